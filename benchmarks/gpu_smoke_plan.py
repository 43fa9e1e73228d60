"""The runs of ``benchmarks/gpu_smoke.py``: each preset's sweep points with the reduced-scale (or ``--tiny``)
overrides, the stage identities of a point (``signatures``) and the cover of all distinct stages (``cover``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))

# (reduced GPU scale, --tiny) overrides by modality, then by defense, attack and preset.
VISION = {
    False: ["data=mnist5k", "data.max_train=2000", "data.max_test=500", "data.holdout_size=500",
            "trainer.max_epochs=2", "trainer.batch_size=128"],
    True: ["data=mnist5k", "data.max_train=40", "data.max_test=20", "data.holdout_size=20", "trainer.max_epochs=1",
           "trainer.max_steps=1", "trainer.batch_size=20"],
}
TEXT = {
    False: ["data=rotten_tomatoes", "model=minilm", "model.name=minilm", "data.max_train=1000", "data.max_test=300",
            "data.holdout_size=300", "data.proxy_size=200", "model.max_length=64", "trainer.max_epochs=1",
            "++attack.epochs=1", "defense.clean_size=300"],
    True: ["data=rotten_tomatoes", "model=minilm", "model.name=minilm", "data.max_train=40", "data.max_test=20",
           "data.holdout_size=20", "data.proxy_size=20", "model.max_length=32", "trainer.max_epochs=1",
           "trainer.max_steps=1", "trainer.batch_size=20", "++attack.epochs=1", "defense.clean_size=20"],
}
DEFENSE = {
    "dbd_full": {
        False: ["defense.ssl_epochs=2", "defense.head_epochs=1", "defense.mixmatch_epochs=1",
                "defense.mixmatch_iterations=20", "defense.rampup_epochs=1"],
        True: ["defense.ssl_epochs=1", "defense.ssl_batch_size=20", "defense.head_epochs=1", "defense.batch_size=20",
               "defense.mixmatch_epochs=1", "defense.mixmatch_iterations=1", "defense.mixmatch_batch_size=8",
               "defense.rampup_epochs=1"],
    },
    "nad": {False: ["defense.teacher_epochs=1", "++defense.epochs=2"],
            True: ["defense.teacher_epochs=1", "++defense.epochs=1", "defense.clean_fraction=null",
                   "defense.clean_size=20"]},
    "rnp": {False: ["defense.unlearn_epochs=3", "defense.recover_epochs=3"],
            True: ["defense.unlearn_epochs=1", "defense.recover_epochs=1", "defense.clean_fraction=null",
                   "defense.clean_size=20", "defense.curve_step=0.45"]},
    "finetune": {False: ["++defense.epochs=2"],
                 True: ["++defense.epochs=1", "defense.clean_fraction=null", "defense.clean_size=20"]},
    "strip": {False: [], True: ["defense.num_copies=4"]},
    "onion": {False: ["defense.lm=smollm2"],
              True: ["defense.lm=smollm2", "defense.lm_batch_size=8", "defense.lm_max_length=24",
                     "defense.lm_dtype=float32"]},
    "rap": {False: ["defense.epochs=2"], True: ["defense.epochs=1"]},
    # model inspection (the zoo presets): the stage on the device, not the method's verdict
    "neural_cleanse": {False: ["defense.steps=5"],
                       True: ["defense.steps=2", "defense.clean_size=20", "defense.classes=[0,1,2]"]},
    "dbs": {False: ["defense.epochs=10"],
            True: ["defense.epochs=2", "defense.trigger_len=2", "defense.positions=[first_half]"]},
}
ATTACK = {
    "label_consistent": {False: ["++attack.surrogate_epochs=1", "++attack.steps=20"],
                         True: ["++attack.surrogate_epochs=1", "++attack.steps=2"]},
    "trojan": {False: ["++attack.surrogate_epochs=1", "++attack.trigger_steps=200"],
               True: ["++attack.surrogate_epochs=1", "++attack.trigger_steps=2"]},
    "dfep": {False: ["++attack.num_samples=1000", "++attack.sample_words=30"],
             True: ["++attack.num_samples=20", "++attack.sample_words=10"]},
    "neuba": {False: ["++attack.max_unlabeled=200", "++attack.probe_size=20"],
              True: ["++attack.max_unlabeled=10", "++attack.probe_size=5"]},
}
PRESET = {"cpu_nad": {False: ["defense.steps_per_epoch=5"], True: ["defense.steps_per_epoch=1"]}}


def sweep_params(name: str) -> dict[str, str]:
    """The preset's ``hydra.sweeper.params``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from backdoorbench.composition import config_dir, register_plugin_configs

    register_plugin_configs(config_dir())  # the generated nodes config.yaml needs (attack_modality/<attack>)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={name}"], return_hydra_config=True)
    return {str(k): str(v) for k, v in OmegaConf.to_container(cfg.hydra.sweeper.params).items()}


