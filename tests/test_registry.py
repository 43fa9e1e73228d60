"""The component registry: registration, lookup errors, resolvers, modalities and plugins."""

from __future__ import annotations

import base64
import hashlib
import logging
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PYTHON, subprocess_env

from backdoorbench import registry as registry_mod
from backdoorbench.models.text import TextModelConfig, create_hf, create_minilm
from backdoorbench.registry import REGISTRY, Registry, UnknownNameError


def _fresh() -> Registry:
    """A registry that neither imports the built-ins nor looks for plugins."""
    reg = Registry()
    reg._builtins_loaded = True
    reg._plugins_loaded = True
    return reg


@dataclass
class _Cfg:
    name: str = "thing"
    alpha: float = 0.5


# -- registration and metadata ---------------------------------------------------------------------
def test_register_stores_metadata_and_lists_sorted() -> None:
    reg = _fresh()

    @reg.register("defense", "zeta", modality=("text", "vision"), category="detector", needs="clean data",
                  config=_Cfg, paper="someone 2024")
    class Zeta:
        """Zeta detector.

        More text that is not the description."""

    @reg.register("defense", "alpha", modality="vision", description="explicit description")
    def alpha() -> None:
        pass

    e = reg.get("defense", "zeta")
    assert e.obj is Zeta
    assert (e.kind, e.name, e.modality, e.category, e.needs) == ("defense", "zeta", ("text", "vision"),
                                                                 "detector", "clean data")
    assert e.description == "Zeta detector."  # first line of the docstring
    assert e.config is _Cfg
    assert e.extra == {"paper": "someone 2024"}
    assert e.source == __name__  # not a backdoorbench module → named after its module
    a = reg.get("defense", "alpha")
    assert a.modality == ("vision",) and a.description == "explicit description"
    assert reg.names("defense") == ["alpha", "zeta"]
    assert [x.name for x in reg.entries("defense")] == ["alpha", "zeta"]
    assert reg.names("attack") == []
    assert [(x.kind, x.name) for x in reg] == [("defense", "alpha"), ("defense", "zeta")]


def test_a_defense_class_category_is_its_kind() -> None:
    """One fact: the registry's category of a defense class is the class's kind (the protocol it runs with)."""
    reg = _fresh()

    class Probe:
        kind = "repair"

    reg.register("defense", "probe", modality="vision")(Probe)
    assert reg.get("defense", "probe").category == "repair"
    reg.register("defense", "probe_same", modality="vision", category="repair")(Probe)  # redundant, agrees
    assert reg.get("defense", "probe_same").category == "repair"
    with pytest.raises(ValueError, match="category='detector', but Probe.kind is 'repair'"):
        reg.register("defense", "probe_other", modality="vision", category="detector")(Probe)
    assert "probe_other" not in reg.names("defense")

    def factory() -> None:  # a defense factory has no kind: its category is the one given
        pass

    reg.register("defense", "factory", modality="vision", category="detector")(factory)
    assert reg.get("defense", "factory").category == "detector"
    for entry in REGISTRY.entries("defense"):
        assert entry.category == entry.obj.kind, entry.name


def test_builtins_are_registered_with_source_builtin() -> None:
    assert {"badnet_rw", "ripples"} <= set(REGISTRY.names("attack"))
    assert {"dan", "none"} <= set(REGISTRY.names("defense"))
    assert "rotten_tomatoes" in REGISTRY.names("dataset")
    assert "minilm" in REGISTRY.names("model")
    dan = REGISTRY.get("defense", "dan")
    assert dan.source == "builtin" and dan.category == "detector"
    assert dan.supports("text") and dan.supports("vision")
    assert REGISTRY.get("attack", "ripples").modality == ("text",)


