"""The shipped alert and recording rules: valid for Prometheus, unit-tested by promtool, named
by the convention, and documented."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.listing import ListingCut
from exporter.models import BUILD_STATUSES, UNKNOWN, Outcome
from exporter.store import QUEUE_DURATION_BUCKETS
from exporter.telemetry import BUILD_LIST_UNAVAILABLE, Component, StateStatus
from tests.helpers.docs import (
    ALERTS_REFERENCE,
    README,
    RUNBOOKS,
    DocumentedFamily,
    anchors,
    documented_metric_names,
    documented_metrics,
    headings,
    section,
)
from tests.helpers.rules import (
    CONSTANT_LEVELS,
    RECORDING_RULES_FILE,
    level_labels,
    load_recording_rules,
    recorded_names,
)
from tests.helpers.support import REPOSITORY, find_binary

MONITORING = REPOSITORY / "monitoring"
RULES_FILE = MONITORING / "alerts.yaml"
RULE_TESTS = sorted((MONITORING / "tests").glob("*.yaml"))
# Alerts about one build; the rest are about the exporter or the API.
BUILD_GROUP = "primeintellect-builds"
SEVERITIES = {"critical", "warning", "info"}
# The address of docs/runbooks.md that every runbook_url starts with; the Helm chart's
# prometheusRule.runbookBaseUrl replaces it.
RUNBOOK_BASE_URL = (
    "https://github.com/primeintellect/primeintellect-build-exporter/blob/main/docs/runbooks.md"
)
# The parts of every runbook section.
RUNBOOK_PARTS = ("**Meaning.**", "**Impact.**", "**What to check.**", "**How to silence.**")
BUILD_LABELS = {"build_id", "image_name", "image_tag"}
# Labels every series has once scraped: Prometheus's target labels, and the Prometheus
# Operator's for a ServiceMonitor's targets (`namespace` is empty without the Operator).
TARGET_LABELS = {"job", "instance", "service", "endpoint", "namespace"}
# Prometheus's own series, with the labels it gives them.
PROMETHEUS_FAMILIES = {"up": DocumentedFamily("gauge", frozenset())}
# Labels whose values are a closed set: every value a rule matches must be one of them.
LABEL_VALUES = {
    "status": {*BUILD_STATUSES, UNKNOWN},
    "outcome": {outcome.value for outcome in Outcome},
    "reason": {outcome.value for outcome in Outcome if outcome is not Outcome.OK}
    | {BUILD_LIST_UNAVAILABLE}
    | {cut.value for cut in ListingCut},
    "component": {component.value for component in Component},
    "source": {"config", "build_files"},
}
# Families whose label of a common name has values of its own.
FAMILY_LABEL_VALUES = {
    ("primeintellect_exporter_state_status", "status"): {status.value for status in StateStatus},
}
# A metric name: the exporter's, a recorded one (level:metric:operations) or `up`.
_SELECTOR = re.compile(
    r"(?<![\w:])((?:[a-z_]+:)?primeintellect_[a-z_]+(?::[a-z0-9_]+)?|up)\s*(?:\{([^}]*)\})?"
)
# Labels an expression makes: count_values's, and label_replace's destination.
_MADE_LABEL = re.compile(
    r'count_values\s*(?:by\s*\([^)]*\)\s*)?\(\s*"(\w+)"'
    r'|"(\w+)"\s*,\s*"[^"]*"\s*,\s*"\w+"\s*,\s*"[^"]*"\s*\)'
)
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_TEMPLATE_LABEL = re.compile(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)")
_RESULT_LABEL = re.compile(r"\.Labels\.([a-zA-Z_][a-zA-Z0-9_]*)|sortByLabel \"([a-z_]+)\"")
# The queue time SLO's threshold, and the family whose bucket of that bound its rules read.
QUEUE_THRESHOLD = "slo:primeintellect_image_builds_queue:threshold_seconds"
QUEUE_BUCKETS = "primeintellect_image_builds_queue_duration_seconds_bucket"
_LE_MATCHER = re.compile(r'le="([^"]*)"')


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES_FILE.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def alert_names() -> list[str]:
    return [rule["alert"] for rule in load_rules()]


def rules_of_group(name: str) -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES_FILE.read_text())
    return [
        rule for group in document["groups"] if group["name"] == name for rule in group["rules"]
    ]


def unit_tested_expressions() -> Iterator[str]:
    """Every promql_expr_test expression of every promtool test file."""
    for path in RULE_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("promql_expr_test", []):
                yield case["expr"]


def unit_test_cases() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every alert_rule_test of every promtool test file, with its test group's name."""
    for path in RULE_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                yield f"{path.name}: {group.get('name', '?')}", case


