"""``scripts/tables.sh``: one command per table of docs/results.md, 3 seeds through the sweep machinery, then
``report``. The Python it calls is replaced by a stub that records its arguments."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "tables.sh"
TABLES = ["text_detect", "vision_detect", "repair", "repair_text", "dbd", "inspect", "anp_clp", "cpu_nad", "cpu_rnp",
          "cpu_dan_text", "cpu_text_repair", "dan_adaptive", "dan_task_agnostic"]
SEED0 = ["repair_sensitivity"]  # a sensitivity study at seed 0 (its 3-seed counterparts: cpu_nad, cpu_rnp)
ZOOS = {"zoo_vision": (10, 12), "zoo_text": (5, 5)}  # clean, backdoored victims


def _calls(tmp_path: Path, *args: str, **env: str) -> tuple[int, list[list[str]]]:
    log = tmp_path / "calls.txt"
    stub = tmp_path / "py"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    stub.chmod(0o755)
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env={**os.environ, "PYTHON": str(stub), **env},
                          capture_output=True, text=True, timeout=60)
    calls = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return proc.returncode, calls


@pytest.mark.parametrize("table", TABLES)
def test_each_table_is_three_seeded_sweeps_then_one_report(tmp_path: Path, table: str) -> None:
    rc, calls = _calls(tmp_path, table, "threads=1")
    assert rc == 0
    *runs, report = calls
    assert runs and report == ["-m", "backdoorbench", "report", f"multirun/tables/{table}"]
    for call in runs:
        assert call[:4] == ["-m", "backdoorbench", "run", "--multirun"]
        assert "seed=0,1,2" in call and call[-1] == "threads=1"  # extra overrides reach every sweep
        dirs = [a for a in call if a.startswith("hydra.sweep.dir=")]
        assert len(dirs) == 1 and dirs[0].startswith(f"hydra.sweep.dir=multirun/tables/{table}/")
    assert len({tuple(a for a in c if a.startswith("hydra.sweep.dir=")) for c in runs}) == len(runs)  # one dir each
    if table.startswith(("cpu_", "dan_")):
        assert f"+experiment={table}" in runs[0]
        assert (REPO_ROOT / "configs" / "experiment" / f"{table}.yaml").is_file()


@pytest.mark.parametrize("zoo", sorted(ZOOS))
def test_each_zoo_sweeps_its_declared_clean_and_backdoored_victims(tmp_path: Path, zoo: str) -> None:
    rc, calls = _calls(tmp_path, zoo)
    assert rc == 0
    *runs, report = calls
    assert report == ["-m", "backdoorbench", "report", f"multirun/tables/{zoo}"]
    counts = {"clean": 0, "backdoored": 0}
    for call in runs:
        assert call[:4] == ["-m", "backdoorbench", "run", "--multirun"] and f"+experiment={zoo}" in call
        values = dict(a.split("=", 1) for a in call[4:] if "=" in a)
        n = len(values["seed"].split(",")) * len(values["attack"].split(","))
        counts["clean" if values.get("attack.poison_rate") == "0" else "backdoored"] += n
    assert (counts["clean"], counts["backdoored"]) == ZOOS[zoo]
    assert (REPO_ROOT / "configs" / "experiment" / f"{zoo}.yaml").is_file()


@pytest.mark.parametrize("table", SEED0)
def test_a_seed_0_table_sweeps_seed_0_only(tmp_path: Path, table: str) -> None:
    rc, calls = _calls(tmp_path, table)
    assert rc == 0 and len(calls) > 1
    assert all("seed=0" in call and not any(a.startswith("seed=0,") for a in call) for call in calls[:-1])


def test_parts_runs_only_the_named_parts_of_a_table(tmp_path: Path) -> None:
    rc, calls = _calls(tmp_path, "zoo_vision", PARTS="retargeted,clean")
    dirs = [a for call in calls[:-1] for a in call if a.startswith("hydra.sweep.dir=")]
    assert rc == 0 and dirs == ["hydra.sweep.dir=multirun/tables/zoo_vision/clean",
                                "hydra.sweep.dir=multirun/tables/zoo_vision/retargeted"]


def test_an_unknown_table_exits_2_without_running_anything(tmp_path: Path) -> None:
    rc, calls = _calls(tmp_path, "nope")
    assert rc == 2 and calls == []


def test_every_cpu_preset_has_a_table() -> None:
    presets = {p.stem for p in (REPO_ROOT / "configs" / "experiment").glob("*.yaml")} - set(ZOOS)
    assert {t for t in TABLES if t.startswith(("cpu_", "dan_"))} == {p for p in presets if p.startswith("cpu_")} | {
        "dan_adaptive", "dan_task_agnostic"}


RUNS = REPO_ROOT / "scripts" / "runs.sh"


def _runs(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(RUNS), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_runs_keep_copies_only_finished_jobs_records_and_restore_puts_them_back(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun" / "tables" / "t" / "main"
    done, unfinished = sweep / "ep_dan_1", sweep / "ep_rap_2"
    for job in (done, unfinished):
        (job / "logs").mkdir(parents=True)
        (job / "config.yaml").write_text(f"job: {job.name}\n")
        (job / "versions.json").write_text("{}")
        (job / "logs" / "x.csv").write_text("big")
    (done / "results.json").write_text('{"run": {}, "metrics": {}}')
    (done / "scores.csv").write_text("split,index,label,pred,score\n")
    (done / "detection.png").write_bytes(b"\0" * 10)
    proc = _runs(tmp_path, "keep", "t")
    assert proc.returncode == 0, proc.stderr
    kept = tmp_path / "docs" / "experiments" / "runs" / "t"
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == [
        "main/ep_dan_1/config.yaml", "main/ep_dan_1/results.json", "main/ep_dan_1/scores.csv",
        "main/ep_dan_1/versions.json"]
    assert (kept / "main" / "ep_dan_1" / "config.yaml").read_text() == "job: ep_dan_1\n"

    # restore into a fresh place: the sweep then finds the job done; an existing result is never overwritten
    (tmp_path / "multirun").rename(tmp_path / "old")
    assert _runs(tmp_path, "restore", "t").returncode == 0
    back = tmp_path / "multirun" / "tables" / "t" / "main" / "ep_dan_1"
    assert (back / "results.json").read_text() == '{"run": {}, "metrics": {}}'
    (back / "results.json").write_text("newer")
    proc = _runs(tmp_path, "restore", "t")
    assert proc.returncode == 0 and "0 run(s) copied" in proc.stdout and "1 already there" in proc.stdout
    assert (back / "results.json").read_text() == "newer"


@pytest.mark.parametrize("args", [["keep", "missing"], ["move", "t"], []])
def test_runs_rejects_a_missing_table_folder_or_an_unknown_action(tmp_path: Path, args: list[str]) -> None:
    proc = _runs(tmp_path, *args)
    assert proc.returncode != 0 and not (tmp_path / "docs").exists()


def test_the_kept_records_are_not_git_ignored() -> None:
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    rec = "docs/experiments/runs/cpu_dan_text/main/ep_dan_1/results.json"
    proc = subprocess.run(["git", "check-ignore", "-q", rec], cwd=REPO_ROOT, capture_output=True, timeout=60)
    assert proc.returncode == 1, f"{rec} would be ignored by .gitignore"
