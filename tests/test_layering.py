"""model/ is the foundation: it must not import the web service or the training code."""

from __future__ import annotations

import ast

from tests.helpers import REPO


def test_model_imports_nothing_from_service_or_training() -> None:
    offenders = []
    for path in (REPO / "model").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("service", "training")]
    assert not offenders
