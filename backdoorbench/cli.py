"""Command line: ``python -m backdoorbench run|list|report ...``.

``run`` is a Hydra application: config groups live in ``configs/`` (attack, defense, data, model,
trainer); override anything with ``key=value``, sweep with ``--multirun a=x,y``. Each run writes its
resolved config, library versions, ``results.json``, ``scores.csv`` and figures into its own run
directory, printed at the end.

Exit status: 0 on success; 2 for an expected failure (a :class:`~backdoorbench.errors.UserError`, a missing
file, a Hydra config error), printed as one ``error: ...`` line; 1 for anything else, printed as one line
naming the log file that keeps the traceback (``<run dir>/error.log``). A failed job also leaves
``failed.json`` in its folder. A sweep runs every job even when some fail; it ends with one line per failed
job and a count, and exits with 2 when every failure was expected, 1 otherwise. Re-running a sweep with the
same ``hydra.sweep.dir`` skips the jobs whose results are there (:mod:`backdoorbench.engine.sweep`).

Composing the config (the config folder, the overrides made ready for Hydra) is :mod:`backdoorbench.composition`,
which the Python API shares; this module sits beside :mod:`backdoorbench.api`, and neither imports the other.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from backdoorbench.composition import (  # noqa: F401 - the last three re-exported (they lived here)
    config_dir,
    prepared_overrides,
    register_model_option,
    register_plugin_configs,
    rewrite_model_override,
)
from backdoorbench.errors import UserError
from backdoorbench.registry import KINDS, REGISTRY

log = logging.getLogger(__name__)

USAGE = """usage: python -m backdoorbench COMMAND [ARGS]

commands:
  run [OVERRIDES...]   run an experiment (Hydra): e.g. run attack=ripples defense=dan seed=3
                       sweep with: run --multirun attack=badnet_rw,ripples defense=dan,none
  list [KIND]          registered attacks, defenses, datasets and models (KIND: one of those)
  report DIR           summarise every results.json under DIR as markdown and CSV

