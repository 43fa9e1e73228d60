"""The tables ``report`` writes across runs: attacks × detectors (``comparison.*``, with ROC figures) and attacks ×
repair / training-time defenses (``defended.*``); one cell per (attack, defense), the mean over its seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backdoorbench.report.fmt import bold_lowest, pct, seed_counts, setting_label, slug
from backdoorbench.report.roc import roc_figure
from backdoorbench.store import atomic_write_text

#: a detector run's numeric columns (the FAR at the table's FRR, quality and cost)
DETECTOR_NUMBERS = [
    "ba", "asr", "far", "auroc", "frr", "forward_passes_per_input", "lm_passes_per_input", "seconds_per_100_inputs",
]
COST_COLUMNS = ["forward_passes_per_input", "lm_passes_per_input", "seconds_per_100_inputs"]


def defended_records(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per repair / training-time run: attack label, defense label, seed, BA / ASR before and after."""
    return [
        {
            "attack": setting_label(r, results),
            "defense": r.get("_defense", r["run"]["defense"]),
            "seed": r["run"].get("seed"),
            **{k: r["metrics"].get(k) for k in ("ba", "asr", "ba_after", "asr_after", "r_acc_after", "der")},
        }
        for r in results
        if r["run"].get("defense_kind") in ("repair", "training") and "ba_after" in r["metrics"]
    ]


def write_defended_comparison(results: list[dict[str, Any]], out: Path) -> str:
    """Attacks × repair / training-time defenses: ``BA after / ASR after`` per cell (means over seeds), the
    backdoored victim's BA / ASR beside each attack; ``defended.md`` / ``defended.csv``. '' when no run
    used such a defense."""
    import pandas as pd

    recs = defended_records(results)
    if not recs:
        return ""
    df = pd.DataFrame(recs).drop(columns="seed")
    groups = df.groupby(["attack", "defense"])
    cells = groups.mean(numeric_only=True).join(groups.size().rename("n")).reset_index()
    cells.to_csv(out / "defended.csv", index=False)
    defenses = sorted(cells["defense"].unique())
    n_note, tag = seed_counts(cells["n"])
    lines = [
        "BA after / ASR after (%) per attack and defense; the backdoored victim's BA / ASR in the second column"
        + n_note,
        "",
        "| attack | victim BA / ASR | " + " | ".join(defenses) + " |",
        "|---" * (2 + len(defenses)) + "|",
    ]
    for attack, group in cells.groupby("attack"):
        first = group.iloc[0]
        row = [attack, f"{pct(first['ba'])} / {pct(first['asr'])}"]
        for d in defenses:
            hit = group[group.defense == d]
            if hit.empty:
                row.append("—")
                continue
            h = hit.iloc[0]
            row.append(f"{pct(h['ba_after'])} / {pct(h['asr_after'])}" + (f" (n={h['n']})" if tag else ""))
        lines.append("| " + " | ".join(row) + " |")
    md = "\n".join(lines) + "\n"
    atomic_write_text(out / "defended.md", md)
    return md


def detector_records(results: list[dict[str, Any]], frr: float = 0.05) -> list[dict[str, Any]]:
    """One record per detector run: attack label, detector label, seed, victim BA / ASR, FAR at ``frr``,
    AUROC, FRR reached, cost, and the run folder (for the ROC figures)."""
    key = f"{frr:g}"
    recs = []
    for res in results:
        r, m, c = res["run"], res["metrics"], res.get("cost", {})
        if r.get("defense_kind") != "detector":
            continue
        recs.append({
            "attack": setting_label(res, results),
            "detector": res.get("_defense", r["defense"]),
            "seed": r.get("seed"),
            "ba": m.get("ba"),
            "asr": m.get("asr"),
            "far": m.get("far_at_frr", {}).get(key),
            "auroc": m.get("auroc"),
            "frr": m.get("frr"),
            **{k: c.get(k) for k in COST_COLUMNS},
            "cached_inputs": c.get("cached_inputs", 0),
            "_dir": res["_dir"],
        })
    return recs


