"""promtool's own check of whole expositions: the golden exporter's, and builds with images."""

from __future__ import annotations

import math
import subprocess
from collections.abc import Iterator

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from exporter.demo.simulator import BuildPlan, Simulator
from tests.helpers import golden
from tests.helpers.images import TEAM, discovering, listed, team_images
from tests.helpers.support import (
    CANARY_API_KEY,
    EPOCH,
    RunningExporter,
    find_binary,
    parse_samples,
    wait_until,
)


@pytest.fixture(scope="module")
def golden_exporter() -> Iterator[RunningExporter]:
    with golden.golden_exporter() as running:
        yield running


def test_exposition_passes_promtool_check_metrics(golden_exporter: RunningExporter) -> None:
    promtool = find_binary("promtool")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=golden_exporter.metrics_text().encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == ""


def test_image_and_build_families_make_one_valid_exposition(
    stopping: list[RunningExporter],
) -> None:
    promtool = find_binary("promtool")
    plans = [*team_images(5), BuildPlan("held", "held", "v1", EPOCH, 1, 1, math.inf)]
    with Simulator(CANARY_API_KEY, plans, team_id=TEAM) as simulator:
        running = discovering(simulator, ["img-0000", "held"])
        stopping.append(running)
        running.wait_until_all_polled()
        wait_until(lambda: listed(running), message="a complete listing")
        text = running.get("/metrics").content
        result = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        openmetrics = running.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        ).text
        parsed = {family.name for family in openmetrics_families(openmetrics)}  # type: ignore[no-untyped-call]
        assert {"primeintellect_image_status", "primeintellect_image_build_status"} <= parsed
        names = {name for name, _ in parse_samples(running.get("/metrics").text)}
        assert {"primeintellect_image_status", "primeintellect_image_build_status"} <= names