run `python -m backdoorbench run --help` for Hydra's help and the config groups.
"""


def cmd_run(args: list[str]) -> int:
    """``run``: compose the overrides, let Hydra run each job (one, or a sweep's), then the exit status."""
    from backdoorbench.engine.sweep import STATE, register_sweep_resolvers

    register_sweep_resolvers()  # ${bb.unique:} and ${bb.job_hash:} in the run / sweep directory names
    cdir, hydra_args = prepared_overrides(args)
    failures: list[BaseException] = []  # the jobs that failed in this process
    sweeps_before = len(STATE.history)
    _hydra_main(cdir, hydra_args, failures)
    return _run_status(failures, sweeps_before)


def _hydra_main(cdir: Path, hydra_args: list[str], failures: list[BaseException]) -> None:
    """Run the Hydra application over ``hydra_args``: :func:`_run_job` for each job. Hydra's own errors (override
    syntax, unknown group option or key) are re-raised, not printed with a traceback and status 1: main() reports
    them like every other expected failure."""
    import hydra
    from omegaconf import DictConfig

    sys.argv = [sys.argv[0], *hydra_args]

    @hydra.main(version_base="1.3", config_path=str(cdir), config_name="config")
    def _main(cfg: DictConfig) -> None:
        _run_job(cfg, failures)

    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _main()
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def _run_job(cfg: Any, failures: list[BaseException]) -> None:
    """One job: skip it when a sweep's earlier submission finished it, else run it and print its summary; a failure
    is recorded (``failed.json``, ``error.log``) and appended to ``failures``, and a sweep goes on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from backdoorbench.engine import sweep
    from backdoorbench.engine.pipeline import run_experiment
    from backdoorbench.report import print_run_summary

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    job = f"job {hc.job.num} ({' '.join(hc.overrides.task)})" if multirun else "the run"
    try:
        if multirun and _done_already(out_dir, cfg, job):
            return
        results = run_experiment(cfg, out_dir)
    except Exception as exc:  # recorded in failed.json; a sweep goes on with its next job
        record_failure(exc, out_dir)
        if multirun or not (out_dir / "results.json").exists():  # never beside an earlier single run's results
            sweep.write_failed(out_dir, exc, failure_line(exc), is_expected(exc), list(hc.overrides.task), cfg)
        failures.append(exc)
        if multirun:
            log.error("%s failed: %s", job, failure_line(exc))
        return
    sweep.clear_failed(out_dir)
    print_run_summary(results)


def _done_already(out_dir: Path, cfg: Any, job: str) -> bool:
    """True when a sweep job's folder holds its results already (resumed: skipped); a :class:`UserError` when it
    holds the results of a different config."""
    from backdoorbench.engine import sweep

    differs = sweep.previous_results(out_dir, cfg)
    if differs is None:
        return False
    if not differs:  # resume: this job's results are already there
        log.info("%s: done already (%s), skipped", job, out_dir)
        sweep.clear_failed(out_dir)  # left by a refused submission with another config
        return True
    raise UserError(
        f"{out_dir} holds the results of a different config (differs in: {', '.join(differs[:5])}); "
        "use another hydra.sweep.dir or delete that folder"
    )


def _run_status(failures: list[BaseException], sweeps_before: int) -> int:
    """The exit status of ``run``: a sweep's from the ``failed.json`` of its jobs (which may have run in other
    processes), else 0, or the first failure re-raised for main() to report."""
    from backdoorbench.engine.sweep import STATE, failures_since

    if len(STATE.history) > sweeps_before and STATE.dir is not None:  # a sweep: its jobs may have run elsewhere
        failed = failures_since(STATE.dir, STATE.started)
        if failed or not failures:  # (a job folder that could not take its failed.json: reported below)
            return sweep_exit_status(failed)
    if failures:
        raise failures[0]
    return 0


def sweep_exit_status(failed: list[dict[str, Any]]) -> int:
    """0 when no job of the sweep failed; else one line per failed job, a count, and status 2 when every failure
    was expected (a config the user can fix), 1 otherwise."""
    if not failed:
        return 0
    for rec in failed:
        print(f"error: {rec['job_dir']}: {rec.get('reason')}", file=sys.stderr)
    print(f"error: {len(failed)} job(s) of the sweep failed (each reason is in its failed.json)", file=sys.stderr)
    return 2 if all(rec.get("expected") for rec in failed) else 1


# -- one error path ------------------------------------------------------------------------------
def is_expected(exc: BaseException) -> bool:
    """Failures the user can fix: :class:`UserError` (config, data, model), a missing file, and Hydra's own
    config errors (bad override syntax, unknown config group option, unknown key)."""
    from hydra.errors import HydraException

    return isinstance(exc, (UserError, FileNotFoundError, HydraException))


CLUSTER_HINT = 'the launchers need the cluster extra: pip install "backdoorbench[cluster]" (docs/cluster.md)'


def failure_line(exc: BaseException) -> str:
    """The exception's message on one line (Hydra's multi-line messages folded); a launcher that is not installed
    gets a hint to install the ``cluster`` extra."""
    line = _one_line(exc)
    if re.search(r"hydra_(joblib|submitit)_launcher|'hydra/launcher/submitit_", line):
        line += f" ({CLUSTER_HINT})"
    elif 'Could not detect "srun"' in line:
        line += " (hydra/launcher=slurm submits to SLURM; on one machine use hydra/launcher=local or joblib)"
    return line


def _one_line(exc: BaseException) -> str:
    from hydra.errors import HydraException

    text = str(exc)
    if isinstance(exc, HydraException):
        if exc.__cause__ is not None and str(exc.__cause__) not in text:
            text += "\n" + str(exc.__cause__)
        text = text.split("Config search path")[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "reference_type=", "See https"))]
    if any(ln.startswith("Available options in") for ln in lines):  # Hydra's unknown group option
        head = [ln for ln in lines if not ln.startswith("Available options in")]
        at = next(i for i, ln in enumerate(lines) if ln.startswith("Available options in"))
        options = lines[at + 1 :]
        group = lines[at][len("Available options in ") :].rstrip(":")
        wanted = re.search(r"Could not find '[^/']*/([^']*)'", text)
        close = difflib.get_close_matches(wanted.group(1), options, n=1) if wanted else []
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"{' '.join(head[: at])}.{hint} Available options in {group}: {', '.join(options)}"
    line = " ".join(lines) or type(exc).__name__
    return line


def record_failure(exc: BaseException, where: Path | None = None) -> None:
    """Keep the traceback of an unexpected failure in ``<where>/error.log`` (a temporary file without a run
    directory) and remember the path on the exception; expected failures need no traceback."""
    if is_expected(exc) or getattr(exc, "error_log", None):
        return
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        if where is None:
            raise OSError
        where.mkdir(parents=True, exist_ok=True)
        path = where / "error.log"
        path.write_text(text)
    except OSError:
        fd, name = tempfile.mkstemp(prefix="backdoorbench-error-", suffix=".log")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        path = Path(name)
    try:
        exc.error_log = str(path)  # type: ignore[attr-defined]
    except AttributeError:  # exceptions with __slots__
        pass


def report_failure(exc: BaseException) -> int:
    """Print one line for a failure; 2 for expected ones, 1 (traceback kept in a log file) otherwise."""
    if is_expected(exc):
        print(f"error: {failure_line(exc)}", file=sys.stderr)
        return 2
    record_failure(exc)
    where = getattr(exc, "error_log", None) or "(could not be written)"
    print(f"error: unexpected {type(exc).__name__}: {failure_line(exc)} (full traceback in {where})", file=sys.stderr)
    return 1


def cmd_list(argv: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    kinds: tuple[str, ...] = KINDS
    if argv:
        wanted = argv[0].rstrip("s")
        if wanted not in KINDS:
            print(f"error: unknown kind {argv[0]!r}; choose from {', '.join(k + 's' for k in KINDS)}", file=sys.stderr)
            return 2
        kinds = (wanted,)
    console = Console(width=max(Console().width, 140))
    for kind in kinds:
        t = Table(title=f"{kind}s", title_justify="left", show_lines=False)
        for col in ("name", "modality", "kind", "needs", "description", "source"):
            t.add_column(col, overflow="fold")
        for e in REGISTRY.entries(kind):
            t.add_row(e.name, "/".join(e.modality), e.category, e.needs, e.description, e.source)
        for pattern in REGISTRY.patterns(kind):
            t.add_row(pattern, "", "", "", "resolved by name", "builtin")
        console.print(t)
    return 0


def cmd_report(argv: list[str]) -> int:
    from backdoorbench.report import write_report
    from backdoorbench.report.reference import DEFAULT_CSV

    p = argparse.ArgumentParser(prog="python -m backdoorbench report")
    p.add_argument("dirs", nargs="*", metavar="DIR", help="run or multirun directories (several are merged)")
    p.add_argument("--out", default=None,
                   help="where to write summary.md, report.md, ... (default: DIR; with several DIRs: ./report)")
    p.add_argument("--reference", nargs="?", const=DEFAULT_CSV, default=None, metavar="CSV",
                   help="put the published figures beside ours (default CSV: the package's published.csv)")
    p.add_argument("--update-docs", action="store_true",
                   help="rewrite the docs' generated tables from their kept records (run from the repository root)")
    p.add_argument("--check-docs", action="store_true",
                   help="check that the docs' generated tables equal their records, and that no table is unmarked")
    ns = p.parse_args(argv)
    if ns.update_docs or ns.check_docs:
        from backdoorbench.report.blocks import docs_command

        return docs_command(Path.cwd(), check=ns.check_docs)
    if not ns.dirs:
        p.error("give at least one DIR (or --update-docs / --check-docs)")
    out = Path(ns.out) if ns.out else (Path(ns.dirs[0]) if len(ns.dirs) == 1 else Path("report"))
    try:
        defaults = config_dir()  # the components' default configs, for the name#hash labels
    except FileNotFoundError:
        defaults = None
    try:
        md = write_report([Path(d) for d in ns.dirs], out, defaults,
                          reference=Path(ns.reference) if ns.reference else None)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(md)
    print(f"written to {out}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _offline_default():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "run":
            return cmd_run(rest)
        if cmd == "list":
            return cmd_list(rest)
        if cmd == "report":
            return cmd_report(rest)
    except Exception as exc:  # the one error path: one line, status 2 (expected) or 1 (traceback in a file)
        return report_failure(exc)
    print(f"error: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _offline_default() -> bool:
    """Offline unless the user opts in to the hub (BACKDOORBENCH_ONLINE=1): the embedded defaults need no
    network, and a hub lookup on a machine without one only adds a long time-out."""
    return os.environ.get("BACKDOORBENCH_ONLINE", "0") in ("0", "", "false")
