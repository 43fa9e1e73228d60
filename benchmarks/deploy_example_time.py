"""Wall time of docs/deploy.md's first example (fit DAN, save, load, guard), each run a fresh process.

    python benchmarks/deploy_example_time.py [--repeats 3]

Writes the page's first ```python block to a temporary file and runs it ``--repeats`` times with this
interpreter (``HF_HUB_OFFLINE=1``), printing each run's wall time (imports included, as a user running the
example sees it) and CPU time (user + system, of the child process: less sensitive to other processes than
wall time on a shared machine), the medians, the machine's CPU count and its load average before each run:
the figures docs/deploy.md quotes come from here. Wall time is only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    block = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), re.S | re.M)[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "BACKDOORBENCH_PROGRESS": "0"}
    times, cpu = [], []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "deploy_example.py"
        script.write_text(block)
        for i in range(args.repeats):
            load = os.getloadavg()[0]
            r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            subprocess.run([sys.executable, str(script)], cwd=tmp, env=env, check=True, capture_output=True)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            times.append(time.perf_counter() - t0)
            cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
            print(f"run {i + 1}: wall {times[-1]:.1f} s, CPU {cpu[-1]:.1f} s (load average before: {load:.1f})")
    print(f"median wall {statistics.median(times):.1f} s, CPU {statistics.median(cpu):.1f} s over {args.repeats} "
          f"runs on {os.cpu_count()} CPU(s)")


if __name__ == "__main__":
    main()
