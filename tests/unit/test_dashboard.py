"""The shipped Grafana dashboard: a well-formed dashboard model that works with any Prometheus
data source and only asks for what the exporter exports.

tests/deployment/test_end_to_end.py runs every query of it against a real Prometheus.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.docs import documented_metric_names
from tests.helpers.support import REPOSITORY

DASHBOARD_FILE = REPOSITORY / "monitoring" / "dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Variables Grafana itself provides to queries.
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}
# Grafana's core panel types this dashboard may use.
PANEL_TYPES = {"row", "stat", "timeseries", "table", "bargauge", "gauge", "barchart", "heatmap"}
# The exporter's own series and the per-build poll health series have no image_name label.
WITHOUT_IMAGE = re.compile(
    r"^(up|primeintellect_exporter_\w+|primeintellect_image_build_last_poll\w*)$"
)


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
    return dashboard


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in all_panels(dashboard) if panel["type"] != "row"]


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in query_panels(dashboard) for target in panel["targets"]]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


def datasource_references(node: Any) -> Iterator[Any]:
    """Every value of a ``datasource`` key, anywhere in the JSON."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasource_references(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_references(item)


def test_dashboard_matches_grafanas_dashboard_model() -> None:
    dashboard = load()
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard["schemaVersion"] >= 36  # datasource references as objects (Grafana 9+)
    assert dashboard["title"].strip()
    # Grafana's rule for uids: at most 40 letters, digits, '-' and '_'.
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert isinstance(dashboard["time"]["from"], str)
    assert isinstance(dashboard["time"]["to"], str)
    assert isinstance(dashboard["templating"]["list"], list)
    for panel in all_panels(dashboard):
        assert panel["type"] in PANEL_TYPES, panel["type"]
        assert isinstance(panel["id"], int)
        assert isinstance(panel["title"], str)
        assert panel["title"].strip()
        grid = panel["gridPos"]
        assert all(isinstance(grid[key], int) for key in ("h", "w", "x", "y")), panel["title"]
        if panel["type"] != "row":
            assert isinstance(panel["targets"], list)
            assert panel["targets"], panel["title"]


def test_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in all_panels(load())]
    assert len(ids) == len(set(ids)), sorted(ids)


def test_panels_fit_the_grid_without_overlapping() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in all_panels(load()):
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["w"] > 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for row in range(grid["y"], grid["y"] + grid["h"]):
            for column in range(grid["x"], grid["x"] + grid["w"]):
                assert (row, column) not in taken, f"{panel['title']} overlaps {taken[row, column]}"
                taken[row, column] = panel["title"]


def test_every_panel_and_target_queries_the_datasource_variable() -> None:
    for panel in query_panels(load()):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]


def test_no_datasource_uid_is_hard_coded() -> None:
    dashboard = load()
    references = list(datasource_references(dashboard))
    assert references, "no datasource references found"
    assert all(reference == DATASOURCE for reference in references), references
    # Import-time placeholders (``__inputs``, ``${DS_...}``) would make provisioning fail.
    assert "__inputs" not in dashboard
    assert "${DS_" not in DASHBOARD_FILE.read_text()


def test_datasource_job_instance_and_image_variables_exist() -> None:
    found = variables(load())
    assert set(found) >= {"datasource", "job", "instance", "image"}
    assert found["datasource"]["type"] == "datasource"
    assert found["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "image"):
        variable = found[name]
        assert variable["type"] == "query", name
        assert variable["datasource"] == DATASOURCE, name
        # A metric with its matchers, or several metrics by __name__ (builds' and images').
        assert re.fullmatch(
            rf"label_values\((primeintellect_\w+)?(\{{.*\}})?, {name}\w*\)", variable["query"]
        ), name
        assert variable["includeAll"] is True, name
        assert variable["allValue"] == ".*", name
    # Each variable narrows the next one's choices.
    assert "$job" in found["instance"]["query"]
    assert "$instance" in found["image"]["query"]


def test_every_target_has_an_expression_and_a_unique_ref_id() -> None:
    for panel in query_panels(load()):
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert isinstance(target.get("expr"), str), panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_expressions_use_only_defined_variables() -> None:
    dashboard = load()
    defined = set(variables(dashboard)) | BUILTIN_VARIABLES
    used = {
        match.group(1) or match.group(2)
        for expression in expressions(dashboard)
        for match in re.finditer(r"\$\{(\w+)\}|\$(\w+)", expression)
    }
    assert used <= defined, f"undefined variables: {used - defined}"


@pytest.mark.parametrize("expression", expressions(load()))
def test_every_selector_follows_the_job_instance_and_image_variables(expression: str) -> None:
    selectors = re.findall(r"\b(primeintellect_\w+|up)\{([^}]*)\}", expression)
    bare = re.findall(r"\b(primeintellect_\w+)\b(?![{\w])", expression)
    assert not bare, f"selectors without the variables' filters: {bare}"
    assert selectors
    # Queries about poll health count builds by build_id; filtering their finished-build
    # exclusion by image would count other images' finished builds as stale.
    about_polls = any(
        metric.startswith("primeintellect_image_build_last_poll") for metric, _ in selectors
    )
    for metric, matchers in selectors:
        assert 'job=~"$job"' in matchers, metric
        assert 'instance=~"$instance"' in matchers, metric
        if not about_polls and not WITHOUT_IMAGE.match(metric):
            assert 'image_name=~"$image"' in matchers, metric


def test_expressions_use_only_metrics_the_exporter_documents() -> None:
    documented = documented_metric_names()
    used = {
        re.sub(r"_bucket$", "", name)
        for expression in expressions(load())
        for name in re.findall(r"\bprimeintellect_[a-z_]+", expression)
    }
    assert used <= documented, f"undocumented metrics: {sorted(used - documented)}"


def test_failed_builds_table_shows_image_tag_artifact_and_error_message() -> None:
    (table,) = (
        panel
        for panel in query_panels(load())
        if panel["type"] == "table"
        and any("artifact_error_info" in target["expr"] for target in panel["targets"])
    )
    (target,) = table["targets"]
    assert target["format"] == "table"
    assert "[$__range]" in target["expr"]
    for label in ("image_name", "image_tag", "artifact_id", "artifact_type", "error_message"):
        assert label in target["expr"], label