def duration_seconds(text: str) -> float:
    """A Prometheus duration such as 1d, 90m or 1h30m, in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text)
    assert "".join(number + unit for number, unit in parts) == text, f"bad duration {text!r}"
    return sum(int(number) * units[unit] for number, unit in parts)


def exporter_metric_names() -> set[str]:
    """Metric names in docs/metrics.md: the exporter's documented contract."""
    return documented_metric_names()


@pytest.mark.parametrize(
    ("path", "load"),
    [(RULES_FILE, load_rules), (RECORDING_RULES_FILE, load_recording_rules)],
    ids=["alerts", "recording rules"],
)
def test_rules_file_passes_promtool_check_rules(
    path: Path, load: Callable[[], list[dict[str, Any]]]
) -> None:
    promtool = find_binary("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load())} rules found" in result.stdout


def test_there_are_promtool_unit_tests() -> None:
    assert RULE_TESTS, "no promtool test files in monitoring/tests"


# One run per file: each has its own timeout, and the files spread over the test workers.
@pytest.mark.parametrize("test_file", RULE_TESTS, ids=[path.stem for path in RULE_TESTS])
def test_rules_pass_the_promtool_unit_tests_of(test_file: Path) -> None:
    promtool = find_binary("promtool")
    # promtool resolves rule_files relative to each test file, so the directory it runs in
    # does not matter.
    result = subprocess.run(
        [promtool, "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        (RULES_FILE, {"alert", "expr", "for", "labels", "annotations"}),
        (RECORDING_RULES_FILE, {"record", "expr", "labels"}),
    ],
    ids=["alerts", "recording rules"],
)
def test_rules_file_is_a_plain_rules_file_that_a_prometheus_rule_spec_can_embed(
    path: Path, allowed: set[str]
) -> None:
    document = yaml.safe_load(path.read_text())
    assert set(document) == {"groups"}
    for group in document["groups"]:
        assert set(group) == {"name", "rules"}, group.get("name")
        for rule in group["rules"]:
            assert set(rule) <= allowed, rule.get("alert", rule.get("record"))
            # The PrometheusRule CRD types these as strings; YAML must not read them otherwise.
            assert isinstance(rule["expr"], str)
            assert isinstance(rule.get("for", "0m"), str)
            values = [*rule.get("labels", {}).values(), *rule.get("annotations", {}).values()]
            assert all(isinstance(value, str) for value in values), rule.get("alert", rule)


def test_alert_names_are_unique() -> None:
    names = alert_names()
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("rule", load_rules(), ids=lambda rule: str(rule["alert"]))
def test_every_alert_has_a_severity_static_summary_description_and_runbook_url(
    rule: dict[str, Any],
) -> None:
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert set(annotations) == {"summary", "description", "runbook_url"}
    # A headline that is the same for every instance: Alertmanager groups and deduplicates
    # notifications by it; the values are in the description.
    assert annotations["summary"].strip()
    assert "{{" not in annotations["summary"]
    assert "$" not in annotations["summary"]
    assert annotations["description"].strip()


@pytest.mark.parametrize("rule", load_rules(), ids=lambda rule: str(rule["alert"]))
def test_every_alert_links_to_its_own_section_of_the_runbooks(rule: dict[str, Any]) -> None:
    url = rule["annotations"]["runbook_url"]
    assert url == f"{RUNBOOK_BASE_URL}#{rule['alert'].lower()}"
    assert url.partition("#")[2] in anchors(RUNBOOKS.read_text())


def test_every_runbook_section_belongs_to_an_alert_and_says_all_it_must() -> None:
    text = RUNBOOKS.read_text()
    sections = [title for level, title in headings(text) if level == 2]
    assert sorted(sections) == sorted(alert_names())
    for title in sections:
        body = section(text, title)
        missing = [part for part in RUNBOOK_PARTS if part not in body]
        assert not missing, f"the runbook of {title} lacks {missing}"


@pytest.mark.parametrize("rule", rules_of_group(BUILD_GROUP), ids=lambda rule: str(rule["alert"]))
def test_build_alert_descriptions_name_the_build(rule: dict[str, Any]) -> None:
    description = rule["annotations"]["description"]
    for label in BUILD_LABELS:
        assert f"$labels.{label}" in description, label


def test_failed_build_alert_fires_at_once_and_quotes_the_artifact_errors() -> None:
    (failed,) = (rule for rule in load_rules() if rule["alert"] == "PrimeIntellectBuildFailed")
    assert duration_seconds(failed["for"]) == 0
    assert "primeintellect_image_build_artifact_error_info" in failed["annotations"]["description"]
    assert ".Labels.error_message" in failed["annotations"]["description"]


def test_every_alert_is_unit_tested_not_firing_then_firing_then_resolved() -> None:
    """Some alert instance (label set) is absent, then firing, then absent again."""
    timelines: dict[tuple[str, str], list[tuple[float, list[frozenset[tuple[str, Any]]]]]] = {}
    for group_name, case in unit_test_cases():
        firing = [frozenset(alert["exp_labels"].items()) for alert in case["exp_alerts"]]
        key = (case["alertname"], group_name)
        timelines.setdefault(key, []).append((duration_seconds(case["eval_time"]), firing))

    def has_full_cycle(timeline: list[tuple[float, list[frozenset[tuple[str, Any]]]]]) -> bool:
        ordered = sorted(timeline, key=lambda entry: entry[0])
        instances = {labels for _, firing in ordered for labels in firing}
        for labels in instances:
            states = [labels in firing for _, firing in ordered]
            first = states.index(True)
            if False in states[:first] and False in states[first:]:
                return True
        return False

    uncovered = [
        name
        for name in alert_names()
        if not any(
            has_full_cycle(timeline)
            for (alertname, _), timeline in timelines.items()
            if alertname == name
        )
    ]
    assert not uncovered, f"no not-firing/firing/resolved unit test for {uncovered}"


def test_build_alerts_carry_build_id_image_name_and_image_tag_in_unit_tests() -> None:
    labelled = {
        case["alertname"]
        for _, case in unit_test_cases()
        for alert in case["exp_alerts"]
        if set(alert["exp_labels"]) >= BUILD_LABELS
    }
    build_alerts = {rule["alert"] for rule in rules_of_group(BUILD_GROUP)}
    assert build_alerts <= labelled, f"never seen with build labels: {build_alerts - labelled}"


@pytest.mark.parametrize("path", [RULES_FILE, RECORDING_RULES_FILE], ids=lambda path: path.name)
def test_rules_use_only_metrics_the_exporter_documents_and_series_the_rules_record(
    path: Path,
) -> None:
    documented = exporter_metric_names()
    used = {name for name, _ in _SELECTOR.findall(path.read_text())} - {"up"}
    recorded = {name for name in used if ":" in name}
    # Histogram series carry suffixes on the documented family name.
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used - recorded}
    assert families <= documented, f"undocumented metrics: {sorted(families - documented)}"
    assert recorded <= set(recorded_names()), f"never recorded: {recorded - set(recorded_names())}"


