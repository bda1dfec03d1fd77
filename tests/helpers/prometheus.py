"""Real Prometheus and Alertmanager on loopback, for the end-to-end and Operator tests: the
binaries started on free ports, a client of Prometheus's HTTP API, the builds whose alerts fire
at once, and the dashboard's queries as Grafana would send them."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from exporter.demo.simulator import ArtifactPlan, BuildPlan, Simulator
from tests.helpers.support import REPOSITORY, wait_until

RULES_FILE = REPOSITORY / "monitoring" / "alerts.yaml"
DASHBOARD_FILE = REPOSITORY / "monitoring" / "dashboard.json"
FAILED_ERROR = "step 7/12 RUN pip install -r requirements.txt: exit code 1"
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

    def __init__(
        self,
        name: str,
        command: list[str],
        log_path: Path,
        cwd: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.url = ""
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd, env=env
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
    env: dict[str, str] | None = None,
) -> Service:
    """Start a binary on a free port (again on another port if that one was taken meanwhile).

    Returns it once its /-/ready answers 200, with its base URL as ``url``; it is stopped
    when ``cleanup`` closes.
    """
    for attempt in range(3):
        port = free_port()
        log_path = directory / f"{name}-{attempt}.log"
        service = Service(name, command_for_port(port), log_path, directory, env)
        cleanup.callback(service.stop)
        service.url = f"http://127.0.0.1:{port}"
        if service.wait_ready(f"{service.url}/-/ready"):
            return service
        service.stop()
        if "address already in use" not in service.log_tail():
            break
    pytest.fail(f"{name} exited at start; log:\n{service.log_tail()}")


def start_prometheus(
    binary: str,
    config: dict[str, Any],
    directory: Path,
    cleanup: ExitStack,
    flags: Sequence[str] = (),
) -> Prometheus:
    """Debian's Prometheus with ``config`` as prometheus.yml, its data in ``directory``, and
    any more command-line ``flags``."""
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    service = start_service(
        "prometheus",
        lambda port: [
            binary,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            *flags,
        ],
        directory,
        cleanup,
    )
    return Prometheus(service.url)


@dataclasses.dataclass(frozen=True)
class Prometheus:
    """A client of a running Prometheus's HTTP API; a failed call fails the test."""

    url: str

    def _get(self, path: str, **params: str) -> Any:
        answer = httpx.get(f"{self.url}{path}", params=params, timeout=10).json()
        assert answer["status"] == "success", f"{path} {params}\n→ {answer}"
        return answer["data"]

    def query(self, expression: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query, now or ``at`` a Unix time; its result vector (a bad expression
        fails the test)."""
        params = {"query": expression} if at is None else {"query": expression, "time": str(at)}
        data = self._get("/api/v1/query", **params)
        assert data["resultType"] == "vector", expression
        result: list[dict[str, Any]] = data["result"]
        return result

    def label_values(self, label: str, selector: str) -> list[str]:
        values: list[str] = self._get(f"/api/v1/label/{label}/values", **{"match[]": selector})
        return values

    def active_alerts(self, alertname: str | None = None) -> list[dict[str, Any]]:
        """Alerts Prometheus holds now (pending or firing), of that name or all."""
        alerts: list[dict[str, Any]] = self._get("/api/v1/alerts")["alerts"]
        return [alert for alert in alerts if alertname in {None, alert["labels"]["alertname"]}]

    def rules(self) -> list[dict[str, Any]]:
        """Every rule of every group, with its health, last error and last evaluation."""
        groups: list[dict[str, Any]] = self._get("/api/v1/rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def exemplars(self, selector: str, start: float, end: float) -> list[dict[str, Any]]:
        """The exemplars Prometheus keeps of the series ``selector`` picks, per series."""
        result: list[dict[str, Any]] = self._get(
            "/api/v1/query_exemplars", query=selector, start=str(start), end=str(end)
        )
        return result

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, with their labels and health."""
        targets: list[dict[str, Any]] = self._get("/api/v1/targets")["activeTargets"]
        return targets


FINISHING = ("e2e-finishing-1", "e2e-finishing-2")


def plans(now: float, finishing: Sequence[str] = FINISHING) -> list[BuildPlan]:
    """One build per situation the rules and the dashboard must tell apart; the ``finishing``
    ones are BUILDING until a test makes them finish."""
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
        *(
            BuildPlan(build_id, "trainer", f"v{n}", now - 120, 10, 10, math.inf)
            for n, build_id in enumerate(finishing, start=1)
        ),
    ]


def finish(simulator: Simulator, plan: BuildPlan) -> None:
    """From now on the API answers that ``plan``'s build COMPLETED, 60s after it started."""
    completed = dataclasses.replace(plan, building=50.0)
    simulator.set_payload(plan.build_id, completed.payload(time.time()))


def waiting(build_id: str, image_name: str, image_tag: str, now: float) -> BuildPlan:
    """A build PENDING until a test makes it start."""
    return BuildPlan(build_id, image_name, image_tag, now - 30, pending=math.inf)


