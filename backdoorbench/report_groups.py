"""What ``report`` reads and how it groups it: the run folders of one or more sweeps (``results.json``, with
``config.yaml`` and ``versions.json`` beside it), the jobs that failed (``failed.json``) and the files it
could not read; groups of runs that differ only by seed, with mean ± std and n per metric, and the reasons
a group may not be one experiment repeated (duplicate seeds, different library or code versions, different
data / model / trainer configs).

A group is (dataset, model, attack config, defense config). An attack or defense whose config differs from
the component's default (its YAML under ``configs/``, else its registered dataclass) is labelled
``name#xxxx``, a short hash of the keys that differ (listed in the report's legend)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("backdoorbench.report")

#: metrics summarised per group (those that appear in at least one run of the table)
SUMMARY_METRICS = [
    "ba", "asr", "far", "frr", "auroc", "ba_after_rejection", "asr_after_rejection", "ba_after", "asr_after",
    "r_acc_after", "der", "poison_recall", "clean_removed_fraction", "sample_auroc",
]
#: versions.json keys that do not make two runs different experiments (the environments: environment_warnings)
IGNORED_VERSION_KEYS = {"platform", "environment", "victim_environment"}
#: the keys of a recorded environment (engine.determinism.environment) a table should not mix
ENVIRONMENT_KEYS = ("cpu", "device", "gpu", "threads", "interop_threads", "torch", "transformers", "lightning", "numpy")


@dataclass
class Collection:
    """Everything found under the report's folders."""

    runs: list[dict[str, Any]] = field(default_factory=list)  # results.json + _dir, _config, _versions, labels
    failed: list[dict[str, Any]] = field(default_factory=list)  # {"dir", "error", "overrides"}
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    legend: dict[str, dict[str, Any]] = field(default_factory=dict)  # "dan#3fa2" -> the keys that differ


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def collect_runs(roots: list[Path], config_dir: Path | None = None) -> Collection:
    """Read every run and failed job under ``roots`` (a run folder reached twice is read once). Unreadable
    ``results.json`` files are skipped with a warning naming them; :class:`FileNotFoundError` when no run and
    no failed job is found."""
    import yaml

    coll = Collection()
    seen: set[Path] = set()
    found = 0
    defaults = _Defaults(config_dir)
    for root in roots:
        if not Path(root).exists():
            raise FileNotFoundError(f"{root} does not exist")
        for f in sorted(Path(root).rglob("results.json")):
            if f.resolve() in seen:
                continue
            seen.add(f.resolve())
            found += 1
            try:
                res = _read_json(f)
                if not isinstance(res, dict) or not isinstance(res.get("run"), dict) or "metrics" not in res:
                    raise ValueError("not a run's results (no 'run' / 'metrics')")
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                log.warning("skipping unreadable %s: %s", f, _first_line(exc))
                coll.skipped.append({"path": str(f), "reason": _first_line(exc)})
                continue
            run_dir = f.parent
            config = _optional(run_dir / "config.yaml", lambda p: yaml.safe_load(p.read_text()), coll)
            versions = _optional(run_dir / "versions.json", _read_json, coll)
            res = {**res, "_dir": str(run_dir), "_config": config if isinstance(config, dict) else None,
                   "_versions": versions if isinstance(versions, dict) else None}
            res["_attack_cfg"] = defaults.label("attack", res["run"].get("attack"), res["_config"], coll.legend)
            res["_defense"] = defaults.label("defense", res["run"].get("defense"), res["_config"], coll.legend)
            coll.runs.append(res)
        for f in sorted(Path(root).rglob("failed.json")):
            if f.resolve() in seen or (f.parent / "results.json").is_file():
                continue  # a job that failed once and succeeded on re-submission counts as a run
            seen.add(f.resolve())
            coll.failed.append(_failure(f))
    if not coll.runs and not coll.failed:
        where = ", ".join(map(str, roots))
        if found:
            raise FileNotFoundError(f"no readable results.json under {where} (skipped {found}, see the warnings)")
        raise FileNotFoundError(f"no results.json under {where}")
    return coll


def _optional(path: Path, load: Any, coll: Collection) -> Any:
    """A run folder's side file, or None when it is missing; an unreadable one is listed as skipped."""
    if not path.is_file():
        return None
    try:
        return load(path)
    except Exception as exc:  # yaml.YAMLError, JSONDecodeError, OSError, ...
        coll.skipped.append({"path": str(path), "reason": f"unreadable ({_first_line(exc)}); run kept without it"})
        return None


