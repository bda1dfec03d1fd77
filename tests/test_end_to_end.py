"""End to end on loopback: simulator → exporter → Prometheus with the shipped rules →
Alertmanager → a webhook, and every dashboard query against that Prometheus.

Prometheus and Alertmanager are the real Debian binaries, started once for the module. The
shipped rules keep their real thresholds, so the builds are laid out to trigger alerts that
fire at once: a build that FAILED minutes ago, and one held in BUILDING since hours ago.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from exporter.simulator import ArtifactPlan, BuildPlan, Simulator
from tests.support import (
    CANARY_API_KEY,
    REPOSITORY,
    RunningExporter,
    find_binary,
    make_config,
    wait_until,
)

# Each test here starts an outside tool (see the `tooling` marker in pyproject.toml).
pytestmark = pytest.mark.tooling

RULES_FILE = REPOSITORY / "monitoring" / "alerts.yaml"
DASHBOARD_FILE = REPOSITORY / "monitoring" / "dashboard.json"
# The job name the README's scrape config uses, which the rules' job selector matches.
JOB = "primeintellect-builds"
FAILED_ERROR = "step 7/12 RUN pip install -r requirements.txt: exit code 1"
MISSING_BUILD = "e2e-missing"
# Grafana's range variables, as Grafana would set them for a short range on a 1s scrape.
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
# Long enough for Prometheus to start, scrape, evaluate and notify, and for Alertmanager's
# group_wait; far above what a healthy run takes (a few seconds).
DEADLINE = 60.0


def find_alertmanager() -> str:
    """Like ``find_binary``, for the binary of Debian's ``prometheus-alertmanager`` package."""
    path = shutil.which("prometheus-alertmanager")
    if path is None:
        reason = (
            "prometheus-alertmanager is not installed "
            "(Debian package 'prometheus-alertmanager' provides it)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; .ci/run must install it")
        pytest.skip(reason)
    return path


def wait_for(
    condition: Callable[[], Any],
    message: str,
    details: Callable[[], str],
    timeout: float = DEADLINE,
) -> Any:
    """``wait_until``, failing with ``details()`` as they are at the deadline."""
    try:
        return wait_until(condition, timeout=timeout, message=message)
    except pytest.fail.Exception:
        pytest.fail(f"timed out after {timeout}s waiting for {message}:\n{details()}")


