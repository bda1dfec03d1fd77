"""How the code is laid out: which module may import what, and how the tests are sorted."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.support import REPOSITORY

TESTS = REPOSITORY / "tests"
# What starts an outside tool: Prometheus, promtool, Alertmanager, hadolint, Helm's engine,
# chromium.
TOOLING_ENTRY_POINTS = frozenset(
    {
        "find_binary",
        "find_alertmanager",
        "hadolint_binary",
        "helm",
        "render_chart",
        "render_case",
        "chromium",
        "start_prometheus",
    }
)


def every_test_module() -> Iterator[Path]:
    return iter(sorted(TESTS.glob("test_*.py")))


def names_used(node: ast.AST) -> set[str]:
    used = {child.id for child in ast.walk(node) if isinstance(child, ast.Name)}
    if isinstance(node, ast.FunctionDef):
        used |= {argument.arg for argument in node.args.args}
    return used


def is_tooling_mark(node: ast.expr) -> bool:
    return any(
        isinstance(child, ast.Attribute) and child.attr == "tooling" for child in ast.walk(node)
    )


def unmarked_tooling_tests(path: Path) -> list[str]:
    """Tests that reach an outside tool, directly or through the module's helpers and fixtures,
    without the ``tooling`` marker on them or on their module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for statement in tree.body:
        if not isinstance(statement, ast.Assign):
            continue
        targets = {target.id for target in statement.targets if isinstance(target, ast.Name)}
        if "pytestmark" in targets and is_tooling_mark(statement.value):
            return []
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    reaching = set(TOOLING_ENTRY_POINTS)
    grown = True
    while grown:
        grown = False
        for function in functions:
            if function.name not in reaching and names_used(function) & reaching:
                reaching.add(function.name)
                grown = True
    return [
        function.name
        for function in functions
        if function.name.startswith("test_")
        and function.name in reaching
        and not any(is_tooling_mark(decorator) for decorator in function.decorator_list)
    ]


def test_no_test_module_imports_another() -> None:
    imports = [
        f"{path.name} imports {node.module}"
        for path in every_test_module()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests.test_")
    ]
    assert imports == [], "shared helpers belong in tests/support.py"


def test_tests_that_start_outside_tools_carry_the_tooling_marker() -> None:
    unmarked = {
        path.name: names for path in every_test_module() if (names := unmarked_tooling_tests(path))
    }
    assert unmarked == {}


def test_the_layout_check_finds_a_test_that_reaches_a_tool_through_a_helper(
    tmp_path: Path,
) -> None:
    module = tmp_path / "test_example.py"
    module.write_text(
        "import pytest\n"
        "def run_promtool():\n    return find_binary('promtool')\n"
        "@pytest.fixture\ndef checked():\n    return run_promtool()\n"
        "def test_through_a_fixture(checked):\n    pass\n"
        "@pytest.mark.tooling\ndef test_marked():\n    run_promtool()\n"
        "def test_pure():\n    assert 1 + 1 == 2\n"
    )
    assert unmarked_tooling_tests(module) == ["test_through_a_fixture"]


def test_the_store_metrics_and_state_do_not_import_the_http_client() -> None:
    # The outcome vocabulary lives with the models, so rendering never loads httpx.
    script = (
        "import sys\n"
        "import exporter.exposition, exporter.exposition_cache, exporter.metrics\n"
        "import exporter.state, exporter.store, exporter.telemetry\n"
        "print(sorted(name for name in ('exporter.api', 'httpx') if name in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPOSITORY
    )
    assert result.stdout.strip() == "[]"


def test_the_simulator_never_imports_a_command_line() -> None:
    """exporter.simulator is a library of the exporter's tests and demo: only the two CLIs
    (exporter.cli, exporter.simulator_cli) import it, never the other way round."""
    source = (REPOSITORY / "exporter" / "simulator.py").read_text()
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module
    } | {
        alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert imported & {"exporter.cli", "exporter.simulator_cli"} == set()