def _failure(path: Path) -> dict[str, Any]:
    """A ``failed.json`` read defensively: its ``reason`` (what ``engine.sweep.write_failed`` writes; ``error`` in
    hand-written records) and ``overrides`` when it has them."""
    try:
        rec = _read_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return {"dir": str(path.parent), "error": f"unreadable failed.json ({_first_line(exc)})", "overrides": ""}
    if not isinstance(rec, dict):
        return {"dir": str(path.parent), "error": "failed.json is not a JSON object", "overrides": ""}
    error = rec.get("reason")
    if error in (None, ""):
        error = rec.get("error")
    error = "no reason recorded" if error in (None, "") else str(error).strip().splitlines()[0]
    overrides = rec.get("overrides", "")
    if isinstance(overrides, list | tuple):
        overrides = " ".join(map(str, overrides))
    return {"dir": str(path.parent), "error": error, "overrides": str(overrides)}


def short_hash(obj: Any, n: int = 4) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


class _Defaults:
    """The default config of each component: ``configs/<group>/<name>.yaml`` (without its ``defaults`` list),
    else the registered config dataclass's defaults; None when neither is found."""

    def __init__(self, config_dir: Path | None) -> None:
        self.config_dir = config_dir
        self.cache: dict[tuple[str, str], dict[str, Any] | None] = {}

    def get(self, group: str, name: str) -> dict[str, Any] | None:
        if (group, name) not in self.cache:
            self.cache[group, name] = self._load(group, name)
        return self.cache[group, name]

    def _load(self, group: str, name: str) -> dict[str, Any] | None:
        import yaml

        if self.config_dir is not None:
            path = Path(self.config_dir) / group / f"{name}.yaml"
            if path.is_file():
                node = yaml.safe_load(path.read_text()) or {}
                node.pop("defaults", None)
                return node
        cfg_type = _config_type(group, name)
        try:
            return asdict(cfg_type()) if cfg_type is not None else None
        except Exception:  # a config class that is not a dataclass or has required fields
            return None

    def declared(self, group: str, name: str) -> set[str] | None:
        """The keys the registered component's config dataclass declares; None when it is unknown here."""
        cfg_type = _config_type(group, name)
        return {f.name for f in fields(cfg_type)} if cfg_type is not None and is_dataclass(cfg_type) else None

    def label(self, group: str, name: Any, config: dict[str, Any] | None, legend: dict[str, dict[str, Any]]) -> str:
        """``name``, or ``name#xxxx`` when the run's ``group`` config differs from the default (the differing
        keys go into ``legend``); the whole config is hashed (``name#xxxx*``) when no default is known. A run
        without ``config.yaml`` is labelled by name. Keys the component does not declare are left out: the run
        ignored them (``++defense.lm_dtype=...`` in a sweep over ``defense=dan,onion``, config.component_config)."""
        name = str(name)
        node = (config or {}).get(group)
        if not isinstance(node, dict):
            return name
        own = self.declared(group, name)
        if own is not None:
            node = {k: v for k, v in node.items() if k in own}
        default = self.get(group, name)
        if default is None:
            lab = f"{name}#{short_hash(node)}*"
            legend.setdefault(lab, {"(whole config: no default found)": node})
            return lab
        diff = {k: v for k, v in node.items() if default.get(k, _MISSING) != v}
        diff.update({k: "(unset)" for k in default if k not in node})
        if not diff:
            return name
        lab = f"{name}#{short_hash(diff)}"
        legend.setdefault(lab, diff)
        return lab


_MISSING = object()


def _config_type(group: str, name: str) -> Any:
    """The registered component's config class; None for a component without one, or one not installed here."""
    try:
        from backdoorbench.registry import REGISTRY

        return REGISTRY.get(group, name).config
    except Exception:  # an unknown or plugin component that is not installed here
        return None


# -- groups ------------------------------------------------------------------------------------------------
def attack_label(res: dict[str, Any]) -> str:
    run = res["run"]
    base = res.get("_attack_cfg") or str(run["attack"])
    return f"{base} ({run['setting']})" if run.get("setting") else base


def group_key(res: dict[str, Any]) -> tuple[str, str, str, str]:
    run = res["run"]
    return (str(run.get("data")), str(run.get("model")), attack_label(res), res.get("_defense") or str(run["defense"]))