def test_threshold_comment_names_every_alert() -> None:
    header = RULES_FILE.read_text().split("\ngroups:", 1)[0]
    missing = [name for name in alert_names() if name not in header]
    assert not missing, f"the threshold comment at the top does not mention {missing}"


def test_alert_reference_table_lists_exactly_the_shipped_alerts() -> None:
    alerts = section(ALERTS_REFERENCE.read_text(), "The alerts")
    in_table = re.findall(r"^\| `(PrimeIntellect[A-Za-z]+)` \|", alerts, re.MULTILINE)
    assert sorted(in_table) == sorted(alert_names())


def test_recording_rule_table_lists_exactly_the_recorded_series() -> None:
    table = section(ALERTS_REFERENCE.read_text(), "Recording rules")
    in_table = re.findall(r"^\| `([a-z_]+:[a-z_]+:[a-z0-9_]+)` \|", table, re.MULTILINE)
    assert sorted(in_table) == sorted(recorded_names())


def known_families() -> dict[str, DocumentedFamily]:
    """Every family a rule may name, by its sample name: the exporter's documented ones (a
    histogram's by its series suffixes too), Prometheus's own, and the recorded ones with the
    labels their level names."""
    families = dict(PROMETHEUS_FAMILIES)
    for name, family in documented_metrics().items():
        families[name] = family
        if family.type == "histogram":
            for suffix, extra in (("_bucket", {"le"}), ("_sum", set()), ("_count", set())):
                families[name + suffix] = DocumentedFamily("gauge", family.labels | extra)
    vocabulary = {label for family in families.values() for label in family.labels}
    vocabulary |= TARGET_LABELS | {"quantile"}
    for name in recorded_names():
        families[name] = DocumentedFamily("gauge", level_labels(name.split(":")[0], vocabulary))
    return families


