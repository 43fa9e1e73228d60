"""The tables per seed: one row per (attack, seed), then each attack's mean ± std over its seeds and, for repair /
training-time defenses, the change each defense makes paired by seed (after − before of the same victim). Every
mean, std and difference is computed from the runs' unrounded values; only the printed cell is rounded."""

from __future__ import annotations

from typing import Any

from backdoorbench.report.fmt import pct
from backdoorbench.report.tables import defended_records, detector_records
from backdoorbench.report_groups import mean_std


def _seed_key(seed: Any) -> tuple[bool, str]:
    return (seed is None, f"{seed:>12}" if isinstance(seed, int) else str(seed))


def mean_std_cell(values: list[Any], signed: bool = False) -> str:
    """``mean ± std`` in % (points for ``signed``, with a sign), the mean alone for one value, '—' for none."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "—"
    sign = "+" if signed else ""
    cell = f"{100 * mean:{sign}.1f}".replace("-", "−")
    return f"{cell} ± {100 * std:.1f}" if n >= 2 else cell


def _bold(cells: list[str], means: list[float | None]) -> list[str]:
    """The leading figure of the cell of the lowest mean (as printed) in bold (ties: each)."""
    shown = [pct(m) for m in means]
    numbers = [float(m) for m, s in zip(means, shown) if m is not None and s != "—"]
    if not numbers:
        return cells
    low = pct(min(numbers))
    out = []
    for c, s in zip(cells, shown):
        head, _, tail = c.partition(" (")
        out.append(f"**{head}**" + (f" ({tail}" if tail else "") if s == low else c)
    return out


def _cell_runs(recs: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in recs if all(r[k] == v for k, v in match.items())]


def _mean(values: list[Any]) -> float | None:
    mean, _, n = mean_std(values)
    return mean if n else None


def detectors_by_seed(results: list[dict[str, Any]], frr: float = 0.05) -> str:
    """Attacks × detectors, one row per (attack, seed): FAR at ``frr`` FRR (AUROC, FRR reached), the lowest of a
    row in bold; the average over the attacks per seed and over the seeds; each attack's mean ± std. '' when no run
    used a detector."""
    recs = detector_records(results, frr)
    if not recs:
        return ""
    detectors = sorted({r["detector"] for r in recs})
    attacks = sorted({r["attack"] for r in recs})
    seeds = sorted({r["seed"] for r in recs}, key=_seed_key)
    lines = [
        f"FAR (%) at {100 * frr:g}% FRR target, in brackets AUROC (%) and the FRR reached on clean test data; the "
        "lowest FAR of a row in bold; mean ± std over the seeds (std with ddof=1).",
        "",
        "| attack | seed | BA | ASR | " + " | ".join(detectors) + " |",
        "|---" * (4 + len(detectors)) + "|",
    ]
    for attack in attacks:
        for seed in seeds:
            mine = _cell_runs(recs, attack=attack, seed=seed)
            if not mine:
                continue
            fars, cells = [], []
            for d in detectors:
                runs = _cell_runs(mine, detector=d)
                fars.append(_mean([r["far"] for r in runs]))
                auroc, frr_reached = _mean([r["auroc"] for r in runs]), _mean([r["frr"] for r in runs])
                cells.append(f"{pct(fars[-1])} ({pct(auroc)}, {pct(frr_reached)})" if runs else "—")
            ba, asr = pct(_mean([r["ba"] for r in mine])), pct(_mean([r["asr"] for r in mine]))
            lines.append(f"| {attack} | {seed} | {ba} | {asr} | " + " | ".join(_bold(cells, fars)) + " |")
    per_seed: dict[str, list[float]] = {d: [] for d in detectors}
    for seed in seeds:  # the average over the attacks every detector has at this seed
        full = [a for a in attacks if all(_cell_runs(recs, attack=a, seed=seed, detector=d) for d in detectors)]
        if not full:
            continue
        avg = [_mean([r["far"] for a in full for r in _cell_runs(recs, attack=a, seed=seed, detector=d)])
               for d in detectors]
        for d, v in zip(detectors, avg):
            if v is not None:
                per_seed[d].append(v)
        cells = _bold([pct(v) for v in avg], avg)
        lines.append(f"| **average, seed {seed}** ({len(full)} attacks) | | | | " + " | ".join(cells) + " |")
    if len(seeds) > 1 and all(per_seed.values()):
        n = len(per_seed[detectors[0]])
        cells = _bold([mean_std_cell(per_seed[d]) for d in detectors], [_mean(per_seed[d]) for d in detectors])
        lines.append(f"| **average over the seeds** (n = {n}) | | | | " + " | ".join(cells) + " |")
    if len(seeds) > 1:
        for attack in attacks:
            per_detector = [[r["far"] for r in _cell_runs(recs, attack=attack, detector=d)] for d in detectors]
            cells = _bold([mean_std_cell(f) for f in per_detector], [_mean(f) for f in per_detector])
            n = len({r["seed"] for r in _cell_runs(recs, attack=attack)})
            lines.append(f"| **{attack}, mean ± std** | n = {n} | | | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pair(runs: list[dict[str, Any]], before: str, after: str) -> list[float]:
    """``after - before`` of each run (the same victim's figures), unrounded."""
    num = (int, float)
    return [r[after] - r[before] for r in runs if isinstance(r[after], num) and isinstance(r[before], num)]


def defended_by_seed(results: list[dict[str, Any]]) -> str:
    """Attacks × repair / training-time defenses, one row per (attack, seed): BA / ASR of the victim and after each
    defense; each attack's mean ± std; and each defense's change paired by seed (after − before on the same victim,
    in points, mean ± std of the per-seed differences). '' when no run used such a defense."""
    recs = defended_records(results)
    if not recs:
        return ""
    defenses = sorted({r["defense"] for r in recs})
    attacks = sorted({r["attack"] for r in recs})
    seeds = sorted({r["seed"] for r in recs}, key=_seed_key)
    lines = [
        "BA / ASR (%) of the victim and after each defense; mean ± std over the seeds (std with ddof=1); the change "
        "is after − before on the same victim, per seed, in points (mean ± std of the per-seed differences).",
        "",
        "| attack | seed | victim | " + " | ".join(defenses) + " |",
        "|---" * (3 + len(defenses)) + "|",
    ]
    for attack in attacks:
        for seed in seeds:
            mine = _cell_runs(recs, attack=attack, seed=seed)
            if not mine:
                continue
            row = [attack, str(seed), f"{pct(_mean([r['ba'] for r in mine]))} / {pct(_mean([r['asr'] for r in mine]))}"]
            for d in defenses:
                runs = _cell_runs(mine, defense=d)
                row.append(f"{pct(_mean([r['ba_after'] for r in runs]))} / {pct(_mean([r['asr_after'] for r in runs]))}"
                           if runs else "—")
            lines.append("| " + " | ".join(row) + " |")
        mine = _cell_runs(recs, attack=attack)
        n = len({r["seed"] for r in mine})
        if n < 2:
            continue
        victims = {r["seed"]: r for r in mine}.values()  # one victim per seed
        row = [f"**{attack}, mean ± std**", f"n = {n}",
               f"{mean_std_cell([r['ba'] for r in victims])} / {mean_std_cell([r['asr'] for r in victims])}"]
        change = [f"**{attack}, change (paired)**", f"n = {n}", ""]
        for d in defenses:
            runs = _cell_runs(mine, defense=d)
            ba_after, asr_after = [r["ba_after"] for r in runs], [r["asr_after"] for r in runs]
            row.append(f"{mean_std_cell(ba_after)} / {mean_std_cell(asr_after)}")
            change.append(f"{mean_std_cell(_pair(runs, 'ba', 'ba_after'), True)} / "
                          f"{mean_std_cell(_pair(runs, 'asr', 'asr_after'), True)}")
        lines += ["| " + " | ".join(row) + " |", "| " + " | ".join(change) + " |"]
    return "\n".join(lines) + "\n"