def write_comparison(results: list[dict[str, Any]], out: Path, frr: float = 0.05) -> str:
    """Attacks × detectors: FAR at ``frr`` FRR (AUROC, FRR reached), victims' BA/ASR, detector costs.

    Several seeds of one cell are averaged. Writes ``comparison.md``, ``comparison.csv`` and
    ``roc_<attack>.png``; returns the markdown ('' when no run used a detector).
    """
    import pandas as pd

    recs = detector_records(results, frr)
    if not recs:
        return ""
    df = pd.DataFrame(recs)
    df[DETECTOR_NUMBERS] = df[DETECTOR_NUMBERS].apply(pd.to_numeric, errors="coerce")
    groups = df.groupby(["attack", "detector"])
    cells = groups[DETECTOR_NUMBERS].mean().join(groups.size().rename("n")).reset_index()
    cells.to_csv(out / "comparison.csv", index=False)
    md = "\n".join(_far_table(cells, frr) + [""] + _cost_table(df)) + "\n"
    atomic_write_text(out / "comparison.md", md)
    return md + _roc_figures(df, out)


def _far_table(cells: Any, frr: float) -> list[str]:
    """The FAR table's lines: a row per attack (the lowest FAR in bold), then the average over the attacks that
    every detector was measured on."""
    detectors = sorted(cells["detector"].unique())
    victims = cells.groupby("attack")[["ba", "asr"]].mean()
    n_note, tag = seed_counts(cells["n"])
    lines = [
        f"FAR (%) at {100 * frr:g}% FRR target — in brackets AUROC (%) and the FRR reached on clean test data"
        + n_note,
        "",
        "| attack | BA | ASR | " + " | ".join(detectors) + " |",
        "|---" * (3 + len(detectors)) + "|",
    ]
    for attack, v in victims.iterrows():
        row = [attack, pct(v["ba"]), pct(v["asr"])]
        mine = cells[cells.attack == attack].set_index("detector")
        fars = dict(zip(mine.index, bold_lowest(list(mine["far"]))))
        for d in detectors:
            if d not in mine.index:
                row.append("—")
            else:
                n = f"; n={mine.loc[d, 'n']}" if tag else ""
                row.append(f"{fars[d]} ({pct(mine.loc[d, 'auroc'])}, {pct(mine.loc[d, 'frr'])}{n})")
        lines.append("| " + " | ".join(row) + " |")
    # the average runs over the attacks every detector was measured on, so that partial tables compare like with like
    full = [a for a, n in cells.groupby("attack")["detector"].nunique().items() if n == len(detectors)]
    avg = cells[cells.attack.isin(full)].groupby("detector")["far"].mean()
    label = "**average**"
    if len(full) < len(victims):
        label += f" ({len(full)} of {len(victims)} attacks: those every detector has)"
    if full:
        lines.append(f"| {label} | | | " + " | ".join(bold_lowest([avg[d] for d in detectors])) + " |")
    return lines


def _cost_table(df: Any) -> list[str]:
    """The detectors' cost, from the runs that scored every input themselves: a run that reused cached scores of
    inputs seen by an earlier run of the sweep (ONION's LM suspicions) did less work than a lone run would."""
    import pandas as pd

    lines = ["| detector | forward passes / input | LM passes / input | seconds / 100 inputs |", "|---|---|---|---|"]
    cached = pd.to_numeric(df["cached_inputs"], errors="coerce").fillna(0)
    partial = False
    for d in sorted(df["detector"].unique()):
        mine = df[df.detector == d]
        full = mine[cached[df.detector == d] == 0]
        partial |= full.empty
        a = (full if not full.empty else mine)[COST_COLUMNS].mean()
        mark = " †" if full.empty else ""
        lm = "—" if pd.isna(a["lm_passes_per_input"]) else f"{a['lm_passes_per_input']:.1f}"
        lines.append(
            f"| {d}{mark} | {a['forward_passes_per_input']:.1f} | {lm} | {a['seconds_per_100_inputs']:.2f} |"
        )
    if partial:
        lines += ["", "† every run of this detector reused scores cached by an earlier run: cost understated."]
    return lines


def _roc_figures(df: Any, out: Path) -> str:
    """One ``roc_<attack>.png`` per attack; a note (markdown) for each figure that could not be drawn."""
    notes = ""
    for attack, group in df.groupby("attack"):
        try:
            roc_figure(out / f"roc_{slug(attack)}.png", attack, list(zip(group["detector"], map(Path, group["_dir"]))))
        except (OSError, ValueError) as exc:  # missing scores.csv: the table is still written
            notes += f"\n(no ROC figure for {attack}: {exc})\n"
    return notes
