"""The docs' generated tables: ``report`` writes each table of the results pages from kept run records into a
marked block, and says which tables are not (yet) generated.

In a page (``docs/results.md``, ``docs/experiments/*.md``, or any page under ``docs/``)::

    <!-- report:begin runs=docs/experiments/runs/cpu_text_repair table=defended_by_seed -->
    (written by ``python -m backdoorbench report --update-docs``; never edited by hand)
    <!-- report:end -->

    <!-- report:none regenerate="bash scripts/tables.sh cpu_nad" cpu="63 min, 2 cores" reason="..." -->
    > (a visible note, written by ``--update-docs``)
    | the next table: typed from runs whose records were not kept |

    <!-- report:not-a-result -->
    | the next table: settings or published figures, not a measurement |

``runs`` (one or more folders, comma-separated, relative to the repository root) are read as ``report`` reads
them; ``table`` is one of :data:`TABLES` (``zoo``: the model-level table of model-inspection runs,
:mod:`~backdoorbench.report.zoo`; like ``reference``, a block whose folders do not exist yet says so instead of
failing); ``reference=1`` adds the published figures beside ours
(:mod:`~backdoorbench.report.reference`); ``legend=1`` lists the configs that differ from the defaults. A block
keeps the indentation of its ``begin`` line (a table inside a list item). ``--check-docs`` (and
tests/test_report_blocks.py) fails when a block differs from what its records give, or when a results page has
a table that is neither generated nor marked.
"""

from __future__ import annotations

import json
import re
import shlex
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backdoorbench.report.summary import write_summary
from backdoorbench.report_groups import Collection, collect_runs, reproducibility_warnings

BEGIN = re.compile(r"^(\s*)<!-- report:begin (.*?) -->\s*$")
END = re.compile(r"^\s*<!-- report:end -->\s*$")
NONE = re.compile(r"^(\s*)<!-- report:none (.*?) -->\s*$")
NOT_RESULT = re.compile(r"^\s*<!-- report:not-a-result( .*)? -->\s*$")
TABLE_RULE = re.compile(r"^\s*\|(\s*:?-{3,}:?\s*\|)+\s*$")
NOTE_START = "> **Not regenerated from kept records.**"
#: the pages whose every table must be generated or marked
RESULT_PAGES = ("docs/results.md", "docs/experiments/*.md")


def _attrs(text: str) -> dict[str, str]:
    out = {}
    for part in shlex.split(text):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"report block attribute {part!r} is not key=value")
        out[key] = value
    return out


def _tmp_table(write: Callable[[list[dict[str, Any]], Path], str]) -> Callable[[Collection], str]:
    def render(coll: Collection) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            return write(coll.runs, Path(tmp))
    return render


def _summary(coll: Collection) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return write_summary(coll, Path(tmp)).split("\n", 2)[2].lstrip("\n")  # without the "# Summary" heading


def _tables() -> dict[str, Callable[[Collection], str]]:
    from backdoorbench.report.seeds import defended_by_seed, detectors_by_seed
    from backdoorbench.report.tables import write_defended_comparison
    from backdoorbench.report.zoo import zoo_table

    return {
        "detectors_by_seed": lambda c: detectors_by_seed(c.runs),
        "defended_by_seed": lambda c: defended_by_seed(c.runs),
        "defended": _tmp_table(write_defended_comparison),
        "summary": _summary,
        "zoo": lambda c: zoo_table(c.runs),
    }


TABLES = ("detectors_by_seed", "defended_by_seed", "defended", "summary", "reference", "zoo")


def render_block(attrs: dict[str, str], root: Path, page_dir: Path | None = None, figures: bool = True) -> str:
    """The markdown of one block, from its records. ``figures=DIR`` (relative to the page's folder ``page_dir``)
    also draws the ROC figures of a detector table there (``figures``: draw them; else only link them)."""
    if "runs" not in attrs or attrs.get("table") not in TABLES:
        raise ValueError(f"a report block needs runs=DIR[,DIR] and table= one of {', '.join(TABLES)}: got {attrs}")
    from backdoorbench.report.reference import DEFAULT_CSV, reference_table

    dirs = [root / d for d in attrs["runs"].split(",")]
    where = ", ".join(f"`{d}`" for d in attrs["runs"].split(","))
    if attrs["table"] == "reference" and not any(d.is_dir() for d in dirs):  # a paper-scale preset not run yet
        return f"No run of this preset is kept yet ({where}); once one is, this block shows it beside the " \
               "published figures.\n"
    if attrs["table"] == "zoo" and not any(d.is_dir() for d in dirs):  # a zoo whose records are not kept yet
        return f"No record of this zoo is kept yet ({where}); once they are (`bash scripts/runs.sh keep <table>`), " \
               "`python -m backdoorbench report --update-docs` writes the table here.\n"
    configs = root / "configs"
    coll = collect_runs(dirs, configs if configs.is_dir() else None)
    csv_path = Path(attrs.get("csv", DEFAULT_CSV))
    if attrs["table"] == "reference":
        md = reference_table(coll.runs, csv_path) or "No cell of these runs has a published figure.\n"
    else:
        md = _tables()[attrs["table"]](coll)
    if attrs.get("reference") == "1":
        md += "\n" + (reference_table(coll.runs, csv_path) or "No cell of these runs has a published figure.\n")
    if attrs.get("legend") == "1" and coll.legend:
        md += "\nConfigs that differ from the component's default (`configs/`):\n\n"
        md += "".join(f"- `{lab}`: " + ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in sorted(d.items()))
                      + "\n" for lab, d in sorted(coll.legend.items()))
    if attrs.get("figures"):
        md += _roc_links(coll.runs, (page_dir or root) / attrs["figures"], attrs["figures"], figures)
    for warning in reproducibility_warnings(coll.runs):
        md += f"\n⚠ the table mixes runs: {warning}\n"
    md += f"\nGenerated by `python -m backdoorbench report --update-docs` from the {len(coll.runs)} run records in " \
          f"{where}.\n"
    return md


