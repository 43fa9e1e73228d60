"""The documentation site's wiring (the build itself is ``python3 -m tox -e docs``, in tox's env_list): CI builds it
strictly, its packages are the ``docs`` extra and are locked, and the navigation is docs/'s folder tree."""

from __future__ import annotations

import configparser
import re

import tomllib
from conftest import REPO_ROOT


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_tox_builds_the_site_strictly_with_the_docs_extra_locked() -> None:
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(REPO_ROOT / "tox.ini")
    assert "docs" in [e.strip() for e in tox["tox"]["env_list"].split(",")]  # the README's `python3 -m tox` runs it
    docs = tox["testenv:docs"]
    assert "mkdocs build --strict" in docs["commands"]
    assert "constraints.txt" in docs["set_env"]
    extra = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["docs"]
    deps = [line.strip() for line in docs["deps"].splitlines() if line.strip()]
    assert sorted(map(_name, deps)) == sorted(map(_name, extra))
    pinned = {
        _name(line)
        for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert {_name(d) for d in extra} | {"mkdocstrings-python"} <= pinned
    assert "docs" in (REPO_ROOT / "scripts" / "lock.sh").read_text().split(".[", 1)[1].split("]")[0]


def test_the_navigation_is_the_folder_tree() -> None:
    """No ``nav:`` list in mkdocs.yml: a page added to docs/ is on the site without editing it."""
    config = (REPO_ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^docs_dir: docs$", config, re.M)
    assert not re.search(r"^nav:", config, re.M)
    assert "scripts/mkdocs_hooks.py" in config and (REPO_ROOT / "scripts" / "mkdocs_hooks.py").is_file()
    assert not (REPO_ROOT / "docs" / "README.md").exists()  # it would clash with docs/index.md as the home page