def label_problems(rule: dict[str, Any], families: dict[str, DocumentedFamily]) -> list[str]:
    """What a rule names that does not exist: families, labels of a selector that its family
    lacks, values outside a closed set, and grouping or template labels no family it names
    (nor a target) has."""
    problems: list[str] = []
    labels_in_reach = set(TARGET_LABELS) | set(rule.get("labels", {}))

    def selectors(text: str) -> set[str]:
        named: set[str] = set()
        for name, matchers in _SELECTOR.findall(text):
            family = families.get(name)
            if family is None:
                problems.append(f"no family {name}")
                continue
            named.add(name)
            for label, operator, value in _MATCHER.findall(matchers):
                if label not in family.labels | TARGET_LABELS:
                    problems.append(f"{name} has no label {label}")
                known = FAMILY_LABEL_VALUES.get((name, label), LABEL_VALUES.get(label))
                if known is not None and value != "%s":
                    values = value.split("|") if operator in {"=~", "!~"} else [value]
                    unknown = set(values) - known
                    if unknown:
                        problems.append(f"{name}: {label} is never {sorted(unknown)}")
        return named

    expression_families = selectors(rule["expr"])
    labels_in_reach |= {label for name in expression_families for label in families[name].labels}
    labels_in_reach |= {made for match in _MADE_LABEL.findall(rule["expr"]) for made in match}
    for group in _GROUPING.findall(rule["expr"]):
        for label in filter(None, (part.strip() for part in group.split(","))):
            if label not in labels_in_reach:
                problems.append(f"expr groups by {label}, which no family it names has")
    for key, text in rule.get("annotations", {}).items():
        queried = selectors(text)
        for label in _TEMPLATE_LABEL.findall(text):
            if label not in labels_in_reach:
                problems.append(f"{key} names $labels.{label}, which the alert never has")
        query_labels = set(TARGET_LABELS) | {
            label for name in queried for label in families[name].labels
        }
        for match in _RESULT_LABEL.findall(text):
            label = match[0] or match[1]
            if label not in query_labels:
                problems.append(f"{key} reads {label} from a query whose families lack it")
    return problems


def test_the_label_check_finds_a_made_up_family_label_and_value() -> None:
    families = known_families()
    rule = {
        "alert": "Made",
        "expr": 'max by (job, colour) (primeintellect_image_build_status{status="EXPLODED",'
        'shade="red"}) + primeintellect_image_build_vibes',
        "labels": {"severity": "warning"},
        "annotations": {
            "description": "{{ $labels.build_id }} {{ $labels.colour }}"
            "{{ with query `primeintellect_exporter_api_up` }}{{ .Labels.build_id }}{{ end }}"
        },
    }
    assert sorted(label_problems(rule, families)) == sorted(
        [
            "no family primeintellect_image_build_vibes",
            "primeintellect_image_build_status has no label shade",
            "primeintellect_image_build_status: status is never ['EXPLODED']",
            "expr groups by colour, which no family it names has",
            "description names $labels.colour, which the alert never has",
            "description reads build_id from a query whose families lack it",
        ]
    )


@pytest.mark.parametrize(
    "rule",
    load_rules() + load_recording_rules(),
    ids=lambda rule: str(rule.get("alert", rule.get("record"))),
)
def test_every_rule_names_only_families_labels_and_values_that_exist(rule: dict[str, Any]) -> None:
    assert label_problems(rule, known_families()) == []


