"""The chart as the Prometheus Operator deploys it, with a real Prometheus.

For each install, the chart is rendered by Helm's own engine; the Operator's view of it
(tests/helpers/operator.py) gives the pods, the targets its ServiceMonitor generates and the rules
file of its PrometheusRule. Each pod is the exporter's console script started with the pod's
own arguments (shard flags included) and the rendered config file, on loopback; Prometheus
scrapes exactly the generated targets, with their labels, and evaluates exactly the rendered
rules. Only what ties a pod to a cluster is replaced: the API (the simulator), the key file,
the state file and the listen address, and the polling and scrape cadence (to seconds); and
the team's image discovery is turned on, so the dashboard's image row has data.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.config.schema import ShardSettings
from exporter.demo.simulator import BuildPlan, Simulator
from tests.helpers.chart import Rendered, render_chart, values_of
from tests.helpers.operator import Pod, ScrapeJob, pods, rules_file, scrape_jobs
from tests.helpers.prometheus import (
    Prometheus,
    Service,
    dashboard_queries,
    finish,
    plans,
    start_prometheus,
    start_service,
    start_while_watched,
    wait_for,
    wait_for_every_dashboard_query_to_return_data,
    wait_for_finished_total,
    waiting,
)
from tests.helpers.support import CANARY_API_KEY, REPOSITORY, SCRIPT, environment, find_binary

MONITORING = {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}
# Each install: the values over the chart's defaults. The ci/*-values.yaml files get the
# ServiceMonitor and the PrometheusRule on (the point of the test), except no-servicemonitor,
# which Prometheus scrapes by the README's own scrape job.
INSTALLS: dict[str, dict[str, Any]] = {
    "all-features": {**values_of("all-features"), **MONITORING},
    "existing-secret": {**values_of("existing-secret"), **MONITORING},
    "shards": {**values_of("shards"), **MONITORING},
    "no-servicemonitor": values_of("no-servicemonitor"),
    "shards-2": {"apiKey": {"value": "pk-test"}, "shards": 2, **MONITORING},
    "name-override": {
        "apiKey": {"value": "pk-test"},
        "nameOverride": "build-exporter",
        **MONITORING,
    },
    "fullname-override": {
        "apiKey": {"value": "pk-test"},
        "fullnameOverride": "team-builds",
        **MONITORING,
    },
    # A user's own ServiceMonitor that selects the chart's Services by their labels only
    # (as the chart's did before): the shards' headless Service is scraped too, so every
    # pod is scraped twice and the copies differ only in `service`.
    "scraped-twice": {"apiKey": {"value": "pk-test"}, "shards": 2, **MONITORING},
}
SCRAPED_TWICE = {"scraped-twice"}
TEAM = "operator-team"
# The README's scrape job, for the install without a ServiceMonitor.
README_JOB = "primeintellect-builds"
BUILD_ALERTS = {
    "PrimeIntellectBuildFailed": "e2e-failing",
    "PrimeIntellectBuildCancelled": "e2e-cancelled",
    "PrimeIntellectBuildStuck": "e2e-stuck",
}
# Labels that tell two scrapes of one pod apart.
SCRAPE_PATH_LABELS = {"service", "endpoint"}
# A build no shard finds (404): the dashboard's poll-error panel has data.
MISSING_BUILD = "e2e-missing"
BUILD_IMAGES_OF_THE_DAY = re.compile(
    r"last_over_time\(primeintellect_image_build_info\{[^}]*\}\[1d\]\)"
)
PROMQL_TIME = re.compile(r"(\.\d{6})\d*")


@dataclasses.dataclass
class Cluster:
    """One install running: its pods' exporters and the Prometheus that scrapes them."""

    install: str
    rendered: Rendered
    simulator: Simulator
    prometheus: Prometheus
    pods: list[Pod]
    exporters: dict[str, Service]
    jobs: list[dict[str, Any]]
    ready_at: float

    def rule(self, alertname: str) -> dict[str, Any]:
        [rule] = [
            rule
            for group in rules_file(self.rendered)["groups"]
            for rule in group["rules"]
            if rule.get("alert") == alertname
        ]
        found: dict[str, Any] = rule
        return found


def rendered_install(install: str) -> Rendered:
    rendered = render_chart(INSTALLS[install])
    if install in SCRAPED_TWICE:
        for monitor in rendered.all("ServiceMonitor"):
            monitor["spec"]["selector"].pop("matchExpressions")
    return rendered