def test_duplicate_registration_is_an_error_but_reregistering_the_same_object_is_not() -> None:
    reg = _fresh()

    class A:
        pass

    class B:
        pass

    reg.register("attack", "dup", modality="text")(A)
    reg.register("attack", "dup", modality="text")(A)  # e.g. a module imported twice
    with pytest.raises(ValueError, match="'dup' is already registered"):
        reg.register("attack", "dup", modality="text")(B)
    assert reg.get("attack", "dup").obj is A


@pytest.mark.parametrize(
    ("kind", "modality", "match"),
    [
        ("gadget", "text", "unknown kind"),
        ("attack", "audio", "modality must be among"),
        ("attack", (), "modality"),
    ],
)
def test_register_rejects_bad_kind_and_modality(kind: str, modality, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _fresh().register(kind, "x", modality=modality)


def test_unknown_name_lists_valid_names_and_suggests_a_close_match() -> None:
    with pytest.raises(UnknownNameError) as exc:
        REGISTRY.get("defense", "dann")
    msg = str(exc.value)
    assert "unknown defense 'dann'" in msg
    assert "Did you mean 'dan'?" in msg
    assert "dan" in msg.split("Valid defenses:")[1] and "none" in msg.split("Valid defenses:")[1]
    assert isinstance(exc.value, KeyError)

    with pytest.raises(UnknownNameError) as exc2:
        REGISTRY.get("attack", "zzzzzz")
    assert "Did you mean" not in str(exc2.value)
    valid = str(exc2.value).split("Valid attacks:")[1]
    assert all(name in valid for name in ("badnet_rw", "ripples"))


# -- the model resolver ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bert-base-uncased", "prajjwal1/bert-tiny", "<an existing folder>"])
def test_any_hf_name_or_path_resolves_to_the_generic_hf_model(name: str, tmp_path) -> None:
    name = str(tmp_path) if name.startswith("<") else name  # a path that does not exist is an error (test_errors)
    e = REGISTRY.get("model", name)
    assert e.kind == "model" and e.name == name
    assert e.obj is create_hf and e.config is TextModelConfig
    assert e.modality == ("text",)
    assert name not in REGISTRY.names("model")  # resolved, not registered


def test_minilm_is_registered_and_prefixed_names_are_not_hf() -> None:
    e = REGISTRY.get("model", "minilm")
    assert e.obj is create_minilm and e.source == "builtin"
    assert "<any HF model name or local path>" in REGISTRY.patterns("model")
    with pytest.raises(UnknownNameError, match="Valid models: .*minilm.*<any HF model name or local path>"):
        REGISTRY.get("model", "foo:bar")  # a prefixed name no resolver takes is not sent to the HF hub


# -- modality ----------------------------------------------------------------------------------------
def test_modality_support() -> None:
    reg = _fresh()
    reg.register("defense", "vis", modality="vision")(type("Vis", (), {}))
    reg.register("defense", "both", modality=["text", "vision"])(type("Both", (), {}))
    assert not reg.get("defense", "vis").supports("text")
    assert reg.get("defense", "vis").supports("vision")
    assert reg.get("defense", "both").supports("text") and reg.get("defense", "both").supports("vision")
    attacks = REGISTRY.entries("attack")
    # an attack's trigger belongs to one modality; an external victim is of the modality its data= says
    assert all(len(e.modality) == 1 for e in attacks if e.name != "external")
    assert REGISTRY.get("attack", "external").modality == ("text", "vision")
    assert {"badnet_rw", "ripples"} <= {e.name for e in attacks if e.supports("text")}
    assert not any(e.supports("vision") for e in attacks if e.name in ("badnet_rw", "ripples"))


# -- plugins -------------------------------------------------------------------------------------------
PLUGIN_SOURCE = '''\
"""A demo backdoorbench plugin."""
from dataclasses import dataclass

import numpy as np

from backdoorbench import register_defense
from backdoorbench.defenses.base import Detector, DetectorConfig


@dataclass
class DemoConfig(DetectorConfig):
    name: str = "demo_detector"
    strength: float = 1.0


@register_defense("demo_detector", modality="text", category="detector", needs="nothing at all",
                  description="demo plugin detector", config=DemoConfig)
class DemoDetector(Detector):
    def _fit(self, model, clean):
        pass

    def score(self, inputs):
        return np.zeros(len(inputs))
'''


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_plugin_wheel(folder: Path) -> Path:
    dist = "bb_demo_plugin-0.1.dist-info"
    files = {
        "bb_demo_plugin.py": PLUGIN_SOURCE.encode(),
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: bb-demo-plugin\nVersion: 0.1\nSummary: demo\n",
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: backdoorbench-tests\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
        f"{dist}/entry_points.txt": b"[backdoorbench.plugins]\ndemo = bb_demo_plugin\n",
    }
    record = "\n".join([_record_line(n, d) for n, d in files.items()] + [f"{dist}/RECORD,,"]) + "\n"
    wheel = folder / "bb_demo_plugin-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}/RECORD", record)
    return wheel


