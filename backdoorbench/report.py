"""Printing one run's results and summarising many runs (``python -m backdoorbench report DIR``)."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from backdoorbench.metrics import FRR_GRID
from backdoorbench.report_groups import attack_label, collect_runs, reproducibility_warnings, write_summary
from backdoorbench.store import atomic_write_text

log = logging.getLogger(__name__)


def _pct(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "—"
    return "—" if f != f else f"{100 * f:.1f}"


def _bold_lowest(values: list[Any]) -> list[str]:
    """Each value as `_pct` prints it, the lowest in bold (ties as printed; missing values never)."""
    shown = [_pct(v) for v in values]
    numbers = [float(v) for v, s in zip(values, shown) if s != "—"]
    lowest = _pct(min(numbers)) if numbers else None
    return [f"**{s}**" if s == lowest else s for s in shown]


def print_run_summary(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    m, r = results["metrics"], results["run"]
    console = Console()
    title = (
        f"{r['attack']} ({r.get('setting') or '-'}) vs {r['defense']} on {r['data']} / {r['model']}, seed {r['seed']}"
    )
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    t.add_column("value (%)", justify="right")
    t.add_row("BA (backdoored model)", _pct(m.get("ba")))
    t.add_row("ASR (backdoored model)", _pct(m.get("asr")))
    if "far_at_frr" in m:
        t.add_row(
            f"threshold (calibrated at FRR {_pct(results.get('frr_target'))}%)",
            f"{m.get('threshold', float('nan')):.4g}",
        )
        t.add_row(f"FAR at the configured FRR {_pct(results.get('frr_target'))}%", _pct(m.get("far")))
        for k, v in m["far_at_frr"].items():
            t.add_row(f"FAR @ FRR {_pct(float(k))}%", _pct(v))
        t.add_row("FRR reached on clean test", _pct(m.get("frr")))
        if "rejection_rate" in m:  # an external victim without a known trigger
            t.add_row("rejected of your inputs (clean test)", _pct(m.get("rejection_rate")))
        t.add_row("AUROC", _pct(m.get("auroc")))
        t.add_row("BA after rejection", _pct(m.get("ba_after_rejection")))
        t.add_row("ASR after rejection", _pct(m.get("asr_after_rejection")))
        if "ba_after_correction" in m:
            t.add_row("BA after input correction", _pct(m.get("ba_after_correction")))
            t.add_row("ASR after input correction", _pct(m.get("asr_after_correction")))
    if "removed" in m:  # a data-inspection defense: its verdict on the training samples
        t.add_row("training samples removed", f"{m['removed']} ({_pct(m.get('removed_fraction'))}%)")
        if "poison_recall" in m:
            t.add_row("poisoned training samples removed (recall)", _pct(m.get("poison_recall")))
            t.add_row("clean training samples removed",
                      f"{m.get('clean_removed')} ({_pct(m.get('clean_removed_fraction'))}%)")
            t.add_row("AUROC of the per-sample score", _pct(m.get("sample_auroc")))
    if "verdict_score" in m:  # model inspection: its verdict on the model (not percentages)
        t.add_row("verdict score (higher = more likely backdoored)", f"{m['verdict_score']:.3g}")
        t.add_row("flagged as backdoored", str(m.get("flagged")))
        t.add_row("suspected targets / most suspicious class", f"{m.get('suspected_targets')} / {m.get('top_class')}")
        if m.get("true_target") is not None:
            t.add_row("attack's target: most suspicious / flagged", f"{m.get('top_class_correct')} / "
                      f"{m.get('target_flagged')}")
    for key, label in (
        ("ba_after", "BA after defense"),
        ("asr_after", "ASR after defense"),
        ("r_acc_after", "R-Acc after defense"),
        ("der", "DER"),
    ):
        if key in m:
            t.add_row(label, _pct(m[key]))
    console.print(t)
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in results.get("timing", {}).items())
    cache = results.get("cache", {})
    if cache.get("stored") is False:  # an external victim: loaded from the user's file, never cached
        victim = f"loaded from {cache.get('info', {}).get('path', '?')}"
    else:
        victim = f"{'from cache' if cache.get('hit') else 'trained'} ({cache.get('key', '')})"
    console.print(f"timing: {timing}; victim {victim}")
    console.print(f"run directory: {results['out_dir']}")


def collect(root: Path) -> list[dict[str, Any]]:
    """Every run's results under ``root`` (see :func:`~backdoorbench.report_groups.collect_runs`)."""
    return collect_runs([Path(root)]).runs


