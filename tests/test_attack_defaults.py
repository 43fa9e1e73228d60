"""The data/model/trainer defaults follow the attack's registered modality (configs/config.yaml's
``attack_modality: ${attack}``, the nodes ``composition.register_plugin_configs`` generates, configs/modality/):
no attack YAML selects them, a vision attack gets the vision ones with a YAML or without, each job of a mixed
sweep its own, and the command line and the experiment presets still win."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from backdoorbench import api, cli, composition
from backdoorbench.attacks.vision.badnets import BadNets, BadNetsConfig
from backdoorbench.engine import pipeline
from backdoorbench.registry import REGISTRY, UnknownNameError

CONFIG_DIR = cli.config_dir()
GROUPS = ("data", "model", "trainer")


def _modality(name: str) -> dict[str, str]:
    """The data/model/trainer options configs/modality/<name>.yaml selects."""
    node = OmegaConf.load(CONFIG_DIR / "modality" / f"{name}.yaml")
    return {k.lstrip("/"): v for d in node.defaults for k, v in d.items()}


def _options(overrides: list[str]) -> dict[str, str]:
    """The options data/model/trainer resolve to (each group's ``name``; trainer: its optimizer, which tells
    trainer=vision (sgd) from trainer=default (adamw))."""
    cfg = api.compose(overrides)
    return {"data": cfg.data.name, "model": cfg.model.name, "trainer": cfg.trainer.optimizer}


def _groups(overrides: list[str]) -> dict[str, object]:
    cfg = api.compose(overrides)
    return {g: OmegaConf.to_container(cfg[g]) for g in GROUPS}


VISION = {"data": "mnist5k", "model": "wrn16_1", "trainer": "sgd"}
TEXT = {"data": "rotten_tomatoes", "model": "minilm", "trainer": "adamw"}


def test_the_modality_files_hold_the_documented_defaults() -> None:
    assert _modality("vision") == {"data": "mnist5k", "model": "wrn16_1", "trainer": "vision"}
    assert _modality("text") == {"data": "rotten_tomatoes", "model": "minilm", "trainer": "default"}
    assert _groups(["attack=badnets"]) == _groups([f"{g}={o}" for g, o in _modality("vision").items()])


def test_no_attack_yaml_selects_data_model_or_trainer() -> None:
    for path in sorted((CONFIG_DIR / "attack").glob("*.yaml")):
        assert "defaults" not in OmegaConf.load(path), path.name


def test_every_attack_gets_the_defaults_of_its_registered_modality() -> None:
    vision = [e.name for e in REGISTRY.entries("attack") if e.modality == ("vision",)]
    assert {"badnets", "blended", "sig", "wanet", "trojan", "label_consistent"} <= set(vision)
    for entry in REGISTRY.entries("attack"):
        assert _options([f"attack={entry.name}"]) == (VISION if entry.name in vision else TEXT), entry.name
    assert REGISTRY.get("attack", "external").modality == ("text", "vision")  # both: the text defaults (above)


def test_the_command_line_wins() -> None:
    assert _options(["attack=badnets", "data=cifar10"]) == {**VISION, "data": "cifar10"}
    assert _options(["attack=wanet", "model=resnet18", "trainer=default"]) == {**VISION, "model": "resnet18",
                                                                              "trainer": "adamw"}
    assert _options(["attack=ripples", "trainer=vision"]) == {**TEXT, "trainer": "sgd"}
    assert _options(["attack=badnets", "model=bert-base-uncased"])["model"] == "bert-base-uncased"  # HF rewrite
    assert _options(["attack=external", "modality=vision"]) == VISION  # a whole modality's defaults by name


def test_an_experiment_preset_wins() -> None:
    # nad_cifar10 overrides data/model/trainer (cifar10, wrn16_1, vision); cpu_dan_text the text ones
    assert _options(["+experiment=nad_cifar10"]) == {**VISION, "data": "cifar10"}
    assert _options(["+experiment=nad_cifar10", "attack=ripples"]) == {**VISION, "data": "cifar10"}
    assert _options(["+experiment=cpu_dan_text", "attack=badnets"]) == TEXT
    assert _options(["+experiment=rnp_cifar10", "model=wrn16_2"])["model"] == "wrn16_2"  # the command line, still
    # zoo_vision overrides only the defense: the attack's modality decides
    assert _options(["+experiment=zoo_vision", "attack=blended"]) == VISION
    assert _options(["+experiment=zoo_text", "attack=addsent"]) == TEXT


def test_each_job_of_a_mixed_sweep_gets_its_own_modality(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs: dict[str, tuple[str, str, str]] = {}

    def record(cfg, failures) -> None:  # noqa: ANN001 - cli._run_job's signature
        jobs[f"{cfg.attack.name}/{cfg.data.name}"] = (cfg.data.name, cfg.model.name, cfg.trainer.optimizer)

    monkeypatch.setattr(cli, "_run_job", record)
    try:
        rc = cli.main(["run", "--multirun", "attack=badnets,ripples", "data=mnist5k,cifar10,rotten_tomatoes",
                       "defense=none", f"hydra.sweep.dir={tmp_path}"])
        assert rc == 0
        assert cli.main(["run", "--multirun", "attack=wanet,external", "defense=none",
                         f"hydra.sweep.dir={tmp_path / 'b'}"]) == 0
    finally:
        GlobalHydra.instance().clear()
    assert jobs["wanet/mnist5k"] == tuple(VISION.values()) and jobs["external/rotten_tomatoes"] == tuple(TEXT.values())
    for data in ("mnist5k", "cifar10", "rotten_tomatoes"):  # data= given: each job keeps its attack's model/trainer
        assert jobs[f"badnets/{data}"] == (data, "wrn16_1", "sgd")
        assert jobs[f"ripples/{data}"] == (data, "minilm", "adamw")


@dataclass
class _NewVisionConfig(BadNetsConfig):
    name: str = "test_new_vision_attack_q5"


@pytest.fixture
def new_vision_attack() -> Iterator[str]:
    name = _NewVisionConfig.name

    class NewVisionAttack(BadNets):
        """A throwaway vision attack."""

    REGISTRY.register("attack", name, modality="vision", category="data", config=_NewVisionConfig)(NewVisionAttack)
    yield name
    REGISTRY._tables["attack"].pop(name, None)
    for group in ("attack", composition.MODALITY_GROUP):
        ConfigStore.instance().repo.get(group, {}).pop(f"{name}.yaml", None)


def test_a_vision_attack_without_a_yaml_gets_the_vision_defaults(new_vision_attack: str) -> None:
    assert not (CONFIG_DIR / "attack" / f"{new_vision_attack}.yaml").exists()
    assert _groups([f"attack={new_vision_attack}"]) == _groups(["attack=badnets"])
    cfg = api.compose([f"attack={new_vision_attack}", "attack.size=4"])
    assert "defaults" not in cfg.attack and cfg.attack.size == 4
    spec = pipeline.validate(cfg)  # accepted: vision data for a vision attack
    assert spec.attack.name == new_vision_attack and spec.dataset.name == "mnist5k"
    assert spec.modality == "vision" and spec.attack_cfg.size == 4
    assert _options([f"attack={new_vision_attack}", "model=resnet18"])["model"] == "resnet18"


def test_a_vision_attack_yaml_needs_no_overrides(new_vision_attack: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's config folder with a YAML for the new attack (its fields only, as docs/add-an-attack.md shows):
    the YAML is used instead of the generated node, and the vision defaults come from the registry; a YAML that the
    registry does not know gets the text defaults, and validation refuses it."""
    cdir = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, cdir)
    (cdir / "attack" / f"{new_vision_attack}.yaml").write_text(f"name: {new_vision_attack}\ntarget: 3\nsize: 5\n")
    (cdir / "attack" / "unregistered_q5.yaml").write_text("name: unregistered_q5\ntarget: 0\n")
    monkeypatch.setenv("BACKDOORBENCH_CONFIG_DIR", str(cdir))
    try:
        cfg = api.compose([f"attack={new_vision_attack}"])
        assert OmegaConf.to_container(cfg.attack) == {"name": new_vision_attack, "target": 3, "size": 5}
        assert _options([f"attack={new_vision_attack}"]) == VISION
        assert _options([f"attack={new_vision_attack}", "data=cifar10"])["data"] == "cifar10"
        assert _options(["attack=unregistered_q5"]) == TEXT
        with pytest.raises(UnknownNameError, match="unknown attack 'unregistered_q5'"):
            pipeline.validate(api.compose(["attack=unregistered_q5"]))
    finally:
        ConfigStore.instance().repo.get(composition.MODALITY_GROUP, {}).pop("unregistered_q5.yaml", None)


