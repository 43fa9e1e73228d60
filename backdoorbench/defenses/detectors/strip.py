"""STRIP — STRong Intentional Perturbation (Gao et al., ACSAC 2019), for images as in the paper and for
text as in STRIP-ViTA (Gao et al., IEEE TDSC 2021) and the STRIP baseline of the RAP / DAN papers
(reference: ``lancopku/RAP``, ``strip_vita.py``). One detector for both modalities: only the
perturbation differs, chosen from the model's modality.

A backdoor trigger dominates the prediction: however much of the rest of a poisoned input is replaced,
the model keeps predicting the target class with confidence. Clean inputs lose their meaning under the
same perturbation, and the predictions on their perturbed copies spread out. So, for each input:

1. predict its label ``ŷ`` (one forward pass);
2. make ``N`` perturbed copies (default 20). In each copy, ``max(1, ⌊replace_ratio · n_words⌋)`` random
   word positions (default ratio 0.7, the reference's) get words of high TF-IDF from the defender's clean
   samples of labels other than ``ŷ``: a random such sample is drawn, its words ranked by TF-IDF
   (scikit-learn's ``TfidfVectorizer``, one per label, fitted at ``fit`` time on the clean samples of the
   other labels), and the top-ranked words fill the positions in order;
3. score = −(mean prediction entropy over the copies): low entropy (trigger still in control) = high score.

Cost: ``1 + N`` forward passes per input (the plain pass gives ``ŷ`` and, in ``score_and_classify``, the
prediction; the ``N`` copies of a batch of inputs go through the model together in batches).

Images (Gao et al. 2019, reference ``garrisongys/STRIP``): each of the ``N`` copies (default 100, the
paper's) superimposes a random clean image of the defender's fitting data on the input, as the reference's
``cv2.addWeighted(x, 1, clean, 1, 0)``: pixel-wise sum saturated at 255 (``superimpose=add``);
``superimpose=average`` blends them half and half instead (rounded up). Cost ``1 + N`` passes per input, in
batches. The superimposition runs on the model's device, in uint8 (the images' dtype, with saturating uint8
arithmetic: the same values as a sum in a wider integer type, clamped); the clean images are copied to that
device once, the entropies stay there, and only the final scores come back to the host.

The perturbation is one method, ``perturb(inputs, preds, rng)``, and its statistics are fitted by
``fit_perturbation(clean)``; both dispatch on the model's modality.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import Detector, DetectorConfig
from backdoorbench.modality.base import Classifier, Inputs
from backdoorbench.progress import progress
from backdoorbench.registry import register_defense

log = logging.getLogger(__name__)


DEFAULT_COPIES = {"text": 20, "vision": 100}  # STRIP-ViTA's text N; the image paper's N
SUPERIMPOSE = ("add", "average")


@dataclass
class STRIPConfig(DetectorConfig):
    name: str = "strip"
    num_copies: int | None = None  # N perturbed copies per input; null = 20 for text, 100 for images
    replace_ratio: float = 0.7  # text: share of an input's words replaced in each copy (reference default)
    superimpose: str = "add"  # images: add (saturating sum, the reference) | average

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_copies is not None and self.num_copies < 1:
            raise ValueError(f"defense.num_copies must be >= 1 or null (modality default), got {self.num_copies}")
        if not 0.0 < self.replace_ratio <= 1.0:
            raise ValueError(f"defense.replace_ratio must be in (0, 1], got {self.replace_ratio}")
        if self.superimpose not in SUPERIMPOSE:
            raise ValueError(f"defense.superimpose must be one of {SUPERIMPOSE}, got {self.superimpose!r}")


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the softmax of each row ``[N, C]`` → ``[N]``, in float64 on the logits' device
    (on the CPU for Apple MPS, which has no float64)."""
    if logits.device.type == "mps":
        logits = logits.cpu()
    logp = torch.log_softmax(logits.double(), dim=1)
    return -(logp.exp() * logp).sum(1)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: asynchronous towards an accelerator, synchronous towards the CPU."""
    return t.to(device, non_blocking=torch.device(device).type != "cpu")


def superimpose_uint8(base: torch.Tensor, other: torch.Tensor, how: str = "add") -> torch.Tensor:
    """Two uint8 image batches combined pixel-wise without leaving uint8: ``add`` = ``min(a + b, 255)``
    (computed as ``a + min(b, 255 − a)``), ``average`` = ``⌈(a + b) / 2⌉`` (computed as
    ``(a >> 1) + (b >> 1) + ((a | b) & 1)``); both equal the same operations in a wider integer type."""
    if how == "add":
        return base + torch.minimum(other, 255 - base)
    return (base >> 1) + (other >> 1) + ((base | other) & 1)


def words_of(text: str) -> list[str]:
    return text.split()


def _is_word(token: str) -> bool:
    """Tokens that may enter the TF-IDF vocabulary (the reference drops punctuation symbols)."""
    return any(ch.isalnum() for ch in token)


@register_defense(
    "strip",
    modality=("text", "vision"),
    needs="defender's clean data (text: with labels, for TF-IDF replacement pools per label)",
    description="entropy of predictions over N perturbed copies (words replaced / clean images superimposed)",
    config=STRIPConfig,
)
class STRIP(Detector):
    """Perturbation-entropy detector (Gao et al. 2019/2021); higher score = lower entropy = suspicious."""

    def __init__(self, cfg: STRIPConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        #: text: per predicted label, the TF-IDF-ranked word lists of the clean samples of the other labels
        self.pools: dict[int, list[list[str]]] = {}
        #: images: the clean images superimposed on inputs (uint8 [M, C, H, W]), and their copy per device
        self.backgrounds: torch.Tensor | None = None
        self._placed: dict[torch.device, torch.Tensor] = {}
        self.modality = ""

    @property
    def num_copies(self) -> int:
        if self.cfg.num_copies is not None:
            return int(self.cfg.num_copies)
        return DEFAULT_COPIES.get(self.modality, 20)

    # -- the perturbation: words replaced (text) or clean images superimposed (vision) -----------
    def fit_perturbation(self, model: Classifier, clean: Samples) -> None:
        self.modality = model.modality
        if model.modality == "vision":
            clean = clean.loaded()  # the defender's clean images (few): in memory
            if not isinstance(clean.inputs, torch.Tensor) or clean.inputs.dtype != torch.uint8:
                raise ConfigError("STRIP on images needs the defender's clean images as uint8 [N, C, H, W]")
            self.backgrounds, self._placed = clean.inputs, {}
            return
        self.fit_word_pools(model, clean)

    def perturb(
        self, inputs: Inputs, preds: np.ndarray | torch.Tensor, rng: np.random.Generator
    ) -> Any:
        """``N`` perturbed copies of each input, grouped by input: copies ``[i*N, (i+1)*N)`` belong to input i.
        Images: on the images' device (``preds`` unused); text: ``preds`` choose the replacement pools."""
        if self.modality == "vision":
            return self.superimpose(inputs, rng)  # type: ignore[arg-type]
        if isinstance(preds, torch.Tensor):
            preds = preds.cpu().numpy()
        return self.replace_words(cast("Sequence[str]", inputs), preds, rng)  # text: a list of strings

    def superimpose(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Each image plus ``N`` random clean images: saturating sum (``add``) or the average, in uint8 on the
        images' device."""
        if self.backgrounds is None:
            raise RuntimeError("call fit() first")
        if images.dtype != torch.uint8:
            raise ConfigError(f"STRIP superimposes uint8 images [N, C, H, W], got {images.dtype}")
        n, device = self.num_copies, images.device
        if device not in self._placed:
            self._placed[device] = to_device(self.backgrounds, device)
        backgrounds = self._placed[device]
        idx = torch.from_numpy(rng.integers(len(backgrounds), size=len(images) * n)).to(device, non_blocking=True)
        return superimpose_uint8(images.repeat_interleave(n, dim=0), backgrounds[idx], self.cfg.superimpose)

    def fit_word_pools(self, model: Classifier, clean: Samples) -> None:
        """Per label ``c``: fit a TF-IDF on the clean samples whose label is not ``c`` and keep, for each of
        them, its words ranked by TF-IDF (highest first)."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        labels = np.asarray(clean.labels)
        texts = list(clean.inputs)
        self.pools = {}
        for c in range(model.num_classes):
            others = [t for t, y in zip(texts, labels) if y != c and any(_is_word(w) for w in words_of(t))]
            if not others:
                raise ConfigError(
                    f"STRIP needs clean samples of a label other than {c} to build its replacement pool; "
                    f"the defender's clean data has labels {sorted(set(labels.tolist()))} only"
                )
            # TF = raw counts, IDF = ln(N / df) + 1 over the other-label samples, as in the reference
            vec = TfidfVectorizer(
                tokenizer=lambda t: [w for w in words_of(t) if _is_word(w)],
                token_pattern=None,
                lowercase=False,
                smooth_idf=False,
                norm=None,
            )
            tfidf = vec.fit_transform(others).tocsr()
            vocab = vec.get_feature_names_out()
            ranked = []
            for row in range(tfidf.shape[0]):
                lo, hi = tfidf.indptr[row], tfidf.indptr[row + 1]
                cols, vals = tfidf.indices[lo:hi], tfidf.data[lo:hi]
                order = np.lexsort((cols, -vals))  # highest TF-IDF first; ties by vocabulary order
                ranked.append([str(vocab[j]) for j in cols[order]])
            self.pools[c] = ranked

    def replace_words(self, inputs: Sequence[Any], preds: np.ndarray, rng: np.random.Generator) -> list[Any]:
        """``N`` word-replaced copies of each text, grouped by input.

        In each copy, ``max(1, ⌊replace_ratio · n⌋)`` distinct random word positions are replaced by the
        top TF-IDF words of a random clean sample of another label than ``preds[i]`` (more such samples are
        drawn when one has too few words). The number of words does not change.
        """
        if not self.pools:
            raise RuntimeError("call fit() first")
        n_copies, ratio = self.num_copies, self.cfg.replace_ratio
        out: list[Any] = []
        for text, pred in zip(inputs, preds):
            words = words_of(text)
            pool = self.pools[int(pred)]
            n = len(words)
            k = min(n, max(1, int(n * ratio)))
            for _ in range(n_copies):
                if n == 0:
                    out.append(text)
                    continue
                positions = rng.choice(n, size=k, replace=False)
                replacement: list[str] = []
                while len(replacement) < k:
                    replacement.extend(pool[int(rng.integers(len(pool)))])
                copy = list(words)
                for pos, word in zip(positions, replacement):
                    copy[int(pos)] = word
                out.append(" ".join(copy))
        return out

    # -- detector ------------------------------------------------------------------------------
    def fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.modality == "vision":
            if self.backgrounds is None:
                raise RuntimeError("call fit() first")
            return {"backgrounds": self.backgrounds}, {"modality": self.modality}
        if not self.pools:
            raise RuntimeError("call fit() first")
        # JSON object keys are strings; the ranked word lists keep their order
        return {}, {"modality": self.modality, "pools": {str(c): pool for c, pool in self.pools.items()}}

    def load_fitted_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.modality = str(meta["modality"])
        if self.modality == "vision":
            self.backgrounds, self._placed = tensors["backgrounds"], {}
        else:
            self.pools = {int(c): [list(map(str, words)) for words in pool] for c, pool in meta["pools"].items()}

    def _fit(self, model: Classifier, clean: Samples) -> None:
        self.fit_perturbation(model, clean)

    @torch.no_grad()
    def _score_and_logits(
        self, inputs: Inputs, desc: str | None = None
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Scores ``[N]`` and the plain logits ``[N, C]``: ``1 + num_copies`` passes per input."""
        assert self.model is not None
        model = self.model
        model.eval()
        bs, n_copies = self.cfg.batch_size, self.num_copies
        rng = self.rng(3)  # same inputs in the same order → same copies → same scores
        scores, plain = [], []
        starts = range(0, len(inputs), bs)
        for start in progress(starts, desc=desc, total=len(starts)):
            chunk = inputs[start : start + bs]
            if isinstance(chunk, torch.Tensor):  # images: uint8 to the model's device, superimposed there
                chunk = to_device(chunk, model.device)
            logits = torch.cat([model(b).float() for b in model.iter_batches(chunk, bs)])
            preds = logits.argmax(1)  # images do not need them on the host; word pools (and subclasses) do
            copies = self.perturb(chunk, preds if self.modality == "vision" else preds.cpu().numpy(), rng)
            ent = torch.cat([prediction_entropy(model(b).float()) for b in model.iter_batches(copies, bs)])
            scores.append(-ent.view(len(chunk), n_copies).mean(1))
            plain.append(logits)
        if not plain:
            return np.zeros(0), torch.empty(0, model.num_classes)
        return torch.cat(scores).cpu().numpy(), torch.cat(plain).cpu()

    def score(self, inputs: Inputs) -> np.ndarray:
        return self._score_and_logits(inputs)[0]

    def score_and_classify(self, inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
        scores, logits = self._score_and_logits(inputs, desc="STRIP: scoring")
        return scores, logits.argmax(1).numpy()