def operator_jobs(rendered: Rendered) -> list[ScrapeJob]:
    return [
        job for monitor in rendered.all("ServiceMonitor") for job in scrape_jobs(rendered, monitor)
    ]


def finishing_builds(shards: int) -> list[list[str]]:
    """Build IDs to finish in two rounds, each round one build of every shard, the second
    after Prometheus scraped the first: every shard's finish series rise in both."""
    candidates = (f"e2e-finishing-{n}" for n in itertools.count(1))
    owned: dict[int, list[str]] = {index: [] for index in range(shards)}
    while any(len(ids) < 2 for ids in owned.values()):
        build_id = next(candidates)
        [index] = [i for i in range(shards) if ShardSettings(count=shards, index=i).owns(build_id)]
        if len(owned[index]) < 2:
            owned[index].append(build_id)
    return [[ids[round_] for ids in owned.values()] for round_ in (0, 1)]


def pod_config(
    rendered: Rendered,
    pod_directory: Path,
    api_url: str,
    port: int,
    build_plans: list[BuildPlan],
) -> Path:
    """The rendered config file, tied to this machine instead of the pod's volumes."""
    config = yaml.safe_load(rendered.config_text())
    key_file = pod_directory / "api-key"
    key_file.write_text(CANARY_API_KEY + "\n")
    config["api"].update(
        {"base_url": api_url, "api_key_file": str(key_file), "requests_per_second": 100}
    )
    # Minutes of cadence compressed to seconds; stale_after stays above the interval.
    config["polling"] = {"interval": "1s", "max_interval": "2s", "stale_after": "15m"}
    config["builds"] = [plan.build_id for plan in build_plans] + [MISSING_BUILD]
    # The build files come from a ConfigMap the chart does not make.
    config.pop("build_files", None)
    # The team's images too (the first shard lists them), so the dashboard's image row has data.
    config["discovery"] = {"images": {"enabled": True, "interval": "30s", "team_id": TEAM}}
    config["state"] = {"path": str(pod_directory / "state.db")}
    config["web"] = {"listen_address": f"127.0.0.1:{port}"}
    path = pod_directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def pod_command(pod: Pod, config: Path, port: int) -> list[str]:
    """The container's command line, with the config file and listen address of this pod."""
    arguments = []
    for argument in pod.arguments():
        if argument.startswith("--config.file="):
            argument = f"--config.file={config}"
        elif argument.startswith("--web.listen-address="):
            argument = f"--web.listen-address=127.0.0.1:{port}"
        arguments.append(argument)
    return [SCRIPT, *arguments]


def start_pod(
    rendered: Rendered,
    pod: Pod,
    simulator: Simulator,
    build_plans: list[BuildPlan],
    directory: Path,
    cleanup: ExitStack,
) -> Service:
    pod_directory = directory / pod.name
    pod_directory.mkdir()

    def command(port: int) -> list[str]:
        config = pod_config(rendered, pod_directory, simulator.base_url, port, build_plans)
        return pod_command(pod, config, port)

    return start_service(
        pod.name, command, pod_directory, cleanup, env=environment(**pod.environment())
    )


def scrape_configs(
    rendered: Rendered, exporters: dict[str, Service], interval: str
) -> list[dict[str, Any]]:
    addresses = {name: service.url.removeprefix("http://") for name, service in exporters.items()}
    jobs = operator_jobs(rendered)
    if jobs:
        return [job.scrape_config(addresses, interval) for job in jobs]
    return [{"job_name": README_JOB, "static_configs": [{"targets": sorted(addresses.values())}]}]


def parse_time(text: str) -> float:
    """A Prometheus API timestamp (RFC 3339 with nanoseconds) as Unix seconds."""
    return datetime.fromisoformat(PROMQL_TIME.sub(r"\1", text)).timestamp()


def installs(names: Iterable[str]) -> list[Any]:
    """Each install's cluster is set up once, on one worker: its tests share a worker group."""
    return [
        pytest.param(install, marks=pytest.mark.xdist_group(f"operator-{install}"))
        for install in sorted(names)
    ]