def test_recording_rules_are_named_level_metric_operations() -> None:
    vocabulary = {
        label for family in known_families().values() for label in family.labels
    } | TARGET_LABELS
    for name in recorded_names():
        level, metric, operations = name.split(":")
        assert metric.startswith("primeintellect_"), name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", operations), name
        level_labels(level, vocabulary)


def test_every_recording_rule_is_unit_tested() -> None:
    tested = " ".join(unit_tested_expressions())
    untested = [name for name in recorded_names() if not re.search(rf"{name}(?![\w:])", tested)]
    assert not untested, f"no promql_expr_test for {untested}"


def test_the_label_check_knows_recorded_series_by_their_level() -> None:
    families = known_families()
    ratio = "job_image_name:primeintellect_image_builds_failed:ratio_rate1h"
    assert families[ratio].labels == {"job", "image_name"}
    rule = {
        "alert": "Made",
        "expr": f'max by (instance) ({ratio}{{status="FAILED"}}) > 0'
        " and job_image_name:primeintellect_image_builds_failed:ratio_rate7h",
    }
    assert sorted(label_problems(rule, families)) == sorted(
        [
            f"{ratio} has no label status",
            "no family job_image_name:primeintellect_image_builds_failed:ratio_rate7h",
        ]
    )


def constants() -> dict[str, float]:
    """The constant series of the recording rules (SLO targets and alert thresholds), by name."""
    values: dict[str, float] = {}
    for rule in load_recording_rules():
        if rule["record"].split(":")[0] in CONSTANT_LEVELS:
            match = re.fullmatch(r"vector\(([0-9.]+)\)", rule["expr"].strip())
            assert match, f"{rule['record']} is not a constant vector(<number>)"
            values[rule["record"]] = float(match[1])
    return values


def test_queue_rules_read_the_bucket_of_the_threshold_constant_a_bound_of_the_histogram() -> None:
    threshold = constants()[QUEUE_THRESHOLD]
    assert threshold in QUEUE_DURATION_BUCKETS
    reading = [
        rule
        for rule in load_recording_rules() + load_rules()
        if QUEUE_BUCKETS in rule["expr"] and _LE_MATCHER.search(rule["expr"])
    ]
    # Each window's slow-start ratio.
    assert len(reading) == 8
    for rule in reading:
        bounds = _LE_MATCHER.findall(rule["expr"])
        # The bound as the exporter writes it (300.0), else the matcher selects nothing.
        assert bounds == [repr(threshold)], rule.get("record", rule.get("alert"))


def test_recording_rule_table_gives_each_constants_value() -> None:
    table = section(ALERTS_REFERENCE.read_text(), "Recording rules")
    for name, value in constants().items():
        (row,) = re.findall(rf"^\| `{re.escape(name)}` \|(.*)\|$", table, re.MULTILINE)
        assert row.strip().endswith(f", {value:g}"), name


def test_slo_section_gives_each_constants_default_in_the_rules_file() -> None:
    table = section(ALERTS_REFERENCE.read_text(), "SLOs")
    row = re.compile(r"^\| [^|]+ \| `([a-z_]+:[a-z_]+:[a-z_]+)` \| `([^`]+)` \|", re.MULTILINE)
    rows = row.findall(table)
    in_file = {
        rule["record"]: rule["expr"].strip()
        for rule in load_recording_rules()
        if rule["record"] in constants()
    }
    assert dict(rows) == in_file


def test_readme_states_the_default_targets_of_the_rules_file() -> None:
    values = constants()
    readme = " ".join(README.read_text().split())
    success = values["slo:primeintellect_image_builds_success:objective_ratio"]
    queue = values["slo:primeintellect_image_builds_queue:objective_ratio"]
    within = values[QUEUE_THRESHOLD]
    in_a_row = values["threshold:primeintellect_image_builds_consecutive_failures:count"]
    failing_for = values["threshold:primeintellect_image_builds_failing:seconds"]
    assert (within, failing_for) == (300, 86400), "the README words 5 minutes and a day"
    assert f"{success:.0%} of finished builds succeed" in readme
    assert f"{queue:.0%} of builds start within 5 minutes" in readme
    assert f"failed its last {in_a_row:g} builds, or has been failing for a day" in readme
