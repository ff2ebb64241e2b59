"""The modules of the four packages import each other without a circle, and imports point one way.

Every module of ``kernels/``, ``vlmcore/``, ``train/`` and ``bench/`` (import names as setup.py maps
them: ``kernels/`` is ``vlmcore.kernels``) is parsed with ``ast``. Its imports are every ``import``
statement anywhere in it (module level, inside functions, under ``if TYPE_CHECKING:``; relative ones
resolved), ``importlib.import_module("...")`` calls with a literal name, and the string entries of a
task registry (``REGISTRY = {"clip": ".clip:ClipTask"}``, imported on first use).

An edge goes to the module named: ``from a.b import c`` to ``a.b.c`` when that is a module, else to
the package ``a.b`` (its ``__init__``), so circles through a package's re-exports count. Importing
``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``; those implicit parent edges are left out
(a package that re-exports its submodules would otherwise make every one of them a circle).
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
#: The layers, lowest first, and the layers each may import.
ALLOWED = {"kernels": {"kernels"}, "models": {"kernels", "models"}, "train": {"kernels", "models", "train"},
           "bench": {"kernels", "models", "train", "bench"}}


def top_level_packages(root: str) -> dict[str, str]:
    """``{import name: folder}`` as setup.py's ``TOP_LEVEL`` maps them (read from its source)."""
    with open(os.path.join(root, "setup.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "TOP_LEVEL" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no TOP_LEVEL mapping")


def module_files(root: str, packages: dict[str, str]) -> dict[str, str]:
    """``{module name: file}`` of every module in a package folder (one with ``__init__.py``)."""
    out = {}
    for name, folder in packages.items():
        for here, subdirs, files in os.walk(os.path.join(root, folder)):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith((".", "__")))
            if "__init__.py" not in files:
                continue
            rel = os.path.relpath(here, os.path.join(root, folder))
            package = name if rel == "." else name + "." + rel.replace(os.sep, ".")
            for file in files:
                if file.endswith(".py"):
                    stem = file[:-3]
                    out[package if stem == "__init__" else f"{package}.{stem}"] = os.path.join(here, file)
    return out


def _absolute(name: str, level: int, package: str) -> str:
    """``name`` imported with ``level`` leading dots from inside ``package``."""
    if level == 0:
        return name
    base = package.split(".")[: len(package.split(".")) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _literal_import_module(node: ast.Call, module: str, package: str) -> str | None:
    """The module of an ``importlib.import_module("x", package)`` call with a literal name, else None."""
    func = node.func
    if getattr(func, "attr", getattr(func, "id", None)) != "import_module" or not node.args:
        return None
    first = node.args[0]
    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
        return None
    name = first.value
    level = len(name) - len(name.lstrip("."))
    anchor = package
    if len(node.args) > 1 and isinstance(node.args[1], ast.Name) and node.args[1].id == "__name__":
        anchor = module
    return _absolute(name[level:], level, anchor)


def _registry_targets(node: ast.AST, package: str) -> list[str]:
    """The modules named by a ``REGISTRY = {name: "module:Class"}`` dict (relative to ``package``)."""
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    value = getattr(node, "value", None)
    if not (any(getattr(t, "id", None) == "REGISTRY" for t in targets) and isinstance(value, ast.Dict)):
        return []
    out = []
    for entry in value.values:
        if isinstance(entry, ast.Constant) and isinstance(entry.value, str) and ":" in entry.value:
            name = entry.value.partition(":")[0]
            level = len(name) - len(name.lstrip("."))
            out.append(_absolute(name[level:], level, package))
    return out


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """``(dotted name, line)`` of everything ``tree`` imports (see the module docstring)."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module or "", node.level, package)
            out += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]  # a name, or a submodule
        elif isinstance(node, ast.Call):
            name = _literal_import_module(node, module, package)
            out += [(name, node.lineno)] if name else []
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            out += [(name, node.lineno) for name in _registry_targets(node, package)]
    return out


def import_graph(root: str = ROOT) -> dict[str, dict[str, str]]:
    """``{module: {imported module: "file:line"}}`` over the package folders (our modules only)."""
    files = module_files(root, top_level_packages(root))
    graph: dict[str, dict[str, str]] = {}
    for module, path in files.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges = graph.setdefault(module, {})
        for name, line in imported_names(tree, module, path.endswith("__init__.py")):
            target = name
            while target and target not in files:  # ``pkg.function`` -> ``pkg``; outside modules -> ""
                target = target.rpartition(".")[0]
            if target and target != module:
                edges.setdefault(target, f"{os.path.relpath(path, root)}:{line}")
    return graph


def _strongly_connected(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, {})))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def _one_cycle(graph: dict[str, dict[str, str]], component: list[str]) -> list[str]:
    """A shortest circle through the first module of ``component`` (breadth-first inside it)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node]):
            if child == start:
                return paths[node] + [start]
            if child in members and child not in paths:
                paths[child] = paths[node] + [child]
                queue.append(child)
    raise AssertionError(f"no circle through {start}")