def is_text(name: str) -> bool:
    from backdoorbench.api import compose
    from backdoorbench.registry import REGISTRY

    return REGISTRY.get("dataset", str(compose([f"+experiment={name}"]).data.name)).modality[0] == "text"


def points(params: dict[str, str]) -> list[tuple[str, str]]:
    """Every (attack, defense) pair of the preset's sweep."""
    attacks, defenses = params["attack"].split(","), params["defense"].split(",")
    return [(a, d) for a in attacks for d in defenses]


# the cheaper stages first, to fill a cover's free slots (a defense run to cover an attack, and the reverse)
CHEAP_DEFENSES = ["strip", "dan", "rap", "finetune", "nad", "rnp", "onion", "dbd_full"]
CHEAP_ATTACKS = ["badnets", "badnet_rw", "blended", "addsent", "sig", "wanet"]


def _rank(order: list[str], name: str) -> int:
    return order.index(name) if name in order else len(order)


def shape(value: Any) -> Any:
    """A config's code-path shape: strings, booleans and ``None`` kept, numbers reduced to their sign class
    (``0`` / ``+`` / ``-``: a zero often switches a stage off), containers kept with their items reduced."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [shape(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "0" if value == 0 else "+" if value > 0 else "-"
    return value


def signatures(overrides: list[str], exact: bool = False) -> tuple[str, str]:
    """(attack stage, defense stage) identities of one run, from its validated config: the attack stage is what
    its victim's cache key hashes (attack, data, model, trainer, seed), the defense stage the defense's config
    with the data, model and trainer. Unless ``exact``, numbers count only by their sign (``shape``): two runs
    that differ only in a learning rate, a size or a target class run the same code on the same devices."""
    from dataclasses import asdict, is_dataclass

    import backdoorbench.config as bb_config
    from backdoorbench.api import compose
    from backdoorbench.engine.spec import validate

    bb_config.forced_keys = lambda: forced_from(overrides)  # type: ignore[assignment]
    spec = validate(compose(overrides))

    def plain(cfg: Any) -> Any:
        return asdict(cfg) if is_dataclass(cfg) and not isinstance(cfg, type) else cfg

    common = {"data": plain(spec.data_cfg), "model": [spec.model.name, plain(spec.model_cfg)],
              "trainer": spec.trainer_cfg.cache_fields()}
    attack = {"attack": [spec.attack.name, plain(spec.attack_cfg)], "seed": spec.seed, **common}
    defense = {"defense": [spec.defense.name, plain(spec.defense_cfg)], **common}
    attack, defense = json.loads(json.dumps([attack, defense], default=str))
    if not exact:
        attack, defense = shape(attack), shape(defense)
    return json.dumps(attack, sort_keys=True), json.dumps(defense, sort_keys=True)


def cover(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A small set of the runs in which every distinct attack stage and every distinct defense stage occurs
    (``signatures``), preset by preset: stages identical to ones already chosen (the same attack on the same
    model, data and trainer in another preset, ...) are not run again. In a preset, new attack stages are paired
    with new defense stages; a new attack left over gets the preset's cheapest defense, a new defense left over
    the cheapest attack whose victim is already in the shared cache. Each run gets ``covers``: what it adds."""
    seen_a: set[str] = set()
    seen_d: set[str] = set()
    chosen: list[dict[str, Any]] = []
    for name in dict.fromkeys(r["preset"] for r in runs):
        mine = [r for r in runs if r["preset"] == name]
        new_a = list({r["sig_attack"]: r["attack"] for r in mine if r["sig_attack"] not in seen_a}.items())
        new_d = list({r["sig_defense"]: r["defense"] for r in mine if r["sig_defense"] not in seen_d}.items())
        pairs = list(zip(new_a, new_d))
        cheap_d = min(mine, key=lambda r: _rank(CHEAP_DEFENSES, r["defense"]))
        pairs += [(a, (cheap_d["sig_defense"], cheap_d["defense"])) for a in new_a[len(pairs):]]
        cached = [r for r in mine if r["sig_attack"] in seen_a or r["sig_attack"] in dict(new_a)]
        cheap_a = min(cached or mine, key=lambda r: _rank(CHEAP_ATTACKS, r["attack"]))
        pairs += [((cheap_a["sig_attack"], cheap_a["attack"]), d) for d in new_d[len(pairs):]]
        for (sa, a), (sd, d) in pairs:
            run = next(r for r in mine if r["attack"] == a and r["defense"] == d)
            covers = ([f"attack {a}"] if sa not in seen_a else []) + ([f"defense {d}"] if sd not in seen_d else [])
            seen_a.add(sa)
            seen_d.add(sd)
            chosen.append({**run, "covers": covers})
    return chosen


