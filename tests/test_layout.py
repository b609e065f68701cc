"""The shape rules of the shipped package: short modules, short functions, and no imports of tooling.

They keep bot/ readable for the next change: a module does one job, a function fits on a screen, and the
product never depends on the tests or the benchmarks, which are not installed with it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "bot"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
TOOLING = ("tests", "benchmarks")


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def where(path: Path, node: ast.AST | None = None) -> str:
    place = str(path.relative_to(ROOT))
    return f"{place}:{node.lineno}" if isinstance(node, ast.stmt) else place


def test_the_package_has_modules_to_check() -> None:
    # The rules below would pass vacuously if the package moved.
    assert len(modules()) > 20


def test_no_module_is_over_the_line_limit() -> None:
    too_long = {
        where(path): lines
        for path in modules()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split them along a seam): {too_long}"


def test_no_function_is_over_the_line_limit() -> None:
    too_long: dict[str, int] = {}
    for path in modules():
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                # From the def (decorators excluded) to the last line of the body, docstring included.
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long[f"{where(path, node)} {node.name}"] = lines
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def tooling_imports(tree: ast.Module) -> list[tuple[ast.stmt, str]]:
    """Import statements (at any depth: inside functions and TYPE_CHECKING blocks too) that name the tests
    or the benchmarks, with the module each names."""
    found: list[tuple[ast.stmt, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node, node.module))
    return [(node, name) for node, name in found if name.split(".")[0] in TOOLING]


def test_nothing_in_the_package_imports_the_tests_or_the_benchmarks() -> None:
    offending = [
        f"{where(path, node)} imports {name}" for path in modules() for node, name in tooling_imports(parsed(path))
    ]
    assert not offending, offending


@pytest.mark.parametrize(
    ("source", "caught"),
    [
        ("import tests.e2e.discord_emulator\n", ["tests.e2e.discord_emulator"]),
        ("import json, benchmarks\n", ["benchmarks"]),
        ("def f():\n    from benchmarks.synthetic import build\n", ["benchmarks.synthetic"]),
        ("if TYPE_CHECKING:\n    from tests import conftest\n", ["tests"]),
        ("from bot.tests_support import x\nimport testsuite\nfrom . import tests\n", []),
    ],
)
def test_the_import_rule_sees_every_kind_of_import(source: str, caught: list[str]) -> None:
    assert [name for _, name in tooling_imports(ast.parse(source))] == caught
