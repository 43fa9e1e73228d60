"""The model-level table of model-inspection runs (Neural Cleanse, DBS): over a zoo of clean and backdoored victims,
the AUROC of the verdict score, the TPR / FPR at the method's own flag and the accuracy of the suspected target
class (``zoo.md``, ``zoo.csv``, ``zoo_models.csv``, ``roc_zoo_*.png``; docs/metrics.md, "Model-inspection metrics").

A zoo is the inspection runs of one defense config on one (data, model). Which victims are backdoored is read from
each run's ``config.yaml`` after the inspections (:func:`zoo_label`): the defender never sees it."""

from __future__ import annotations

import csv
import io
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from backdoorbench.report.fmt import pct, slug
from backdoorbench.report_groups import attack_label, mean_std
from backdoorbench.store import atomic_write_text

#: the zoo-level numbers (rates 0-1), each a mean over seeds when the zoo is repeated per seed
RATE_KEYS = ("auroc", "tpr", "fpr", "target_top_class", "target_flagged")
MODEL_FIELDS = ["defense", "data", "model", "attack", "seed", "backdoored", "verdict_score", "flagged", "top_class",
                "suspected_targets", "true_target", "top_class_correct", "target_flagged", "defense_s", "total_s",
                "victim", "dir"]


def zoo_label(res: dict[str, Any]) -> tuple[bool | None, str]:
    """Whether the run's victim is backdoored, and why; ``None`` when the records cannot tell (then the run is left
    out of the zoo with that reason). The rule: ``attack=external`` (a user's checkpoint) has no ground truth; an
    attack whose config has ``poison_rate`` is backdoored iff it is > 0 (``attack=badnets attack.poison_rate=0`` is
    the zoo's clean victim); an attack without ``poison_rate`` (weight poisoning: DFEP, NeuBA, BadPre) always
    implants its backdoor. A run without ``config.yaml`` cannot be labelled."""
    if str(res["run"].get("attack")) == "external":
        return None, "attack=external: a model with no ground truth (whether it is backdoored is the question)"
    node = (res.get("_config") or {}).get("attack")
    if not isinstance(node, dict):
        return None, "no attack config (config.yaml) beside results.json: cannot tell clean from backdoored"
    if "poison_rate" not in node:
        return True, "an attack without poison_rate (it poisons the weights)"
    try:
        rate = float(node["poison_rate"])
    except (TypeError, ValueError):
        return None, f"attack.poison_rate is {node['poison_rate']!r}: not a number"
    return (rate > 0), f"attack.poison_rate={rate:g}"


def _number(v: Any) -> float | None:
    """A recorded score as a float (``inf`` kept); None for a missing / non-numeric / NaN one."""
    if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
        return None
    return float(v)