def test_the_yaml_of_the_add_an_attack_page_gets_the_vision_defaults(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/add-an-attack.md's ``border`` attack (its module block) with the page's optional YAML, which has no
    defaults list, in a config folder of one's own: the YAML's values, the vision defaults, validation passes."""
    import importlib
    import re
    import sys

    page = (Path(__file__).resolve().parents[1] / "docs" / "add-an-attack.md").read_text()
    [module] = re.findall(r"<!-- file: border_attack\.py -->\n```python\n(.*?)^```", page, re.S | re.M)
    [yaml_text] = re.findall(r"```yaml\n(# configs/attack/border\.yaml\n.*?)^```", page, re.S | re.M)
    assert "defaults" not in yaml_text and "override" not in yaml_text
    (tmp_path / "border_attack.py").write_text(module)
    cdir = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, cdir)
    (cdir / "attack" / "border.yaml").write_text(yaml_text.replace("width: 1", "width: 2"))
    monkeypatch.setenv("BACKDOORBENCH_CONFIG_DIR", str(cdir))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "border" not in REGISTRY.names("attack")
    try:
        importlib.import_module("border_attack")
        cfg = api.compose(["attack=border"])
        assert cfg.attack.width == 2 and _options(["attack=border"]) == VISION  # the YAML, the vision defaults
        spec = pipeline.validate(cfg)
        assert spec.modality == "vision" and spec.attack_cfg.width == 2
        assert _options(["attack=border", "data=cifar10"])["data"] == "cifar10"
    finally:
        REGISTRY._tables["attack"].pop("border", None)
        sys.modules.pop("border_attack", None)
        for group in ("attack", composition.MODALITY_GROUP):
            ConfigStore.instance().repo.get(group, {}).pop("border.yaml", None)