def mean_std(values: list[Any]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; NaN below two values) and count of the finite values."""
    xs = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n >= 2 else float("nan")
    return mean, std, n


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per group: the key, the runs' seeds and folders, ``<metric>_mean/_std/_n`` and the warnings."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for res in runs:
        groups.setdefault(group_key(res), []).append(res)
    out = []
    for key in sorted(groups):
        members = groups[key]
        rec: dict[str, Any] = dict(zip(("data", "model", "attack", "defense"), key))
        rec["n"] = len(members)
        rec["seeds"] = sorted((r["run"].get("seed") for r in members), key=lambda s: (s is None, str(s)))
        for m in SUMMARY_METRICS:
            mean, std, n = mean_std([r["metrics"].get(m) for r in members])
            rec[f"{m}_mean"], rec[f"{m}_std"], rec[f"{m}_n"] = mean, std, n
        rec["warnings"] = mixing_warnings(members)
        rec["dirs"] = [r["_dir"] for r in members]
        out.append(rec)
    return out


def mixing_warnings(members: list[dict[str, Any]]) -> list[str]:
    """Why the runs of one group may not be one experiment over several seeds."""
    warnings: list[str] = []
    by_seed: dict[Any, list[str]] = {}
    for r in members:
        by_seed.setdefault(r["run"].get("seed"), []).append(r["_dir"])
    for seed, dirs in by_seed.items():
        if len(dirs) > 1:
            warnings.append(f"duplicate: seed {seed} in {len(dirs)} runs ({', '.join(dirs)}); each counts as a sample")
    known = [r for r in members if r.get("_versions") is not None]
    if len(known) < len(members):
        warnings.append(f"{len(members) - len(known)} run(s) without versions.json: library versions unknown")
    for label, keys in (("code version", {"backdoorbench"}), ("library versions", None)):
        differ = _differing(known, "_versions", keys)
        if differ:
            warnings.append(f"different {label}: {differ}")
    configs = [r for r in members if r.get("_config") is not None]
    if len(configs) < len(members):
        warnings.append(f"{len(members) - len(configs)} run(s) without config.yaml: configs unknown, grouped by name")
    for group in ("trainer", "data", "model"):
        differ = _differing(configs, "_config", None, group)
        if differ:
            warnings.append(f"different {group} configs: {differ}")
    return warnings + reproducibility_warnings(members)


def run_threads(res: dict[str, Any]) -> str:
    """The CPU thread count a run used: recorded in ``results.json`` (``reproducibility.threads``), else the
    configured ``threads`` of its ``config.yaml`` (``default`` for null: torch's default, the machine's cores)."""
    rec = res.get("reproducibility")
    if isinstance(rec, dict) and rec.get("threads") is not None:
        return str(rec["threads"])
    config = res.get("_config")
    if not isinstance(config, dict):
        return "unknown"
    return "default" if config.get("threads") is None else str(config["threads"])


def reproducibility_warnings(runs: list[dict[str, Any]]) -> list[str]:
    """Runs that mix CPU thread counts (CPU training sums in a thread-count-dependent order) or ran an operation
    without a deterministic implementation (docs/reproducibility.md)."""
    out = []
    counts = sorted({run_threads(r) for r in runs})
    if len(counts) > 1:
        out.append(f"different CPU thread counts: {' | '.join(counts)} (results depend on it; docs/reproducibility.md)")
    out += environment_warnings(runs)
    ops = sorted({op for r in runs for op in (r.get("reproducibility") or {}).get("nondeterministic_ops") or []})
    if ops:
        n = sum(bool((r.get("reproducibility") or {}).get("nondeterministic_ops")) for r in runs)
        out.append(f"{n} run(s) used operations without a deterministic implementation: {', '.join(ops)}")
    return out


def environment_warnings(runs: list[dict[str, Any]]) -> list[str]:
    """Runs that ran, or whose victims were trained, in different environments (CPU model, device, thread counts,
    library versions: ``versions.json``'s ``environment`` / ``victim_environment``). The runs' own thread counts
    are left to :func:`reproducibility_warnings`; records without an environment (older runs) are counted."""
    out = []
    for key, who in (("environment", "the runs ran"), ("victim_environment", "their victims were trained")):
        envs = [(r.get("_versions") or {}).get(key) for r in runs]
        known = [e for e in envs if isinstance(e, dict)]
        if not known:
            continue
        skip = {"threads", "interop_threads"} if key == "environment" else set()
        parts = []
        for k in ENVIRONMENT_KEYS:
            values = sorted({str(e.get(k)) for e in known}) if k not in skip else []
            if len(values) > 1:
                parts.append(f"{k}: {' | '.join(values)}")
        if parts:
            out.append(f"{who} in different environments: {'; '.join(parts)}")
        if len(known) < len(envs):
            out.append(f"{len(envs) - len(known)} of {len(envs)} run(s) without a recorded environment ({key})")
    return out


def _differing(runs: list[dict[str, Any]], attr: str, only: set[str] | None, group: str | None = None) -> str:
    """``key: a | b`` for each key whose value differs among ``runs`` (in ``run[attr]`` or its ``group`` node)."""
    nodes = []
    for r in runs:
        node = r[attr].get(group) if group else r[attr]
        nodes.append(node if isinstance(node, dict) else {})
    keys = sorted({k for n in nodes for k in n})
    if only is not None:
        keys = [k for k in keys if k in only]
    elif attr == "_versions":
        keys = [k for k in keys if k not in IGNORED_VERSION_KEYS and k != "backdoorbench"]
    parts = []
    for k in keys:
        values = sorted({json.dumps(n.get(k), sort_keys=True, default=str) for n in nodes})
        if len(values) > 1:
            parts.append(f"{k}: {' | '.join(values)}")
    return "; ".join(parts)
