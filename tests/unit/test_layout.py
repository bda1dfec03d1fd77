"""How the code is laid out: which module may import what, and how the tests are sorted."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.helpers.support import REPOSITORY

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


# Where tests live: fast unit tests, tests over loopback, tests with outside tools.
TEST_FOLDERS = ("unit", "integration", "deployment")


def every_test_module() -> Iterator[Path]:
    return iter(sorted(TESTS.rglob("test_*.py")))


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }


def names_used(node: ast.AST) -> set[str]:
    used = {child.id for child in ast.walk(node) if isinstance(child, ast.Name)}
    used |= {
        argument.arg
        for child in ast.walk(node)
        if isinstance(child, ast.FunctionDef)
        for argument in child.args.args
    }
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


def test_every_test_module_lives_in_one_of_the_three_test_folders() -> None:
    misplaced = [
        str(path.relative_to(TESTS))
        for path in every_test_module()
        if path.parent.parent != TESTS or path.parent.name not in TEST_FOLDERS
    ]
    assert misplaced == [], f"test modules belong in tests/{{{','.join(TEST_FOLDERS)}}}/"


def test_test_folders_hold_only_tests_and_helpers_hold_none() -> None:
    strays = [
        str(path.relative_to(TESTS))
        for folder in TEST_FOLDERS
        for path in (TESTS / folder).glob("*.py")
        if not path.name.startswith("test_") and path.name not in {"__init__.py", "conftest.py"}
    ] + [str(path.relative_to(TESTS)) for path in (TESTS / "helpers").glob("test_*.py")]
    assert strays == [], "shared helpers belong in tests/helpers/, tests in the test folders"


def test_no_test_module_imports_another() -> None:
    imports = [
        f"{path.relative_to(TESTS)} imports {module}"
        for path in every_test_module()
        for module in imported_modules(path)
        if module.startswith("tests.") and ".test_" in module
    ]
    assert imports == [], "shared helpers belong in tests/helpers/"


def test_unit_tests_start_no_simulator_and_no_exporter() -> None:
    servers = {"Simulator", "RunningExporter", "Exporter", "MetricsServer", "start_exporter"}
    starting = {
        path.name: sorted(used)
        for path in (TESTS / "unit").glob("test_*.py")
        if (used := names_used(ast.parse(path.read_text())) & servers)
    }
    assert starting == {}, "a test that serves over loopback belongs in tests/integration/"


def test_only_deployment_tests_start_outside_tools() -> None:
    reaching = {
        str(path.relative_to(TESTS)): names
        for path in every_test_module()
        if path.parent.name != "deployment" and (names := unmarked_tooling_tests(path))
    }
    assert reaching == {}, "tests with outside tools belong in tests/deployment/"


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
    """exporter.demo.simulator is a library of the exporter's tests and demo: only the two CLIs
    (exporter.cli, exporter.demo.cli) import it, never the other way round."""
    source = (REPOSITORY / "exporter" / "demo" / "simulator.py").read_text()
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
    assert imported & {"exporter.cli", "exporter.demo.cli"} == set()


def test_every_deployment_test_carries_the_tooling_marker() -> None:
    """``make unit`` (``-m 'not tooling'``) selects none of them: the folder's conftest marks
    each one."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-m",
            "not tooling",
            "--",
            str(TESTS / "deployment"),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPOSITORY,
        timeout=120,
    )
    # Exit code 5: every test collected was deselected, none left to run.
    assert result.returncode == 5, result.stdout + result.stderr
    assert re.search(r"no tests collected \(\d+ deselected\)", result.stdout), result.stdout


def exporter_imports() -> dict[str, set[str]]:
    """Each module of the exporter and the exporter modules it imports."""
    package = REPOSITORY / "exporter"
    graph = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(REPOSITORY).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[module] = {name for name in imported_modules(path) if name.startswith("exporter.")}
    return graph


def test_the_exporter_modules_import_one_another_without_a_cycle() -> None:
    graph = exporter_imports()
    done: set[str] = set()

    def cycle_from(module: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        if module in path:
            return (*path[path.index(module) :], module)
        if module in done:
            return None
        for imported in sorted(graph.get(module, set())):
            if (found := cycle_from(imported, (*path, module))) is not None:
                return found
        done.add(module)
        return None

    cycles = [found for module in graph if (found := cycle_from(module, ())) is not None]
    assert cycles == [], " -> ".join(cycles[0]) if cycles else ""


def test_the_config_package_imports_nothing_else_of_the_exporter() -> None:
    outside = {
        module: sorted(name for name in imported if not name.startswith("exporter.config"))
        for module, imported in exporter_imports().items()
        if module.startswith("exporter.config")
    }
    assert {module: names for module, names in outside.items() if names} == {}


def test_reload_app_and_cli_are_imported_only_from_above() -> None:
    """A reload stays in reload.py and the config package: nothing below calls back up."""
    allowed = {
        "exporter.reload": {"exporter.app"},
        "exporter.app": {"exporter.cli"},
        "exporter.cli": {"exporter.__main__"},
    }
    importers = {
        top: {module for module, imported in exporter_imports().items() if top in imported}
        for top in allowed
    }
    assert importers == allowed
