"""``summary.md`` / ``summary.csv``: one row per group of runs that differ only by seed (report_groups), with
mean ± std and n, the legend of the config hashes, what groups mix, the failed jobs and the skipped files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from backdoorbench.report_groups import SUMMARY_METRICS, Collection, summarise
from backdoorbench.store import atomic_write_text


def _mean_std_cell(rec: dict[str, Any], metric: str) -> str:
    mean, std, n = rec[f"{metric}_mean"], rec[f"{metric}_std"], rec[f"{metric}_n"]
    if n == 0:
        return "—"
    cell = f"{100 * mean:.1f} ± {100 * std:.1f}" if n >= 2 else f"{100 * mean:.1f}"
    return cell if n == rec["n"] else f"{cell} (n={n})"


def write_summary(coll: Collection, out: Path) -> str:
    """``summary.md`` / ``summary.csv``: one row per (data, model, attack config, defense config) with mean ±
    std (ddof=1, shown from n = 2) and n over its runs, each seed's run one sample; then the legend of the
    config hashes, what groups mix, the failed jobs and the skipped files. Returns the markdown."""
    groups = summarise(coll.runs)
    metrics = [m for m in SUMMARY_METRICS if any(g[f"{m}_n"] for g in groups)]
    buf = io.StringIO()
    fields = ["data", "model", "attack", "defense", "n", "seeds"]
    fields += [f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")] + ["warnings"]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for g in groups:
        w.writerow({**g, "seeds": " ".join(map(str, g["seeds"])), "warnings": " / ".join(g["warnings"])})
    atomic_write_text(out / "summary.csv", buf.getvalue())

    lines = ["# Summary", "", f"{len(coll.runs)} runs in {len(groups)} groups; rates in %, mean ± std over "
             "the runs of a group (one per seed, std with ddof=1), n = runs.", ""]
    if groups:
        head = ["data", "model", "attack", "defense", "n", "seeds", *metrics]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, g in enumerate(groups, 1):
            mark = f" ⚠{i}" if g["warnings"] else ""
            cells = [g["data"], g["model"], g["attack"], g["defense"] + mark, str(g["n"]),
                     " ".join(map(str, g["seeds"]))]
            lines.append("| " + " | ".join(cells + [_mean_std_cell(g, m) for m in metrics]) + " |")
    if coll.legend:
        lines += ["", "Configs that differ from the component's default:", ""]
        lines += [f"- `{lab}`: " + ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in sorted(diff.items()))
                  for lab, diff in sorted(coll.legend.items())]
    mixed = [(i, g) for i, g in enumerate(groups, 1) if g["warnings"]]
    if mixed:
        lines += ["", "## Groups that mix runs they should not", ""]
        for i, g in mixed:
            lines += [f"- ⚠{i} {g['data']} / {g['model']} / {g['attack']} / {g['defense']}:"]
            lines += [f"  - {warning}" for warning in g["warnings"]]
    if coll.failed:
        lines += ["", f"## Failed jobs ({len(coll.failed)})", "", "| job directory | error | overrides |",
                  "|---|---|---|"]
        lines += [f"| {f['dir']} | {_cell(f['error'])} | {_cell(f['overrides'])} |" for f in coll.failed]
    if coll.skipped:
        lines += ["", f"## Skipped files ({len(coll.skipped)})", "", "| file | reason |", "|---|---|"]
        lines += [f"| {s['path']} | {_cell(s['reason'])} |" for s in coll.skipped]
    md = "\n".join(lines) + "\n"
    atomic_write_text(out / "summary.md", md)
    return md


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