def describe_cycles(graph: dict[str, dict[str, str]]) -> list[str]:
    """One line per import circle: ``a (a.py:3) -> b (b.py:9) -> a``."""
    lines = []
    for component in _strongly_connected(graph):
        cycle = _one_cycle(graph, component)
        hops = [f"{a} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        lines.append(" -> ".join(hops + [cycle[0]]) + f"   [{len(component)} modules in this knot]")
    return lines


def layer(module: str) -> str:
    """``kernels``, ``models``, ``train`` or ``bench``."""
    for name, prefix in (("kernels", "vlmcore.kernels"), ("train", "vlmcore.train"), ("bench", "vlmcore.bench")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "models"


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_collector_sees_every_kind_of_import(tmp_path):
    (tmp_path / "setup.py").write_text('TOP_LEVEL = {"vlmcore": "vlmcore", "vlmcore.train": "train"}\n')
    (tmp_path / "vlmcore").mkdir()
    (tmp_path / "vlmcore" / "__init__.py").write_text("from vlmcore.clip import CLIP\n")
    (tmp_path / "vlmcore" / "clip.py").write_text("CLIP = 1\n")
    (tmp_path / "train" / "tasks").mkdir(parents=True)
    (tmp_path / "train" / "__init__.py").write_text("")
    (tmp_path / "train" / "config.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vlmcore.train.tasks import get_task\n"
        "def f():\n    import importlib\n    return importlib.import_module('vlmcore.train.loop')\n")
    (tmp_path / "train" / "loop.py").write_text("def g():\n    from . import config\n    import vlmcore\n")
    (tmp_path / "train" / "tasks" / "__init__.py").write_text('REGISTRY = {"clip": ".clip:ClipTask"}\n')
    (tmp_path / "train" / "tasks" / "clip.py").write_text("from ..config import X\nfrom .. import loop\n")
    edges = {module: set(targets) for module, targets in import_graph(str(tmp_path)).items()}
    assert edges == {
        "vlmcore": {"vlmcore.clip"}, "vlmcore.clip": set(), "vlmcore.train": set(),
        "vlmcore.train.config": {"vlmcore.train.tasks", "vlmcore.train.loop"},
        "vlmcore.train.loop": {"vlmcore.train.config", "vlmcore"},
        "vlmcore.train.tasks": {"vlmcore.train.tasks.clip"},
        "vlmcore.train.tasks.clip": {"vlmcore.train.config", "vlmcore.train.loop"}}
    assert len(describe_cycles(import_graph(str(tmp_path)))) == 1


def test_the_packages_have_no_import_circle(graph):
    cycles = describe_cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_imports_point_one_way(graph):
    """kernels <- models <- train; bench may import all; nothing imports train or bench from below."""
    wrong = [f"{module} imports {target} ({where})" for module, targets in sorted(graph.items())
             for target, where in sorted(targets.items()) if layer(target) not in ALLOWED[layer(module)]]
    assert not wrong, "\n".join(wrong)


def test_the_config_schema_imports_nothing_of_the_trainer(graph):
    """train/config.py is a leaf: the task lookup and the DeepSpeed check are handed in."""
    assert not [t for t in graph["vlmcore.train.config"] if layer(t) == "train"], graph["vlmcore.train.config"]
