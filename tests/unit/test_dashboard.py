"""The shipped Grafana dashboard: a well-formed dashboard model that works with any Prometheus
data source and only asks for what the exporter exports.

tests/deployment/test_end_to_end.py runs every query of it against a real Prometheus.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from exporter.config.grammar import parse_listen_address
from exporter.config.schema import DEFAULT_LISTEN_ADDRESS
from exporter.listing import ListingCut
from exporter.models import API_DOWN_OUTCOMES, Outcome
from exporter.store import FINISHED_DURATION_BUCKETS, BuildState
from exporter.telemetry import API_DOWN_AFTER_SECONDS, REQUEST_DURATION_BUCKETS
from exporter.web.server import _BUILD_PAGE_PREFIX as BUILD_PAGE_PREFIX
from tests.helpers.docs import (
    ALERTS_REFERENCE,
    documented_metric_names,
    documented_metrics,
    section,
    table_rows,
)
from tests.helpers.rules import (
    CONSTANT_LEVEL,
    level_labels,
    load_recording_rules,
    recorded_names,
)
from tests.helpers.support import REPOSITORY

DASHBOARD_FILE = REPOSITORY / "monitoring" / "dashboard.json"
ALERTS_FILE = REPOSITORY / "monitoring" / "alerts.yaml"
DATASOURCE_FILE = REPOSITORY / "monitoring" / "grafana-datasource.yaml"
SELECTOR = 'job=~"$job", instance=~"$instance"'
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Variables Grafana itself provides to queries.
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}
# Grafana's core panel types this dashboard may use.
PANEL_TYPES = {"row", "stat", "timeseries", "table", "bargauge", "gauge", "barchart", "heatmap"}
# A recorded series of monitoring/rules.yaml: level:metric:operations.
RECORDED = re.compile(r"(?<![\w:])([a-z_]+:primeintellect_[a-z_]+:[a-z0-9_]+)")
# A metric name, recorded or not, before its selector's braces.
SELECTED = re.compile(r"(?<![\w:])((?:[a-z_]+:)?[a-z_]+(?::[a-z0-9_]+)?)\{")
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


def recorded_labels(name: str) -> frozenset[str]:
    """The labels a recorded series keeps, as its level names them."""
    vocabulary = {"job", "instance", "quantile"} | {
        label for family in documented_metrics().values() for label in family.labels
    }
    return level_labels(name.split(":")[0], vocabulary)


@pytest.mark.parametrize("expression", expressions(load()))
def test_every_selector_follows_the_job_instance_and_image_variables(expression: str) -> None:
    # Recorded series (monitoring/rules.yaml) sum a job's instances: job and image only.
    for name, matchers in re.findall(rf"{RECORDED.pattern}\{{([^}}]*)\}}", expression):
        labels = recorded_labels(name)
        assert 'job=~"$job"' in matchers, name
        assert "instance" not in matchers, name
        assert ('image_name=~"$image"' in matchers) == ("image_name" in labels), name
    bare_recorded = [
        name
        for name in re.findall(rf"{RECORDED.pattern}(?![{{\w:])", expression)
        if name.split(":")[0] != CONSTANT_LEVEL
    ]
    assert not bare_recorded, f"recorded series without the variables' filters: {bare_recorded}"
    recorded = RECORDED.findall(expression)
    expression = RECORDED.sub("recorded", expression)
    selectors = re.findall(r"\b(primeintellect_\w+|up)\{([^}]*)\}", expression)
    bare = re.findall(r"\b(primeintellect_\w+)\b(?![{\w])", expression)
    assert not bare, f"selectors without the variables' filters: {bare}"
    assert selectors or recorded
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


def test_expressions_use_only_metrics_the_exporter_documents_and_series_the_rules_record() -> None:
    documented = documented_metric_names()
    used = {
        re.sub(r"_bucket$", "", name)
        for expression in expressions(load())
        for name in re.findall(r"\bprimeintellect_[a-z_]+", RECORDED.sub("", expression))
    }
    assert used <= documented, f"undocumented metrics: {sorted(used - documented)}"
    recorded = {name for expression in expressions(load()) for name in RECORDED.findall(expression)}
    assert recorded <= set(recorded_names()), f"never recorded: {recorded - set(recorded_names())}"


def test_failed_builds_table_shows_the_builds_error_or_else_its_artifacts_errors() -> None:
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
    # The build's own message first; an artifact's only for a build without one.
    build_error = target["expr"].index("primeintellect_image_build_error_info")
    artifact_error = target["expr"].index("primeintellect_image_build_artifact_error_info")
    assert build_error < artifact_error
    between = target["expr"][build_error:artifact_error]
    assert re.search(r"\bor on \(build_id\)", between)
    (organize,) = table["transformations"]
    assert set(organize["options"]["indexByName"]) >= {"error_message", "source", "artifact_type"}


# --- what each panel says it shows ------------------------------------------------------------

# Labels every series has from its scrape target; the Prometheus Operator adds the others.
TARGET_LABELS = frozenset({"job", "instance"})
SCRAPE_PATH_LABELS = frozenset({"service", "endpoint"})
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
# Units that say "per time": Grafana's requests per second, or a custom "per hour" suffix.
RATE_UNIT = re.compile(r"reqps|ops|suffix:.+/(s|min|h)")
# A window that follows the zoom: a count over it grows and shrinks as one zooms.
ZOOMED_WINDOW = re.compile(r"\bincrease\([^()]*\[\$(__rate_interval|__interval)\]\)")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def family_labels(name: str) -> frozenset[str] | None:
    """The labels of the metric ``name`` as a query sees them (its family's, the target's and a
    bucket's ``le``); None when the exporter has no such metric."""
    if name == "up":
        return TARGET_LABELS
    if ":" in name:
        return recorded_labels(name) if name in recorded_names() else None
    families = documented_metrics()
    if name in families:
        return families[name].labels | TARGET_LABELS
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in families and families[base].type == "histogram":
            le = {"le"} if suffix == "_bucket" else set()
            return families[base].labels | TARGET_LABELS | le
    return None


def matching_paren(text: str, start: int) -> int:
    """The index of the ``)`` closing the ``(`` at ``start``."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "(":
            depth += 1
        elif text[index] == ")":
            depth -= 1
            if depth == 0:
                return index
    raise AssertionError(f"unbalanced parentheses: {text[start:]}")


def labels_in(expression: str) -> frozenset[str]:
    """Every label the series of ``expression`` may carry: its metrics' labels and the labels
    label_replace or label_join add."""
    labels: set[str] = set()
    for name in SELECTED.findall(expression):
        labels |= family_labels(name) or set()
    labels |= set(re.findall(r'\)\s*,\s*"(\w+)"\s*,', expression))
    return frozenset(labels)


def unknown_labels(expression: str) -> list[str]:
    """What names a label its metrics lack: a matcher of a selector, a grouping or matching
    clause (an aggregation's ``by`` against the metrics it aggregates)."""
    problems = []
    for name, matchers in re.findall(rf"{SELECTED.pattern}([^}}]*)\}}", expression):
        labels = family_labels(name)
        if labels is None:
            problems.append(f"{name}: no such metric")
            continue
        for label in re.findall(r'(\w+)\s*(?:=~|!~|!=|=)\s*"', matchers):
            if label not in labels:
                problems.append(f"{name} has no label {label}")
    everywhere = labels_in(expression)
    for match in re.finditer(
        r"\b(by|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expression
    ):
        clause, named = match.group(1), {label.strip() for label in match.group(2).split(",")}
        named.discard("")
        scope = everywhere
        if clause == "by":
            start = expression.index("(", match.end())
            scope = labels_in(expression[start : matching_paren(expression, start) + 1])
        problems += [f"{clause} ({label}): no metric there has it" for label in named - scope]
    for match in re.finditer(r"\bwithout\s*\(([^)]*)\)", expression):
        named = {label.strip() for label in match.group(1).split(",")}
        problems += [f"without ({label})" for label in named - everywhere - SCRAPE_PATH_LABELS]
    return problems


def targets(panel: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = panel["targets"]
    return found


def test_the_images_row_comes_first_where_a_discovery_only_user_sees_it() -> None:
    first, *_ = load()["panels"]
    assert first["type"] == "row"
    assert "discovery.images" in first["title"]
    assert first["gridPos"]["y"] == 0
    assert not first["collapsed"]


def test_every_panel_has_a_description_and_a_unit() -> None:
    for panel in query_panels(load()):
        assert panel.get("description", "").strip(), panel["title"]
        unit = panel["fieldConfig"]["defaults"].get("unit")
        assert isinstance(unit, str), panel["title"]
        assert unit.strip(), panel["title"]


def test_titles_and_descriptions_name_only_metrics_the_exporter_exposes() -> None:
    # docs/metrics.md is held to the exporter's families by tests/unit/test_docs.py.
    for panel in all_panels(load()):
        text = f"{panel['title']} {panel.get('description', '')}"
        for name in re.findall(r"(?<![\w:])(?:[a-z_]+:)?primeintellect_\w+(?::\w+)?", text):
            assert family_labels(name) is not None, f"{panel['title']}: {name}"


def test_a_query_naming_a_label_its_metric_lacks_is_caught() -> None:
    assert unknown_labels('sum by (reason) (primeintellect_exporter_api_up{job=~"$job"})') == [
        "by (reason): no metric there has it"
    ]
    assert unknown_labels('primeintellect_exporter_builds{status="active"}') == [
        "primeintellect_exporter_builds has no label status"
    ]
    assert unknown_labels("primeintellect_image_build_nothing{}") == [
        "primeintellect_image_build_nothing: no such metric"
    ]
    assert (
        unknown_labels(
            'label_replace(max by (build_id) (primeintellect_image_build_info{job="x"}), "source",'
            ' "build", "", "") or on (source) up{job="x"}'
        )
        == []
    )


@pytest.mark.parametrize("expression", expressions(load()))
def test_every_query_uses_only_labels_its_metrics_have(expression: str) -> None:
    assert unknown_labels(expression) == []


def test_every_legend_and_table_column_is_a_label_of_its_query() -> None:
    for panel in query_panels(load()):
        exprs = " ".join(target["expr"] for target in targets(panel))
        labels = labels_in(exprs)
        for target in targets(panel):
            named = set(LEGEND_LABEL.findall(target.get("legendFormat", "")))
            assert named <= labels, f"{panel['title']}: {named - labels}"
        for transformation in panel.get("transformations", []):
            columns = set(transformation["options"].get("indexByName", {}))
            columns = {column for column in columns if not column.startswith("Value")}
            assert columns <= labels, f"{panel['title']}: {columns - labels}"


def test_the_series_of_one_panel_are_split_by_the_same_labels() -> None:
    # A count beside per-reason sums reads as one more reason.
    for panel in query_panels(load()):
        legends = {
            frozenset(LEGEND_LABEL.findall(target.get("legendFormat", "")))
            for target in targets(panel)
        }
        assert len(legends) == 1, f"{panel['title']}: {legends}"


def test_no_chart_draws_one_series_per_build() -> None:
    # At hundreds of builds a line or bar each is unreadable: per-build values are top-N tables.
    for panel in query_panels(load()):
        for target in targets(panel):
            if panel["type"] != "table":
                assert "build_id" not in LEGEND_LABEL.findall(target.get("legendFormat", ""))
            elif "build_id" in target["expr"] and "topk" not in target["expr"]:
                # The other build tables list only the failed or the unfinished builds.
                statuses = re.findall(
                    r'primeintellect_image_build_status\{[^}]*status=~?"([^"]+)"', target["expr"]
                )
                assert statuses, panel["title"]
                assert all("COMPLETED" not in status for status in statuses), panel["title"]


def test_rates_are_shown_in_a_unit_per_time() -> None:
    for panel in query_panels(load()):
        exprs = [target["expr"] for target in targets(panel)]
        says_rate = re.search(r"\brate\b|per (second|minute|hour)\b", panel["title"], re.I)
        if says_rate or any("rate(" in e and "histogram_quantile" not in e for e in exprs):
            unit = panel["fieldConfig"]["defaults"]["unit"]
            assert RATE_UNIT.fullmatch(unit), f"{panel['title']}: {unit}"


def test_no_count_is_taken_over_a_window_that_follows_the_zoom() -> None:
    for panel in query_panels(load()):
        for target in targets(panel):
            assert not ZOOMED_WINDOW.search(target["expr"]), panel["title"]
            if panel["type"] == "timeseries":
                assert "$__range" not in target["expr"], panel["title"]


def duration_bars() -> dict[str, Any]:
    (panel,) = (
        panel
        for panel in query_panels(load())
        if panel["type"] == "bargauge"
        and all("builds_finished_duration_seconds_bucket" in t["expr"] for t in targets(panel))
    )
    return panel


def human_duration(seconds: float) -> str:
    return f"{seconds / 3600:g}h" if seconds >= 3600 else f"{seconds / 60:g}m"


def test_duration_bars_are_the_exporters_buckets_each_named_by_its_bounds() -> None:
    bounds = [*FINISHED_DURATION_BUCKETS, math.inf]
    panel = duration_bars()
    assert len(targets(panel)) == len(bounds)
    lower = None
    for target, upper in zip(targets(panel), bounds, strict=True):
        used = sorted(float(le) for le in re.findall(r'le="([^"]+)"', target["expr"]))
        if lower is None:
            assert target["legendFormat"] == f"≤ {human_duration(upper)}"
            assert used == [upper]
        else:
            # One bucket alone: the cumulative count up to its upper bound, less the one below.
            assert re.fullmatch(r"sum \(.*\)\n-\nsum \(.*\)", target["expr"], re.DOTALL)
            assert used == [lower, upper]
            expected = (
                f"> {human_duration(lower)}"
                if upper == math.inf
                else f"{human_duration(lower)}\N{EN DASH}{human_duration(upper)}"
            )
            assert target["legendFormat"] == expected
        lower = upper
    assert "cumulative" in panel["description"]


def panel_titled(title: str) -> dict[str, Any]:
    (panel,) = (panel for panel in query_panels(load()) if panel["title"] == title)
    return panel


def test_api_up_is_described_by_the_exporters_window_and_what_counts_as_unusable() -> None:
    description = panel_titled("API up")["description"]
    assert f"{API_DOWN_AFTER_SECONDS:g} s" in description
    assert re.findall(r"\b\d\d\d\b", description) == ["401", "403", "404", "429"]
    statuses = {"401": Outcome.UNAUTHORIZED, "403": Outcome.FORBIDDEN}
    statuses |= {"404": Outcome.NOT_FOUND, "429": Outcome.RATE_LIMITED}
    unusable = description.split("unusable:")[1].split(";")[0]
    for status, outcome in statuses.items():
        assert (status in unusable) == (outcome in API_DOWN_OUTCOMES), status


def test_tracked_builds_names_every_state() -> None:
    description = panel_titled("Tracked builds")["description"]
    for state in BuildState:
        assert f"{state.value} (" in description or f"{state.value}," in description, state


def test_stale_builds_are_counted_as_the_stale_alert_counts_them() -> None:
    rules = yaml.safe_load(ALERTS_FILE.read_text())
    (rule,) = (
        rule
        for group in rules["groups"]
        for rule in group["rules"]
        if rule.get("alert") == "PrimeIntellectBuildDataStale"
    )
    (threshold,) = re.findall(r"last_poll_success_timestamp_seconds\) > (\d+)", rule["expr"])
    panel = panel_titled("Stale unfinished builds")
    (target,) = targets(panel)
    assert f"timestamp_seconds{{{SELECTOR}}}) > {threshold}\n" in target["expr"]
    assert f"for {int(threshold) // 60} minutes" in panel["description"]
    assert target["legendFormat"] == f"stale for {int(threshold) // 60}m"


def test_each_config_source_is_shown_so_one_success_cannot_hide_a_failure() -> None:
    (target,) = targets(panel_titled("Config reload"))
    assert target["expr"].startswith("min by (instance, source) (")
    assert "{{source}}" in target["legendFormat"]


@pytest.mark.parametrize(
    "title", ["Stale unfinished builds", "Builds whose last poll failed, by reason"]
)
def test_poll_health_follows_the_image_variable_by_each_builds_last_known_image(title: str) -> None:
    # Poll series carry only build_id. Leaving out builds known to be of other images keeps
    # the builds that never answered (no image at all) under every choice, All included.
    (target,) = targets(panel_titled(title))
    assert re.search(
        r"unless on \(job, instance, build_id\)\s+last_over_time\(primeintellect_image_build_info"
        r'\{[^}]*image_name!~"\$image"\}\[1d\]\)',
        target["expr"],
    )


def test_the_documents_panel_table_lists_every_row_and_panel_in_the_dashboards_order() -> None:
    table = section(ALERTS_REFERENCE.read_text(), "The panels")
    _header, *rows = table_rows(table)
    documented = [row[0] for row in rows]
    shown = [
        f"**{panel['title']}**" if panel["type"] == "row" else panel["title"]
        for panel in all_panels(load())
    ]
    assert documented == shown


def test_quantile_panels_state_the_exporters_bucket_ranges() -> None:
    first, *_, last = FINISHED_DURATION_BUCKETS
    finished = panel_titled("Duration of builds finished in the last hour, by image")
    assert f"({human_duration(first)} to {human_duration(last)};" in finished["description"]
    assert (
        f"beyond {human_duration(last)} it reads {human_duration(last)}"
        in (finished["description"])
    )
    first, *_, last = REQUEST_DURATION_BUCKETS
    requests = panel_titled("API request latency")
    assert f"({first * 1000:g} ms to {last:g} s;" in requests["description"]


def test_the_image_listing_error_panel_names_every_reason_a_cut_listing_gives() -> None:
    [panel] = [
        panel
        for panel in all_panels(load())
        if "primeintellect_exporter_image_list_last_error" in panel.get("description", "")
    ]
    missing = [cut.value for cut in ListingCut if cut.value not in panel["description"]]
    assert missing == []


def test_the_slo_row_shows_each_images_success_ratio_and_error_budget_left() -> None:
    panels = list(all_panels(load()))
    start = next(index for index, panel in enumerate(panels) if panel["title"] == "SLOs")
    assert panels[start]["type"] == "row"
    end = next(
        (index for index in range(start + 1, len(panels)) if panels[index]["type"] == "row"),
        len(panels),
    )
    exprs = " ".join(
        target["expr"] for panel in panels[start + 1 : end] for target in targets(panel)
    )
    assert "1 - job_image_name:primeintellect_image_builds_failed:ratio_rate30d{" in exprs
    assert "job_image_name:primeintellect_image_builds_failed:error_budget_remaining30d{" in exprs
    for name in RECORDED.findall(exprs):
        assert name in recorded_names(), name


def test_finished_duration_quantiles_are_the_recorded_ones_and_the_p99_brings_the_exemplars() -> (
    None
):
    # Grafana draws exemplars only for a target selecting the raw buckets, which carry them; a
    # recorded series has none. So the recorded median and 90th percentile stay, and the 99th
    # percentile is the one computed from the buckets, over the recorded quantiles' hour.
    panel = panel_titled("Duration of builds finished in the last hour, by image")
    recorded = (
        "job_image_name_quantile:primeintellect_image_builds_finished_duration_seconds"
        ":histogram_quantile1h"
    )
    quantiles = [re.findall(r'quantile="([^"]+)"', target["expr"]) for target in targets(panel)]
    assert quantiles == [["0.5"], ["0.9"], []]
    *from_rules, from_buckets = targets(panel)
    assert all(target["expr"].startswith(recorded + "{") for target in from_rules)
    assert not any(target.get("exemplar") for target in from_rules)
    assert from_buckets["exemplar"] is True
    assert from_buckets["expr"].startswith("histogram_quantile(0.99, sum by (le, image_name) (")
    assert "primeintellect_image_builds_finished_duration_seconds_bucket{" in from_buckets["expr"]
    assert from_buckets["expr"].endswith("[1h]))\n))")
    assert "Instance does not narrow them" in panel["description"]
    assert "exemplars" in panel["description"]


# The histograms whose buckets carry exemplars in the OpenMetrics exposition (docs/metrics.md).
EXEMPLAR_HISTOGRAMS = (
    "primeintellect_image_builds_finished_duration_seconds",
    "primeintellect_image_builds_queue_duration_seconds",
)


def test_only_targets_on_the_raw_buckets_of_a_histogram_with_exemplars_ask_for_them() -> None:
    asking = [
        (panel, target)
        for panel in query_panels(load())
        for target in targets(panel)
        if target.get("exemplar")
    ]
    assert asking
    for panel, target in asking:
        # Exemplars are drawn on time series charts only.
        assert panel["type"] == "timeseries", panel["title"]
        assert not RECORDED.findall(target["expr"]), panel["title"]
        selected = set(re.findall(r"\b(primeintellect_\w+)\{", target["expr"]))
        assert selected <= {f"{name}_bucket" for name in EXEMPLAR_HISTOGRAMS}, panel["title"]
        assert selected, panel["title"]


def panels_of_row(title: str) -> list[dict[str, Any]]:
    panels = list(all_panels(load()))
    start = next(index for index, panel in enumerate(panels) if panel["title"] == title)
    assert panels[start]["type"] == "row"
    end = next(
        (index for index in range(start + 1, len(panels)) if panels[index]["type"] == "row"),
        len(panels),
    )
    return panels[start + 1 : end]


def recorded_constant(name: str) -> float:
    """The number a constant series of monitoring/rules.yaml (an SLO's target, a threshold)
    records."""
    (rule,) = (rule for rule in load_recording_rules() if rule["record"] == name)
    match = re.fullmatch(r"vector\(([\d.]+)\)", rule["expr"].strip())
    assert match, rule
    return float(match.group(1))


def test_the_slo_row_shows_each_images_queue_time_slo_its_budget_and_its_quantiles() -> None:
    exprs = " ".join(target["expr"] for panel in panels_of_row("SLOs") for target in targets(panel))
    assert "1 - job_image_name:primeintellect_image_builds_queue_slow:ratio_rate30d{" in exprs
    assert (
        "job_image_name:primeintellect_image_builds_queue_slow:error_budget_remaining30d{" in exprs
    )
    panel = panel_titled("Queue time of builds started in the last hour, by image")
    recorded = (
        "job_image_name_quantile:primeintellect_image_builds_queue_duration_seconds"
        ":histogram_quantile1h{"
    )
    assert all(target["expr"].startswith(recorded) for target in targets(panel))
    quantiles = [re.findall(r'quantile="([^"]+)"', target["expr"]) for target in targets(panel)]
    assert quantiles == [["0.5"], ["0.9"], ["0.99"]]


@pytest.mark.parametrize(
    "title",
    [
        "Queue-time SLO by image, 30 days",
        "Queue-time error budget left by image, 30 days",
        "Queue time of builds started in the last hour, by image",
    ],
)
def test_queue_time_slo_panels_state_the_slo_as_the_rules_set_it_and_where(title: str) -> None:
    description = panel_titled(title)["description"]
    objective = recorded_constant("slo:primeintellect_image_builds_queue:objective_ratio")
    threshold = recorded_constant("slo:primeintellect_image_builds_queue:threshold_seconds")
    slo = (
        f"{objective:.0%} of each image's started builds start within {threshold:g} s over 30 days"
    )
    assert slo in description
    assert "docs/alerts-and-dashboard.md#slos" in description
    assert "## SLOs" in ALERTS_REFERENCE.read_text()


# --- the image health table -------------------------------------------------------------------

HEALTH_FAMILIES = {
    "A": "primeintellect_image_builds_last_finished_status",
    "B": "primeintellect_image_builds_consecutive_failures",
    "C": "primeintellect_image_builds_failing_since_timestamp_seconds",
    "D": "primeintellect_image_builds_last_success_timestamp_seconds",
}


def health_table() -> dict[str, Any]:
    (panel,) = panels_of_row("Image health")
    assert panel["type"] == "table"
    return panel


def test_the_image_health_row_comes_right_after_the_slos_row() -> None:
    rows = [panel["title"] for panel in load()["panels"] if panel["type"] == "row"]
    assert rows[rows.index("SLOs") + 1] == "Image health"


def test_the_image_health_table_has_one_row_per_image_and_tag_from_each_health_family() -> None:
    panel = health_table()
    by_ref = {target["refId"]: target for target in targets(panel)}
    assert set(by_ref) == set(HEALTH_FAMILIES)
    for ref, family in HEALTH_FAMILIES.items():
        target = by_ref[ref]
        assert (target["format"], target["instant"]) == ("table", True), ref
        by = "image_name, image_tag, status" if ref == "A" else "image_name, image_tag"
        # One value per image and tag: each pod once (service, endpoint), then across shards.
        assert re.search(
            rf"max by \({by}\) \(\s*max without \(service, endpoint\) \({family}\{{",
            target["expr"],
        ), ref
    # The one-hot status: only the latest finished build's status is a row.
    assert by_ref["A"]["expr"].rstrip(")\n ").endswith("== 1")
    # Grafana's date units read milliseconds.
    for ref in ("C", "D"):
        assert by_ref[ref]["expr"].startswith("1000 * max by"), ref
    merge, organize = panel["transformations"]
    assert merge["id"] == "merge"
    assert organize["id"] == "organize"
    columns = sorted(organize["options"]["indexByName"], key=organize["options"]["indexByName"].get)
    assert columns == ["image_name", "image_tag", "status", "Value #B", "Value #C", "Value #D"]
    assert organize["options"]["excludeByName"] == {"Time": True, "Value #A": True}


def column_overrides(panel: dict[str, Any], column: str) -> dict[str, Any]:
    """The properties a panel's overrides give the column named ``column`` (after renaming)."""
    found: dict[str, Any] = {}
    for override in panel["fieldConfig"]["overrides"]:
        matcher = override["matcher"]
        if (matcher["id"] == "byName" and matcher["options"] == column) or (
            matcher["id"] == "byRegexp" and re.fullmatch(matcher["options"], column)
        ):
            found |= {prop["id"]: prop["value"] for prop in override["properties"]}
    return found


def test_the_image_health_table_puts_failing_images_first_in_colour_and_shows_dates() -> None:
    panel = health_table()
    (organize,) = (t for t in panel["transformations"] if t["id"] == "organize")
    names = organize["options"]["renameByName"]
    failures = names["Value #B"]
    assert panel["options"]["sortBy"] == [{"displayName": failures, "desc": True}]
    colour = column_overrides(panel, failures)
    assert colour["custom.cellOptions"]["type"] == "color-background"
    steps = [(step["value"], step["color"]) for step in colour["thresholds"]["steps"]]
    alert_threshold = int(
        recorded_constant("threshold:primeintellect_image_builds_consecutive_failures:count")
    )
    assert steps == [(None, "green"), (1, "orange"), (alert_threshold, "red")]
    assert f"orange from 1, red from {alert_threshold}" in panel["description"]
    for ref in ("Value #C", "Value #D"):
        assert column_overrides(panel, names[ref])["unit"] == "dateTimeAsIso", ref
    status = column_overrides(panel, names["status"])
    assert set(status["mappings"][0]["options"]) == {"COMPLETED", "FAILED", "CANCELLED"}


# --- links to the exporter's status page ------------------------------------------------------

BUILD_LINK = f"${{status_page}}{BUILD_PAGE_PREFIX}${{__data.fields.build_id}}"


def test_the_status_page_variable_defaults_to_the_exporters_default_listen_port() -> None:
    variable = variables(load())["status_page"]
    assert variable["type"] == "textbox"
    default = urlsplit(variable["query"])
    assert default.port == parse_listen_address(DEFAULT_LISTEN_ADDRESS)[1]
    assert default.path == ""
    assert variable["current"]["value"] == variable["query"]


def test_every_table_of_builds_links_each_build_to_its_page_on_the_status_page() -> None:
    tables = [
        panel
        for panel in query_panels(load())
        if panel["type"] == "table" and any("build_id" in t["expr"] for t in targets(panel))
    ]
    assert len(tables) == 4
    for panel in tables:
        (organize,) = (t for t in panel["transformations"] if t["id"] == "organize")
        column = organize["options"]["renameByName"]["build_id"]
        links = column_overrides(panel, column)["links"]
        assert [link["url"] for link in links] == [BUILD_LINK], panel["title"]


def test_the_datasource_example_links_each_exemplar_to_its_builds_page() -> None:
    (datasource,) = yaml.safe_load(DATASOURCE_FILE.read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    (destination,) = datasource["jsonData"]["exemplarTraceIdDestinations"]
    assert destination["name"] == "build_id"
    # "$$" is Grafana's escape for a "$" that is not an environment variable.
    url = urlsplit(destination["url"].replace("$$", "$"))
    assert url.path == f"{BUILD_PAGE_PREFIX}${{__value.raw}}"
    assert url.port == parse_listen_address(DEFAULT_LISTEN_ADDRESS)[1]
    assert "$" not in destination["url"].replace("$${", "")
