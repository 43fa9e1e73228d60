"""The data/model/trainer defaults follow the attack's registered modality: a vision attack selects the vision
defaults (``composition.VISION_DEFAULTS``) whether its config comes from a YAML or, without one, from its dataclass."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from backdoorbench import api, cli, composition
from backdoorbench.attacks.vision.badnets import BadNets, BadNetsConfig
from backdoorbench.engine import pipeline
from backdoorbench.registry import REGISTRY

CONFIG_DIR = cli.config_dir()
GROUPS = ("data", "model", "trainer")


def _groups(overrides: list[str]) -> dict[str, object]:
    cfg = api.compose(overrides)
    return {g: OmegaConf.to_container(cfg[g]) for g in GROUPS}


def _vision_attacks() -> list[str]:
    return [e.name for e in REGISTRY.entries("attack") if e.modality == ("vision",)]


def test_every_vision_attack_yaml_selects_the_vision_defaults() -> None:
    """The built-in vision attacks' YAMLs override data/model/trainer with exactly the options a vision attack
    without a YAML gets, so both ways of adding a vision attack resolve the same."""
    names = _vision_attacks()
    assert {"badnets", "blended", "sig", "wanet", "trojan", "label_consistent"} <= set(names)
    for name in names:
        node = OmegaConf.load(CONFIG_DIR / "attack" / f"{name}.yaml")
        overrides = {k.split()[1].split("@")[0].lstrip("/"): v for d in node.defaults for k, v in d.items()}
        assert overrides == composition.VISION_DEFAULTS, name


@pytest.mark.parametrize("attack", ["badnets", "wanet"])
def test_a_vision_attack_resolves_to_the_vision_options(attack: str) -> None:
    expected = _groups([f"{g}={o}" for g, o in composition.VISION_DEFAULTS.items()])
    assert _groups([f"attack={attack}"]) == expected
    assert _groups([f"attack={attack}"])["data"] != _groups(["attack=ripples"])["data"]  # text defaults differ
    assert _groups([f"attack={attack}", "data=cifar10"])["data"]["name"] == "cifar10"  # the command line wins


@dataclass
class _NewVisionConfig(BadNetsConfig):
    name: str = "test_new_vision_attack_q5"


@pytest.fixture
def new_vision_attack() -> Iterator[str]:
    name = _NewVisionConfig.name

    class NewVisionAttack(BadNets):
        """A throwaway vision attack registered without a YAML file."""

    REGISTRY.register("attack", name, modality="vision", category="data", config=_NewVisionConfig)(NewVisionAttack)
    yield name
    REGISTRY._tables["attack"].pop(name, None)
    ConfigStore.instance().repo.get("attack", {}).pop(f"{name}.yaml", None)


def test_a_vision_attack_without_a_yaml_gets_the_vision_defaults(new_vision_attack: str) -> None:
    assert not (CONFIG_DIR / "attack" / f"{new_vision_attack}.yaml").exists()
    assert _groups([f"attack={new_vision_attack}"]) == _groups(["attack=badnets"])
    cfg = api.compose([f"attack={new_vision_attack}", "attack.size=4"])
    assert "defaults" not in cfg.attack and cfg.attack.size == 4
    spec = pipeline.validate(cfg)  # accepted: vision data for a vision attack
    assert spec.attack.name == new_vision_attack and spec.dataset.name == composition.VISION_DEFAULTS["data"]
    assert spec.modality == "vision" and spec.attack_cfg.size == 4
    assert _groups([f"attack={new_vision_attack}", "model=resnet18"])["model"]["name"] == "resnet18"
