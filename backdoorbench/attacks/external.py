"""External victims: defend a model that backdoorbench did not attack (``attack=external``).

``run`` trains nothing: the victim comes from ``attack.path`` -- a safetensors state dict, a torch / timm
checkpoint, a BackdoorBench ``attack_result.pt`` (see :mod:`backdoorbench.models.checkpoints`) loaded into the
``model=`` architecture, or (text) an HF model folder / hub name loaded with its own tokenizer. ``data=`` says
what the model classifies. Such a model is never stored in the artifact cache (``cacheable = False``).

A known trigger is optional. With one (text: ``trigger_words`` or ``trigger_sentence``; vision:
``trigger_image`` as a patch with ``trigger_mask``, or blended with ``blend_alpha``; and ``target``), BA and
ASR are measured as for the built-in attacks, with the same random stream (so a cached victim's own files
reproduce that run). Without one, a BackdoorBench record's own poisoned test set (``bd_test``, read by
:mod:`backdoorbench.data.backdoorbench_record`) gives the triggered inputs and their backdoor labels, as
BackdoorBench measures ASR; ``results.json`` says which was used (``run.triggered_test``). Without either,
the test set contains no triggered inputs: detectors report their scores, calibrated threshold and the
rejection rate on the clean inputs; repairs report BA.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from backdoorbench.attacks.base import Attack, AttackContext, AttackResult
from backdoorbench.attacks.text.addsent import insert_sentence
from backdoorbench.attacks.text.triggers import insert_rare_words
from backdoorbench.attacks.vision.blended import blend, image_pattern
from backdoorbench.attacks.vision.common import check_images, round_to_uint8
from backdoorbench.config import ConfigError
from backdoorbench.data.backdoorbench_record import RecordTest, read_bd_test
from backdoorbench.data.base import Samples
from backdoorbench.errors import DataError
from backdoorbench.modality.base import Classifier
from backdoorbench.models import checkpoints as ckpt
from backdoorbench.registry import register_attack
from backdoorbench.store import file_digest

if TYPE_CHECKING:
    from backdoorbench.modality.vision import VisionClassifier

log = logging.getLogger(__name__)

POSITIONS = ("random", "start", "end")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass
class ExternalConfig:
    """Parameters of ``attack=external`` (see configs/attack/external.yaml)."""

    name: str = "external"
    path: str = ""  # weights file, folder, or (text) HF model name
    target: int | None = None  # the backdoor's target label, with a known trigger
    # text trigger: rare words (BadNet-RW style) or a sentence (AddSent style)
    trigger_words: list[str] | None = None
    trigger_insertions: int = 1  # words inserted per input (each drawn from trigger_words)
    trigger_sentence: str | None = None
    trigger_position: str = "random"  # random | start | end
    # vision trigger: a full-size image stamped through a mask (patch) or blended in with blend_alpha
    trigger_image: str | None = None
    trigger_mask: str | None = None  # grey image: white = trigger pixel; null = the image's non-black pixels
    blend_alpha: float | None = None

    def __post_init__(self) -> None:
        self.path = str(Path(self.path).expanduser()) if self.path else ""  # "" = not given yet: check() refuses
        if self.path and not Path(self.path).exists() and not looks_like_hub_name(self.path):
            raise ValueError(f"attack.path: no such file or folder {self.path!r}")
        text = self.trigger_words is not None or self.trigger_sentence is not None
        vision = self.trigger_image is not None
        if self.trigger_words is not None and self.trigger_sentence is not None:
            raise ValueError("attack.trigger_words and attack.trigger_sentence exclude each other: give one")
        if text and vision:
            raise ValueError("attack: give a text trigger (trigger_words / trigger_sentence) or an image trigger")
        if self.trigger_words is not None and (
            not self.trigger_words or any(not isinstance(w, str) or not w.strip() for w in self.trigger_words)
        ):
            raise ValueError(f"attack.trigger_words must be a non-empty list of words, got {self.trigger_words}")
        if self.trigger_sentence is not None and not self.trigger_sentence.split():
            raise ValueError("attack.trigger_sentence must be a non-empty sentence")
        if self.trigger_insertions < 1:
            raise ValueError(f"attack.trigger_insertions must be >= 1, got {self.trigger_insertions}")
        if self.trigger_position not in POSITIONS:
            raise ValueError(f"attack.trigger_position must be one of {POSITIONS}, got {self.trigger_position!r}")
        for key in ("trigger_image", "trigger_mask"):
            v = getattr(self, key)
            if v is not None and not Path(v).expanduser().is_file():
                raise ValueError(f"attack.{key}: no such file {v!r}")
        if not vision and (self.trigger_mask is not None or self.blend_alpha is not None):
            raise ValueError("attack.trigger_mask and attack.blend_alpha need attack.trigger_image")
        if self.blend_alpha is not None and not 0.0 < self.blend_alpha <= 1.0:
            raise ValueError(f"attack.blend_alpha must be in (0, 1], got {self.blend_alpha}")
        if (text or vision) and self.target is None:
            raise ValueError("attack.target is required with a trigger: the label the backdoor produces")
        if self.target is not None and (isinstance(self.target, bool) or self.target < 0):
            raise ValueError(f"attack.target must be a label >= 0, got {self.target!r}")


def looks_like_hub_name(path: str) -> bool:
    """``name`` or ``owner/name`` without a weights-file suffix: an HF hub model name (text)."""
    return bool(_HUB_NAME.fullmatch(path)) and not path.lower().endswith(ckpt.WEIGHT_SUFFIXES)


@register_attack(
    "external",
    modality=("text", "vision"),
    category="external victim",
    needs="the victim's weights (attack.path); optionally its trigger and target",
    description="your own model from a file, folder or HF name (safetensors, torch/timm, BackdoorBench)",
    config=ExternalConfig,
)
class ExternalVictim(Attack):
    """A victim loaded from ``attack.path``, with an optional known trigger."""

    version = "1"
    cacheable = False
    trains = False

    def __init__(self, cfg: ExternalConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self._trigger: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._record: RecordTest | None = None  # a BackdoorBench record's bd_test, when used for ASR
        self._label_map: np.ndarray | None = None  # its true label -> backdoor label (-1: not poisoned)

    # -- trigger ----------------------------------------------------------------------------------
    @property
    def given_trigger(self) -> bool:
        """The user gave the trigger (attack.trigger_words / _sentence / _image)."""
        c = self.cfg
        return c.trigger_words is not None or c.trigger_sentence is not None or c.trigger_image is not None

    @property
    def has_trigger(self) -> bool:
        return self.given_trigger or self._record is not None

    @property
    def triggered_source(self) -> str | None:
        if self.given_trigger:
            return "trigger"
        return "record" if self._record is not None else None

    @property
    def target(self) -> int | None:  # type: ignore[override]
        if self._label_map is not None:  # the record's all-to-one target (None: all-to-all)
            targets = set(self._label_map[self._label_map >= 0].tolist())
            return targets.pop() if len(targets) == 1 else None
        return None if self.cfg.target is None else int(self.cfg.target)

    def check(self, num_classes: int) -> None:
        if not self.cfg.path:
            raise ConfigError(f"attack.path is required with attack=external: {ckpt.SUPPORTED}")
        if self.target is not None:
            super().check(num_classes)

    def target_labels(self, true_labels: np.ndarray) -> np.ndarray:
        if self._label_map is not None:  # the record's label transform (all-to-one or all-to-all)
            return self._label_map[np.asarray(true_labels, dtype=np.int64)]
        if self.target is None:  # no known backdoor: no input has a target
            return np.full(len(true_labels), -1, dtype=np.int64)
        return super().target_labels(true_labels)

    def triggered_test(self, test: Samples) -> tuple[Samples, np.ndarray]:
        """With a given trigger: the non-target test inputs, triggered. Else a record's ``bd_test`` (indices:
        in the record's test set), all of it or, when the run's test set is smaller (``data.max_test``), a
        seeded random subset of that size."""
        if self._record is not None and not self.given_trigger:
            rec, n = self._record, len(self._record.samples)
            idx = np.arange(n) if n <= len(test) else np.sort(self.rng(7919).choice(n, len(test), replace=False))
            return rec.samples.subset(idx), rec.index[idx]
        if not self.has_trigger:
            return test.subset(np.zeros(0, dtype=np.int64)), np.zeros(0, dtype=np.int64)
        is_image = self.cfg.trigger_image is not None
        if is_image != (test.modality == "vision"):
            kind = "an image trigger (trigger_image)" if is_image else "a text trigger (trigger_words/_sentence)"
            raise ConfigError(f"attack: {kind} does not apply to {test.modality} data (data=)")
        return super().triggered_test(test)

    def apply_trigger(self, inputs: list[str] | torch.Tensor, rng: np.random.Generator) -> list[str] | torch.Tensor:
        c = self.cfg
        if isinstance(inputs, torch.Tensor):
            return self._apply_image(inputs)
        if c.trigger_words is not None:
            if c.trigger_position == "random":
                return insert_rare_words(inputs, c.trigger_words, c.trigger_insertions, rng)
            out = []
            for text in inputs:
                words = [c.trigger_words[int(i)] for i in rng.integers(0, len(c.trigger_words), c.trigger_insertions)]
                out.append(_place(text, words, c.trigger_position))
            return out
        if c.trigger_sentence is not None:
            if c.trigger_position == "random":
                return insert_sentence(inputs, c.trigger_sentence, rng)
            return [_place(t, c.trigger_sentence.split(), c.trigger_position) for t in inputs]
        raise ConfigError("attack=external has no trigger (attack.trigger_words, trigger_sentence or trigger_image)")

    def _apply_image(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        if self.cfg.trigger_image is None:
            raise ConfigError("attack=external has no image trigger (attack.trigger_image)")
        _, ch, h, w = images.shape
        pattern, mask = self._load_trigger(ch, h, w)
        if self.cfg.blend_alpha is not None and mask is None:  # x' = (1 − α)·x + α·t, as attack=blended
            return blend(images, pattern, self.cfg.blend_alpha)
        alpha = 1.0 if self.cfg.blend_alpha is None else self.cfg.blend_alpha
        assert mask is not None
        if alpha == 1.0 and bool(((mask == 0) | (mask == 1)).all()):  # a binary patch: exact, as attack=badnets
            return torch.where(mask.bool()[None], pattern[None], images)
        a = alpha * mask.double()[None]  # x' = (1 − α·m)·x + α·m·t
        return round_to_uint8((1.0 - a) * images.double() + a * pattern.double()[None])

    def _load_trigger(self, ch: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (ch, h, w)
        if key not in self._trigger:
            c = self.cfg
            blended = c.blend_alpha is not None and c.trigger_mask is None
            if not blended:  # a patch is placed pixel for pixel: its image must have the data's size
                for p in (c.trigger_image, c.trigger_mask):
                    if p is not None and _image_size(p) != (h, w):
                        raise ConfigError(
                            f"attack: {p} is {_image_size(p)[0]}x{_image_size(p)[1]} but the images are {h}x{w}: "
                            "a patch trigger and its mask are full-size images (black where there is no trigger)"
                        )
            pattern = image_pattern(str(Path(c.trigger_image).expanduser()), ch, h, w)
            if blended:
                mask = None
            elif c.trigger_mask is not None:
                mask = image_pattern(str(Path(c.trigger_mask).expanduser()), 1, h, w)[0].double() / 255.0
            else:  # BackdoorBench's convention: the trigger is where the image is not black
                mask = (pattern > 0).any(dim=0).double()
            self._trigger[key] = (pattern, mask)
        return self._trigger[key]

    # -- the victim ---------------------------------------------------------------------------------
    def run(self, ctx: AttackContext) -> AttackResult:
        path = Path(self.cfg.path)
        self._record = self._label_map = None
        info: dict[str, Any] = {"path": self.cfg.path, "trigger": self.given_trigger}
        if _is_hf(path, ctx):
            model = self._load_hf(ctx)
            info["format"] = "hf"
        else:
            checkpoint = ckpt.read_checkpoint(path)
            info.update(format=checkpoint.format, file=str(checkpoint.path), sha256=file_digest(checkpoint.path))
            if checkpoint.format == "backdoorbench":
                model = self._backdoorbench_model(checkpoint, ctx)
                info["backdoorbench"] = checkpoint.meta
            else:
                model = ctx.new_model()
            self._load_weights(model, checkpoint, ctx)
            if checkpoint.format == "backdoorbench":  # once the weights fit: its poisoned test set
                info["bd_test"] = self._use_record_test(checkpoint, model, ctx.num_classes)
        model.eval()
        log.info("external victim loaded from %s (%s)", self.cfg.path, info["format"])
        return AttackResult(model, None, info)

    def _load_hf(self, ctx: AttackContext) -> Classifier:
        from backdoorbench.models.text import load_hf_classifier

        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.cfg.path)
        except Exception as exc:
            raise ConfigError(f"attack.path: could not read the HF model {self.cfg.path!r} ({_first(exc)})") from None
        if not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
            raise ConfigError(
                f"attack.path: {self.cfg.path!r} is a {config.architectures or 'bare'} model, not a sequence "
                "classifier: there is no trained classification head to defend"
            )
        if config.num_labels != ctx.num_classes:
            raise ConfigError(
                f"attack.path: the model has {config.num_labels} classes but the dataset (data=) has {ctx.num_classes}"
            )
        max_length = int(getattr(ctx.model_cfg, "max_length", 128) or 128)
        try:
            model = load_hf_classifier(self.cfg.path, ctx.num_classes, max_length)
        except Exception as exc:
            raise ConfigError(f"attack.path: could not load the HF model {self.cfg.path!r} ({_first(exc)})") from None
        return model

    def _backdoorbench_model(self, checkpoint: ckpt.Checkpoint, ctx: AttackContext) -> Classifier:
        """``model=`` rebuilt with BackdoorBench's normalisation for the file's dataset."""
        from backdoorbench.modality.vision import VisionClassifier

        meta = checkpoint.meta
        name, model_name = str(meta.get("model_name")), getattr(ctx.model_cfg, "name", None)
        ours = ckpt.BACKDOORBENCH_MODELS.get(name.lower())
        if ours is None:
            raise ConfigError(
                f"attack.path: BackdoorBench model {name!r} has no backdoorbench counterpart; supported: "
                f"{', '.join(ckpt.BACKDOORBENCH_MODELS)}"
            )
        if model_name != ours:
            raise ConfigError(
                f"attack.path: a BackdoorBench {name} checkpoint needs model={ours} (got model={model_name})"
            )
        if int(meta["num_classes"]) != ctx.num_classes:
            raise ConfigError(
                f"attack.path: the BackdoorBench model has {meta['num_classes']} classes but the dataset (data=) "
                f"has {ctx.num_classes}"
            )
        model = ctx.new_model()
        assert isinstance(model, VisionClassifier)
        size = meta.get("img_size")
        if size and len(size) >= 2 and tuple(int(v) for v in size[:2]) != (model.image.height, model.image.width):
            raise ConfigError(
                f"attack.path: the BackdoorBench model was trained on {size[0]}x{size[1]} images but the dataset "
                f"(data=) has {model.image.height}x{model.image.width}"
            )
        norm = ckpt.BACKDOORBENCH_NORMALIZATION.get(str(meta.get("clean_data", "")).lower())
        if norm is None:
            log.warning("BackdoorBench dataset %r unknown: using the data's normalisation", meta.get("clean_data"))
            return model
        mean, std = norm
        if len(mean) != model.image.channels:
            raise ConfigError(
                f"attack.path: BackdoorBench {meta.get('clean_data')} images have {len(mean)} channel(s), "
                f"the dataset (data=) has {model.image.channels}"
            )
        image = replace(model.image, mean=mean, std=std)
        return VisionClassifier(
            model.net, model.num_classes, image, model.stage_names, model.use_augment, model.crop_padding
        )

    def _use_record_test(self, checkpoint: ckpt.Checkpoint, model: Classifier, num_classes: int) -> str:
        """Read the record's ``bd_test`` for ASR unless a trigger was given; what happened, for ``info``."""
        if checkpoint.bd_test is None:
            return "absent"
        if self.given_trigger:
            return "not used: attack.trigger_* was given"
        image = cast("VisionClassifier", model).image  # a vision model (an image record)
        try:
            shape = (image.channels, image.height, image.width)
            rec = read_bd_test(checkpoint.bd_test, checkpoint.path.parent, shape, num_classes)
            mapping = rec.label_map(num_classes)
        except DataError as exc:
            log.warning("the record's bd_test is not used, ASR is not measured: %s", exc)
            return f"not used: {exc}"
        self._record, self._label_map = rec, mapping
        log.info("ASR on the record's bd_test: %d poisoned test images (%s)", len(rec.samples), rec.form)
        return f"used: {len(rec.samples)} images, {rec.form}"

    def _load_weights(self, model: Classifier, checkpoint: ckpt.Checkpoint, ctx: AttackContext) -> None:
        sd = ckpt.align_keys(checkpoint.state_dict, model.state_dict())
        mismatch = ckpt.compare(model, sd)
        if mismatch:
            n = ckpt.class_count_mismatch(mismatch, ctx.num_classes)
            if n is not None:
                raise ConfigError(
                    f"attack.path: the weights have {n} classes but the dataset (data=) has {ctx.num_classes}"
                )
            current = getattr(ctx.model_cfg, "name", "?")
            raise ConfigError(
                f"attack.path: the weights in {checkpoint.path} do not fit model={current} ({mismatch.describe()}). "
                + ckpt.suggest_model(checkpoint, getattr(model, "image", None), current, ctx.num_classes)
            )
        ckpt.load_into(model, sd)


def _is_hf(path: Path, ctx: AttackContext) -> bool:
    """Text victims only: an HF model folder (``config.json``, loaded with its tokenizer) or a hub name."""
    if ctx.train.modality != "text":
        return False
    if path.is_dir():
        return (path / "config.json").is_file()
    return not path.exists() and looks_like_hub_name(str(path))


def _place(text: str, words: list[str], position: str) -> str:
    tokens = text.split()
    return " ".join(words + tokens if position == "start" else tokens + words)


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(Path(path).expanduser()) as img:
        return img.height, img.width


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