@pytest.fixture(scope="module", params=installs(INSTALLS))
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """The install running, every target scraped, builds seen to finish and to start."""
    install: str = request.param
    prometheus_binary = find_binary("prometheus")
    directory = tmp_path_factory.mktemp(install)
    rendered = rendered_install(install)
    running = pods(rendered)
    rounds = finishing_builds(len(running) if rendered.all("StatefulSet") else 1)
    now = time.time()
    starting = [waiting(f"e2e-starting-{n}", "trainer", f"s{n}", now) for n in (1, 2)]
    build_plans = [*plans(now, finishing=[*rounds[0], *rounds[1]]), *starting]
    with ExitStack() as cleanup:
        simulator = cleanup.enter_context(Simulator(CANARY_API_KEY, build_plans, team_id=TEAM))
        exporters = {
            pod.name: start_pod(rendered, pod, simulator, build_plans, directory, cleanup)
            for pod in running
        }
        jobs = scrape_configs(rendered, exporters, "1s")
        (directory / "rules.yaml").write_text(yaml.safe_dump(rules_file(rendered)))
        prometheus = start_prometheus(
            prometheus_binary,
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(directory / "rules.yaml")],
                "scrape_configs": jobs,
            },
            directory,
            cleanup,
        )
        expected_targets = sum(
            len(static["targets"]) for job in jobs for static in job["static_configs"]
        )
        wait_for(
            lambda: (
                [target["health"] for target in prometheus.targets()] == ["up"] * expected_targets
            ),
            f"Prometheus to scrape {expected_targets} target(s)",
            lambda: str(prometheus.targets()),
        )
        # The finish counter and histogram only move for finishes an exporter sees; make two
        # rounds happen, the second after Prometheus has scraped the first, so rates are not zero.
        by_id = {plan.build_id: plan for plan in build_plans}
        finished = 0
        for round_ in rounds:
            for build_id in round_:
                finish(simulator, by_id[build_id])
            finished += len(round_)
            wait_for_finished_total(prometheus, finished)
        # Likewise the queue-time histogram, for builds seen PENDING that then start.
        start_while_watched(simulator, prometheus, starting)
        yield Cluster(
            install, rendered, simulator, prometheus, running, exporters, jobs, time.time()
        )


def test_each_pod_is_one_target_under_the_job_the_exporter_alerts_select(cluster: Cluster) -> None:
    targets = cluster.prometheus.targets()
    scrapes_per_pod = 2 if cluster.install in SCRAPED_TWICE else 1
    addresses = [service.url.removeprefix("http://") for service in cluster.exporters.values()]
    instances = [target["labels"]["instance"] for target in targets]
    assert sorted(instances) == sorted(addresses * scrapes_per_pod)
    if cluster.rendered.all("ServiceMonitor"):
        by_pod = Counter(target["labels"]["pod"] for target in targets)
        assert by_pod == {pod.name: scrapes_per_pod for pod in cluster.pods}
    # PrimeIntellectExporterDown's own expression, asking for targets up instead of down,
    # finds every pod once: the alert can fire for each of them, and only once.
    down = cluster.rule("PrimeIntellectExporterDown")["expr"]
    assert down.endswith(" == 0")
    found = cluster.prometheus.query(down.removesuffix(" == 0") + " == 1")
    assert len(found) == len(cluster.pods), found
    assert not cluster.prometheus.active_alerts("PrimeIntellectExporterAbsent")


def test_every_rule_evaluates_without_error(cluster: Cluster) -> None:
    def evaluated_since_ready() -> list[dict[str, Any]] | None:
        rules = cluster.prometheus.rules()
        if all(parse_time(rule["lastEvaluation"]) > cluster.ready_at for rule in rules):
            return rules
        return None

    rules = wait_for(
        evaluated_since_ready,
        "every rule evaluated after every target was scraped",
        lambda: str(cluster.prometheus.rules()),
    )
    assert len(rules) == sum(
        len(group["rules"]) for group in rules_file(cluster.rendered)["groups"]
    )
    failing = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert failing == {}


