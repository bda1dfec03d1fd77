"""The ``build status changed`` log line of a build that failed: it says what the build failed
with, from the build's own error message, else its artifacts'. No HTTP; a driven clock."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from exporter.api import Answer
from exporter.models import Build, Outcome, parse_build
from exporter.poller import Poller, PollSettings
from exporter.store import BuildStore
from exporter.telemetry import Telemetry
from tests.helpers.clock import DrivenClock

CHANGED = "build status changed"


def failed(error_message: str | None, *artifact_errors: tuple[str, str]) -> Build:
    document: dict[str, Any] = {
        "id": "b1",
        "imageName": "trainer",
        "imageTag": "v2",
        "status": "FAILED",
        "createdAt": "2026-01-01T00:00:00Z",
        "startedAt": "2026-01-01T00:00:10Z",
        "completedAt": "2026-01-01T00:01:00Z",
        "errorMessage": error_message,
        "artifacts": [
            {
                "id": f"b1-{index}",
                "artifactType": kind,
                "status": "FAILED",
                "errorMessage": message,
                "createdAt": "2026-01-01T00:00:00Z",
            }
            for index, (kind, message) in enumerate(artifact_errors)
        ],
    }
    return parse_build(json.dumps(document).encode())


class OneAnswer:
    def __init__(self, build: Build) -> None:
        self.build = build

    async def fetch(self, build_id: str) -> Answer[Build]:
        return Answer(Outcome.OK, self.build)

    def credentials_generation(self) -> int:
        return 0


def status_change_logged(build: Build, caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    """Poll the build once on a driven clock; the one status change line it logged."""
    clock = DrivenClock()
    telemetry = Telemetry(clock.monotonic)
    settings = PollSettings(interval=30, stale_after=900, requests_per_second=4, max_concurrency=1)
    poller = Poller(
        OneAnswer(build), BuildStore(), telemetry, settings, wall_clock=clock.wall, clock=clock
    )
    poller.set_builds([build.id])
    with caplog.at_level(logging.INFO, logger="exporter.poller"):
        assert asyncio.run(poller.poll_once())
    [record] = [record for record in caplog.records if record.getMessage() == CHANGED]
    return record


def test_a_failed_builds_status_line_says_the_builds_own_error_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    build = failed("2 of 2 artifacts failed", ("CONTAINER_IMAGE", "COPY failed"))
    record = status_change_logged(build, caplog)
    assert record.__dict__["status"] == "FAILED"
    assert record.__dict__["error_message"] == "2 of 2 artifacts failed"


def test_a_failed_builds_status_line_without_its_own_message_says_its_artifacts_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    build = failed(
        None, ("CONTAINER_IMAGE", "COPY failed: no such file"), ("VM_SANDBOX", "disk quota")
    )
    record = status_change_logged(build, caplog)
    assert (
        record.__dict__["error_message"]
        == "container: COPY failed: no such file; vm_sandbox: disk quota"
    )
