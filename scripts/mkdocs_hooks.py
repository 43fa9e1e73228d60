"""MkDocs hook (mkdocs.yml ``hooks:``): the API reference pages, and the repository files the pages link to.

The API reference: one generated page per public module of ``backdoorbench`` under ``reference/``, rendered by
mkdocstrings from the docstrings (read statically, nothing imported); new modules get their page by themselves.
The docstrings are written with reST roles (``:class:`~x.Y```) and ``::`` literal blocks; :class:`RestRoles`
(a griffe extension, mkdocs.yml ``extensions:``) turns those into Markdown code spans and paragraphs.

The pages link to files elsewhere in the repository (``../../datasets/cifar10.md``, the README links into
``docs/``). Such a file joins the site under ``repository/<its path>``, read in place (no copy in the repository),
and the links to it, and the links inside it, are rewritten to site paths. The files linked from a joined Markdown
file join too. A link to a folder under docs/ (the kept run records, ``runs/``) gets a generated page listing the
folder's files. A link to a file that exists nowhere is left as written, so ``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import Any

import griffe
from mkdocs.structure.files import File, Files

PREFIX = "repository"
#: inline Markdown links and images: ](target) or ](target#anchor)
LINK = re.compile(r"\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")
#: fenced code blocks (links inside them are text, not links)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
SKIP = (".git", ".tox", "venv", "site")

#: reST cross-reference roles: :class:`~a.b.C` -> `C`, :func:`run` -> `run`
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc|const|ref):`(~?)([^`]+)`")
LITERAL = re.compile(r"(?<=\S)::$", re.M)  # "... back::" before an indented block -> "... back:"


class RestRoles(griffe.Extension):
    """Docstrings: reST roles to Markdown code spans, ``text::`` to ``text:`` (the indented block after it is
    a code block in Markdown already)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", obj.docstring.value)
            obj.docstring.value = LITERAL.sub(":", text)


#: absolute path -> site src_uri (repository/... or a folder's listing), rebuilt on each build
_joined: dict[str, str] = {}


def _relative_targets(text: str) -> list[str]:
    text = FENCE.sub("", text)
    return [
        m["target"]
        for m in LINK.finditer(text)
        if "://" not in m["target"] and not m["target"].startswith(("/", "mailto:"))
    ]


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def on_files(files: Files, config: Any) -> Files:
    root = os.path.dirname(os.path.abspath(config.config_file_path))
    docs = os.path.abspath(config.docs_dir)
    _joined.clear()
    _reference(files, config, root)
    queue = [f.abs_src_path for f in files if f.src_uri.endswith(".md") and f.abs_src_path]
    while queue:
        source = queue.pop()
        with open(source, encoding="utf-8") as fh:
            targets = _relative_targets(fh.read())
        for target in targets:
            path = os.path.normpath(os.path.join(os.path.dirname(source), target))
            has_index = any(os.path.exists(os.path.join(path, n)) for n in ("index.md", "README.md"))
            if os.path.isdir(path) and _inside(path, docs) and path != docs and not has_index and path not in _joined:
                _joined[path] = _listing(files, config, path, docs)
                continue
            if _inside(path, docs) or not _inside(path, root) or not os.path.isfile(path) or path in _joined:
                continue
            rel = os.path.relpath(path, root)
            if rel.split(os.sep)[0] in SKIP:
                continue
            uri = posixpath.join(PREFIX, *rel.split(os.sep))
            _joined[path] = uri
            files.append(File.generated(config, uri, abs_src_path=path))
            if path.endswith(".md"):
                queue.append(path)
    return files


def _reference(files: Files, config: Any, root: str) -> None:
    """``reference/<module path>.md`` (a package: ``.../index.md``) with ``::: <module>`` for every module whose
    path has no private (``_``) part, and ``reference/index.md`` listing them."""
    package = os.path.join(root, "backdoorbench")
    modules: list[tuple[str, str]] = []
    for folder, dirs, names in os.walk(package):
        dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
        for name in sorted(names):
            if not name.endswith(".py") or (name.startswith("_") and name != "__init__.py"):
                continue
            parts = os.path.relpath(os.path.join(folder, name), root)[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
                uri = posixpath.join("reference", *parts, "index.md")
            else:
                uri = posixpath.join("reference", *parts) + ".md"
            modules.append((".".join(parts), uri))
    for module, uri in modules:
        content = f"# `{module}`\n\n::: {module}\n"
        files.append(File.generated(config, uri, content=content))
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings (mkdocstrings): one page per module. The guide to",
        "the Python API is [Python API](../api.md).",
        "",
    ]
    lines += [f"- [`{m}`]({posixpath.relpath(u, 'reference')})" for m, u in modules if u != "reference/index.md"]
    files.append(File.generated(config, "reference/index.md", content="\n".join(lines) + "\n"))


def _listing(files: Files, config: Any, folder: str, docs: str) -> str:
    """A generated page ``<folder>/index.md`` linking every file under ``folder`` (its site src_uri)."""
    rel = posixpath.join(*os.path.relpath(folder, docs).split(os.sep))
    uri = posixpath.join(rel, "index.md")
    names = sorted(
        posixpath.join(*os.path.relpath(os.path.join(d, n), folder).split(os.sep))
        for d, _, fs in os.walk(folder)
        for n in fs
    )
    lines = [f"# {rel}/", "", f"The files under `docs/{rel}/` ({len(names)}), as kept in the repository.", ""]
    lines += [f"- [{n}]({n})" for n in names]
    files.append(File.generated(config, uri, content="\n".join(lines) + "\n"))
    return uri


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    source = page.file.abs_src_path
    if not source:
        return markdown
    docs = os.path.abspath(config.docs_dir)
    here = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match[str]) -> str:
        target = match["target"]
        if "://" in target or target.startswith(("/", "mailto:")):
            return match[0]
        path = os.path.normpath(os.path.join(os.path.dirname(source), target))
        if path in _joined:
            uri = _joined[path]
        elif _inside(path, docs) and not _inside(source, docs):  # a joined file linking into docs/
            uri = posixpath.join(*os.path.relpath(path, docs).split(os.sep))
        else:
            return match[0]
        return f"]({posixpath.relpath(uri, here or '.')}{match['anchor'] or ''})"

    return LINK.sub(rewrite, markdown)