def test_each_failing_build_alerts_exactly_once(cluster: Cluster) -> None:
    def all_raised() -> list[dict[str, Any]] | None:
        alerts = cluster.prometheus.active_alerts()
        raised = {
            (alert["labels"]["alertname"], alert["labels"].get("build_id")) for alert in alerts
        }
        return alerts if set(BUILD_ALERTS.items()) <= raised else None

    alerts = wait_for(
        all_raised,
        "the failed, cancelled and stuck builds' alerts",
        lambda: str(cluster.prometheus.active_alerts()),
    )
    for alertname, build_id in BUILD_ALERTS.items():
        builds = [
            alert["labels"]["build_id"]
            for alert in alerts
            if alert["labels"]["alertname"] == alertname
        ]
        assert builds == [build_id], alertname
    # No alert twice, not even with copies that differ only in how the pod was scraped.
    copies = Counter(
        frozenset(
            (key, value) for key, value in alert["labels"].items() if key not in SCRAPE_PATH_LABELS
        )
        for alert in alerts
    )
    assert [labels for labels, count in copies.items() if count > 1] == []
    names = {alert["labels"]["alertname"] for alert in alerts}
    assert not names & {"PrimeIntellectExporterDown", "PrimeIntellectExporterAbsent"}


def test_every_dashboard_query_returns_data(cluster: Cluster) -> None:
    wait_for_every_dashboard_query_to_return_data(cluster.prometheus)


def results(prometheus: Prometheus, query: str, at: float) -> dict[frozenset[tuple[str, str]], str]:
    return {
        frozenset(sample["metric"].items()): sample["value"][1]
        for sample in prometheus.query(query, at)
    }


@pytest.mark.parametrize("cluster", installs(SCRAPED_TWICE), indirect=True)
def test_a_pod_scraped_twice_is_counted_once_by_every_dashboard_query(cluster: Cluster) -> None:
    queries = dashboard_queries(cluster.prometheus)
    # Every selector starts with the job matcher; through one Service only, the same query
    # at the same instant must give the same answer. The ones compared are those a second
    # copy could change, the sums, counts and quantiles (a max or min cannot double), over
    # instant values: the copies are scraped at different moments, so their rates, and the
    # exporter's own ever-moving gauges, differ a little. A build's image over the last day
    # (the poll-health panels' image filter) is the same in both copies.
    instant = [
        (name, query)
        for name, query in queries
        if "[" not in BUILD_IMAGES_OF_THE_DAY.sub("", query)
        and re.search(r"\b(sum|count|quantile) ", query)
    ]
    assert len(instant) >= 8
    # Once every copy has been scraped since the last build changed, the copies agree.
    wait_for(
        lambda: all(
            parse_time(target["lastScrape"]) > cluster.ready_at
            for target in cluster.prometheus.targets()
        ),
        "every target scraped since the builds last changed",
        lambda: str(cluster.prometheus.targets()),
    )
    at = time.time()
    differing = []
    for name, query in instant:
        through_one = query.replace('job=~"', 'service!~".+-headless", job=~"')
        assert through_one != query, name
        both, one = (results(cluster.prometheus, text, at) for text in (query, through_one))
        if both != one:
            differing.append(f"{name}: {both} through both, {one} through one\n  {query}")
    assert not differing, "\n".join(differing)


def test_a_pod_that_stops_answering_raises_exporter_down_for_it_alone(cluster: Cluster) -> None:
    stopped = cluster.pods[-1]
    address = cluster.exporters[stopped.name].url.removeprefix("http://")
    cluster.exporters[stopped.name].stop()

    def pending() -> list[dict[str, Any]]:
        return cluster.prometheus.active_alerts("PrimeIntellectExporterDown")

    alerts = wait_for(pending, "PrimeIntellectExporterDown pending", lambda: str(pending()))
    assert [alert["labels"]["instance"] for alert in alerts] == [address]
    assert alerts[0]["state"] == "pending"  # `for: 5m`


def test_renamed_chart_rules_pass_their_promtool_unit_tests(tmp_path: Path) -> None:
    promtool = find_binary("promtool")
    rendered = render_chart({**INSTALLS["name-override"], "shards": 2})
    (tmp_path / "rendered-rules.yaml").write_text(yaml.safe_dump(rules_file(rendered)))
    case = REPOSITORY / "monitoring" / "tests" / "chart" / "renamed_chart_test.yaml"
    shutil.copy(case, tmp_path)

    def unit_tests() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [promtool, "test", "rules", case.name],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    result = unit_tests()
    assert result.returncode == 0, result.stdout + result.stderr
    # The same cases fail on the rules file as is: they pin the job selector's replacement.
    shutil.copy(REPOSITORY / "monitoring" / "alerts.yaml", tmp_path / "rendered-rules.yaml")
    unreplaced = unit_tests()
    assert unreplaced.returncode != 0, unreplaced.stdout