RATES = [
    "ba",
    "asr",
    "far",
    "frr",
    "auroc",
    "ba_after_rejection",
    "asr_after_rejection",
    "ba_after_correction",
    "asr_after_correction",
    "ba_after",
    "asr_after",
    "r_acc_after",
    "der",
    "labelled_poisoned_fraction",
    "poison_recall",  # data inspection: training samples
    "clean_removed_fraction",
    "sample_auroc",
]
COLUMNS = (
    ["attack", "setting", "defense", "data", "model", "seed", *RATES[:5]]
    + [f"far@{g:g}" for g in FRR_GRID]
    + RATES[5:]
    + ["seconds_per_100_inputs", "forward_passes_per_input", "attack_config", "defense_config", "dir"]
)


def rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for res in results:
        r, m, c = res["run"], res["metrics"], res.get("cost", {})
        row = {k: r.get(k) for k in ("attack", "setting", "defense", "data", "model", "seed")}
        for k in RATES:
            row[k] = m.get(k)
        for g in FRR_GRID:
            row[f"far@{g:g}"] = m.get("far_at_frr", {}).get(f"{g:g}")
        row["seconds_per_100_inputs"] = c.get("seconds_per_100_inputs")
        row["forward_passes_per_input"] = c.get("forward_passes_per_input")
        row["attack_config"] = res.get("_attack_cfg", r.get("attack"))
        row["defense_config"] = res.get("_defense", r.get("defense"))
        row["dir"] = res.get("_dir")
        out.append(row)
    return out


def write_report(roots: Path | list[Path], out: Path | None = None, config_dir: Path | None = None) -> str:
    """Report on every run under ``roots`` (one folder or several sweeps, merged). Writes ``summary.md`` /
    ``summary.csv`` (one row per group of runs that differ only by seed: mean ± std and n; the failed and
    unreadable jobs; what a group mixes), ``report.csv`` / ``report.md`` (one row per run) and, when the runs
    include detectors or repair/training defenses, ``comparison.*`` and ``defended.*``, plus one ROC figure
    per attack. ``config_dir``: where the components' default configs are (for the ``name#hash`` labels).
    Returns the markdown."""
    roots = [Path(r) for r in roots] if isinstance(roots, list | tuple) else [Path(roots)]
    coll = collect_runs(roots, config_dir)
    results = coll.runs
    out = out or roots[0]
    out.mkdir(parents=True, exist_ok=True)
    md = write_summary(coll, out)
    mixed = reproducibility_warnings(results)  # across the whole table, not only within a group
    for warning in mixed:
        log.warning("report: the table mixes runs: %s", warning)
    if mixed:
        md += "\n## Reproducibility\n\n" + "".join(f"- ⚠ the table mixes runs: {w}\n" for w in mixed)
    table = rows(results)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(table)
    atomic_write_text(out / "report.csv", buf.getvalue())
    pct = set(RATES) | {f"far@{g:g}" for g in FRR_GRID}
    used = [c for c in COLUMNS if c != "dir" and any(row.get(c) is not None for row in table)]
    lines = ["| " + " | ".join(used) + " |", "|" + "---|" * len(used)]
    for row in table:
        cells = []
        for c in used:
            v = row.get(c)
            cells.append(
                _pct(v) if c in pct else ("—" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)))
            )
        lines.append("| " + " | ".join(cells) + " |")
    runs_md = "Rates in %.\n\n" + "\n".join(lines) + "\n"
    atomic_write_text(out / "report.md", runs_md)
    md += "\n## Runs\n\n" + runs_md if results else ""
    if not results:
        return md
    comp = write_comparison(results, out)
    if comp:
        md += "\n" + comp
    rep = write_defended_comparison(results, out)
    if rep:
        md += "\n" + rep
    return md


