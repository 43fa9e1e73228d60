"""Config validation: dataclass merging, range checks, modality checks, the YAML files, the CLI rewrite."""

from __future__ import annotations

from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from backdoorbench import cli
from backdoorbench.attacks.text.ripples import RipplesConfig
from backdoorbench.config import ConfigError, DataConfig, to_dataclass
from backdoorbench.defenses.base import DetectorConfig
from backdoorbench.defenses.detectors.dan import DANConfig
from backdoorbench.engine import pipeline
from backdoorbench.registry import REGISTRY, UnknownNameError
from backdoorbench.trainer.lit import TrainConfig

CONFIG_DIR = cli.config_dir()


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# -- to_dataclass ------------------------------------------------------------------------------------
def test_to_dataclass_merges_into_defaults() -> None:
    cfg = to_dataclass(TrainConfig, OmegaConf.create({"lr": 0.001, "max_epochs": 2}), "trainer")
    assert isinstance(cfg, TrainConfig)
    assert cfg.lr == 0.001 and cfg.max_epochs == 2
    assert cfg.batch_size == TrainConfig().batch_size
    cfg2 = to_dataclass(DANConfig, {"layers": [0, 2], "frr": "0.1"}, "defense")  # strings are converted
    assert cfg2.layers == [0, 2] and cfg2.frr == pytest.approx(0.1) and cfg2.name == "dan"
    assert to_dataclass(DataConfig, None, "data") == DataConfig()


def test_unknown_key_names_the_key_and_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as exc:
        to_dataclass(TrainConfig, {"lr": 0.1, "learning_rate": 0.1}, "trainer")
    msg = str(exc.value)
    assert msg.startswith("trainer: unknown key(s) 'learning_rate'")
    valid = msg.split("Valid keys:")[1]
    for key in ("max_epochs", "batch_size", "lr", "optimizer", "deterministic"):
        assert key in valid


@pytest.mark.parametrize(
    ("schema", "node", "where", "needles"),
    [
        (TrainConfig, {"lr": "abc"}, "trainer", ["trainer.lr", "abc"]),
        (TrainConfig, {"max_epochs": 0}, "trainer", ["max_epochs must be >= 1"]),
        (DANConfig, {"frr": 1.5}, "defense", ["defense.frr must be in (0, 1)", "1.5"]),
        (DANConfig, {"covariance": "diag"}, "defense", ["defense.covariance", "diag", "ledoit_wolf"]),
        (DANConfig, {"layers": [0, "x"]}, "defense", ["defense.layers"]),
        (RipplesConfig, {"poison_rate": -0.1}, "attack", ["attack.poison_rate must be in [0, 1]", "-0.1"]),
        (RipplesConfig, {"setting": "xyz"}, "attack", ["attack.setting", "afm", "apmf", "xyz"]),
        (RipplesConfig, {"triggers": []}, "attack", ["attack.triggers"]),
        (DataConfig, {"max_train": 0}, "data", ["data.max_train must be >= 1", "0"]),
        (DataConfig, {"test_fraction": 1.0}, "data", ["data.test_fraction"]),
        (DetectorConfig, {"clean_size": 0}, "defense", ["defense.clean_size must be >= 1"]),
    ],
)
def test_bad_values_raise_config_errors(schema, node, where, needles) -> None:
    with pytest.raises(ConfigError) as exc:
        to_dataclass(schema, node, where)
    for needle in needles:
        assert needle in str(exc.value), str(exc.value)


