"""The package's shape: no import cycles, Ray only where the README says, one error hierarchy, one exit-code table.

Everything here reads source files (``ast``) or imports modules in a fresh interpreter; nothing is mocked.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvseg_ray import errors

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nvseg_ray"


# --------------------------------------------------------------------------------------------------------
# The import graph (module-level and function-level imports alike: lazy imports are how cycles hide)
# --------------------------------------------------------------------------------------------------------


def package_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (a package directory)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _runtime_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, at any depth (``if TYPE_CHECKING:`` blocks never do)."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
        return
    for field, value in ast.iter_fields(node):
        if isinstance(node, ast.If) and field == "body" and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, ast.AST):
                yield from _runtime_imports(child)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (``from .x import name`` counts ``.x.name`` when
    that is a module, else ``.x``)."""
    modules = package_modules(root)
    top = root.name

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        targets: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.split(".")[0] == top}
                continue
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != top:
                continue
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in map(owner, targets) if t and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one example cycle path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_path(graph, set(c)) for c in components]


def _cycle_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One cycle through a strongly connected component: a -> b -> ... -> a."""
    start = min(component)
    paths = {start: [start]}
    todo = [start]
    while todo:  # breadth-first back to start inside the component
        v = todo.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                todo.append(w)
    raise AssertionError(component)  # pragma: no cover - a component always has a cycle


def test_no_import_cycles():
    cycles = import_cycles(import_graph(PACKAGE))
    assert not cycles, "import cycles inside nvseg_ray:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cycle_check_sees_lazy_and_relative_imports(tmp_path):
    """The check itself can fail: a cycle through a function-level relative import, and one through a package
    ``__init__``; a ``TYPE_CHECKING`` import is no cycle."""
    pkg = tmp_path / "demo"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from . import a\n    return a\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import helper\n")
    (pkg / "sub" / "c.py").write_text("import demo.d\ndef helper(): ...\n")
    (pkg / "d.py").write_text("from .sub import helper\n")
    (pkg / "e.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .f import x\n")
    (pkg / "f.py").write_text("from .e import TYPE_CHECKING as x\n")
    cycles = sorted(import_cycles(import_graph(pkg)))
    assert cycles == [["demo.a", "demo.b", "demo.a"], ["demo.d", "demo.sub", "demo.sub.c", "demo.d"]]


# --------------------------------------------------------------------------------------------------------
# The engine in two parts: model-free stages, and the model runner
# --------------------------------------------------------------------------------------------------------

#: what CPU workers, Serve gateways and the CLI build without weights (the runner is nvseg_ray.model_runner).
MODEL_FREE = ("nvseg_ray.prompts", "nvseg_ray.stages")


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_model_free_stages_hold_no_model():
    """The stages never reach the model runner, and import nothing that loads or holds weights."""
    graph = import_graph(PACKAGE)
    modules = package_modules(PACKAGE)
    for name in MODEL_FREE:
        assert "nvseg_ray.model_runner" not in reachable(graph, name), name
        imported = {alias.name for node in _runtime_imports(ast.parse(modules[name].read_text()))
                    for alias in node.names}
        assert not imported & {"load_model", "LoadedModel", "ModelRunner"}, name


# --------------------------------------------------------------------------------------------------------
# Ray: imported only by the modules the README names, and only when a run starts
# --------------------------------------------------------------------------------------------------------


def readme_ray_modules() -> set[str]:
    """The ``nvseg_ray`` files named by the README's "Ray is imported only by ..." sentence."""
    text = " ".join((REPO / "README.md").read_text().split())
    found = re.search(r"Ray is imported only by (.+?)\.(?:\s|$)", text)
    assert found, "the README no longer says which modules import Ray"
    named = re.findall(r"`([^`]+)`", found.group(1))
    return {n for n in named if n.endswith(".py")}


def imports_ray(path: Path) -> bool:
    for node in _runtime_imports(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        if node.__class__ is ast.ImportFrom and node.level:
            continue
        if any(n == "ray" or n.startswith("ray.") for n in names):
            return True
    return False


def test_readme_names_the_modules_that_import_ray():
    actual = {path.relative_to(PACKAGE).as_posix() for path in package_modules(PACKAGE).values() if imports_ray(path)}
    assert actual == readme_ray_modules()


def test_every_module_imports_without_ray():
    """``import nvseg_ray`` and every module in it (the Ray ones too: they import Ray inside the function
    that starts a run), and building the ``nvseg`` parser, leave Ray unimported."""
    names = sorted(package_modules(PACKAGE))
    script = f"""
import importlib, sys
for name in {names!r}:
    if name.endswith("__main__"):
        continue
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:  # an optional extra that is not installed
        if exc.name.split(".")[0] in ("nvseg_ray", "ray"):
            raise
        continue
    assert "ray" not in sys.modules, f"importing {{name}} imported ray"
from nvseg_ray.cli import build_parser
build_parser()
assert "ray" not in sys.modules, "building the nvseg parser imported ray"
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


# --------------------------------------------------------------------------------------------------------
# One error hierarchy, one exit-code table
# --------------------------------------------------------------------------------------------------------


def _error_class_names() -> set[str]:
    return {name for name, value in vars(errors).items()
            if isinstance(value, type) and issubclass(value, errors.NvsegError)}


def test_every_error_class_lives_in_errors():
    """No module outside ``nvseg_ray/errors.py`` (package, Serve app, jobs) defines an error class."""
    known = _error_class_names()
    elsewhere = []
    for folder in ("nvseg_ray", "serve_apps", "jobs"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == PACKAGE / "errors.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    bases = {ast.unparse(b).rpartition(".")[2] for b in node.bases}
                    if bases & known:
                        elsewhere.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not elsewhere, elsewhere


EXIT_CODES = {name: value for name, value in vars(errors).items() if name.startswith("EXIT_")}


def readme_exit_codes() -> set[int]:
    section = (REPO / "README.md").read_text().split("### Exit codes", 1)[1].split("\n#", 1)[0]
    return {int(m) for m in re.findall(r"^\|\s*(\d+)\s*\|", section, flags=re.M)}


def test_readme_exit_code_table_is_the_constants():
    assert readme_exit_codes() == set(EXIT_CODES.values())
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)  # one constant per code


@pytest.mark.parametrize("name", sorted(_error_class_names()))
def test_each_error_family_declares_status_and_exit_code(name):
    cls = getattr(errors, name)
    assert isinstance(cls.http_status, int) and isinstance(cls.exit_code, int)
    assert 400 <= cls.http_status < 600 and cls.exit_code in EXIT_CODES.values(), cls
    assert cls.code and cls.__doc__


def test_per_instance_status():
    """Storage reasons map onto statuses on the base class; an explicit status wins; the code can be refined."""
    assert errors.StorageError("x", reason=errors.REASON_NOT_FOUND).http_status == 404
    assert errors.StorageError("x", reason=errors.REASON_PERMISSION_DENIED).http_status == 403
    assert errors.StorageError("x", reason=errors.REASON_IO_ERROR).http_status == 422
    assert errors.OutputExists("x", reason=errors.REASON_NOT_FOUND).http_status == 409
    assert errors.FetchFailed("x", http_status=422).http_status == 422 and errors.FetchFailed("x").http_status == 502
    err = errors.InputError("x", code="too_large")
    assert (err.code, err.http_status, err.exit_code, errors.InputError.code) == ("too_large", 422, 3, "invalid_input")
    assert (errors.NvsegError("x").http_status, errors.ConfigError("x").http_status) == (500, 400)