def zoo_models(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """One record per model-inspection run (``verdict_score`` in its metrics) that can be labelled, and the runs left
    out (``{"dir", "reason"}``)."""
    models, left_out = [], []
    for res in results:
        r, m = res["run"], res["metrics"]
        if "verdict_score" not in m:
            continue
        backdoored, why = zoo_label(res)
        if backdoored is None:
            left_out.append({"dir": str(res.get("_dir")), "reason": why})
            continue
        timing = res.get("timing") or {}
        models.append({
            "defense": res.get("_defense") or str(r.get("defense")), "data": str(r.get("data")),
            "model": str(r.get("model")), "attack": attack_label(res), "seed": r.get("seed"),
            "backdoored": backdoored, "verdict_score": _number(m.get("verdict_score")),
            "flagged": bool(m.get("flagged")), "top_class": m.get("top_class"),
            "suspected_targets": m.get("suspected_targets") or [],
            "true_target": m.get("true_target") if backdoored else None,
            "top_class_correct": m.get("top_class_correct") if backdoored else None,
            "target_flagged": m.get("target_flagged") if backdoored else None,
            "defense_s": _number(timing.get("defense")), "total_s": _number(timing.get("total")),
            "dir": str(res.get("_dir")), "victim": (res.get("cache") or {}).get("key"),
        })
    return models, left_out


def _auroc(models: list[dict[str, Any]]) -> float | None:
    """AUROC of the verdict score over models (backdoored positive; scikit-learn); None without both classes.
    ±inf scores are moved just past the finite ones (the same ranks); models without a score are left out."""
    from sklearn.metrics import roc_auc_score

    scored = [(m["backdoored"], m["verdict_score"]) for m in models if m["verdict_score"] is not None]
    finite = [s for _, s in scored if math.isfinite(s)] or [0.0]
    lo, hi = min(finite) - 1.0, max(finite) + 1.0
    y = [int(b) for b, _ in scored]
    s = [s if math.isfinite(s) else (hi if s > 0 else lo) for _, s in scored]
    return float(roc_auc_score(y, s)) if len(set(y)) == 2 else None


def _share(flags: list[Any]) -> float | None:
    known = [bool(f) for f in flags if f is not None]
    return sum(known) / len(known) if known else None


def zoo_numbers(models: list[dict[str, Any]]) -> dict[str, Any]:
    """The zoo-level numbers of a set of models: counts, AUROC, TPR / FPR at the method's flag, and over the
    backdoored models with one known target: the share whose most suspicious class is the target
    (``top_class_correct``) and whose flagged classes include it (``target_flagged``)."""
    clean = [m for m in models if not m["backdoored"]]
    bad = [m for m in models if m["backdoored"]]
    targeted = [m for m in bad if m["true_target"] is not None]
    return {
        "n_clean": len(clean), "n_backdoored": len(bad), "n_targeted": len(targeted),
        "flagged_clean": sum(m["flagged"] for m in clean), "flagged_backdoored": sum(m["flagged"] for m in bad),
        "top_class_hits": sum(bool(m["top_class_correct"]) for m in targeted),
        "target_flagged_hits": sum(bool(m["target_flagged"]) for m in targeted),
        "auroc": _auroc(models),
        "tpr": _share([m["flagged"] for m in bad]), "fpr": _share([m["flagged"] for m in clean]),
        "target_top_class": _share([m["top_class_correct"] for m in targeted]),
        "target_flagged": _share([m["target_flagged"] for m in targeted]),
    }


def repeated_seeds(models: list[dict[str, Any]]) -> list[Any]:
    """The seeds, when the zoo is the same zoo repeated per seed: at least two seeds, each with the same victims
    (attack configs, clean or backdoored) and both clean and backdoored ones; else []."""
    per_seed: dict[Any, Counter[tuple[str, bool]]] = {}
    for m in models:
        per_seed.setdefault(m["seed"], Counter())[(m["attack"], m["backdoored"])] += 1
    kinds = list(per_seed.values())
    if len(kinds) < 2 or any(k != kinds[0] for k in kinds):
        return []
    if {b for _, b in kinds[0]} != {False, True}:
        return []
    return sorted(per_seed, key=lambda s: (s is None, str(s)))


def _zoos(models: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    zoos: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for m in models:
        zoos.setdefault((m["defense"], m["data"], m["model"]), []).append(m)
    return dict(sorted(zoos.items()))


def zoo_summary(models: list[dict[str, Any]]) -> dict[str, Any]:
    """The zoo's record: :func:`zoo_numbers` over all its models, and where the zoo is repeated per seed each rate
    as the mean over the seeds' zoos with ``<rate>_std`` (ddof=1) and ``seeds`` (their number)."""
    rec = zoo_numbers(models)
    seeds = repeated_seeds(models)
    rec["seeds"] = len(seeds)
    if seeds:
        per_seed = [zoo_numbers([m for m in models if m["seed"] == s]) for s in seeds]
        for k in RATE_KEYS:
            mean, std, n = mean_std([p[k] for p in per_seed])
            rec[k], rec[f"{k}_std"], rec[f"{k}_n"] = (mean, std, n) if n else (None, None, 0)
    rec["defense_s"] = sum(m["defense_s"] or 0.0 for m in models)
    rec["total_s"] = sum(m["total_s"] or 0.0 for m in models)
    return rec


def _rate(rec: dict[str, Any], key: str, hits: str | None = None, of: str | None = None) -> str:
    """A rate in %: ``mean ± std`` over seeds for a repeated zoo, else the value with its count (``7/12``)."""
    v = rec.get(key)
    if v is None:
        return "—"
    if rec.get("seeds"):
        std, n = rec.get(f"{key}_std"), rec.get(f"{key}_n")
        cell = pct(v) + (f" ± {pct(std)}" if std is not None and std == std else "")
        return cell + (f" (n={n})" if n != rec["seeds"] else "")
    return pct(v) + (f" ({rec[hits]}/{rec[of]})" if hits and of else "")


def _score(values: list[float | None]) -> str:
    """Mean ± std of the finite scores, and how many were ±inf."""
    xs = [v for v in values if v is not None]
    mean, std, n = mean_std(xs)
    cell = "—" if n == 0 else f"{mean:.3g}" + (f" ± {std:.3g}" if n >= 2 else "")
    return cell + (f" (+{len(xs) - n} inf)" if n < len(xs) else "")


def _attack_rows(defense: str, where: str, models: list[dict[str, Any]]) -> list[str]:
    """One row per (attack config, clean or backdoored): n, seeds, targets, verdict score mean ± std over the
    seeds, flagged, and for backdoored victims the target found (most suspicious class; among the flagged)."""
    rows = []
    keys = sorted({(m["backdoored"], m["attack"]) for m in models})
    for backdoored, attack in keys:
        mine = [m for m in models if m["attack"] == attack and m["backdoored"] == backdoored]
        seeds = " ".join(map(str, sorted({m["seed"] for m in mine}, key=lambda s: (s is None, str(s)))))
        targeted = [m for m in mine if m["true_target"] is not None]
        targets = " ".join(map(str, sorted({m["true_target"] for m in targeted}))) if backdoored else "—"
        found = (f"{sum(bool(m['top_class_correct']) for m in targeted)}/{len(targeted)} | "
                 f"{sum(bool(m['target_flagged']) for m in targeted)}/{len(targeted)}") if targeted else "— | —"
        rows.append(f"| {defense} | {where} | {attack} | {'backdoored' if backdoored else 'clean'} | {targets} | "
                    f"{seeds} | {len(mine)} | {_score([m['verdict_score'] for m in mine])} | "
                    f"{sum(m['flagged'] for m in mine)}/{len(mine)} | {found} |")
    return rows


def zoo_table(results: list[dict[str, Any]]) -> str:
    """The model-level tables (markdown): a row per zoo, then a row per attack config; the runs left out and why.
    '' when no run is a model inspection."""
    models, left_out = zoo_models(results)
    if not models and not left_out:
        return ""
    zoos = _zoos(models)
    lines = [
        "Model-level detection over a zoo of clean and backdoored victims (rates in %): AUROC of the verdict score "
        "(backdoored positive), TPR and FPR at the method's own flag, and over the backdoored victims with one "
        "target the share whose most suspicious class is the target (top class) and whose flagged classes include "
        "it (flagged); in brackets the counts. A zoo repeated per seed shows mean ± std over its seeds (ddof=1).",
        "",
        "| defense | data / model | clean | backdoored | seeds | AUROC | TPR at flag | FPR at flag | "
        "target: top class | target: flagged | inspection s | run s |",
        "|---" * 12 + "|",
    ]
    for (defense, data, model), mine in zoos.items():
        rec = zoo_summary(mine)
        seeds = f"{rec['seeds']} (repeated)" if rec["seeds"] else "pooled"
        lines.append(
            f"| {defense} | {data} / {model} | {rec['n_clean']} | {rec['n_backdoored']} | {seeds} | "
            f"{_rate(rec, 'auroc')} | {_rate(rec, 'tpr', 'flagged_backdoored', 'n_backdoored')} | "
            f"{_rate(rec, 'fpr', 'flagged_clean', 'n_clean')} | "
            f"{_rate(rec, 'target_top_class', 'top_class_hits', 'n_targeted')} | "
            f"{_rate(rec, 'target_flagged', 'target_flagged_hits', 'n_targeted')} | "
            f"{rec['defense_s']:.0f} | {rec['total_s']:.0f} |")
    lines += [
        "", "Per attack config: the verdict score's mean ± std over the models (seeds), how many the method flagged, "
        "and for backdoored victims how many had the target as the most suspicious class | among the flagged ones.",
        "",
        "| defense | data / model | attack | victim | target | seeds | n | verdict score | flagged | "
        "target: top class | target: flagged |",
        "|---" * 11 + "|",
    ]
    for (defense, data, model), mine in zoos.items():
        lines += _attack_rows(defense, f"{data} / {model}", mine)
    notes = ["", "Clean = the attack config's `poison_rate` is 0; `attack=external` runs have no ground truth and are "
             "left out. Times: wall seconds summed over the zoo's runs (`timing.defense`; `timing.total`, which "
             "includes a victim's training only where the run trained it rather than loading it from the cache)."]
    no_target = sum(m["backdoored"] and m["true_target"] is None for m in models)
    if no_target:
        notes.append(f"{no_target} backdoored victim(s) without one target (all-to-all) count in AUROC and TPR, "
                     "not in the target columns.")
    keys = Counter((m["defense"], m["data"], m["model"], m["victim"]) for m in models if m["victim"])
    repeats = sum(n - 1 for n in keys.values() if n > 1)
    if repeats:
        notes.append(f"{repeats} run(s) inspected a victim (cache key) that another run of the same zoo inspected "
                     "too: each counts as a model.")
    if any(m["verdict_score"] is None for m in models):
        notes.append("Models without a verdict score (null) are left out of the AUROC.")
    if left_out:  # the folders named from the runs' common folder: the same text wherever the records lie
        base = Path(os.path.commonpath([str(r.get("_dir")) for r in results])).parent
        notes += ["", f"Left out ({len(left_out)} run(s)):", ""]
        notes += [f"- `{_relative(x['dir'], base)}`: {x['reason']}" for x in left_out]
    return "\n".join(lines + notes) + "\n"


def _relative(path: str, base: Path) -> str:
    try:
        return Path(path).relative_to(base).as_posix()
    except ValueError:
        return path


def zoo_figure(path: Path, title: str, models: list[dict[str, Any]]) -> Path | None:
    """The ROC curve of the verdict score over the zoo's models; None without both classes."""
    from sklearn.metrics import roc_curve

    from backdoorbench.plots import _plt
    from backdoorbench.report.roc import save_roc

    scored = [m for m in models if m["verdict_score"] is not None]
    y = [int(m["backdoored"]) for m in scored]
    if len(set(y)) < 2:
        return None
    finite = [m["verdict_score"] for m in scored if math.isfinite(m["verdict_score"])] or [0.0]
    s = [v if math.isfinite(v) else (max(finite) + 1 if v > 0 else min(finite) - 1)
         for v in (m["verdict_score"] for m in scored)]
    fpr, tpr, _ = roc_curve(y, s)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot(fpr, tpr, marker="o", label=f"{sum(y)} backdoored, {len(y) - sum(y)} clean")
    flagged_fpr = _share([m["flagged"] for m in scored if not m["backdoored"]])
    flagged_tpr = _share([m["flagged"] for m in scored if m["backdoored"]])
    ax.plot([flagged_fpr], [flagged_tpr], marker="*", markersize=12, ls="", label="the method's own flag")
    return save_roc(fig, ax, path, "FPR (clean models flagged)", "TPR (backdoored models flagged)",
                    f"ROC over models: {title}")


def write_zoo(results: list[dict[str, Any]], out: Path) -> str:
    """``zoo.md`` (:func:`zoo_table`), ``zoo.csv`` (a row per zoo), ``zoo_models.csv`` (a row per labelled model)
    and one ``roc_zoo_<defense>_<data>_<model>.png`` per zoo. Returns the markdown ('' when no run is a model
    inspection; nothing is written then)."""
    md = zoo_table(results)
    if not md:
        return ""
    models, _ = zoo_models(results)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MODEL_FIELDS)
    w.writeheader()
    w.writerows({**m, "suspected_targets": " ".join(map(str, m["suspected_targets"]))} for m in models)
    atomic_write_text(out / "zoo_models.csv", buf.getvalue())
    buf = io.StringIO()
    fields = ["defense", "data", "model", "n_clean", "n_backdoored", "n_targeted", "seeds", "flagged_clean",
              "flagged_backdoored", "top_class_hits", "target_flagged_hits"]
    fields += [f"{k}{s}" for k in RATE_KEYS for s in ("", "_std")] + ["defense_s", "total_s"]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    notes = ""
    for (defense, data, model), mine in _zoos(models).items():
        w.writerow({"defense": defense, "data": data, "model": model, **zoo_summary(mine)})
        try:
            zoo_figure(out / f"roc_zoo_{slug(f'{defense} {data} {model}')}.png", f"{defense}, {data} / {model}", mine)
        except (OSError, ValueError) as exc:  # the table is still written
            notes += f"\n(no ROC figure for {defense} on {data} / {model}: {exc})\n"
    atomic_write_text(out / "zoo.csv", buf.getvalue())
    atomic_write_text(out / "zoo.md", md)
    return md + notes
