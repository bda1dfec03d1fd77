"""A team's images in the simulator, and an exporter that lists them."""

from __future__ import annotations

from typing import Any

from exporter.demo.simulator import ArtifactPlan, BuildPlan, Simulator
from tests.helpers.clock import DrivenClock
from tests.helpers.support import EPOCH, RunningExporter, make_config

TEAM = "team-1"
TWO_TYPES = (ArtifactPlan("CONTAINER_IMAGE"), ArtifactPlan("VM_SANDBOX"))


def team_images(count: int) -> list[BuildPlan]:
    return [
        BuildPlan(f"img-{n:04}", f"image-{n:04}", "v1", EPOCH, 5, 5, 5, artifacts=TWO_TYPES)
        for n in range(count)
    ]


def discovering(
    simulator: Simulator,
    builds: list[str] | None = None,
    clock: DrivenClock | None = None,
    **options: Any,
) -> RunningExporter:
    config = make_config(
        simulator.base_url,
        builds or [],
        discovery={"enabled": True, "interval": "30s", "team_id": TEAM},
        **options,
    )
    if clock is None:
        return RunningExporter(config).start()
    return RunningExporter(config, clock=clock).start()


def listed(running: RunningExporter) -> float:
    at = running.exporter.inventory.snapshot().listed_at
    return 0.0 if at is None else at
