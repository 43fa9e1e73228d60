"""DAN's distance step, before and after the quadratic-form identity: peak memory, time and the largest
difference, on synthetic features.

    python benchmarks/dan_distance.py [--n 20000] [--classes 100] [--dim 2048] [--before-n 250]
                                      [--device cpu|cuda] [--threads 2]

*Before* is the implementation up to the on-device rewrite, copied here: one ``[N, C, D]`` float64 difference
tensor and an einsum per layer. It needs ``8·N·C·D`` bytes (33 GB at the defaults), so it runs on the first
``--before-n`` inputs only, and its memory and time are also printed scaled linearly to ``--n`` (both are
linear in N; ``--before-n 20000`` measures it whole where memory allows). *After* is
:meth:`LayerGaussian.distance <backdoorbench.defenses.detectors.dan.LayerGaussian.distance>` on all ``--n``
inputs (float64, chunked). A third line times the same identity in float32, to show what float64 costs and
how far float32 would move the distances (the reason DAN keeps float64).

Memory: on the CPU, the growth of the process's peak resident set over the memory held before the step (the
peak is reset through ``/proc/self/clear_refs``, Linux); on CUDA, ``torch.cuda.max_memory_allocated`` above
the memory allocated before. Timings are wall-clock, one run each; on a shared machine they are rough.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed copy
os.environ.setdefault("BACKDOORBENCH_PROGRESS", "0")


def einsum_distance(feats, means, precision):  # type: ignore[no-untyped-def]
    """Today's formula before the rewrite (``dan.py`` at commit 2f1dcc9): ``[N, C, D]`` in float64."""
    import torch

    x = feats.to(means.dtype)
    diff = x[:, None, :] - means[None, :, :]  # [N, C, D]
    d = torch.einsum("ncd,de,nce->nc", diff, precision, diff)
    return d.min(dim=1).values


def float32_identity(feats, means, precision):  # type: ignore[no-untyped-def]
    """The same centred, chunked quadratic-form identity in float32 (not used by DAN; for comparison only)."""
    import torch

    from backdoorbench.defenses.detectors.dan import CHUNK_BYTES

    p, m = precision.float(), means.float()
    centre = m.mean(0)
    mc = m - centre
    mpm = ((mc @ p) * mc).sum(1)[None, :]
    step = max(1, CHUNK_BYTES // (8 * (2 * len(p) + 2 * len(m))))
    out = []
    for start in range(0, len(feats), step):
        x = feats[start : start + step].float() - centre
        xp = x @ p
        out.append((torch.addmm(mpm, xp, mc.T, alpha=-2.0) + xp.mul_(x).sum(1, keepdim=True)).min(1).values)
    return torch.cat(out)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(step: Callable[[], object], device) -> tuple[object, float, float]:  # type: ignore[no-untyped-def]
    """The step's result, its wall time (s) and its peak memory above what was held before it (MiB)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out = step()
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        return out, elapsed, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak resident set (VmHWM) to the current one
        f.write("5")
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = step()
    elapsed = time.perf_counter() - t0
    return out, elapsed, (_status_kib("VmHWM") - before) / 1024


def synthetic(n: int, c: int, d: int, device):  # type: ignore[no-untyped-def]
    """Seeded features ``[n, d]`` (float32), class means ``[c, d]`` and an SPD precision ``[d, d]`` (float64)."""
    import torch

    g = torch.Generator().manual_seed(0)
    # features with a common offset, as hidden states have: the identity's terms are then much larger than
    # the distances they give, which is where rounding shows
    offset = torch.randn(d, generator=g) * 3
    feats = (torch.randn(n, d, generator=g) + offset).to(device)
    means = (torch.randn(c, d, generator=g, dtype=torch.float64) * 0.5 + offset.double()).to(device)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    precision = torch.linalg.inv(a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)).to(device)
    return feats, means, precision


def run_variant(variant: str, n: int, c: int, d: int, nb: int, device_name: str, threads: int):  # type: ignore[no-untyped-def]
    """One variant in this (fresh) process: its distances (numpy), wall time and peak memory."""
    import torch

    from backdoorbench.defenses.detectors.dan import LayerGaussian

    torch.set_num_threads(threads)
    device = torch.device(device_name)
    feats, means, precision = synthetic(n, c, d, device)
    if variant == "before":
        out, t, m = measure(lambda: einsum_distance(feats[:nb], means, precision), device)
    elif variant == "after":
        gauss = LayerGaussian(means, precision)
        gauss.on(feats.device)  # the per-device operands are made once per fitted detector, not per call
        out, t, m = measure(lambda: gauss.distance(feats), device)
    else:
        out, t, m = measure(lambda: float32_identity(feats, means, precision), device)
    return out.double().cpu().numpy(), t, m  # type: ignore[union-attr]


def main() -> None:
    import multiprocessing

    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20_000, help="inputs")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--dim", type=int, default=2048, help="feature dimension")
    p.add_argument("--before-n", type=int, default=250, help="inputs the [N, C, D] formula runs on")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    n, c, d, nb = a.n, a.classes, a.dim, min(a.before_n, a.n)
    print(f"DAN distance: N={n:,} C={c} D={d}, device {a.device}, {a.threads} threads, each variant in a fresh process")
    print(f"(features {n * d * 4 / 2**20:,.0f} MiB float32; the [N, C, D] float64 tensor of 'before' would be "
          f"{8 * n * c * d / 2**30:,.1f} GiB)")
    ctx = multiprocessing.get_context("spawn")  # a fresh allocator per variant: no memory reused across them
    res = {}
    for variant in ("before", "after", "float32"):
        with ctx.Pool(1) as pool:
            res[variant] = pool.apply(run_variant, (variant, n, c, d, nb, a.device, a.threads))
    (before, t_before, m_before), (after, t_after, m_after), (f32, t_f32, m_f32) = res.values()
    scale = n / nb
    print(f"{'':34s} {'peak MiB':>10s} {'time s':>9s}")
    print(f"{f'before, N={nb:,} (measured)':34s} {m_before:10,.0f} {t_before:9.2f}")
    if nb < n:
        print(f"{f'before, N={n:,} (x{scale:g}, linear)':34s} {m_before * scale:10,.0f} {t_before * scale:9.2f}")
    print(f"{f'after, N={n:,} (float64, chunked)':34s} {m_after:10,.0f} {t_after:9.2f}")
    print(f"{f'float32 identity, N={n:,}':34s} {m_f32:10,.0f} {t_f32:9.2f}")
    diff = np.abs(after[:nb] - before)
    d32 = np.abs(f32 - after)
    print(f"max |after - before| over the first {nb:,} inputs: {diff.max():.3g} (relative "
          f"{(diff / np.abs(before)).max():.3g}; distances {before.min():.4g} .. {before.max():.4g})")
    print(f"max |float32 - float64| over all inputs: {d32.max():.3g} (relative {(d32 / np.abs(after)).max():.3g})")
    # DAN's score of a one-layer detector is (d - mean) / std: the score difference is the distance's over std
    std = after.std()
    print(f"max score difference (one layer, normalised by the distances' std {std:.4g}): "
          f"after - before {diff.max() / std:.3g}, float32 - float64 {d32.max() / std:.3g}")
    if nb < n:
        print(f"memory ratio before/after at N={n:,}: {m_before * scale / max(m_after, 1e-9):,.0f}x; "
              f"time ratio {t_before * scale / t_after:,.1f}x")


if __name__ == "__main__":
    main()
