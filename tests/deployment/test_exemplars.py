"""Prometheus itself scrapes the exemplars of the OpenMetrics exposition and keeps them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.helpers import golden
from tests.helpers.prometheus import start_prometheus, wait_for
from tests.helpers.support import RunningExporter, find_binary


@pytest.fixture(scope="module")
def golden_exporter() -> Iterator[RunningExporter]:
    with golden.golden_exporter() as running:
        yield running


def test_prometheus_keeps_each_histograms_exemplar_with_its_build_id(
    golden_exporter: RunningExporter, tmp_path: Path
) -> None:
    address = golden_exporter.url.removeprefix("http://").split("/")[0]
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "builds", "static_configs": [{"targets": [address]}]}],
    }
    with ExitStack() as cleanup:
        prometheus = start_prometheus(
            find_binary("prometheus"),
            config,
            tmp_path,
            cleanup,
            flags=["--enable-feature=exemplar-storage"],
        )
        selector = (
            '{__name__=~"primeintellect_image_builds_(finished|queue)_duration_seconds_bucket"}'
        )

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
