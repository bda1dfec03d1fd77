from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from exporter.config import Config
from exporter.simulator import Simulator
from tests.support import CANARY_API_KEY, RunningExporter


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    """A fake API on loopback that accepts the canary key and knows no builds yet."""
    with Simulator(CANARY_API_KEY) as running:
        yield running


StartExporter = Callable[..., RunningExporter]


@pytest.fixture
def start_exporter() -> Iterator[StartExporter]:
    """Start in-process exporters over real HTTP; each is stopped after the test."""
    started: list[RunningExporter] = []

    def start(config: Config, *, wall_clock: Callable[[], float] = time.time) -> RunningExporter:
        running = RunningExporter(config, wall_clock=wall_clock).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
