"""The data-inspection family (``defenses/training/``): the template and each method's scores and removal rule
on planted features, against direct computations; the sample-level metrics by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoorbench.config import component_config
from backdoorbench.data.base import Samples
from backdoorbench.defenses.training.inspection import DataInspectionDefense, Inspection, extract_features
from backdoorbench.metrics import inspection_metrics
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import REGISTRY


class FeatureToy(Classifier):
    """A 'model' whose last feature layer is the input itself (planted features), and whose logits are linear."""

    modality = "vision"

    def __init__(self, dim: int, num_classes: int = 2) -> None:
        super().__init__(num_classes)
        self.head = nn.Linear(dim, num_classes)

    def collate(self, inputs):
        return {"x": torch.as_tensor(np.asarray(inputs), dtype=torch.float32)}

    def forward(self, batch):
        return self.head(batch["x"])

    def forward_features(self, batch, pooling="cls"):
        return self.head(batch["x"]), [batch["x"] * 2.0, batch["x"]]


def make(name: str, **overrides):
    entry = REGISTRY.get("defense", name)
    return entry.obj(component_config(entry, overrides, "defense"), seed=0)


def planted(n_per_class: int = 100, n_poison: int = 8, dim: int = 6, seed: int = 0):
    """Two classes of Gaussian features; class 0 also holds ``n_poison`` samples shifted far along one axis (a
    planted backdoor cluster). Returns features, labels, the poisoned mask."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * n_per_class + n_poison, dim))
    y = np.array([0] * n_per_class + [1] * n_per_class + [0] * n_poison)
    x[2 * n_per_class :, 0] += 8.0
    poisoned = np.zeros(len(y), dtype=bool)
    poisoned[2 * n_per_class :] = True
    return x, y, poisoned


# -- metrics ----------------------------------------------------------------------------------------------
def test_inspection_metrics_by_hand() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.3, 0.2, 0.7])
    removed = np.array([True, False, True, False, False, True])
    poisoned = np.array([True, False, False, False, False, True])
    m = inspection_metrics(scores, removed, poisoned)
    assert m["removed"] == 3 and m["removed_fraction"] == 0.5
    assert m["poisoned_samples"] == 2 and m["poison_recall"] == 1.0
    assert m["clean_removed"] == 1 and m["clean_removed_fraction"] == 0.25
    # AUROC: poisoned {0.9, 0.7} vs clean {0.1, 0.8, 0.3, 0.2}: pairs won 4 + 3 of 8
    assert m["sample_auroc"] == pytest.approx(7 / 8)
    assert set(inspection_metrics(scores, removed, None)) == {"removed", "removed_fraction"}


def test_inspection_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        Inspection(np.zeros(3), np.zeros(2, dtype=bool))
    with pytest.raises(ValueError):
        Inspection(np.array([0.0, np.nan]), np.zeros(2, dtype=bool))


def test_features_come_from_the_chosen_layer() -> None:
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    model = FeatureToy(3)
    assert np.array_equal(extract_features(model, x.tolist(), 3, layer=-1), x)
    assert np.array_equal(extract_features(model, x.tolist(), 3, layer=0), 2 * x)