def _roc_links(runs: list[dict[str, Any]], folder: Path, rel: str, draw: bool) -> str:
    """Links to one ROC figure per attack (every detector, the first seed's runs), drawn into ``folder`` when
    ``draw``. The check (``draw`` False) compares the links only: a PNG's bytes depend on the plotting library."""
    import pandas as pd

    from backdoorbench.report.fmt import slug
    from backdoorbench.report.tables import _roc_figures, detector_records

    recs = detector_records(runs)
    if not recs:
        return ""
    first = sorted({r["seed"] for r in recs}, key=lambda s: (s is None, str(s)))[0]
    df = pd.DataFrame([r for r in recs if r["seed"] == first])
    if draw:
        folder.mkdir(parents=True, exist_ok=True)
        _roc_figures(df, folder)
    names = {a: f"roc_{slug(a)}.png" for a in sorted(df["attack"].unique())}
    missing = {a for a, name in names.items() if not (folder / name).is_file()}  # then the check fails
    links = [f"[{a}]({rel}/{name})" + (" (missing)" if a in missing else "") for a, name in names.items()]
    return f"\nROC curves per attack (every detector, seed {first}; from the records' `scores.csv`): " \
           + ", ".join(links) + ".\n"


def none_note(attrs: dict[str, str]) -> str:
    """The visible note under a ``report:none`` marker."""
    parts = [NOTE_START]
    if attrs.get("reason"):
        reason = attrs["reason"].rstrip(".")
        parts.append(reason[:1].upper() + reason[1:] + ".")
    if attrs.get("regenerate"):
        cpu = f" (CPU time: {attrs['cpu']})" if attrs.get("cpu") else ""
        parts.append(f"To regenerate: `{attrs['regenerate']}`{cpu}; then keep the records (`bash scripts/runs.sh "
                     "keep <table>`) and generate this table from them (docs/metrics.md, \"Generated tables\").")
    return " ".join(parts)


def process_page(text: str, root: Path, page_dir: Path | None = None, figures: bool = False) -> str:
    """The page with every block and note rewritten from the records (markers in code fences are examples)."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    fence = False
    while i < len(lines):
        line = lines[i]
        out.append(line)
        if line.lstrip().startswith("```"):
            fence = not fence
        begin, none = (None, None) if fence else (BEGIN.match(line), NONE.match(line))
        if begin:
            end = next((j for j in range(i + 1, len(lines)) if END.match(lines[j])), None)
            if end is None:
                raise ValueError(f"line {i + 1}: report:begin without report:end")
            indent = begin.group(1)
            body = render_block(_attrs(begin.group(2)), root, page_dir, figures).rstrip("\n").split("\n")
            out += [""] + [(indent + b) if b else "" for b in body] + [""]
            i = end
            continue
        if none:
            out.append(none.group(1) + none_note(_attrs(none.group(2))))
            if i + 1 < len(lines) and lines[i + 1].lstrip().startswith(NOTE_START):
                i += 1  # the old note: replaced
        i += 1
    return "\n".join(out)


def unmarked_tables(text: str) -> list[int]:
    """Line numbers (1-based) of the tables that are neither inside a generated block nor the first table after a
    ``report:none`` / ``report:not-a-result`` marker (tables in code fences are not counted)."""
    bad = []
    inside = fence = marked = False
    lines = text.split("\n")
    for n, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fence = not fence
        if fence:
            continue
        if BEGIN.match(line):
            inside = True
        elif END.match(line):
            inside = False
        elif NONE.match(line) or NOT_RESULT.match(line):
            marked = True
        elif TABLE_RULE.match(line) and n > 0 and lines[n - 1].lstrip().startswith("|"):
            if not inside and not marked:
                bad.append(n)  # the header line's number, 1-based
            marked = False
    return bad


def pages(root: Path) -> list[Path]:
    """The results pages and every other docs page that holds a block."""
    found = {p for pattern in RESULT_PAGES for p in root.glob(pattern)}
    found |= {p for p in (root / "docs").rglob("*.md") if "<!-- report:" in p.read_text()}
    return sorted(found)


def update_docs(root: Path, check: bool = False) -> list[str]:
    """Rewrite every block and note under ``root/docs`` (``check``: write nothing). Returns the problems: pages
    whose blocks differ from their records (``check``) and unmarked tables of the results pages."""
    problems = []
    results = {p for pattern in RESULT_PAGES for p in root.glob(pattern)}
    for page in pages(root):
        text = page.read_text()
        new = process_page(text, root, page.parent, figures=not check)
        rel = page.relative_to(root)
        if new != text:
            if check:
                problems.append(f"{rel}: its generated blocks differ from their records "
                                "(python -m backdoorbench report --update-docs)")
            else:
                page.write_text(new)
        if page in results:
            problems += [f"{rel}:{n}: a table neither generated from records nor marked report:none / "
                         "report:not-a-result" for n in unmarked_tables(new)]
    return problems


def docs_command(root: Path, check: bool) -> int:
    """``report --update-docs`` / ``--check-docs``: 0 when every block equals its records and no results table is
    unmarked, 1 with the problems listed, 2 for a bad page or a missing records folder."""
    import sys

    if not (root / "docs").is_dir():
        print("error: no docs/ here: run from the repository root", file=sys.stderr)
        return 2
    try:
        problems = update_docs(root, check=check)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"docs: {len(problems)} problem(s)")
    else:
        print("docs: every block equals its records" if check else "docs: blocks rewritten from their records")
    return 1 if problems else 0