def start(simulator: Simulator, plan: BuildPlan) -> None:
    """From now on the API answers that ``plan``'s build is BUILDING, 20s after its creation."""
    started = dataclasses.replace(plan, pending=20.0, uploading=5.0, building=math.inf)
    simulator.set_payload(plan.build_id, started.payload(time.time()))


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


def resolve_variables(prometheus: Prometheus, dashboard: dict[str, Any]) -> dict[str, str]:
    """Each query variable's values from Prometheus, formatted as Grafana does for a
    multi-value selection: ``(a|b)``."""
    values = dict(GRAFANA_INTERVALS)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = substitute(variable["query"], values)
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: unsupported query {query}"
        found = prometheus.label_values(match.group(2), match.group(1))
        assert found, f"variable {variable['name']} has no values: {query}"
        escaped = "|".join(grafana_regex_escape(value) for value in found)
        values[variable["name"]] = f"({escaped})"
    return values


# Queries that rightly return nothing while all is well, by panel / refId: why.
NO_DATA_WHEN_HEALTHY = {
    "Image listing error / A": "primeintellect_exporter_image_list_last_error is present only "
    "while the latest image listing failed; the panel reads 'none' meanwhile",
}


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every target of every panel, those of collapsed rows included: (panel / refId, target)."""
    panels = [panel for top in dashboard["panels"] for panel in (top, *top.get("panels", []))]
    return [
        (f"{panel['title']} / {target['refId']}", target)
        for panel in panels
        for target in panel.get("targets", [])
    ]


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(name, target["expr"]) for name, target in dashboard_targets(dashboard)]


def dashboard_queries(prometheus: Prometheus) -> list[tuple[str, str]]:
    """Every dashboard query as Grafana sends it with every variable's every value selected:
    (panel / refId, PromQL)."""
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    values = resolve_variables(prometheus, dashboard)
    return [(name, substitute(expr, values)) for name, expr in dashboard_expressions(dashboard)]


def dashboard_query(prometheus: Prometheus, panel_title: str, ref_id: str = "A") -> str:
    """One dashboard query as Grafana sends it, as ``dashboard_queries`` gives it."""
    [query] = [
        query
        for name, query in dashboard_queries(prometheus)
        if name == f"{panel_title} / {ref_id}"
    ]
    return query


def queries_without_data(prometheus: Prometheus, queries: list[tuple[str, str]]) -> list[str]:
    """The queries whose result holds no finite sample (a query that errors fails the test),
    but for those of ``NO_DATA_WHEN_HEALTHY``."""
    missing = []
    for name, query in queries:
        if name in NO_DATA_WHEN_HEALTHY:
            continue
        samples = [float(sample["value"][1]) for sample in prometheus.query(query)]
        if not any(math.isfinite(sample) for sample in samples):
            missing.append(f"{name}: {samples}\n  {query}")
    return missing


def wait_for_every_dashboard_query_to_return_data(prometheus: Prometheus) -> None:
    """Every dashboard query returns data: rates need a few scrapes after the last finish,
    so this polls until they do, and fails naming the queries still without any."""
    queries = dashboard_queries(prometheus)
    assert len(queries) > 20
    names = {name for name, _ in queries}
    assert set(NO_DATA_WHEN_HEALTHY) <= names, "a query listed as empty is not on the dashboard"
    wait_for(
        lambda: not queries_without_data(prometheus, queries),
        "data for every dashboard query",
        lambda: "no data from:\n" + "\n".join(queries_without_data(prometheus, queries)),
    )


def wait_for_finished_total(prometheus: Prometheus, count: int) -> None:
    """Wait until Prometheus has scraped ``count`` builds seen to finish."""
    wait_for_sum(
        prometheus,
        'primeintellect_image_builds_finished_total{status="COMPLETED"}',
        count,
        "finished build(s)",
    )


def wait_for_started_total(prometheus: Prometheus, count: int) -> None:
    """Wait until Prometheus has scraped ``count`` builds seen to start."""
    wait_for_sum(
        prometheus,
        "primeintellect_image_builds_queue_duration_seconds_count",
        count,
        "started build(s)",
    )


def wait_for_sum(prometheus: Prometheus, selector: str, count: int, what: str) -> None:
    """Wait until the series of ``selector`` add up to ``count``, each pod counted once even
    where it is scraped twice (through two Services)."""
    query = f"sum(max without (service, endpoint) ({selector}))"

    def seen() -> float:
        result = prometheus.query(query)
        return float(result[0]["value"][1]) if result else 0.0

    wait_for(
        lambda: seen() == count,
        f"Prometheus to see {count} {what}",
        lambda: f"{query} is {seen()}",
    )


def start_while_watched(
    simulator: Simulator, prometheus: Prometheus, plans: list[BuildPlan]
) -> None:
    """Start each of ``plans`` (``waiting`` builds) once Prometheus has seen it PENDING, so its
    exporter polled it queued first, and wait for the start to be scraped: the queue-time
    histogram observes only the builds seen to start."""
    for count, plan in enumerate(plans, start=1):
        wait_for_sum(
            prometheus,
            f'primeintellect_image_build_status{{build_id="{plan.build_id}",status="PENDING"}}',
            1,
            f"{plan.build_id} PENDING",
        )
        start(simulator, plan)
        wait_for_started_total(prometheus, count)
