"""The package's floor plan, checked on the import graph (DESIGN.md section 2).

The graph is read from the source with `ast`, so it holds every import a module can make:
module-level ones, those inside functions (a lazy import that hides a circle is still a
circle) and those under `if TYPE_CHECKING`. An edge goes to the module an import names:
`from mckmpi.offload import client` is an edge to `mckmpi.offload.client`, `from
mckmpi.offload.policy import Policy` one to `mckmpi.offload.policy`; the implicit import of
parent packages is not an edge (else every `__init__` that imports a submodule would make a
circle with all of its package).

The rules on what a package may import (post-processing never imports the runtime, node/
never the offload, the offload's rank side never its proxy side) follow imports through
other modules. Those on post-processing count only imports that run: an import under
`if TYPE_CHECKING` names a type for the checker and loads nothing, so results still open
where mpi4py is missing. Circles count every import, type-only ones included.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest

import mckmpi

ROOT = Path(mckmpi.__file__).parent

#: The two halves of the offload (mckmpi/offload/__init__.py lists them)
OFFLOAD_RANK_SIDE = {f"mckmpi.offload.{m}" for m in ("session", "client", "spawn")}
OFFLOAD_PROXY_SIDE = {f"mckmpi.offload.{m}" for m in (
    "server", "loop", "paths", "data", "tracee", "remote", "ring_server", "failures")}

#: What post-processing (analysis/, trace/) must never import, directly or not
RUNTIME = ("mckmpi.lwk", "mckmpi.offload", "mpi4py", "mckmpi.runner")


def module_name(path: Path, root: Path) -> str:
    """`mckmpi.offload.client` for ROOT/offload/client.py, `mckmpi.offload` for its __init__."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_only(tree: ast.AST) -> set[int]:
    """ids of the import statements under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
                isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                or isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"):
            found.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return found


def imports_of(tree: ast.AST, name: str, is_package: bool, known: set[str],
               type_only: bool = True) -> set[str]:
    """Every module `tree` (module `name`) imports, anywhere in it (with `type_only`, also
    those under `if TYPE_CHECKING`)."""
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    skip = set() if type_only else _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            if node.level:
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return found


def import_graph(root: Path = ROOT, type_only: bool = True) -> dict[str, set[str]]:
    """module -> modules it imports (inside the package or not), for every module under root;
    without `type_only`, the imports under `if TYPE_CHECKING` are left out."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    return {name: imports_of(ast.parse(path.read_text(), str(path)), name,
                             path.name == "__init__.py", known, type_only)
            for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module, or a
    module that imports itself (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start] & graph.keys())))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for succ in edges:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ] & graph.keys()))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
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
                    if len(component) > 1 or node in graph[node]:
                        found.append(sorted(component))
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others (externals included)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for succ in graph.get(todo.pop(), ()):
            if succ not in seen:
                seen.add(succ)
                todo.append(succ)
    return seen


def under(module: str, prefixes: Iterable[str]) -> bool:
    """Whether `module` is one of `prefixes` or inside one of them."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(root: Path = ROOT) -> list[str]:
    """Every breach of the layout rules, one line each (empty when the house is in order)."""
    graph, runs = import_graph(root), import_graph(root, type_only=False)
    found = [f"import circle: {' <-> '.join(c)}" for c in cycles(graph)
             if any(under(m, ["mckmpi.offload"]) for m in c)]
    for module in sorted(graph):
        deps = reachable(graph, module)
        if under(module, ["mckmpi.analysis", "mckmpi.trace"]):
            found += [f"{module} imports the runtime module {d}"
                      for d in sorted(reachable(runs, module)) if under(d, RUNTIME)]
        if under(module, ["mckmpi.node"]):
            found += [f"{module} imports the offload module {d}" for d in sorted(deps)
                      if under(d, ["mckmpi.offload"])]
        if module in OFFLOAD_RANK_SIDE:
            found += [f"rank-side {module} imports proxy-side {d}" for d in sorted(deps)
                      if d in OFFLOAD_PROXY_SIDE]
    return found


def test_the_offload_halves_exist_as_named():
    assert OFFLOAD_RANK_SIDE | OFFLOAD_PROXY_SIDE <= set(import_graph())


def test_no_offload_circle_and_no_forbidden_import():
    assert violations() == []


def test_no_import_circle_anywhere():
    assert cycles(import_graph()) == []


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    """A copy of the package with `files` (path -> source) added or replaced."""
    root = tmp_path / "mckmpi"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    ({"offload/syscalls.py": (ROOT / "offload/syscalls.py").read_text()
      + "\n\ndef _f():\n    from mckmpi.offload import seccomp\n"},
     "import circle: mckmpi.offload.seccomp <-> mckmpi.offload.syscalls"),
    ({"analysis/planted.py": "def f():\n    from mckmpi.offload import syscalls\n"},
     "mckmpi.analysis.planted imports the runtime module mckmpi.offload.syscalls"),
    ({"trace/planted.py": "from mckmpi.config import Settings\nimport mpi4py.MPI\n"},
     "mckmpi.trace.planted imports the runtime module mpi4py.MPI"),
    ({"trace/planted.py": "from .. import runner\n"},
     "mckmpi.trace.planted imports the runtime module mckmpi.runner"),
    ({"node/__init__.py": "", "node/host.py": "from mckmpi.offload.policy import Policy\n"},
     "mckmpi.node.host imports the offload module mckmpi.offload.policy"),
    ({"offload/spawn.py": (ROOT / "offload/spawn.py").read_text()
      + "\n\nif False:\n    from mckmpi.offload.loop import Emulator\n"},
     "rank-side mckmpi.offload.spawn imports proxy-side mckmpi.offload.loop"),
    ({"offload/protocol.py": (ROOT / "offload/protocol.py").read_text()
      + "\n\nfrom .tracee import Gone\n"},
     "rank-side mckmpi.offload.client imports proxy-side mckmpi.offload.tracee"),
])
def test_a_planted_breach_is_found(tmp_path: Path, files: dict[str, str], expected: str):
    assert expected in violations(_plant(tmp_path, files))


def test_a_planted_circle_outside_the_offload_is_found(tmp_path: Path):
    root = _plant(tmp_path, {"planted_a.py": "from mckmpi import planted_b\n",
                             "planted_b.py": "def f():\n    import mckmpi.planted_a\n"})
    assert ["mckmpi.planted_a", "mckmpi.planted_b"] in cycles(import_graph(root))