def free_port() -> int:
    """A port nothing listens on right now, for a binary that must be told its port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Service:
    """A binary running in the background with its log in a file; stopped, then killed."""

    def __init__(self, name: str, command: list[str], log_path: Path, cwd: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd
        )

    def log_tail(self, characters: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]

    def wait_ready(self, url: str) -> bool:
        """True once ``url`` answers 200; False if the process exits first."""

        def ready_or_exited() -> bool:
            if self.process.poll() is not None:
                return True
            try:
                return httpx.get(url, timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready_or_exited, f"{self.name} to answer {url}", self.log_tail, timeout=30)
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


def start_service(
    name: str,
    command_for_port: Callable[[int], list[str]],
    directory: Path,
    cleanup: ExitStack,
) -> str:
    """Start a binary on a free port (again on another port if that one was taken meanwhile).

    Returns its base URL; the service is stopped when ``cleanup`` closes.
    """
    for attempt in range(3):
        port = free_port()
        service = Service(
            name, command_for_port(port), directory / f"{name}-{attempt}.log", directory
        )
        cleanup.callback(service.stop)
        url = f"http://127.0.0.1:{port}"
        if service.wait_ready(f"{url}/-/ready"):
            return url
        service.stop()
        if "address already in use" not in service.log_tail():
            break
    pytest.fail(f"{name} exited at start; log:\n{service.log_tail()}")


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
    prometheus_url: str
    alertmanager_url: str
    webhook: WebhookReceiver

    def query(self, expression: str) -> list[dict[str, Any]]:
        """An instant query; its result vector (a bad expression fails the test)."""
        response = httpx.get(
            f"{self.prometheus_url}/api/v1/query", params={"query": expression}, timeout=10
        )
        answer = response.json()
        assert answer["status"] == "success", f"{expression}\n→ {answer}"
        assert answer["data"]["resultType"] == "vector", expression
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def label_values(self, label: str, selector: str) -> list[str]:
        response = httpx.get(
            f"{self.prometheus_url}/api/v1/label/{label}/values",
            params={"match[]": selector},
            timeout=10,
        )
        answer = response.json()
        assert answer["status"] == "success", answer
        values: list[str] = answer["data"]
        return values

    def active_alerts(self, alertname: str) -> list[dict[str, Any]]:
        """Alerts of that name Prometheus holds now (pending or firing)."""
        response = httpx.get(f"{self.prometheus_url}/api/v1/alerts", timeout=10)
        alerts: list[dict[str, Any]] = response.json()["data"]["alerts"]
        return [alert for alert in alerts if alert["labels"]["alertname"] == alertname]


def plans(now: float) -> list[BuildPlan]:
    """One build per situation the rules and the dashboard must tell apart."""
    return [
        # FAILED eight minutes ago, with one artifact's error message.
        BuildPlan(
            "e2e-failing",
            "eval",
            "canary",
            now - 600,
            pending=10,
            uploading=20,
            building=100,
            outcome="FAILED",
            artifacts=(ArtifactPlan("CONTAINER_IMAGE", FAILED_ERROR), ArtifactPlan("VM_SANDBOX")),
        ),
        # BUILDING since almost three hours: stuck.
        BuildPlan(
            "e2e-stuck",
            "inference",
            "2026.01",
            now - 3 * 3600,
            pending=60,
            uploading=60,
            building=math.inf,
        ),
        BuildPlan("e2e-completed", "web-frontend", "v1.4.2", now - 7200, 30, 60, 600),
        BuildPlan(
            "e2e-cancelled", "data-prep", "nightly", now - 300, 45, 0, 0, outcome="CANCELLED"
        ),
        # PENDING for a minute: neither stuck nor failed.
        BuildPlan("e2e-pending", "trainer", "v3", now - 60, pending=math.inf),
        # BUILDING until the fixture makes them finish, one after the other.
        *(
            BuildPlan(f"e2e-finishing-{n}", "trainer", f"v{n}", now - 120, 10, 10, math.inf)
            for n in (1, 2)
        ),
    ]


def finish(simulator: Simulator, plan: BuildPlan) -> None:
    """From now on the API answers that ``plan``'s build COMPLETED, 60s after it started."""
    completed = dataclasses.replace(plan, building=50.0)
    simulator.set_payload(plan.build_id, completed.payload(time.time()))