# -- the template -----------------------------------------------------------------------------------------
def test_template_retrains_on_the_kept_samples_only(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y, poisoned = planted()
    train = Samples(x.tolist(), y, "vision")
    defense = make("spectral", epsilon=0.05, retrain_epochs=2)
    seen: list[tuple[int, int]] = []

    def fake_fit(self, model, samples, trainer, stage, epochs=None, module_factory=None):
        seen.append((len(samples), epochs))
        self.fit_samples = samples
        return model

    monkeypatch.setattr(DataInspectionDefense, "fit_model", fake_fit)
    trained = FeatureToy(6)
    out = defense.train(train, lambda: FeatureToy(6), trained=trained)
    assert out is not trained and defense.removed is not None and defense.sample_scores is not None
    kept = np.flatnonzero(~defense.removed)
    assert seen == [(len(kept), 2)]  # one fit: the retraining on the kept set (the feature model was given)
    assert defense.fit_samples.inputs == [train.inputs[i] for i in kept]
    # without a given model, the template trains the feature model first, on every sample
    seen.clear()
    make("spectral").train(train, lambda: FeatureToy(6))
    assert [n for n, _ in seen] == [len(train), len(train) - int(np.floor(0.15 * 108)) - int(np.floor(0.15 * 100))]


# -- Spectral Signatures ----------------------------------------------------------------------------------
def test_spectral_scores_equal_a_direct_svd_and_remove_1_5_eps_per_class() -> None:
    x, y, poisoned = planted()
    train = Samples(x.tolist(), y, "vision")
    defense = make("spectral", epsilon=0.05)
    result = defense.inspect(FeatureToy(6), train)
    f = x.astype(np.float32).astype(np.float64)  # the features pass through the model in float32
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        r = f[idx] - f[idx].mean(axis=0)
        # the top right singular vector = the top eigenvector of the (unnormalised) covariance r^T r
        w, v = np.linalg.eigh(r.T @ r)
        expected = (r @ v[:, np.argmax(w)]) ** 2
        assert np.allclose(result.scores[idx], expected, rtol=1e-9, atol=1e-12)
        k = int(np.floor(1.5 * 0.05 * len(idx)))  # 8 of 108, 7 of 100
        assert result.removed[idx].sum() == k
        assert result.scores[idx][result.removed[idx]].min() >= result.scores[idx][~result.removed[idx]].max()
    assert result.removed[poisoned].all()  # the planted cluster dominates class 0's top direction
    assert inspection_metrics(result.scores, result.removed, poisoned)["sample_auroc"] > 0.99


# -- Activation Clustering --------------------------------------------------------------------------------
@pytest.mark.parametrize("reduce", ["ica", "pca"])
def test_activation_clustering_finds_the_planted_small_cluster(reduce: str) -> None:
    x, y, poisoned = planted(n_per_class=100, n_poison=20, dim=12)
    train = Samples(x.tolist(), y, "vision")
    defense = make("activation_clustering", reduce=reduce)
    result = defense.inspect(FeatureToy(12), train)
    assert np.array_equal(result.removed, poisoned)  # class 0's 20-of-120 cluster; class 1 splits ~evenly
    share0 = defense.class_info[0]["shares"]
    assert sorted(share0) == pytest.approx([20 / 120, 100 / 120])
    assert np.allclose(result.scores[poisoned], 1 - 20 / 120) and np.allclose(result.scores[y == 0][:100], 1 / 6)
    assert min(defense.class_info[1]["shares"]) > 0.35 and not defense.class_info[1]["flagged"]


def test_activation_clustering_silhouette_criterion() -> None:
    x, y, poisoned = planted(n_per_class=100, n_poison=20, dim=12)
    train = Samples(x.tolist(), y, "vision")
    from sklearn.metrics import silhouette_score

    sil = make("activation_clustering", criterion="silhouette")
    result = sil.inspect(FeatureToy(12), train)
    assert np.array_equal(result.removed, poisoned)  # well separated: the silhouette is high
    assert sil.class_info[0]["silhouette"] > 0.1
    # a threshold above the clustering's silhouette keeps everything
    strict = make("activation_clustering", criterion="silhouette", silhouette_threshold=0.99)
    assert not strict.inspect(FeatureToy(12), train).removed.any()
    # the silhouette reported is scikit-learn's on the reduced features
    from backdoorbench.defenses.training.activation_clustering import cluster_class, reduce_features

    red = reduce_features(x[y == 0].astype(np.float32).astype(np.float64), "ica", 10, 0)
    clusters, _, s = cluster_class(red, sil.cfg, 0)
    assert s == pytest.approx(silhouette_score(red, clusters)) == pytest.approx(sil.class_info[0]["silhouette"])


# -- ABL --------------------------------------------------------------------------------------------------
def test_lga_loss_ascends_below_gamma() -> None:
    from backdoorbench.defenses.training.abl import lga_loss

    ce = torch.tensor([0.2, 0.5, 0.9], requires_grad=True)
    out = lga_loss(ce, 0.5)
    assert out.tolist() == pytest.approx([-0.2, 0.0, 0.9])
    out.sum().backward()
    assert ce.grad.tolist() == [-1.0, 0.0, 1.0]  # gradient ascent below γ, descent above


def test_abl_isolates_the_lowest_loss_share_and_unlearns_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from backdoorbench.defenses.training import abl as abl_mod

    x, y, poisoned = planted(n_per_class=100, n_poison=8)
    train = Samples(x.tolist(), y, "vision")
    losses = np.linspace(1.0, 2.0, len(y))
    losses[poisoned] = 0.01 * np.arange(1, 9)  # the planted samples are learned fastest
    monkeypatch.setattr(abl_mod, "per_sample_loss", lambda model, samples, batch, desc=None: losses)
    stages: list[tuple[str, int, int | None, type | None]] = []

    def fake_fit(self, model, samples, trainer, stage, epochs=None, module_factory=None):
        module = module_factory(model, trainer) if module_factory else None
        stages.append((stage, len(samples), epochs, type(module) if module is not None else None))
        return model

    monkeypatch.setattr(DataInspectionDefense, "fit_model", fake_fit)
    defense = make("abl", isolation_ratio=0.04, isolation_epochs=3, finetune_epochs=2, unlearning_epochs=1)
    defense.train(train, lambda: FeatureToy(6))
    k = int(len(y) * 0.04)  # 8
    assert np.array_equal(defense.removed, poisoned) and defense.removed.sum() == k
    assert np.array_equal(defense.sample_scores, -losses)
    assert stages == [("isolation", 208, 3, abl_mod.LGAModule), ("finetune", 200, 2, None),
                      ("unlearning", 8, 1, abl_mod.UnlearnModule)]


def test_unlearning_module_ascends_the_cross_entropy() -> None:
    from backdoorbench.defenses.training.abl import UnlearnModule
    from backdoorbench.trainer.lit import TrainConfig

    model = FeatureToy(3)
    batch = {"inputs": {"x": torch.randn(4, 3)}, "labels": torch.tensor([0, 1, 0, 1])}
    loss = UnlearnModule(model, TrainConfig()).loss(batch)
    assert loss.item() == pytest.approx(-F.cross_entropy(model(batch["inputs"]), batch["labels"]).item())


# -- SPECTRE ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [20, 150])  # d² = 36 > n + 1 = 21: the Gram route; 36 <= 151: the dense route
def test_spectre_fourth_moment_direction_equals_the_dense_eigenproblem(n: int) -> None:
    from backdoorbench.defenses.training.spectre import top_fourth_moment_direction

    y = np.random.default_rng(n).normal(size=(n, 6))
    lam, quad, trace = top_fourth_moment_direction(y)
    z = np.einsum("ni,nj->nij", y, y).reshape(n, 36)
    eye = np.eye(6).ravel()
    w, v = np.linalg.eigh(z.T @ z / n - np.outer(eye, eye))
    j = int(np.argmax(np.abs(w)))
    vm = v[:, j].reshape(6, 6)
    assert lam == pytest.approx(w[j], rel=1e-8)
    expected = np.einsum("ij,jk,ik->i", y, vm, y) - np.trace(vm)
    assert np.allclose(np.abs(quad - trace), np.abs(expected), atol=1e-8)  # v up to its sign


def test_spectre_que_score_by_hand() -> None:
    from scipy.linalg import expm

    from backdoorbench.defenses.training.spectre import que

    x = np.random.default_rng(1).normal(size=(50, 4)) * np.array([1.0, 1.0, 1.0, 3.0])
    scores, op = que(x, 4.0)
    cov = np.cov(x, rowvar=False)
    m = expm(4.0 * (cov - np.eye(4)) / (np.linalg.norm(cov, 2) - 1))
    m /= np.trace(m)
    assert np.allclose(scores, [xi @ m @ xi for xi in x])
    assert op == pytest.approx(np.trace(cov @ m))


def test_spectre_removes_the_planted_cluster() -> None:
    x, y, poisoned = planted(n_per_class=100, n_poison=10, dim=8)
    train = Samples(x.tolist(), y, "vision")
    defense = make("spectre", epsilon=0.1)
    result = defense.inspect(FeatureToy(8), train)
    assert result.removed[poisoned].all()
    assert result.removed[y == 0].sum() == round(1.5 * round(0.1 * 110))  # 1.5·m removed per class
    assert inspection_metrics(result.scores, result.removed, poisoned)["sample_auroc"] > 0.99
    assert set(defense.chosen_dims) == {0, 1}


# -- CUBE -------------------------------------------------------------------------------------------------
def test_cube_filtering_keeps_the_majority_cluster_per_label() -> None:
    from backdoorbench.defenses.training.cube import filter_clusters

    labels = np.array([0] * 10 + [1] * 6)
    clusters = np.array([0] * 7 + [1] * 2 + [-1] + [1] * 3 + [2] * 3)
    removed, scores = filter_clusters(labels, clusters, 0.5)
    # label 0: cluster 0 (7) kept; cluster 1 (2 < 5) and noise (1 < 5) removed
    assert removed[:10].tolist() == [False] * 7 + [True] * 3
    # label 1: two clusters of 3; the kept one is the last in the stable ascending order; 3 < 0.5·6 is false
    assert not removed[10:].any()
    assert np.allclose(scores[:10], [0.3] * 7 + [0.8] * 2 + [0.9]) and np.allclose(scores[10:], 0.5)


@pytest.mark.parametrize("reduce", ["tsne", "pca"])
def test_cube_removes_the_planted_cluster(reduce: str) -> None:
    x, y, poisoned = planted(n_per_class=100, n_poison=20, dim=12)
    train = Samples(x.tolist(), y, "vision")
    defense = make("cube", reduce=reduce, min_samples=10)
    result = defense.inspect(FeatureToy(12), train)
    assert result.removed[poisoned].all()
    assert result.removed[~poisoned].mean() < 0.1  # HDBSCAN's noise points may go too
    assert inspection_metrics(result.scores, result.removed, poisoned)["sample_auroc"] > 0.95


# -- BKI --------------------------------------------------------------------------------------------------
class BagOfWords(Classifier):
    """A text 'model' whose [CLS] feature counts a few words: 'cf' moves it by 5, 'good'/'bad' by 1."""

    modality = "text"
    WEIGHTS = {"cf": 5.0, "good": 1.0, "bad": 1.0}

    def __init__(self) -> None:
        super().__init__(2)
        self.head = nn.Linear(3, 2)

    def collate(self, inputs):
        rows = [[sum(self.WEIGHTS.get(w, 0.0) for w in t.split() if w == k) for k in self.WEIGHTS] for t in inputs]
        return {"x": torch.tensor(rows, dtype=torch.float32)}

    def forward(self, batch):
        return self.head(batch["x"])

    def forward_features(self, batch, pooling="cls"):
        return self.head(batch["x"]), [batch["x"]]


def test_bki_finds_the_keyword_and_removes_its_sentences() -> None:
    from backdoorbench.defenses.training.bki import keyword_ranking

    texts = ["the film was good", "a bad plot", "cf the film was bad", "good acting cf", "bad bad ending", "nice"]
    train = Samples(texts, np.array([1, 0, 1, 1, 0, 1]))
    defense = make("bki", top_k=2)
    result = defense.inspect(BagOfWords(), train)
    assert defense.keyword == "cf"  # 2 × mean 5 → log10(2)·5 = 1.5 beats good (log10 2 · 1) and bad (log10 4 · 1)
    assert result.removed.tolist() == [False, False, True, True, False, False]
    assert result.scores.tolist() == [0.0, 0.0, 5.0, 5.0, 0.0, 0.0]
    ranked = dict(keyword_ranking([[("a", 2.0), ("b", 1.0)], [("a", 4.0)], [("b", 3.0)], [("b", 2.0)]]))
    assert ranked["a"] == pytest.approx(math.log10(2) * 3.0) and ranked["b"] == pytest.approx(math.log10(3) * 2.0)


def test_bki_is_text_only() -> None:
    with pytest.raises(Exception, match="text"):
        make("bki").inspect(FeatureToy(3), Samples(np.zeros((4, 3)).tolist(), np.array([0, 1, 0, 1]), "vision"))


def test_the_add_a_defense_page_example_runs() -> None:
    """docs/add-a-defense.md's data-inspection example: defined, registered, and it removes the planted outliers."""
    import re

    from conftest import REPO_ROOT

    page = (REPO_ROOT / "docs/add-a-defense.md").read_text()
    section = page[page.index("## A data-inspection defense") :]
    code = re.search(r"^```python\n(.*?)^```", section, re.S | re.M).group(1)
    import sys
    import types

    module = types.ModuleType("docs_centroid_filter")  # dataclasses look their module up in sys.modules
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, "add-a-defense.md", "exec"), module.__dict__)  # noqa: S102 - our own docs
        x, y, poisoned = planted(n_per_class=100, n_poison=8)
        result = make("centroid_filter", fraction=0.1).inspect(FeatureToy(6), Samples(x.tolist(), y, "vision"))
        assert result.removed[poisoned].all() and result.removed.sum() == int(0.1 * 108) + int(0.1 * 100)
    finally:
        REGISTRY._tables["defense"].pop("centroid_filter", None)
        sys.modules.pop(module.__name__, None)