def test_plugin_wheel_registers_a_defense_through_the_entry_point(tmp_path: Path) -> None:
    wheel = build_plugin_wheel(tmp_path)
    site = tmp_path / "site"
    pip = subprocess.run(
        [PYTHON, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", "-q",
         "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=120,
    )
    assert pip.returncode == 0, pip.stderr
    assert (site / "bb_demo_plugin.py").is_file()
    assert (site / "bb_demo_plugin-0.1.dist-info" / "entry_points.txt").is_file()
    env = subprocess_env(PYTHONPATH=str(site))

    listed = subprocess.run([PYTHON, "-m", "backdoorbench", "list", "defenses"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "demo_detector" in listed.stdout
    assert "bb_demo_plugin" in listed.stdout  # the source column names the plugin module
    assert "dan" in listed.stdout  # built-ins are still there

    snippet = (
        "from backdoorbench.registry import REGISTRY\n"
        "e = REGISTRY.get('defense', 'demo_detector')\n"
        "assert e.source == 'bb_demo_plugin', e.source\n"
        "assert e.category == 'detector' and e.modality == ('text',)\n"
        "assert e.config.__name__ == 'DemoConfig' and e.config().strength == 1.0\n"
        "print('PLUGIN-OK')\n"
    )
    check = subprocess.run([PYTHON, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert check.returncode == 0, check.stderr
    assert "PLUGIN-OK" in check.stdout


class _FakeEntryPoint:
    def __init__(self, name: str, value: str, load) -> None:
        self.name, self.value, self._load = name, value, load

    def load(self):
        return self._load()


def test_broken_plugin_is_skipped_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    def boom():
        raise ImportError("plugin dependency missing")

    def good():
        def register_all(reg: Registry) -> None:  # a callable entry point gets the registry
            reg.register("attack", "from_callable", modality="text")(type("FromCallable", (), {}))

        return register_all

    calls: list[str] = []

    def fake_entry_points(group: str):
        calls.append(group)
        return [_FakeEntryPoint("broken", "broken_mod", boom), _FakeEntryPoint("good", "good_mod:fn", good)]

    monkeypatch.setattr(registry_mod, "entry_points", fake_entry_points)
    reg = Registry()
    reg._builtins_loaded = True
    with caplog.at_level(logging.WARNING, logger="backdoorbench.registry"):
        loaded = reg.load_plugins()
    assert calls == ["backdoorbench.plugins"]
    assert loaded == ["good"]
    assert "from_callable" in reg._tables["attack"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("broken" in w and "plugin dependency missing" in w for w in warnings), warnings

    # through load(): a broken plugin does not break lookups either
    reg2 = Registry()
    reg2._builtins_loaded = True
    reg2.register("defense", "x", modality="text")(type("X", (), {}))
    assert reg2.get("defense", "x").name == "x"
    assert "from_callable" in reg2.names("attack")

