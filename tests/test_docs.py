"""The summaries cannot drift: package docstrings name what exists, and every docs link resolves.

The package docstrings are the first thing ``help(vlmcore.kernels)`` shows; they once listed 3 of
5 ops and 3 of 11 tasks. The README is the front page and ``docs/`` the reference; a page moved
or renamed without its links is caught here.
"""

import importlib
import inspect
import pathlib
import re

import pytest
import vlmcore.bench
import vlmcore.kernels
import vlmcore.train
from vlmcore.train.tasks import task_names

import vlmcore

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# Sphinx roles naming an object (``:func:`name```); ``~`` shortens a dotted path to its last part.
ROLE = re.compile(r":(?:func|class|data|mod):`~?([\w.]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# The README is a front page: the reference belongs in docs/.
README_MAX_LINES = 300


def _named_objects(doc: str) -> set[str]:
    """The last dotted part of every object a docstring names through a Sphinx role."""
    return {name.rsplit(".", 1)[-1] for name in ROLE.findall(doc)}


def _named_modules(doc: str, package: str) -> set[str]:
    """The submodules of ``package`` that a docstring names with ``:mod:``."""
    prefix = package + "."
    return {name[len(prefix):].split(".")[0] for name in ROLE.findall(doc) if name.startswith(prefix)}


def test_kernels_docstring_names_every_public_op_and_nothing_else():
    doc = inspect.getdoc(vlmcore.kernels)
    public = set(vlmcore.kernels.__all__)
    named = _named_objects(doc) - {"reference", "_backend", "_distributed"}
    assert public - named == set(), f"in vlmcore.kernels.__all__ but not in its docstring: {sorted(public - named)}"
    assert named - public == set(), f"named in vlmcore.kernels' docstring but not exported: {sorted(named - public)}"


def test_every_op_file_of_kernels_is_exported():
    """Each public module of kernels/ (one op per file) contributes a name to ``__all__``."""
    op_files = {p.stem for p in (ROOT / "kernels").glob("*.py") if not p.stem.startswith("_")} - {"reference"}
    exported = [getattr(vlmcore.kernels, name) for name in vlmcore.kernels.__all__]
    exporting = {obj.__module__.rsplit(".", 1)[-1] for obj in exported if callable(obj)}
    unexported = sorted(op_files - exporting)
    assert not unexported, f"op files with nothing in vlmcore.kernels.__all__: {unexported}"


def test_bench_docstring_names_every_module_of_bench():
    modules = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"__init__"}
    named = _named_modules(inspect.getdoc(vlmcore.bench), "vlmcore.bench")
    assert modules - named == set(), f"bench/ modules missing from vlmcore.bench's docstring: {sorted(modules - named)}"
    assert named - modules == set(), f"vlmcore.bench's docstring names missing modules: {sorted(named - modules)}"


def _docstring_task_list(doc: str) -> set[str]:
    """The ````name```` entries of the paragraph starting with "Tasks" in a docstring."""
    paragraph = next(p for p in doc.split("\n\n") if p.startswith("Tasks"))
    return set(re.findall(r"``(\w+)``", paragraph.split(":", 1)[1])) - {"task"}


def test_train_docstring_names_every_registered_task_and_nothing_else():
    listed, registered = _docstring_task_list(inspect.getdoc(vlmcore.train)), set(task_names())
    assert registered - listed == set(), f"tasks missing from vlmcore.train's docstring: {sorted(registered - listed)}"
    assert listed - registered == set(), f"vlmcore.train's docstring lists unknown tasks: {sorted(listed - registered)}"


def test_train_docstring_names_every_subpackage():
    subpackages = {p.parent.name for p in (ROOT / "train").glob("*/__init__.py")}
    named = _named_modules(inspect.getdoc(vlmcore.train), "vlmcore.train")
    assert subpackages - named == set(), f"train/ subpackages missing from its docstring: {sorted(subpackages - named)}"
    for name in named:  # every module it names imports
        importlib.import_module(f"vlmcore.train.{name}")


def test_vlmcore_docstring_names_every_export_and_nothing_else():
    doc = inspect.getdoc(vlmcore)
    public = set(vlmcore.__all__) - {"kernels"}  # the subpackage, named by its dotted path
    named = _named_objects(doc) - set(_named_modules(doc, "vlmcore")) - {"vlmcore"}
    assert public - named == set(), f"in vlmcore.__all__ but not in its docstring: {sorted(public - named)}"
    assert named - public == set(), f"named in vlmcore's docstring but not exported: {sorted(named - public)}"
    for module in _named_modules(doc, "vlmcore"):
        importlib.import_module(f"vlmcore.{module}")


def _markdown_files() -> list[pathlib.Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _links(path: pathlib.Path) -> list[str]:
    """The targets of the markdown links of a file, code blocks and inline code left out."""
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return LINK.findall(text)


def _heading_anchors(path: pathlib.Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces -> '-'."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    headings = re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    broken = []
    for target in _links(path):
        if re.match(r"^[a-z]+:", target):  # https:, mailto: ...: not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _heading_anchors(linked):
            broken.append(f"{target} (no heading with anchor #{anchor})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"


def test_readme_maps_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in _links(README) if not re.match(r"^[a-z]+:", t)}
    pages = set(DOCS.rglob("*.md"))
    assert pages, "docs/ holds no page"
    missing = sorted(str(p.relative_to(ROOT)) for p in pages if p.resolve() not in linked)
    assert not missing, f"docs pages the README's map does not link: {missing}"


def test_readme_is_a_front_page():
    """A few hundred lines at most, opening with the two commands a new user runs."""
    text = README.read_text(encoding="utf-8")
    lines = text.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move reference text to docs/"
    first_block = FENCE.search(text).group(0).splitlines()[1:-1]
    assert [line.split()[:2] for line in first_block] == [["make", "demo"], ["make", "test"]], first_block
