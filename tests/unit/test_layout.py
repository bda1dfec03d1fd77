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
PACKAGE = REPOSITORY / "exporter"
# The data flow, bottom to top: a module imports only modules of a lower layer, so the
# import graph has no circle and nothing imports back up. A new module gets its layer here.
LAYERS: tuple[frozenset[str], ...] = tuple(
    frozenset(layer.split())
    for layer in (
        "exporter exporter.logs exporter.blocking exporter.demo exporter.web exporter.probe",
        "exporter.models exporter.listing exporter.config exporter.config.wording",
        "exporter.config.grammar",
        "exporter.config.credentials",
        "exporter.config.schema",
        "exporter.config.loading",
        "exporter.telemetry",
        "exporter.health",
        "exporter.store",
        "exporter.state exporter.api",
        "exporter.budget",
        "exporter.poller exporter.families",
        "exporter.discovery exporter.build_discovery exporter.metrics",
        "exporter.exposition",
        "exporter.exposition_cache exporter.web.auth exporter.web.connections",
        "exporter.web.webconfig exporter.web.status_page",
        "exporter.web.server exporter.reload",
        "exporter.app",
        "exporter.cli",
        "exporter.__main__",
    )
)
# The demo stands apart: the simulator imports nothing of the exporter, and only the two
# command lines import it.
DEMO = ("exporter.demo.simulator", "exporter.demo.cli")
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


def module_name(path: Path) -> str:
    parts = path.relative_to(REPOSITORY).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports() -> dict[str, set[str]]:
    """Each module of the exporter package, and the package's modules it imports."""
    return {
        module_name(path): {
            module for module in imported_modules(path) if module.split(".")[0] == "exporter"
        }
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def layer_of(module: str) -> int | None:
    return next((rank for rank, layer in enumerate(LAYERS) if module in layer), None)


def upward_imports(imports: dict[str, set[str]]) -> list[str]:
    """Imports that do not run down the layers, and modules that have no layer."""
    problems = [
        f"{module} has no layer in LAYERS"
        for module in imports
        if module not in DEMO and layer_of(module) is None
    ]
    for module, imported in imports.items():
        if module in DEMO:
            allowed = {"exporter.demo.simulator"} if module == "exporter.demo.cli" else set()
            problems += [f"{module} imports {name}" for name in sorted(imported - allowed)]
            continue
        rank = layer_of(module)
        for name in sorted(imported):
            if name in DEMO and module == "exporter.cli":
                continue
            target = layer_of(name)
            if rank is not None and (target is None or target >= rank):
                problems.append(f"{module} imports {name}, which is not below it")
    return problems


def test_imports_run_down_the_data_flow_with_no_circle() -> None:
    assert upward_imports(package_imports()) == []


def test_the_layer_check_finds_an_import_back_up_and_a_module_without_a_layer() -> None:
    imports = {
        "exporter.store": {"exporter.metrics"},
        "exporter.metrics": {"exporter.store"},
        "exporter.newcomer": set(),
        "exporter.demo.simulator": {"exporter.models"},
    }
    assert upward_imports(imports) == [
        "exporter.newcomer has no layer in LAYERS",
        "exporter.store imports exporter.metrics, which is not below it",
        "exporter.demo.simulator imports exporter.models",
    ]


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