def plan(presets: list[str], tiny: bool, every: bool, accelerator: str, cache: Path,
         exact: bool = False) -> list[dict[str, Any]]:
    """The runs: every point of every preset (``every``) or a cover of their stages (``cover``). An attack's
    stage identity is taken from its run with the preset's first defense, a defense's from its run with the first
    attack (the overrides of one group never change the other's config)."""
    runs = []
    for name in presets:
        params, text = sweep_params(name), is_text(name)
        pairs = points(params)
        first_a, first_d = pairs[0]
        sig_a = {a: signatures(point_overrides(name, params, a, first_d, tiny, text, accelerator, cache), exact)[0]
                 for a in dict.fromkeys(a for a, _ in pairs)}
        sig_d = {d: signatures(point_overrides(name, params, first_a, d, tiny, text, accelerator, cache), exact)[1]
                 for d in dict.fromkeys(d for _, d in pairs)}
        runs += [{"preset": name, "attack": a, "defense": d, "sig_attack": sig_a[a], "sig_defense": sig_d[d],
                  "overrides": point_overrides(name, params, a, d, tiny, text, accelerator, cache),
                  "covers": ["all points"]} for a, d in pairs]
    return runs if every else cover(runs)


def merge(*groups: list[str]) -> list[str]:
    """Overrides, a later value of a key replacing an earlier one (``++`` kept when either had it)."""
    out: dict[str, tuple[str, str]] = {}
    for group in groups:
        for item in group:
            key, _, value = item.partition("=")
            bare = key.lstrip("+")
            plus = "++" if key.startswith("++") or out.get(bare, ("", ""))[0] == "++" else key[: len(key) - len(bare)]
            out[bare] = (plus, value)
    return [f"{plus}{k}={v}" for k, (plus, v) in out.items()]


def point_overrides(name: str, params: dict[str, str], attack: str, defense: str, tiny: bool, text: bool,
                    accelerator: str, cache: Path) -> list[str]:
    fixed = [f"{k}={v.split(',')[0]}" for k, v in params.items() if k not in ("attack", "defense")]
    base = (TEXT if text else VISION)[tiny]
    return merge([f"+experiment={name}", f"attack={attack}", f"defense={defense}"], fixed, base,
                 DEFENSE.get(defense, {}).get(tiny, []), ATTACK.get(attack, {}).get(tiny, []),
                 PRESET.get(name, {}).get(tiny, []), [f"trainer.accelerator={accelerator}", f"cache.dir={cache}"])


def forced_from(overrides: list[str]) -> dict[str, set[str]]:
    """The ``++group.key`` overrides, as a Hydra sweep job's ``config.forced_keys()`` would report them."""
    forced: dict[str, set[str]] = {}
    for item in overrides:
        if item.startswith("++"):
            group, _, sub = item[2:].partition("=")[0].partition(".")
            forced.setdefault(group, set()).add(sub.split(".")[0])
    return forced