# -- pipeline.validate on composed configs -------------------------------------------------------------
def test_default_config_validates() -> None:
    spec = pipeline.validate(compose_cfg())
    assert (spec.attack.name, spec.defense.name, spec.dataset.name, spec.model.name) == (
        "ripples", "dan", "rotten_tomatoes", "minilm")
    assert isinstance(spec.attack_cfg, RipplesConfig) and spec.attack_cfg.setting == "apmf"
    assert isinstance(spec.defense_cfg, DANConfig)
    assert isinstance(spec.trainer_cfg, TrainConfig) and isinstance(spec.data_cfg, DataConfig)
    assert spec.modality == "text" and spec.seed == 0 and spec.cache_enabled is True


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["trainer.lr=abc"], ["trainer.lr", "abc"]),
        (["defense.frr=1.5"], ["defense.frr", "1.5"]),
        (["attack.poison_rate=-0.1"], ["attack.poison_rate", "-0.1"]),
        (["data.max_train=0"], ["data.max_train"]),
        (["attack.setting=xyz"], ["attack.setting", "xyz"]),
        (["+trainer.foo=1"], ["trainer: unknown key(s) 'foo'", "Valid keys:", "max_epochs"]),
        (["+defense.frrr=0.1"], ["'frrr'", "frr"]),
        (["model.max_length=2"], ["model.max_length"]),
        (["seed=-1"], ["seed"]),
        (["threads=0"], ["threads"]),
        (["model=hf"], ["model.name is not set"]),
    ],
)
def test_validate_reports_config_errors(overrides: list[str], needles: list[str]) -> None:
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError) as exc:
        pipeline.validate(cfg)
    for needle in needles:
        assert needle in str(exc.value), str(exc.value)


def test_unknown_attack_name_is_an_unknown_name_error() -> None:
    with pytest.raises(UnknownNameError) as exc:
        pipeline.validate(compose_cfg("attack.name=ripple"))
    msg = str(exc.value)
    assert "unknown attack 'ripple'" in msg and "Did you mean 'ripples'?" in msg
    assert "badnet_rw" in msg


@dataclass
class _VisionOnlyConfig:
    name: str = "test_vision_only_defense_x7"
    clean_size: int = 10


@pytest.fixture
def vision_only_defense():
    name = "test_vision_only_defense_x7"

    class VisionOnly:
        """A throwaway vision-only defense."""

    REGISTRY.register("defense", name, modality="vision", config=_VisionOnlyConfig)(VisionOnly)
    yield name
    REGISTRY._tables["defense"].pop(name, None)


def test_vision_only_component_against_text_data(vision_only_defense: str) -> None:
    cfg = compose_cfg("defense=none", f"defense.name={vision_only_defense}")
    with pytest.raises(ConfigError) as exc:
        pipeline.validate(cfg)
    msg = str(exc.value)
    assert vision_only_defense in msg
    assert "vision" in msg and "text" in msg
    assert "rotten_tomatoes" in msg
    assert "dan" in msg.split("Choose a text defense:")[1]  # suggests the text defenses
    assert vision_only_defense not in msg.split("Choose a text defense:")[1]


# -- every YAML file ------------------------------------------------------------------------------------
def _yaml_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_config_groups_are_not_empty() -> None:
    for group in ("attack", "defense", "data", "model", "trainer"):
        assert _yaml_options(group), group
    assert {"badnet_rw", "ripples"} <= set(_yaml_options("attack"))
    assert {"dan", "none"} <= set(_yaml_options("defense"))


@pytest.mark.parametrize("group", ["attack", "defense", "data"])
def test_every_yaml_validates_and_is_named_after_its_file(group: str) -> None:
    for option in _yaml_options(group):
        cfg = compose_cfg(f"{group}={option}")
        if group == "data" and REGISTRY.get("dataset", option).modality == ("vision",):
            cfg = compose_cfg(f"{group}={option}", "attack=badnets")  # a vision dataset takes a vision attack
        if group == "defense" and REGISTRY.get("defense", option).modality == ("vision",):
            cfg = compose_cfg(f"{group}={option}", "attack=badnets")  # a vision-only defense (DBD) needs vision data
        assert cfg[group].name == option, f"configs/{group}/{option}.yaml: name is {cfg[group].name!r}"
        spec = pipeline.validate(cfg)
        entry = {"attack": spec.attack, "defense": spec.defense, "data": spec.dataset}[group]
        assert entry.name == option
        typed = {"attack": spec.attack_cfg, "defense": spec.defense_cfg, "data": spec.data_cfg}[group]
        assert not isinstance(typed, dict), f"{group} {option!r} has no config dataclass"
        # every key of the YAML reached the typed config
        for key, value in OmegaConf.to_container(cfg[group], resolve=True).items():
            actual = getattr(typed, key)  # a nested settings block (nc_unlearn's nc) as a dict
            assert (asdict(actual) if is_dataclass(actual) else actual) == value, (
                group, option, key)


