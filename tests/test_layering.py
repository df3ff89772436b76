"""The layers' direction, read from the source: model <- training, model <- service <- sowa, and a service core
that knows no HTTP framework (so it can run under another front end, or none).

Every import counts, relative ones resolved, inside functions and `if TYPE_CHECKING:` blocks too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

# package -> top-level packages it must not import
FORBIDDEN = {"model": {"service", "training", "sowa"}, "training": {"service", "sowa"}, "service": {"training", "sowa"}}
# the service's core: no FastAPI or Starlette, directly or through another service module
CORE = {"service.batcher", "service.engine", "service.registry", "service.store", "service.codecs", "service.staging",
        "service.uploads", "service.errors", "service.telemetry", "service.bank_residency", "service.settings",
        "service.class_names"}
WEB = {"fastapi", "starlette"}


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, as absolute dotted names (`from a import b` gives `a` and `a.b`)."""
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
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def _files(package: str) -> list[Path]:
    return sorted((REPO / package.replace(".", "/")).rglob("*.py"))


def _in(name: str, modules: set[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_downwards(package: str) -> None:
    offenders = [f"{_module(p)} imports {name}" for p in _files(package) for name in sorted(imports(p))
                 if name.split(".")[0] in FORBIDDEN[package]]
    assert not offenders, "\n".join(offenders)


def _core_files() -> list[Path]:
    files = []
    for m in sorted(CORE):
        path = REPO / m.replace(".", "/")
        assert path.is_dir() or path.with_suffix(".py").is_file(), f"core module {m} is gone: update CORE"
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    return files


def test_the_service_core_knows_no_web_framework() -> None:
    offenders = []
    for path in _core_files():
        for name in sorted(imports(path)):
            if name.split(".")[0] in WEB:
                offenders.append(f"{_module(path)} imports {name}")
            elif name.split(".")[0] == "service" and name != "service" and not _in(name, CORE):
                offenders.append(f"{_module(path)} imports {name}, outside the core")
    assert not offenders, "\n".join(offenders)
