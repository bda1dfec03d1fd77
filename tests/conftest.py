from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from exporter.config import Config
from exporter.logs import LogfmtFormatter
from exporter.simulator import Simulator
from tests.pki import Pki, make_pki
from tests.support import CANARY_API_KEY, Daemon, RunningExporter


@pytest.fixture(autouse=True)
def _api_key_never_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The canary key of every test appears in no log record: message, fields or traceback."""
    yield
    for record in caplog.get_records("setup") + caplog.get_records("call"):
        rendered = LogfmtFormatter().format(record)
        assert CANARY_API_KEY not in rendered, f"API key logged: {rendered[:200]}"


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

    def start(config: Config, **options: Any) -> RunningExporter:
        running = RunningExporter(config, **options).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.kill()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with a server and two client certificates, and a client of another CA."""
    return make_pki(tmp_path_factory.mktemp("pki"))
