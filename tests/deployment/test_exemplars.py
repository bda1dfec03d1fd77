"""Prometheus itself scrapes the exemplars of the OpenMetrics exposition and keeps them, and
the dashboard's exemplars lead, through the Grafana data source example's link, to the build's
page on the exporter's status page."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from urllib.parse import urlsplit

import pytest
import yaml

from tests.helpers import golden
from tests.helpers.prometheus import (
    DASHBOARD_FILE,
    GRAFANA_INTERVALS,
    Prometheus,
    dashboard_targets,
    start_prometheus,
    substitute,
    wait_for,
)
from tests.helpers.support import REPOSITORY, RunningExporter, find_binary

DATASOURCE_FILE = REPOSITORY / "monitoring" / "grafana-datasource.yaml"
# The dashboard's variables with every value selected, as Grafana sends them.
EVERY_VALUE = GRAFANA_INTERVALS | {"job": ".*", "instance": ".*", "image": ".*"}


@pytest.fixture(scope="module")
def golden_exporter() -> Iterator[RunningExporter]:
    with golden.golden_exporter() as running:
        yield running


@pytest.fixture(scope="module")
def prometheus(
    golden_exporter: RunningExporter, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """A Prometheus keeping exemplars, scraping the golden exporter each second."""
    address = golden_exporter.url.removeprefix("http://").split("/")[0]
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "builds", "static_configs": [{"targets": [address]}]}],
    }
    with ExitStack() as cleanup:
        yield start_prometheus(
            find_binary("prometheus"),
            config,
            tmp_path_factory.mktemp("exemplars"),
            cleanup,
            flags=["--enable-feature=exemplar-storage"],
        )


def exemplar_build_ids(prometheus: Prometheus, query: str) -> list[str]:
    """The build_id of every exemplar Prometheus keeps for the series ``query`` selects."""
    series = prometheus.exemplars(query, golden.POLL_TIME - 1, time.time() + 60)
    return [exemplar["labels"]["build_id"] for one in series for exemplar in one["exemplars"]]


def test_prometheus_keeps_each_histograms_exemplar_with_its_build_id(
    prometheus: Prometheus,
) -> None:
    selector = '{__name__=~"primeintellect_image_builds_(finished|queue)_duration_seconds_bucket"}'

    def kept() -> dict[str, tuple[str, float]]:
        series = prometheus.exemplars(selector, golden.POLL_TIME - 1, time.time() + 60)
        return {
            one["seriesLabels"]["__name__"]: (
                one["exemplars"][0]["labels"]["build_id"],
                float(one["exemplars"][0]["value"]),
            )
            for one in series
            if one["exemplars"]
        }

    wait_for(lambda: len(kept()) == 2, "Prometheus to keep both exemplars", lambda: "")
    assert kept() == {
        "primeintellect_image_builds_finished_duration_seconds_bucket": (
            golden.FINISHING.build_id,
            320.0,
        ),
        "primeintellect_image_builds_queue_duration_seconds_bucket": (
            golden.FINISHING.build_id,
            10.0,
        ),
    }


def test_each_dashboard_exemplar_links_to_its_builds_page_on_the_status_page(
    golden_exporter: RunningExporter, prometheus: Prometheus
) -> None:
    (datasource,) = yaml.safe_load(DATASOURCE_FILE.read_text())["datasources"]
    (destination,) = datasource["jsonData"]["exemplarTraceIdDestinations"]
    # "$$" is Grafana's escape in provisioning files for a "$" of its own.
    link = urlsplit(destination["url"].replace("$$", "$"))
    queries = [
        substitute(target["expr"], EVERY_VALUE)
        for _, target in dashboard_targets(json.loads(DASHBOARD_FILE.read_text()))
        if target.get("exemplar")
    ]
    assert queries
    for query in queries:

        def kept(query: str = query) -> list[str]:
            return exemplar_build_ids(prometheus, query)

        build_ids = wait_for(kept, f"exemplars of {query}", lambda: "")
        assert set(build_ids) == {golden.FINISHING.build_id}
        # What Grafana opens from the exemplar's link: its build_id for ${__value.raw}.
        page = golden_exporter.get(link.path.replace("${__value.raw}", golden.FINISHING.build_id))
        assert page.status_code == 200
        assert golden.FINISHING.build_id in page.text
