"""The exporter behind the golden files: one build of each status, one undocumented, and one
seen queued, then finished (its start and its finish observed)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from exporter.demo.simulator import BuildPlan, Simulator
from tests.helpers.support import (
    CANARY_API_KEY,
    EPOCH,
    RunningExporter,
    fixed_plans,
    make_config,
    wait_until,
)

# The wall-clock time the exporter under test believes it polls at.
POLL_TIME = EPOCH + 86400.0

FINISHING = BuildPlan(
    "golden-finishing", "trainer", "v3", EPOCH, pending=10, uploading=20, building=300
)
UNDOCUMENTED = {
    "id": "golden-undocumented",
    "imageName": "sandbox",
    "imageTag": "edge",
    "status": "QUARANTINED",
    "createdAt": "2026-01-01T00:00:00",
    "startedAt": "2026-01-01T01:00:00+01:00",
    "completedAt": None,
    "region": "eu-west",
    "artifacts": [
        {
            "id": "golden-undocumented-a",
            "artifactType": "WASM_MODULE",
            "status": "QUARANTINED",
            "createdAt": "2026-01-01T00:00:00.000000001Z",
        },
        {"id": "golden-undocumented-b", "status": "BUILDING", "createdAt": "2026-01-01T00:00:00Z"},
    ],
}
MISSING = "golden-missing"


@contextmanager
def golden_exporter() -> Iterator[RunningExporter]:
    """An exporter that has seen one build of each status, one undocumented, one start and finish.

    Tests share one per module: they only read from it.
    """
    with Simulator(CANARY_API_KEY, fixed_plans()) as simulator:
        # Still queued (PENDING, no startedAt) at its first poll: its start is observed.
        simulator.set_payload(FINISHING.build_id, FINISHING.payload(EPOCH + 5))
        simulator.set_payload("golden-undocumented", UNDOCUMENTED)
        # The build's own error message, which the official client reads though the spec
        # leaves it out.
        failed = simulator.payload("golden-failed")
        assert failed is not None
        assert failed["status"] == "FAILED"
        simulator.set_payload(
            "golden-failed", {**failed, "errorMessage": "1 of 1 artifacts failed"}
        )
        build_ids = [*simulator.build_ids, FINISHING.build_id, "golden-undocumented", MISSING]
        running = RunningExporter(
            make_config(simulator.base_url, build_ids), wall_clock=lambda: POLL_TIME
        ).start()
        try:
            running.wait_until_all_polled()
            simulator.set_payload(FINISHING.build_id, FINISHING.payload(EPOCH + 1000))
            wait_until(
                lambda: running.exporter.store.snapshot().records[FINISHING.build_id].finished,
                message="the finishing build to finish",
            )
            yield running
        finally:
            running.stop()
