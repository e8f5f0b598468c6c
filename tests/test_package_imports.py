"""The production packages never import the local harness or the load tests: an image may
ship without them, and the worker must not depend on tools that start servers."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PRODUCTION = ("topics", "detectors", "streams", "api", "cli", "cases", "supervision")
NOT_PRODUCTION = ("harness", "loadtest", "tests")


def _imported(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_production_code_imports_no_harness_and_no_loadtest() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported(path) & set(NOT_PRODUCTION))
        for package in PRODUCTION
        for path in sorted((Path(ROOT) / package).rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(offenders) > 40  # the walk found the packages


def test_the_harness_imports_no_loadtest() -> None:
    for path in sorted((Path(ROOT) / "harness").rglob("*.py")):
        assert "loadtest" not in _imported(path), path
