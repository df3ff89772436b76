"""The layers' direction, read from the source, by package: model <- training, model <- service <- sowa; inside
the service, core <- http <- workers <- server and core <- rpc <- workers <- server (rpc: the gRPC front end, beside
http), and a core that knows no HTTP or RPC framework (so it can run under another front end, or none). No import
cycle between modules either.

Every import counts, relative ones resolved, inside functions and `if TYPE_CHECKING:` blocks too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("model", "training", "service", "sowa")
# package -> what it must not import; a layer is named by its package, so a new module joins its layer's rules
# the training stack (the `train` extra) stays out of the pure-torch model and out of the service image
TRAINING_STACK = {"lightning", "pytorch_lightning", "hydra", "omegaconf", "tensorboard", "wandb"}
FORBIDDEN = {
    "model": {"service", "training", "sowa", *TRAINING_STACK},
    "training": {"service", "sowa"},
    "service": {"training", "sowa", *TRAINING_STACK},
    "service.core": {"service.http", "service.rpc", "service.workers", "service.server", "service.client", "fastapi",
                     "starlette", "grpc"},
    "service.http": {"service.rpc", "service.workers", "service.server", "service.client"},
    # the gRPC front end sits beside http, on the core alone; workers and server start it where the model is
    "service.rpc": {"service.http", "service.workers", "service.server", "service.client", "fastapi", "starlette"},
    "service.workers": {"service.server", "service.client"},
    "service.client": {"service.core", "service.workers", "service.server"},
}


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(name: str) -> bool:
    path = REPO / name.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").is_file()


def imports(path: Path) -> set[str]:
    """Every module `path` imports, as absolute dotted names: `from a import b` gives `a.b` where that is a
    module of this repository, else `a`."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:
                found.add(f"{base}.{a.name}" if _exists(f"{base}.{a.name}") else base)
    return found


def _files(package: str) -> list[Path]:
    path = REPO / package.replace(".", "/")
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def wrong_way(package: str) -> list[str]:
    return [f"{_module(p)} imports {name}" for p in _files(package) for name in sorted(imports(p))
            if any(_in(name, f) for f in FORBIDDEN[package])]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_downwards(package: str) -> None:
    assert _exists(package), f"{package} is gone: update FORBIDDEN"
    offenders = wrong_way(package)
    assert not offenders, "\n".join(offenders)


def test_every_service_module_sits_in_a_layer() -> None:
    """A module at the service's top level is a composition root (server) or stands alone (client); anything else
    belongs in core, http or workers, where the rules above hold it."""
    top = sorted(p.stem for p in (REPO / "service").glob("*.py") if p.stem != "__init__")
    assert top == ["client", "server"], top


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for pkg in PACKAGES for p in _files(pkg)}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imported in imports(path):
            # the longest module of this repository the name is in (a package's __init__ counts as a module)
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                deps.add(imported)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    found = cycles(_graph())
    assert not found, "\n".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_loop_through_function_level_imports() -> None:
    # the loop issue 19 found: server -> supervisor -> worker -> server
    graph = {"server": {"supervisor"}, "supervisor": {"worker"}, "worker": {"server"}, "model": set()}
    assert cycles(graph) == [["server", "supervisor", "worker"]]
