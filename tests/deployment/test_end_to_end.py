"""End to end on loopback: simulator → exporter → Prometheus with the shipped rules →
Alertmanager → a webhook, and every dashboard query against that Prometheus.

Prometheus and Alertmanager are the real Debian binaries, started once for the module. The
shipped rules keep their real thresholds, so the builds are laid out to trigger alerts that
fire at once: a build that FAILED minutes ago, and one held in BUILDING since hours ago. Two
more FAILED builds carry the build's own error message, one of them an artifact's too, so the
dashboard's failed-builds table has each kind of reason. Two PENDING builds start while
Prometheus watches, so the queue-time histogram, its SLO and quantiles have data.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml

from exporter.demo.simulator import ArtifactPlan, BuildPlan, Simulator
from tests.helpers.docs import documented_metrics
from tests.helpers.prometheus import (
    DASHBOARD_FILE,
    DEADLINE,
    FAILED_ERROR,
    RULES_FILE,
    Prometheus,
    dashboard_query,
    dashboard_targets,
    find_alertmanager,
    finish,
    plans,
    resolve_variables,
    start_prometheus,
    start_service,
    start_while_watched,
    substitute,
    wait_for,
    wait_for_every_dashboard_query_to_return_data,
    wait_for_finished_total,
    waiting,
)
from tests.helpers.rules import RECORDING_RULES_FILE, level_labels, recorded_names
from tests.helpers.support import (
    CANARY_API_KEY,
    RunningExporter,
    find_binary,
    make_config,
    wait_until,
)

pytestmark = pytest.mark.xdist_group("end-to-end")

# The job name the README's scrape config uses, which the rules' job selector matches.
JOB = "primeintellect-builds"
# Every build's artifacts are rows of this team's image listing too.
TEAM = "e2e-team"
DISCOVERY: dict[str, object] = {"enabled": True, "interval": "30s", "team_id": TEAM}
MISSING_BUILD = "e2e-missing"
# FAILED builds with the build's own error message (the API's top-level errorMessage): one
# whose artifacts have none, one whose artifact has one too.
BUILD_ERROR = "build exceeded its 2h time limit"
BOTH_ERRORS_BUILD_ERROR = "1 of 1 artifacts failed"
BOTH_ERRORS_ARTIFACT_ERROR = "push to registry: 503 Service Unavailable"


def failed_with_build_errors(now: float) -> list[tuple[BuildPlan, str]]:
    """The FAILED builds whose answer has a build-level error message, with that message."""
    return [
        (
            BuildPlan(
                "e2e-build-error", "eval", "nightly", now - 900, 10, 20, 100, outcome="FAILED"
            ),
            BUILD_ERROR,
        ),
        (
            BuildPlan(
                "e2e-both-errors",
                "eval",
                "both",
                now - 900,
                10,
                20,
                100,
                outcome="FAILED",
                artifacts=(ArtifactPlan("CONTAINER_IMAGE", BOTH_ERRORS_ARTIFACT_ERROR),),
            ),
            BOTH_ERRORS_BUILD_ERROR,
        ),
    ]


class WebhookReceiver:
    """An HTTP server that records every Alertmanager notification posted to it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._notifications: list[dict[str, Any]] = []
        record = self._record

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                record(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="webhook", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/alerts"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _record(self, notification: dict[str, Any]) -> None:
        with self._lock:
            self._notifications.append(notification)

    def firing(self, alertname: str) -> list[dict[str, Any]]:
        """Every firing alert of that name received so far."""
        with self._lock:
            return [
                alert
                for notification in self._notifications
                for alert in notification["alerts"]
                if alert["status"] == "firing" and alert["labels"]["alertname"] == alertname
            ]


@dataclasses.dataclass(frozen=True)
class Stack:
    simulator: Simulator
    exporter: RunningExporter
    prometheus: Prometheus
    alertmanager_url: str
    webhook: WebhookReceiver


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Everything running, every build polled and scraped, two builds seen to finish and two
    to start."""
    prometheus_binary = find_binary("prometheus")
    alertmanager = find_alertmanager()
    directory = tmp_path_factory.mktemp("e2e")
    now = time.time()
    build_plans = plans(now)
    with_build_errors = failed_with_build_errors(now)
    build_plans += [plan for plan, _ in with_build_errors]
    starting = [waiting(f"e2e-starting-{n}", "trainer", f"s{n}", now) for n in (1, 2)]
    build_plans += starting
    with ExitStack() as cleanup:
        simulator = cleanup.enter_context(Simulator(CANARY_API_KEY, build_plans, team_id=TEAM))
        for plan, message in with_build_errors:
            simulator.set_payload(plan.build_id, plan.payload(now) | {"errorMessage": message})
        build_ids = [plan.build_id for plan in build_plans] + [MISSING_BUILD]
        config = make_config(simulator.base_url, build_ids, discovery=DISCOVERY)
        exporter = RunningExporter(config).start()
        cleanup.callback(exporter.stop)
        # Every build is known before the first scrape, so the first rule evaluation that
        # fires any alert has seen every build.
        exporter.wait_until_all_polled()
        wait_until(
            lambda: exporter.exporter.inventory.snapshot().listed_at,
            message="the team's image listing",
        )

        webhook = WebhookReceiver()
        webhook.start()
        cleanup.callback(webhook.stop)
        (directory / "alertmanager.yml").write_text(
            yaml.safe_dump(
                {
                    "route": {
                        "receiver": "webhook",
                        # One notification per alert, sent a second after it arrives.
                        "group_by": ["..."],
                        "group_wait": "1s",
                        "group_interval": "1s",
                        "repeat_interval": "1h",
                    },
                    "receivers": [
                        {
                            "name": "webhook",
                            "webhook_configs": [{"url": webhook.url, "send_resolved": True}],
                        }
                    ],
                }
            )
        )
        alertmanager_url = start_service(
            "alertmanager",
            lambda port: [
                alertmanager,
                f"--config.file={directory / 'alertmanager.yml'}",
                f"--storage.path={directory / 'alertmanager-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
            ],
            directory,
            cleanup,
        ).url

        exporter_address = exporter.url.removeprefix("http://").rstrip("/")
        alertmanager_address = alertmanager_url.removeprefix("http://")
        prometheus = start_prometheus(
            prometheus_binary,
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RECORDING_RULES_FILE), str(RULES_FILE)],
                "alerting": {
                    "alertmanagers": [{"static_configs": [{"targets": [alertmanager_address]}]}]
                },
                "scrape_configs": [
                    {"job_name": JOB, "static_configs": [{"targets": [exporter_address]}]}
                ],
            },
            directory,
            cleanup,
        )
        running = Stack(simulator, exporter, prometheus, alertmanager_url, webhook)
        wait_until(
            lambda: running.prometheus.query(f'up{{job="{JOB}"}} == 1'),
            timeout=DEADLINE,
            message="Prometheus to scrape the exporter",
        )

        # The finish counter and histogram only move for finishes the exporter sees; make two
        # happen, the second after Prometheus has scraped the first, so rates are not zero.
        finishing = [plan for plan in build_plans if plan.build_id.startswith("e2e-finishing")]
        for count, plan in enumerate(finishing, start=1):
            finish(simulator, plan)
            wait_for_finished_total(running.prometheus, count)
        # Likewise the queue-time histogram, for builds seen PENDING that then start.
        start_while_watched(simulator, running.prometheus, starting)
        yield running


def firing_alert(stack: Stack, alertname: str, build_id: str) -> dict[str, Any]:
    """The webhook's notification of that alert for that build, once it arrives."""

    def arrived() -> dict[str, Any] | None:
        for alert in stack.webhook.firing(alertname):
            if alert["labels"].get("build_id") == build_id:
                return alert
        return None

    alert: dict[str, Any] = wait_for(
        arrived,
        f"{alertname} for {build_id} at the webhook",
        lambda: (
            f"webhook got {stack.webhook.firing(alertname)}; "
            f"Prometheus has {stack.prometheus.active_alerts(alertname)}"
        ),
    )
    return alert


def test_failed_build_alert_reaches_the_webhook_with_build_labels_and_error_message(
    stack: Stack,
) -> None:
    alert = firing_alert(stack, "PrimeIntellectBuildFailed", "e2e-failing")
    labels = alert["labels"]
    assert labels["image_name"] == "eval"
    assert labels["image_tag"] == "canary"
    assert labels["severity"] == "warning"
    assert labels["job"] == JOB
    description = alert["annotations"]["description"]
    assert "eval:canary" in description
    assert f'"{FAILED_ERROR}"' in description
    assert alert["annotations"]["summary"] == "An image build FAILED"
    runbook = alert["annotations"]["runbook_url"]
    assert runbook.endswith("/docs/runbooks.md#primeintellectbuildfailed")


def test_a_failed_image_of_the_team_alerts_with_its_error_and_no_build_id_configured(
    stack: Stack,
) -> None:
    def arrived() -> list[dict[str, Any]]:
        return stack.webhook.firing("PrimeIntellectImageFailed")

    def arrived_for_canary() -> list[dict[str, Any]]:
        return [alert for alert in arrived() if alert["labels"]["image_tag"] == "canary"]

    [alert] = wait_for(
        arrived_for_canary,
        "PrimeIntellectImageFailed for eval:canary at the webhook",
        lambda: str(stack.prometheus.active_alerts("PrimeIntellectImageFailed")),
    )
    labels = alert["labels"]
    assert (labels["image_name"], labels["image_tag"], labels["artifact_type"]) == (
        "eval",
        "canary",
        "CONTAINER_IMAGE",
    )
    assert "build_id" not in labels
    assert alert["annotations"]["description"] == (
        f'The latest CONTAINER_IMAGE build of image eval:canary FAILED: "{FAILED_ERROR}".'
    )


def test_only_the_failed_build_raises_the_failed_alert(stack: Stack) -> None:
    firing_alert(stack, "PrimeIntellectBuildFailed", "e2e-failing")
    # The cancelled build alerts too, under its own name: the rules did see the other builds.
    firing_alert(stack, "PrimeIntellectBuildCancelled", "e2e-cancelled")
    in_prometheus = {
        alert["labels"]["build_id"]
        for alert in stack.prometheus.active_alerts("PrimeIntellectBuildFailed")
    }
    at_webhook = {
        alert["labels"]["build_id"] for alert in stack.webhook.firing("PrimeIntellectBuildFailed")
    }
    failed = {"e2e-failing", *(plan.build_id for plan, _ in failed_with_build_errors(0))}
    wait_for(
        lambda: (
            {a["labels"]["build_id"] for a in stack.webhook.firing("PrimeIntellectBuildFailed")}
            == failed
        ),
        "PrimeIntellectBuildFailed for every failed build at the webhook",
        lambda: str(stack.webhook.firing("PrimeIntellectBuildFailed")),
    )
    assert in_prometheus == failed
    assert at_webhook <= failed


def test_build_held_in_building_for_hours_raises_the_stuck_alert(stack: Stack) -> None:
    alert = firing_alert(stack, "PrimeIntellectBuildStuck", "e2e-stuck")
    assert alert["labels"]["status"] == "BUILDING"
    assert alert["labels"]["image_name"] == "inference"
    assert alert["labels"]["image_tag"] == "2026.01"
    # Started 2h59m before the fixture began.
    assert re.search(
        r"has been BUILDING for (2h 59|3h \d+)m .* \(since it started\)\.$",
        alert["annotations"]["description"],
    )
    # The build PENDING for a minute is not stuck.
    stuck = {
        alert["labels"]["build_id"]
        for alert in stack.prometheus.active_alerts("PrimeIntellectBuildStuck")
    }
    assert stuck == {"e2e-stuck"}


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    wait_for_every_dashboard_query_to_return_data(stack.prometheus)


def test_failed_builds_table_gives_each_failed_build_the_builds_error_or_else_its_artifacts(
    stack: Stack,
) -> None:
    query = dashboard_query(stack.prometheus, "Failed builds in the selected range")
    rows = {
        (
            row["metric"]["build_id"],
            row["metric"].get("source", ""),
            row["metric"].get("artifact_type", ""),
            row["metric"]["error_message"],
        )
        for row in stack.prometheus.query(query)
    }
    assert rows == {
        ("e2e-failing", "artifact", "CONTAINER_IMAGE", FAILED_ERROR),
        ("e2e-build-error", "build", "", BUILD_ERROR),
        # The build's own message says why; its artifact's is on the build's page.
        ("e2e-both-errors", "build", "", BOTH_ERRORS_BUILD_ERROR),
    }


def test_tracked_builds_panel_shows_every_state_unpolled_included(stack: Stack) -> None:
    query = dashboard_query(stack.prometheus, "Tracked builds")
    states = {row["metric"]["state"]: row["value"][1] for row in stack.prometheus.query(query)}
    assert set(states) == {"active", "finished", "failing", "unpolled"}


def test_every_legend_names_labels_its_query_returns(stack: Stack) -> None:
    wait_for_every_dashboard_query_to_return_data(stack.prometheus)
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    values = resolve_variables(stack.prometheus, dashboard)
    unlabelled = []
    for name, target in dashboard_targets(dashboard):
        named = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        for series in stack.prometheus.query(substitute(target["expr"], values)):
            if missing := named - set(series["metric"]):
                unlabelled.append(f"{name}: {series['metric']} lacks {sorted(missing)}")
    assert unlabelled == []


def test_every_recording_rule_records_series_with_the_labels_its_level_names(stack: Stack) -> None:
    vocabulary = {"job", "instance", "quantile"} | {
        label for family in documented_metrics().values() for label in family.labels
    }
    for name in recorded_names():

        def recorded(name: str = name) -> list[dict[str, Any]]:
            return stack.prometheus.query(name)

        series = wait_for(
            recorded,
            f"{name} to be recorded",
            lambda: str([rule for rule in stack.prometheus.rules() if rule.get("lastError")]),
        )
        expected = level_labels(name.split(":")[0], vocabulary)
        assert {frozenset(set(one["metric"]) - {"__name__"}) for one in series} == {expected}
    # The finishes the fixture made: trainer's builds COMPLETED, none FAILED.
    [ratio] = stack.prometheus.query(
        'job_image_name:primeintellect_image_builds_failed:ratio_rate1h{image_name="trainer"}'
    )
    assert ratio["value"][1] == "0"
    assert not [rule for rule in stack.prometheus.rules() if rule["health"] != "ok"]


def test_image_health_table_shows_each_images_last_status_failures_and_dates(
    stack: Stack,
) -> None:
    title = "Image health by image and tag"

    def column(ref_id: str) -> dict[tuple[str, str], dict[str, Any]]:
        query = dashboard_query(stack.prometheus, title, ref_id)
        return {
            (row["metric"]["image_name"], row["metric"]["image_tag"]): row
            for row in stack.prometheus.query(query)
        }

    statuses = {image: row["metric"]["status"] for image, row in column("A").items()}
    assert statuses[("eval", "canary")] == "FAILED"
    assert statuses[("web-frontend", "v1.4.2")] == "COMPLETED"
    assert statuses[("data-prep", "nightly")] == "CANCELLED"
    failures = {image: row["value"][1] for image, row in column("B").items()}
    assert failures[("eval", "canary")] == "1"
    assert failures[("web-frontend", "v1.4.2")] == "0"
    # Dates in milliseconds, as Grafana's date units read them: eval:canary fails since its
    # only build, e2e-failing, completed.
    failing_since = column("C")
    assert ("web-frontend", "v1.4.2") not in failing_since
    [completed] = stack.prometheus.query(
        'primeintellect_image_build_completed_timestamp_seconds{build_id="e2e-failing"}'
    )
    assert float(failing_since[("eval", "canary")]["value"][1]) == 1000 * float(
        completed["value"][1]
    )
    assert ("web-frontend", "v1.4.2") in column("D")
