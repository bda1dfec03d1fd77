from __future__ import annotations

import concurrent.futures.thread
import contextlib
import gc
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.config.schema import Config
from exporter.demo.simulator import Simulator
from exporter.logs import LogfmtFormatter
from tests.helpers.pki import Pki, make_pki
from tests.helpers.support import CANARY_API_KEY, Daemon, RunningExporter

# Real seconds a test's own threads and processes get to end after it, on a busy machine: they
# were told to stop by the test's own teardown, so on a quiet one they are gone at once. (The
# test of this check sets it shorter.)
LEAK_GRACE_SECONDS = float(os.environ.get("LEAK_GRACE_SECONDS", "10"))


def child_processes() -> set[int]:
    """Process IDs of this process's living children (zombies included)."""
    children: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            children.update(int(pid) for pid in (task / "children").read_text().split())
        except OSError:
            continue
    return children


def _serves_a_pool(thread: threading.Thread) -> bool:
    """A worker of a thread pool or a request thread of a ThreadingHTTPServer: it belongs to
    its pool or server, maybe one a whole module shares, and is checked with its owner."""
    target = getattr(thread, "_target", None)
    return target is concurrent.futures.thread._worker or thread.name.endswith(
        "(process_request_thread)"
    )


class LeakCheck:
    """Threads and processes a test or a module left running, each reported once."""

    def __init__(self) -> None:
        self.reported: set[threading.Thread] = set()

    def assert_none_left(
        self, threads_before: set[threading.Thread], children_before: set[int], *, pools: bool
    ) -> None:
        """Fail on the threads (with ``pools``, also pool workers and request threads) and
        processes started since, once the grace is over; the processes are killed."""
        threads, children = self._leftovers(threads_before | self.reported, children_before, pools)
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        self.reported.update(threads)
        assert not threads, f"threads left running: {[thread.name for thread in threads]}"
        assert not children, f"child processes left running: {sorted(children)}"

    @staticmethod
    def _leftovers(
        threads_before: set[threading.Thread], children_before: set[int], pools: bool
    ) -> tuple[list[threading.Thread], set[int]]:
        deadline = time.monotonic() + LEAK_GRACE_SECONDS
        while True:
            threads = [
                thread
                for thread in threading.enumerate()
                if thread not in threads_before
                and thread.is_alive()
                and (pools or not _serves_a_pool(thread))
            ]
            children = child_processes() - children_before
            if (not threads and not children) or time.monotonic() > deadline:
                return threads, children
            time.sleep(0.02)


def collect_garbage(*, everything: bool = False) -> None:
    """Free unreachable objects, so an unclosed socket or pipe among them raises its
    ResourceWarning (an error, by filterwarnings) now; then set the survivors aside, so the
    next collection scans only what was made since. ``everything``: the survivors set aside
    before too, which later tests and teardowns may have let go."""
    if everything:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True, scope="session")
def _leak_check() -> Iterator[LeakCheck]:
    collect_garbage()
    yield LeakCheck()
    gc.unfreeze()


@pytest.fixture(autouse=True, scope="module")
def _no_leaks_from_the_module(_leak_check: LeakCheck) -> Iterator[None]:
    """What a module's shared set-ups start (an exporter's thread pools, a server's request
    threads) ends with them, and what they open is closed."""
    threads_before = set(threading.enumerate())
    children_before = child_processes()
    yield
    collect_garbage(everything=True)
    _leak_check.assert_none_left(threads_before, children_before, pools=True)


@pytest.fixture(autouse=True)
def _no_leaks(_leak_check: LeakCheck) -> Iterator[None]:
    """Every test ends its own threads and processes, and closes its own files, sockets and
    pipes: a leak fails the test that leaked, not a later one that happened to collect it."""
    threads_before = set(threading.enumerate())
    children_before = child_processes()
    yield
    collect_garbage()
    _leak_check.assert_none_left(threads_before, children_before, pools=False)


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
def stopping() -> Iterator[list[RunningExporter]]:
    """Exporters a test started itself, each stopped after the test."""
    started: list[RunningExporter] = []
    yield started
    for running in started:
        running.stop()


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
