"""Command line: ``python -m backdoorbench run|list|report ...``.

``run`` is a Hydra application: config groups live in ``configs/`` (attack, defense, data, model,
trainer); override anything with ``key=value``, sweep with ``--multirun a=x,y``. Each run writes its
resolved config, library versions, ``results.json``, ``scores.csv`` and figures into its own run
directory, printed at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from backdoorbench.registry import KINDS, REGISTRY, UnknownNameError

GROUP_OF_KIND = {"attack": "attack", "defense": "defense", "dataset": "data", "model": "model"}
USAGE = """usage: python -m backdoorbench COMMAND [ARGS]

commands:
  run [OVERRIDES...]   run an experiment (Hydra): e.g. run attack=ripples defense=dan seed=3
                       sweep with: run --multirun attack=badnet_rw,ripples defense=dan,none
  list [KIND]          registered attacks, defenses, datasets and models (KIND: one of those)
  report DIR           summarise every results.json under DIR as markdown and CSV

run `python -m backdoorbench run --help` for Hydra's help and the config groups.
"""


def config_dir() -> Path:
    """``$BACKDOORBENCH_CONFIG_DIR``, else the repository's ``configs/``, else the packaged copy."""
    env = os.environ.get("BACKDOORBENCH_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [here.parent / "configs", here / "configs"]
    for c in candidates:
        if (c / "config.yaml").is_file():
            return c
    raise FileNotFoundError(f"no configs/config.yaml found (looked in {', '.join(map(str, candidates))})")


def _group_options(cdir: Path, group: str) -> set[str]:
    return {p.stem for p in (cdir / group).glob("*.yaml")}


def rewrite_model_override(args: list[str], cdir: Path) -> list[str]:
    """``model=<HF name or path>`` / ``model=timm:<name>`` → the generic group option + ``model.name``."""
    options = _group_options(cdir, "model")
    out = []
    for a in args:
        if a.startswith("model=") and a[len("model=") :] not in options:
            value = a[len("model=") :].strip("'\"")
            generic = "timm" if value.startswith("timm:") and "timm" in options else "hf"
            out += [f"model={generic}", f"model.name='{value}'"]
        else:
            out.append(a)
    return out


def register_plugin_configs(cdir: Path) -> None:
    """Give every registered component without a YAML file a config node built from its dataclass, so
    that ``defense=<plugin>`` works for pip-installed plugins."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for kind, group in GROUP_OF_KIND.items():
        existing = _group_options(cdir, group)
        for entry in REGISTRY.entries(kind):
            if entry.name in existing:
                continue
            node: dict[str, Any] = {}
            if entry.config is not None and is_dataclass(entry.config):
                node = asdict(entry.config())
            node["name"] = entry.name
            cs.store(group=group, name=entry.name, node=node)


def cmd_run(args: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from backdoorbench.config import ConfigError
    from backdoorbench.engine.rundir import register_resolvers

    cdir = config_dir()
    register_resolvers()  # ${bb.unique:} in the run / sweep directory names
    REGISTRY.load()
    register_plugin_configs(cdir)
    sys.argv = [sys.argv[0], *rewrite_model_override(args, cdir)]

    @hydra.main(version_base="1.3", config_path=str(cdir), config_name="config")
    def _main(cfg: DictConfig) -> None:
        from backdoorbench.engine.pipeline import run_experiment
        from backdoorbench.report import print_run_summary

        out_dir = HydraConfig.get().runtime.output_dir
        try:
            results = run_experiment(cfg, out_dir)
        except (ConfigError, UnknownNameError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        print_run_summary(results)

    _main()
    return 0


def cmd_list(argv: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    kinds = KINDS
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

    p = argparse.ArgumentParser(prog="python -m backdoorbench report")
    p.add_argument("dir", help="a run or multirun directory")
    p.add_argument("--out", default=None, help="where to write report.md / report.csv (default: DIR)")
    ns = p.parse_args(argv)
    try:
        md = write_report(Path(ns.dir), Path(ns.out) if ns.out else None)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(md)
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
    except UnknownNameError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"error: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _offline_default() -> bool:
    """Offline unless the user opts in to the hub (BACKDOORBENCH_ONLINE=1): the embedded defaults need no
    network, and a hub lookup on a machine without one only adds a long time-out."""
    return os.environ.get("BACKDOORBENCH_ONLINE", "0") in ("0", "", "false")