def write_defended_comparison(results: list[dict[str, Any]], out: Path) -> str:
    """Attacks × repair / training-time defenses: ``BA after / ASR after`` per cell (means over seeds), the
    backdoored victim's BA / ASR beside each attack; ``defended.md`` / ``defended.csv``. '' when no run
    used such a defense."""
    import pandas as pd

    recs = [
        {
            "attack": _setting_label(r, results),
            "defense": r.get("_defense", r["run"]["defense"]),
            **{k: r["metrics"].get(k) for k in ("ba", "asr", "ba_after", "asr_after", "r_acc_after", "der")},
        }
        for r in results
        if r["run"].get("defense_kind") in ("repair", "training") and "ba_after" in r["metrics"]
    ]
    if not recs:
        return ""
    df = pd.DataFrame(recs)
    groups = df.groupby(["attack", "defense"])
    cells = groups.mean(numeric_only=True).join(groups.size().rename("n")).reset_index()
    cells.to_csv(out / "defended.csv", index=False)
    defenses = sorted(cells["defense"].unique())
    n_note, tag = _seed_counts(cells["n"])
    lines = [
        "BA after / ASR after (%) per attack and defense; the backdoored victim's BA / ASR in the second column"
        + n_note,
        "",
        "| attack | victim BA / ASR | " + " | ".join(defenses) + " |",
        "|---" * (2 + len(defenses)) + "|",
    ]
    for attack, group in cells.groupby("attack"):
        first = group.iloc[0]
        row = [attack, f"{_pct(first['ba'])} / {_pct(first['asr'])}"]
        for d in defenses:
            hit = group[group.defense == d]
            if hit.empty:
                row.append("—")
                continue
            h = hit.iloc[0]
            row.append(f"{_pct(h['ba_after'])} / {_pct(h['asr_after'])}" + (f" (n={h['n']})" if tag else ""))
        lines.append("| " + " | ".join(row) + " |")
    md = "\n".join(lines) + "\n"
    atomic_write_text(out / "defended.md", md)
    return md


def _seed_counts(n: Any) -> tuple[str, bool]:
    """How many runs each cell of a table averages: the end of the table's first sentence, and whether the
    counts differ between cells (then every cell shows its own ``n=``, so that one seed is never read as three)."""
    counts = sorted(set(int(k) for k in n))
    if len(counts) > 1:
        return "; each cell is the mean of its n runs (seeds), which differ between cells.", True
    if counts[0] > 1:
        return f"; each cell is the mean of {counts[0]} runs (seeds).", False
    return ".", False