def test_model_and_trainer_yamls_validate(tmp_path: Path) -> None:
    for option in _yaml_options("model"):
        overrides = [f"model={option}"]
        if option == "hf":
            overrides.append(f"model.name={tmp_path}")
        name = compose_cfg(*overrides).model.name
        vision = option != "hf" and REGISTRY.get("model", name).modality == ("vision",)
        if vision:
            overrides.insert(0, "attack=badnets")  # brings the vision data; model= on the command line wins
        spec = pipeline.validate(compose_cfg(*overrides))
        assert spec.model.name == name and spec.modality == ("vision" if vision else "text")
        for key, value in OmegaConf.to_container(compose_cfg(*overrides).model, resolve=True).items():
            assert getattr(spec.model_cfg, key) == value, (option, key)
        if option == "minilm":
            assert spec.model.name == "minilm"
    for option in _yaml_options("trainer"):
        spec = pipeline.validate(compose_cfg(f"trainer={option}"))
        assert isinstance(spec.trainer_cfg, TrainConfig)


# -- model=<anything> rewriting ---------------------------------------------------------------------------
def test_rewrite_model_override() -> None:
    rw = cli.rewrite_model_override
    assert rw(["model=bert-base-uncased", "seed=1"], CONFIG_DIR) == [
        "model=hf", "model.name='bert-base-uncased'", "seed=1"]
    assert rw(["model=minilm"], CONFIG_DIR) == ["model=minilm"]
    assert rw(["model=hf", "model.name=x"], CONFIG_DIR) == ["model=hf", "model.name=x"]
    assert rw(["model=/some/path"], CONFIG_DIR) == ["model=hf", "model.name='/some/path'"]
    assert rw(["model='/quoted/path'"], CONFIG_DIR) == ["model=hf", "model.name='/quoted/path'"]
    untouched = ["model.max_length=32", "attack=ripples"]
    assert rw(untouched, CONFIG_DIR) == untouched


def test_rewritten_override_composes_to_the_hf_model(tmp_path: Path) -> None:
    overrides = cli.rewrite_model_override([f"model={tmp_path}"], CONFIG_DIR)
    cfg = compose_cfg(*overrides)
    assert cfg.model.name == str(tmp_path)
    spec = pipeline.validate(cfg)
    assert spec.model.name == str(tmp_path) and spec.model_cfg.name == str(tmp_path)


# -- config nodes for plugin components without a YAML file -------------------------------------------------
@dataclass
class _PluginDefenseConfig:
    name: str = "test_plugin_defense_q3"
    clean_size: int = 7
    strength: float = 0.25


@pytest.fixture
def plugin_defense():
    name = "test_plugin_defense_q3"

    class PluginDefense:
        """A throwaway text defense without a YAML file."""

    REGISTRY.register("defense", name, modality="text", config=_PluginDefenseConfig)(PluginDefense)
    yield name
    REGISTRY._tables["defense"].pop(name, None)


def test_register_plugin_configs_makes_the_component_selectable(plugin_defense: str) -> None:
    cli.register_plugin_configs(CONFIG_DIR)
    cfg = compose_cfg(f"defense={plugin_defense}", "defense.strength=0.5")
    assert OmegaConf.to_container(cfg.defense) == {"name": plugin_defense, "clean_size": 7, "strength": 0.5}
    spec = pipeline.validate(cfg)
    assert spec.defense.name == plugin_defense
    assert isinstance(spec.defense_cfg, _PluginDefenseConfig) and spec.defense_cfg.strength == 0.5
    # components that have a YAML file keep it
    dan_yaml = OmegaConf.load(CONFIG_DIR / "defense" / "dan.yaml")
    assert OmegaConf.to_container(compose_cfg("defense=dan").defense) == OmegaConf.to_container(dan_yaml)
