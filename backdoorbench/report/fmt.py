"""How ``report`` writes numbers and labels: rates in %, the lowest of a row in bold, the attack's label."""

from __future__ import annotations

from typing import Any

from backdoorbench.report_groups import attack_label


def pct(v: Any) -> str:
    """A rate (0-1) in % with one decimal; '—' for a missing or non-numeric value."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "—"
    return "—" if f != f else f"{100 * f:.1f}"


def bold_lowest(values: list[Any]) -> list[str]:
    """Each value as `pct` prints it, the lowest in bold (ties as printed; missing values never)."""
    shown = [pct(v) for v in values]
    numbers = [float(v) for v, s in zip(values, shown) if s != "—"]
    lowest = pct(min(numbers)) if numbers else None
    return [f"**{s}**" if s == lowest else s for s in shown]


def seed_counts(n: Any) -> tuple[str, bool]:
    """How many runs each cell of a table averages: the end of the table's first sentence, and whether the
    counts differ between cells (then every cell shows its own ``n=``, so that one seed is never read as three)."""
    counts = sorted(set(int(k) for k in n))
    if len(counts) > 1:
        return "; each cell is the mean of its n runs (seeds), which differ between cells.", True
    if counts[0] > 1:
        return f"; each cell is the mean of {counts[0]} runs (seeds).", False
    return ".", False


def setting_label(res: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The attack's label (``name#hash (setting)``), prefixed with ``data / model:`` when the runs span more than
    one dataset or model, so that the tables never average over them."""
    label = attack_label(res)
    if len({(r["run"].get("data"), r["run"].get("model")) for r in results}) > 1:
        return f"{res['run'].get('data')} / {res['run'].get('model')}: {label}"
    return label


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_")
