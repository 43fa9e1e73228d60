"""Printing one run's results, and the report over many runs (``python -m backdoorbench report DIR``)."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from backdoorbench.metrics import FRR_GRID
from backdoorbench.report.fmt import pct as _pct
from backdoorbench.report.reference import reference_table
from backdoorbench.report.seeds import defended_by_seed, detectors_by_seed
from backdoorbench.report.summary import write_summary
from backdoorbench.report.tables import write_comparison, write_defended_comparison
from backdoorbench.report.zoo import write_zoo
from backdoorbench.report_groups import collect_runs, reproducibility_warnings
from backdoorbench.store import atomic_write_text

log = logging.getLogger("backdoorbench.report")


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


def write_report(
    roots: Path | list[Path], out: Path | None = None, config_dir: Path | None = None, reference: Path | None = None
) -> str:
    """Report on every run under ``roots`` (one folder or several sweeps, merged). Writes ``summary.md`` /
    ``summary.csv`` (one row per group of runs that differ only by seed: mean ± std and n; the failed and
    unreadable jobs; what a group mixes), ``report.csv`` / ``report.md`` (one row per run) and, when the runs
    include detectors or repair/training defenses, ``comparison.*`` and ``defended.*``, plus one ROC figure
    per attack; for model-inspection runs the model-level table over the zoo (``zoo.*``, ``zoo_models.csv``,
    ``roc_zoo_*.png``: :mod:`~backdoorbench.report.zoo`); ``by_seed.md`` when a cell has several seeds (a row
    per seed, mean ± std, paired differences);
    ``reference.md`` with ``reference`` (a published-figures CSV: :mod:`~backdoorbench.report.reference`).
    ``config_dir``: where the components' default configs are (for the ``name#hash`` labels). Returns the markdown."""
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
    zoo = write_zoo(results, out)
    if zoo:
        md += "\n## Model inspection over the zoo\n\n" + zoo
    by_seed = _by_seed(results)
    if by_seed:
        atomic_write_text(out / "by_seed.md", by_seed)
        md += "\n## Per seed\n\n" + by_seed
    if reference is not None:
        ref = reference_table(results, reference) or "No cell of these runs has a published figure.\n"
        atomic_write_text(out / "reference.md", ref)
        md += "\n## Published figures\n\n" + ref
    return md


def _by_seed(results: list[dict[str, Any]]) -> str:
    """The per-seed tables, when some (attack, defense) cell holds more than one seed."""
    cells: dict[tuple[Any, ...], set[Any]] = {}
    for r in results:
        cells.setdefault((r["run"].get("attack"), r.get("_defense"), r["run"].get("data")), set()).add(
            r["run"].get("seed"))
    if all(len(seeds) < 2 for seeds in cells.values()):
        return ""
    parts = [t for t in (detectors_by_seed(results), defended_by_seed(results)) if t]
    return "\n".join(parts)