def _setting_label(res: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The attack's label (``name#hash (setting)``), prefixed with ``data / model:`` when the runs span more than
    one dataset or model, so that the tables never average over them."""
    label = attack_label(res)
    if len({(r["run"].get("data"), r["run"].get("model")) for r in results}) > 1:
        return f"{res['run'].get('data')} / {res['run'].get('model')}: {label}"
    return label


def write_comparison(results: list[dict[str, Any]], out: Path, frr: float = 0.05) -> str:
    """Attacks × detectors: FAR at ``frr`` FRR (AUROC, FRR reached), victims' BA/ASR, detector costs.

    Several seeds of one cell are averaged. Writes ``comparison.md``, ``comparison.csv`` and
    ``roc_<attack>.png``; returns the markdown ('' when no run used a detector).
    """
    import pandas as pd

    key = f"{frr:g}"
    recs = []
    for res in results:
        r, m, c = res["run"], res["metrics"], res.get("cost", {})
        if r.get("defense_kind") != "detector":
            continue
        recs.append(
            {
                "attack": _setting_label(res, results),
                "detector": res.get("_defense", r["defense"]),
                "ba": m.get("ba"),
                "asr": m.get("asr"),
                "far": m.get("far_at_frr", {}).get(key),
                "auroc": m.get("auroc"),
                "frr": m.get("frr"),
                "forward_passes_per_input": c.get("forward_passes_per_input"),
                "lm_passes_per_input": c.get("lm_passes_per_input"),
                "seconds_per_100_inputs": c.get("seconds_per_100_inputs"),
                "cached_inputs": c.get("cached_inputs", 0),
                "_dir": res["_dir"],
            }
        )
    if not recs:
        return ""
    df = pd.DataFrame(recs)
    num = [
        "ba",
        "asr",
        "far",
        "auroc",
        "frr",
        "forward_passes_per_input",
        "lm_passes_per_input",
        "seconds_per_100_inputs",
    ]
    df[num] = df[num].apply(pd.to_numeric, errors="coerce")
    groups = df.groupby(["attack", "detector"])
    cells = groups[num].mean().join(groups.size().rename("n")).reset_index()
    cells.to_csv(out / "comparison.csv", index=False)
    detectors = sorted(cells["detector"].unique())
    victims = cells.groupby("attack")[["ba", "asr"]].mean()
    n_note, tag = _seed_counts(cells["n"])
    lines = [
        f"FAR (%) at {100 * frr:g}% FRR target — in brackets AUROC (%) and the FRR reached on clean test data"
        + n_note,
        "",
        "| attack | BA | ASR | " + " | ".join(detectors) + " |",
        "|---" * (3 + len(detectors)) + "|",
    ]
    for attack, v in victims.iterrows():
        row = [attack, _pct(v["ba"]), _pct(v["asr"])]
        mine = cells[cells.attack == attack].set_index("detector")
        fars = dict(zip(mine.index, _bold_lowest(list(mine["far"]))))  # the lowest FAR of the row in bold
        for d in detectors:
            if d not in mine.index:
                row.append("—")
            else:
                n = f"; n={mine.loc[d, 'n']}" if tag else ""
                row.append(f"{fars[d]} ({_pct(mine.loc[d, 'auroc'])}, {_pct(mine.loc[d, 'frr'])}{n})")
        lines.append("| " + " | ".join(row) + " |")
    # the average runs over the attacks every detector was measured on, so that partial tables compare like with like
    full = [a for a, n in cells.groupby("attack")["detector"].nunique().items() if n == len(detectors)]
    avg = cells[cells.attack.isin(full)].groupby("detector")["far"].mean()
    label = "**average**"
    if len(full) < len(victims):
        label += f" ({len(full)} of {len(victims)} attacks: those every detector has)"
    if full:
        lines.append(f"| {label} | | | " + " | ".join(_bold_lowest([avg[d] for d in detectors])) + " |")
    lines += [
        "",
        "| detector | forward passes / input | LM passes / input | seconds / 100 inputs |",
        "|---|---|---|---|",
    ]
    # cost from the runs that scored every input themselves: a run that reused cached scores of inputs seen
    # by an earlier run of the sweep (ONION's LM suspicions) did less work than a lone run would
    cost_cols = ["forward_passes_per_input", "lm_passes_per_input", "seconds_per_100_inputs"]
    df["cached_inputs"] = pd.to_numeric(df["cached_inputs"], errors="coerce").fillna(0)
    partial = False
    for d in detectors:
        mine = df[df.detector == d]
        full = mine[mine.cached_inputs == 0]
        partial |= full.empty
        a = (full if not full.empty else mine)[cost_cols].mean()
        mark = " †" if full.empty else ""
        lm = "—" if pd.isna(a["lm_passes_per_input"]) else f"{a['lm_passes_per_input']:.1f}"
        lines.append(
            f"| {d}{mark} | {a['forward_passes_per_input']:.1f} | {lm} | {a['seconds_per_100_inputs']:.2f} |"
        )
    if partial:
        lines += ["", "† every run of this detector reused scores cached by an earlier run: cost understated."]
    md = "\n".join(lines) + "\n"
    atomic_write_text(out / "comparison.md", md)
    for attack, group in df.groupby("attack"):
        try:
            roc_figure(out / f"roc_{_slug(attack)}.png", attack, list(zip(group["detector"], map(Path, group["_dir"]))))
        except (OSError, ValueError) as exc:  # missing scores.csv: the table is still written
            md += f"\n(no ROC figure for {attack}: {exc})\n"
    return md


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_")


def roc_figure(path: Path, attack: str, runs: list[tuple[str, Path]]) -> Path:
    """One ROC curve per detector for one attack, from each run's ``scores.csv``."""
    import numpy as np
    from sklearn.metrics import roc_curve

    from backdoorbench.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for detector, run_dir in sorted(runs):
        y, s = [], []
        with (run_dir / "scores.csv").open() as f:
            for row in csv.DictReader(f):
                if row["score"] == "":
                    continue
                if row["split"] == "clean":
                    y.append(0)
                elif row.get("attack_success") == "1":
                    y.append(1)
                else:
                    continue
                s.append(float(row["score"]))
        if len(set(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(np.array(y), np.array(s))
        ax.plot(fpr, tpr, label=detector)
    ax.plot([0, 1], [0, 1], color="grey", ls=":")
    ax.set_xlabel("FRR (clean inputs rejected)")
    ax.set_ylabel("1 − FAR (poisoned inputs rejected)")
    ax.set_title(f"ROC: {attack}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
