"""Published figures beside ours (``python -m backdoorbench report DIR --reference [CSV]``).

``published.csv`` (this folder; one copy, shipped with the package) holds the figures the papers and leaderboards
publish, one row per (source, attack, defense, data, model, poison rate, config, metric): all 192 rows of
BackdoorBench's leaderboard for CIFAR-10 / PreAct-ResNet-18 / 10% (CA, ASR, RA as ``ba(_after)``,
``asr(_after)``, ``r_acc(_after)``), the DBD, NAD and RNP READMEs / logs and the DAN paper's summary gaps; each
row names its source. Names are ours (BackdoorBench's ``badnet`` is ``badnets``, ``ft`` is ``finetune``; the
original names are in ``note``). Values are in % as published; an empty value is NA in the source.

A published row matches one of our cells when attack, defense (``none`` for the victim before a defense) and
metric are the same and the row has no ``config`` (a variant such as RNP at threshold 0.3). Data, model and
poison rate need not be the same: the table then says how the scales differ, so that a figure at MNIST /
WRN-16-1 scale is never read as a reproduction of one at CIFAR-10 / PreAct-ResNet-18 scale.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from backdoorbench.report.fmt import pct
from backdoorbench.report_groups import mean_std

DEFAULT_CSV = Path(__file__).with_name("published.csv")
#: our metric -> the published metric of the same quantity (the victim's, before a defense, under defense "none")
METRICS = {"ba": "ba", "asr": "asr", "ba_after": "ba_after", "asr_after": "asr_after", "r_acc_after": "r_acc_after"}
#: our defense names whose published counterpart has another name (the paper-scale schedule of the same defense)
DEFENSE_ALIASES = {"dbd_full": "dbd"}


def load_published(path: Path = DEFAULT_CSV) -> list[dict[str, str]]:
    """The published rows; :class:`FileNotFoundError` / ``ValueError`` for a missing or malformed file."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"source", "attack", "defense", "data", "model", "poison_rate", "metric", "value"}
    if rows and not need <= set(rows[0]):
        raise ValueError(f"{path}: a published-figures CSV needs the columns {', '.join(sorted(need))}")
    return rows


def _poison_rate(res: dict[str, Any]) -> str:
    attack = (res.get("_config") or {}).get("attack")
    rate = attack.get("poison_rate") if isinstance(attack, dict) else None
    return "" if rate is None else f"{float(rate):g}"


def scale_note(ours: dict[str, str], theirs: dict[str, str]) -> str:
    """'same scale', or what differs: ``data mnist5k vs cifar10; model wrn16_1 vs preact_resnet18``."""
    diffs = []
    for key in ("data", "model", "poison_rate"):
        a, b = ours.get(key, ""), theirs.get(key, "")
        if a and b and (float(a) != float(b) if key == "poison_rate" else a != b):
            shown = (f"{100 * float(a):g}%", f"{100 * float(b):g}%") if key == "poison_rate" else (a, b)
            diffs.append(f"{key.replace('_', ' ')} {shown[0]} vs {shown[1]}")
    return "same scale" if not diffs else "**different scale**: " + "; ".join(diffs)


def _cells(results: list[dict[str, Any]]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """Our repair / training-time runs, and the runs without a defense (the victim alone), grouped by (attack,
    defense label, defense, data, model, poison rate)."""
    cells: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for res in results:
        r = res["run"]
        defended = r.get("defense_kind") in ("repair", "training") and "ba_after" in res["metrics"]
        if not defended and r.get("defense") != "none":
            continue
        key = (str(r.get("attack")), res.get("_defense") or str(r.get("defense")), str(r.get("defense")),
               str(r.get("data")), str(r.get("model")), _poison_rate(res))
        cells.setdefault(key, []).append(res)
    return cells


def reference_rows(results: list[dict[str, Any]], published: list[dict[str, str]]) -> list[dict[str, str]]:
    """One row per (our cell, metric, matching published row): our mean over seeds (%, n), theirs, the source and
    the scale note. Our victim's BA / ASR are compared with the published ``none`` rows."""
    out = []
    for (attack, label, defense, data, model, rate), runs in sorted(_cells(results).items()):
        ours = {"data": data, "model": model, "poison_rate": rate}
        for metric, theirs_metric in METRICS.items():
            mean, _, n = mean_std([r["metrics"].get(metric) for r in runs])
            if n == 0:
                continue
            their_defense = "none" if metric in ("ba", "asr") else DEFENSE_ALIASES.get(defense, defense)
            for row in published:
                if (row["attack"], row["defense"], row["metric"]) != (attack, their_defense, theirs_metric):
                    continue
                if row.get("config"):
                    continue
                out.append({
                    "attack": attack, "defense": label if metric not in ("ba", "asr") else "none (victim)",
                    "metric": metric, "ours": pct(mean) + (f" (n={n})" if n > 1 else ""),
                    "published": row["value"] or "NA", "source": row["source"],
                    "ours_scale": f"{data} / {model} / {rate or '?'}",
                    "scale": scale_note(ours, row),
                })
    seen, unique = set(), []
    for row in out:  # the victim's rows repeat for every defense of the same attack
        key = tuple(row.values())
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def reference_table(results: list[dict[str, Any]], path: Path = DEFAULT_CSV) -> str:
    """Markdown: our figure and the published one side by side, with the source and a scale note ('' when no cell
    of ours has a published counterpart)."""
    rows = reference_rows(results, load_published(path))
    if not rows:
        return ""
    lines = [
        "Published figures beside ours (%, ours the mean over seeds; `published.csv` of backdoorbench.report, or "
        "the CSV given to `--reference`):",
        "",
        "| attack | defense | metric | ours | published | source | scale (ours: data / model / poison rate) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['attack']} | {r['defense']} | {r['metric']} | {r['ours']} | {r['published']} | "
                     f"{r['source']} | {r['ours_scale']}: {r['scale']} |")
    return "\n".join(lines) + "\n"
