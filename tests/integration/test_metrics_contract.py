"""The metric contract, end to end: simulator → exporter → /metrics over real HTTP."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import golden
from tests.helpers.support import (
    REPOSITORY,
    RunningExporter,
    family_blocks,
)

GOLDEN_DIRECTORY = REPOSITORY / "tests" / "golden"
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def contract_part(exposition: str) -> str:
    """The families whose content is fixed by the simulator's answers and the config (not by
    timing): the builds', and the state's (no state.path)."""
    return "".join(
        block
        for name, block in family_blocks(exposition).items()
        if name.startswith(("primeintellect_image_", "primeintellect_exporter_state_"))
        or name == "primeintellect_exporter_builds"
    )


@pytest.fixture(scope="module")
def golden_exporter() -> Iterator[RunningExporter]:
    """Shared by the module: the tests only read from it."""
    with golden.golden_exporter() as running:
        yield running


@pytest.mark.parametrize(
    ("accept", "golden_name"),
    [("", "metrics.prom"), (OPENMETRICS, "metrics.openmetrics")],
    ids=["text", "openmetrics"],
)
def test_exposition_matches_the_golden_file(
    golden_exporter: RunningExporter, accept: str, golden_name: str
) -> None:
    response = golden_exporter.get("/metrics", headers={"Accept": accept} if accept else None)
    actual = contract_part(response.text)
    golden = GOLDEN_DIRECTORY / golden_name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(actual)
    assert golden.exists(), f"{golden} is missing; run with UPDATE_GOLDEN=1 to create it"
    assert actual == golden.read_text(), (
        f"exposition differs from {golden}; review the diff, then UPDATE_GOLDEN=1"
    )


def test_every_contract_metric_is_exposed(golden_exporter: RunningExporter) -> None:
    names = set(family_blocks(golden_exporter.metrics_text()))
    contract = {
        "primeintellect_image_build_info",
        "primeintellect_image_build_status",
        "primeintellect_image_build_created_timestamp_seconds",
        "primeintellect_image_build_started_timestamp_seconds",
        "primeintellect_image_build_completed_timestamp_seconds",
        "primeintellect_image_build_queued_seconds",
        "primeintellect_image_build_duration_seconds",
        "primeintellect_image_build_artifacts",
        "primeintellect_image_build_artifact_info",
        "primeintellect_image_build_artifact_duration_seconds",
        "primeintellect_image_build_artifact_error_info",
        "primeintellect_image_build_last_poll_success",
        "primeintellect_image_build_last_poll_success_timestamp_seconds",
        "primeintellect_image_build_last_poll_error",
        "primeintellect_image_builds_finished_total",
        "primeintellect_image_builds_finished_duration_seconds",
        "primeintellect_exporter_api_requests_total",
        "primeintellect_exporter_api_request_duration_seconds",
        "primeintellect_exporter_api_up",
        "primeintellect_exporter_rate_limited_until_timestamp_seconds",
        "primeintellect_exporter_builds",
        "primeintellect_exporter_config_last_reload_successful",
        "primeintellect_exporter_build_info",
        "process_resident_memory_bytes",
        "python_info",
    }
    assert contract <= names, f"missing: {sorted(contract - names)}"


def test_status_is_one_hot_over_documented_statuses(golden_exporter: RunningExporter) -> None:
    samples = [
        sample
        for family in text_string_to_metric_families(golden_exporter.metrics_text())
        if family.name == "primeintellect_image_build_status"
        for sample in family.samples
    ]
    expected_current = {
        "golden-pending": "PENDING",
        "golden-uploading": "UPLOADING",
        "golden-building": "BUILDING",
        "golden-completed": "COMPLETED",
        "golden-failed": "FAILED",
        "golden-cancelled": "CANCELLED",
        "golden-finishing": "COMPLETED",
        "golden-undocumented": "UNKNOWN",
    }
    for build_id, current in expected_current.items():
        series = {s.labels["status"]: s.value for s in samples if s.labels["build_id"] == build_id}
        documented = {"PENDING", "UPLOADING", "BUILDING", "COMPLETED", "FAILED", "CANCELLED"}
        assert documented <= set(series), build_id
        assert [status for status, value in series.items() if value == 1.0] == [current]
        assert ("UNKNOWN" in series) == (current == "UNKNOWN")


def test_a_build_seen_finishing_is_counted_once_with_its_duration(
    golden_exporter: RunningExporter,
) -> None:
    finished = ("image_name", "trainer"), ("status", "COMPLETED")
    samples = golden_exporter.samples()
    assert samples[("primeintellect_image_builds_finished_total", frozenset(finished))] == 1.0
    assert (
        samples[("primeintellect_image_builds_finished_duration_seconds_sum", frozenset(finished))]
        == 320.0
    )
    # Builds that were already finished at their first poll are not counted: their images'
    # series are at 0.
    counts = {
        labels: value
        for (name, labels), value in samples.items()
        if name == "primeintellect_image_builds_finished_total"
    }
    assert counts[frozenset({("image_name", "eval"), ("status", "FAILED")})] == 0.0
    assert sum(counts.values()) == 1.0


def test_a_build_seen_queued_then_started_observes_its_queue_time_once(
    golden_exporter: RunningExporter,
) -> None:
    samples = golden_exporter.samples()
    trainer = frozenset({("image_name", "trainer")})
    name = "primeintellect_image_builds_queue_duration_seconds"
    # Created at EPOCH, pending for 10 s: startedAt - createdAt.
    assert samples[(f"{name}_count", trainer)] == 1.0
    assert samples[(f"{name}_sum", trainer)] == 10.0
    assert samples[(f"{name}_bucket", trainer | {("le", "5.0")})] == 0.0
    assert samples[(f"{name}_bucket", trainer | {("le", "15.0")})] == 1.0
    # Builds already started at their first poll are not observed: their images' are empty.
    counts = {
        labels: value for (sample, labels), value in samples.items() if sample == f"{name}_count"
    }
    assert counts[frozenset({("image_name", "eval")})] == 0.0
    assert sum(counts.values()) == 1.0


def test_openmetrics_response_parses_and_ends_with_eof(golden_exporter: RunningExporter) -> None:
    response = golden_exporter.get("/metrics", headers={"Accept": OPENMETRICS})
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    assert response.text.count("# EOF") == 1
    names = {family.name for family in openmetrics_families(response.text)}  # type: ignore[no-untyped-call]
    assert {"primeintellect_image_build", "primeintellect_exporter_api_requests"} <= names


def test_openmetrics_buckets_carry_the_build_of_their_last_observation_and_text_none(
    golden_exporter: RunningExporter,
) -> None:
    response = golden_exporter.get("/metrics", headers={"Accept": OPENMETRICS})
    exemplars = {
        (sample.name, sample.labels["le"]): sample.exemplar
        for family in openmetrics_families(response.text)  # type: ignore[no-untyped-call]
        for sample in family.samples
        if sample.exemplar is not None
    }
    finished = "primeintellect_image_builds_finished_duration_seconds_bucket"
    queued = "primeintellect_image_builds_queue_duration_seconds_bucket"
    assert set(exemplars) == {(finished, "600.0"), (queued, "15.0")}
    build = {"build_id": golden.FINISHING.build_id}
    assert exemplars[(finished, "600.0")].labels == build
    assert exemplars[(finished, "600.0")].value == 320.0
    assert exemplars[(queued, "15.0")].labels == build
    assert exemplars[(queued, "15.0")].value == 10.0
    assert float(exemplars[(queued, "15.0")].timestamp) == golden.POLL_TIME
    assert " # {" not in golden_exporter.metrics_text()


def test_gzip_response_is_one_gzip_member_of_the_same_exposition(
    golden_exporter: RunningExporter,
) -> None:
    for accept in ("", OPENMETRICS):
        plain = golden_exporter.get("/metrics", headers={"Accept": accept}).content
        headers, raw = golden_exporter.get_raw(
            "/metrics", headers={"Accept": accept, "Accept-Encoding": "gzip"}
        )
        assert headers["Content-Encoding"] == "gzip"
        # A single member: decoders that stop after the first member still see everything.
        decompressor = zlib.decompressobj(wbits=31)
        unpacked = decompressor.decompress(raw)
        assert decompressor.eof
        assert decompressor.unused_data == b""
        assert contract_part(unpacked.decode()) == contract_part(plain.decode())
        assert unpacked.endswith(b"# EOF\n") == (accept == OPENMETRICS)