def wait_for_finished_total(stack: Stack, count: int) -> None:
    """Wait until Prometheus has scraped ``count`` builds seen to finish."""
    query = 'sum(primeintellect_image_builds_finished_total{status="COMPLETED"})'

    def seen() -> float:
        result = stack.query(query)
        return float(result[0]["value"][1]) if result else 0.0

    wait_for(
        lambda: seen() == count,
        f"Prometheus to see {count} finished build(s)",
        lambda: f"{query} is {seen()}",
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Everything running, every build polled and scraped, two builds seen to finish."""
    prometheus = find_binary("prometheus")
    alertmanager = find_alertmanager()
    directory = tmp_path_factory.mktemp("e2e")
    build_plans = plans(time.time())
    with ExitStack() as cleanup:
        simulator = cleanup.enter_context(Simulator(CANARY_API_KEY, build_plans))
        build_ids = [plan.build_id for plan in build_plans] + [MISSING_BUILD]
        exporter = RunningExporter(make_config(simulator.base_url, build_ids)).start()
        cleanup.callback(exporter.stop)
        # Every build is known before the first scrape, so the first rule evaluation that
        # fires any alert has seen every build.
        exporter.wait_until_all_polled()

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
        )

        exporter_address = exporter.url.removeprefix("http://").rstrip("/")
        alertmanager_address = alertmanager_url.removeprefix("http://")
        (directory / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES_FILE)],
                    "alerting": {
                        "alertmanagers": [{"static_configs": [{"targets": [alertmanager_address]}]}]
                    },
                    "scrape_configs": [
                        {"job_name": JOB, "static_configs": [{"targets": [exporter_address]}]}
                    ],
                }
            )
        )
        prometheus_url = start_service(
            "prometheus",
            lambda port: [
                prometheus,
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            directory,
            cleanup,
        )
        running = Stack(simulator, exporter, prometheus_url, alertmanager_url, webhook)
        wait_until(
            lambda: running.query(f'up{{job="{JOB}"}} == 1'),
            timeout=DEADLINE,
            message="Prometheus to scrape the exporter",
        )

        # The finish counter and histogram only move for finishes the exporter sees; make two
        # happen, the second after Prometheus has scraped the first, so rates are not zero.
        finishing = [plan for plan in build_plans if plan.build_id.startswith("e2e-finishing")]
        for count, plan in enumerate(finishing, start=1):
            finish(simulator, plan)
            wait_for_finished_total(running, count)
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
            f"Prometheus has {stack.active_alerts(alertname)}"
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
    assert alert["annotations"]["summary"] == "Image build eval:canary FAILED"


def test_only_the_failed_build_raises_the_failed_alert(stack: Stack) -> None:
    firing_alert(stack, "PrimeIntellectBuildFailed", "e2e-failing")
    # The cancelled build alerts too, under its own name: the rules did see the other builds.
    firing_alert(stack, "PrimeIntellectBuildCancelled", "e2e-cancelled")
    in_prometheus = {
        alert["labels"]["build_id"] for alert in stack.active_alerts("PrimeIntellectBuildFailed")
    }
    at_webhook = {
        alert["labels"]["build_id"] for alert in stack.webhook.firing("PrimeIntellectBuildFailed")
    }
    assert in_prometheus == {"e2e-failing"}
    assert at_webhook == {"e2e-failing"}


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
        alert["labels"]["build_id"] for alert in stack.active_alerts("PrimeIntellectBuildStuck")
    }
    assert stuck == {"e2e-stuck"}


def substitute(expression: str, values: dict[str, str]) -> str:
    """Grafana's variable interpolation: ``$name`` and ``${name}``."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown variable ${name} in {expression}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expression)


def grafana_regex_escape(value: str) -> str:
    """A value escaped as Grafana does inside a PromQL regex matcher: a regex escape, itself
    escaped for the double-quoted string (so ``.`` becomes ``\\\\.`` in the query text)."""
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda match: "\\\\" + match.group(0), value)


def resolve_variables(stack: Stack, dashboard: dict[str, Any]) -> dict[str, str]:
    """Each query variable's values from Prometheus, formatted as Grafana does for a
    multi-value selection: ``(a|b)``."""
    values = dict(GRAFANA_INTERVALS)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = substitute(variable["query"], values)
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: unsupported query {query}"
        found = stack.label_values(match.group(2), match.group(1))
        assert found, f"variable {variable['name']} has no values: {query}"
        escaped = "|".join(grafana_regex_escape(value) for value in found)
        values[variable["name"]] = f"({escaped})"
    return values


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (f"{panel['title']} / {target['refId']}", target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    values = resolve_variables(stack, dashboard)
    queries = [(name, substitute(expr, values)) for name, expr in dashboard_expressions(dashboard)]
    assert len(queries) > 20

    def without_data() -> list[str]:
        missing = []
        for name, query in queries:
            samples = [float(sample["value"][1]) for sample in stack.query(query)]
            if not any(math.isfinite(sample) for sample in samples):
                missing.append(f"{name}: {samples}\n  {query}")
        return missing

    # Rates need a few scrapes after the last finish; poll until every panel has data.
    wait_for(
        lambda: not without_data(),
        "data for every dashboard query",
        lambda: "no data from:\n" + "\n".join(without_data()),
    )
