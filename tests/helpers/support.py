"""Shared test helpers: an in-process exporter over real HTTP, configs, waiting, parsing."""

from __future__ import annotations

import asyncio
import email.utils
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from exporter.app import Exporter
from exporter.budget import Clock
from exporter.config.credentials import ApiKeySource
from exporter.config.schema import Config, ConfigFile
from exporter.demo.simulator import ArtifactPlan, BuildPlan, Simulator
from exporter.metrics import health_families, per_build_families, summary_families
from exporter.models import ARTIFACT_TYPES, BUILD_STATUSES, MAX_LABEL_LENGTH
from exporter.store import Snapshot
from exporter.web.connections import ServerLimits
from exporter.web.server import MetricsServer
from tests.helpers.clock import DrivenClock

SCRIPT = str(Path(sys.executable).parent / "primeintellect-build-exporter")
SIMULATOR_SCRIPT = str(Path(sys.executable).parent / "primeintellect-build-simulator")
CANARY_API_KEY = "pk-canary-0b7f5e2d9c4a41e8b3f6a1d2c9e8f7a6"
REPOSITORY = Path(__file__).resolve().parents[2]
# A signal must end the exporter promptly, and real time is the point: a quiet machine takes
# about 0.15 s from the signal to the exit; ten times that, rounded up, bounds it on a busy one.
SIGNAL_EXIT_BOUND = 2.0
# 2026-01-01T00:00:00Z: every fixed timestamp of the golden builds counts from here.
EPOCH = 1767225600.0


def wait_until(
    condition: Callable[[], Any], *, timeout: float = 30.0, message: str = "condition"
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(0.02)


def make_config(
    base_url: str,
    build_ids: Iterable[str],
    *,
    api_key: str = CANARY_API_KEY,
    interval: str = "1s",
    stale_after: str = "15m",
    timeout: str = "2s",
    requests_per_second: float = 100.0,
    max_concurrency: int = 4,
    max_response_size: str = "1MiB",
    listen_address: str = "127.0.0.1:0",
    max_interval: str | None = None,
    state_path: Path | None = None,
    shard: tuple[int, int] | None = None,
    finished_build_retention: str | None = None,
    discovery: dict[str, object] | None = None,
    build_discovery: dict[str, object] | None = None,
) -> Config:
    """A valid config pointing at a loopback API, with the key given directly; ``discovery``
    is the ``discovery.images`` section, ``build_discovery`` the ``discovery.builds`` one."""
    polling = {"interval": interval, "stale_after": stale_after}
    if max_interval is not None:
        polling["max_interval"] = max_interval
    extra: dict[str, object] = {}
    if state_path is not None:
        extra["state"] = {"path": str(state_path)}
    if shard is not None:
        extra["shard"] = {"index": shard[0], "count": shard[1]}
    if finished_build_retention is not None:
        extra["metrics"] = {"finished_build_retention": finished_build_retention}
    sections = {"images": discovery, "builds": build_discovery}
    if any(section is not None for section in sections.values()):
        extra["discovery"] = {name: s for name, s in sections.items() if s is not None}
    file = ConfigFile.model_validate(
        {
            **extra,
            "api": {
                "base_url": base_url,
                "timeout": timeout,
                "requests_per_second": requests_per_second,
                "max_concurrency": max_concurrency,
                "max_response_size": max_response_size,
            },
            "polling": polling,
            "builds": list(build_ids),
            "web": {"listen_address": listen_address},
        }
    )
    return Config(
        source=Path("test.yaml"),
        file=file,
        api_key=ApiKeySource(value=SecretStr(api_key)),
        build_ids=tuple(file.builds),
    )


class RunningExporter:
    """An exporter serving on loopback from a background thread with its own event loop."""

    def __init__(
        self,
        config: Config,
        *,
        wall_clock: Callable[[], float] | None = None,
        web_config_file: Path | None = None,
        load_config: Callable[[], Config] | None = None,
        enable_lifecycle: bool = False,
        limits: ServerLimits | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._limits = limits
        self.exporter = Exporter(
            config,
            # A driven clock brings its own wall time, which moves with it.
            wall_clock=wall_clock or (clock.wall if isinstance(clock, DrivenClock) else time.time),
            load_config=load_config,
            enable_lifecycle=enable_lifecycle,
            clock=clock,
        )
        self._web_config_file = web_config_file
        self.url = ""
        self._listening = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="exporter-under-test", daemon=True)

    def start(self) -> RunningExporter:
        self._thread.start()
        if not self._listening.wait(10) or self._error is not None:
            raise RuntimeError(f"exporter did not start: {self._error!r}")
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:
            self._error = error
            self._listening.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = self.exporter.create_server(self._web_config_file, self._limits)
        await self.exporter.serve(self._stop, server, self._on_listening)

    def _on_listening(self, url: str) -> None:
        self.url = url
        self._listening.set()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive(), "exporter did not stop within 10s"

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> httpx.Response:
        """GET a path; every answer is checked for the API key, which must never appear."""
        response = httpx.get(self.url + path, headers=dict(headers or {}), timeout=10)
        assert CANARY_API_KEY.encode() not in response.content
        return response

    def get_raw(
        self, path: str, headers: Mapping[str, str] | None = None
    ) -> tuple[httpx.Headers, bytes]:
        """Headers and body exactly as sent, without content decoding."""
        with (
            httpx.Client(timeout=10) as client,
            client.stream("GET", self.url + path, headers=dict(headers or {})) as response,
        ):
            return response.headers, b"".join(response.iter_raw())

    def metrics_text(self) -> str:
        response = self.get("/metrics")
        response.raise_for_status()
        return response.text

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return parse_samples(self.metrics_text())

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples().get((name, frozenset(labels.items())))

    def wait_until_all_polled(self, timeout: float = 10.0) -> None:
        wait_until(
            lambda: self.exporter.store.snapshot().all_polled,
            timeout=timeout,
            message="every build polled once",
        )


class ServerThread:
    """A bare MetricsServer on its own event loop in a background thread."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server
        self.url = server.url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def parse_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a text exposition, keyed by name and label set."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def family_blocks(text: str) -> dict[str, str]:
    """The exposition split into one block per family (``# HELP`` through its samples)."""
    blocks: dict[str, str] = {}
    current = ""
    for line in text.splitlines(keepends=True):
        if line.startswith("# HELP "):
            current = line.split(" ", 3)[2]
            blocks[current] = ""
        if current:
            blocks[current] += line
    return blocks


def find_binary(name: str, package: str = "prometheus") -> str:
    """Path of a required binary: fails under CI when missing, skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (Debian package '{package}' provides it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; .ci/run must install it")
        pytest.skip(reason)
    return path


def fixed_plans() -> list[BuildPlan]:
    """Builds whose answers never change: one per documented status, at fixed timestamps."""
    container = ArtifactPlan("CONTAINER_IMAGE")
    sandbox = ArtifactPlan("VM_SANDBOX")
    return [
        BuildPlan("golden-pending", "trainer", "v1", EPOCH, pending=math.inf),
        BuildPlan("golden-uploading", "trainer", "v2", EPOCH, pending=30, uploading=math.inf),
        BuildPlan(
            "golden-building",
            "inference",
            "2026.01",
            EPOCH,
            pending=30,
            uploading=60,
            building=math.inf,
            artifacts=(container, sandbox),
        ),
        BuildPlan(
            "golden-completed",
            "inference",
            "2026.02",
            EPOCH,
            pending=30,
            uploading=60,
            building=600,
            artifacts=(container, sandbox),
        ),
        BuildPlan(
            "golden-failed",
            "eval",
            "canary",
            EPOCH,
            pending=12.5,
            uploading=20,
            building=100,
            outcome="FAILED",
            artifacts=(
                ArtifactPlan("CONTAINER_IMAGE", 'step 3/9: "pip install" failed\nexit code 1'),
                sandbox,
            ),
        ),
        BuildPlan(
            "golden-cancelled",
            "data-prep",
            "nightly",
            EPOCH,
            pending=45,
            uploading=0,
            building=0,
            outcome="CANCELLED",
        ),
    ]


def environment(**extra: str) -> dict[str, str]:
    """The test process's environment without Prime Intellect settings, plus ``extra``.

    HOME names no directory, so a key saved by ``prime login`` on this machine is never read.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
    base["HOME"] = "/nonexistent"
    return {**base, **extra}


class Daemon:
    """The console script running as a daemon, stopped and reaped after the test.

    ``wrapper`` is a command that ends by running the rest of its arguments in its own place
    (``exec``), such as ``unshare``: signals then reach the exporter itself.
    """

    def __init__(self, *arguments: str, env: dict[str, str], wrapper: tuple[str, ...] = ()) -> None:
        self.process = subprocess.Popen(
            [*wrapper, SCRIPT, *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.stderr_lines: list[str] = []
        self.url = ""

    def wait_for_url(self) -> str:
        """Read log lines until the 'listening' line gives the URL."""
        assert self.process.stderr is not None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            self.stderr_lines.append(line)
            match = re.search(r"url=(https?://\S+)", line) or re.search(
                r'"url": "(https?://[^"]+)"', line
            )
            if match:
                self.url = match.group(1)
                return self.url
        pytest.fail(f"no 'listening' log line; stderr: {''.join(self.stderr_lines)}")

    def stop(self, signal_number: int = signal.SIGTERM) -> tuple[int, float, str]:
        """Send the signal; exit code, seconds to exit, and the rest of stderr."""
        started = time.monotonic()
        self.process.send_signal(signal_number)
        _, rest = self.process.communicate(timeout=15)
        return (
            self.process.returncode,
            time.monotonic() - started,
            "".join(self.stderr_lines) + rest,
        )

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=10)


def run_script(
    *arguments: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        env=env if env is not None else environment(),
        check=False,
    )


def build_families(snapshot: Snapshot, max_artifacts_per_build: int = 64) -> list[Metric]:
    """Every store-derived family as prometheus_client objects: the reference that the
    exporter's own line writer is checked against, and benchmarked against."""
    return [
        *per_build_families(snapshot.records.values(), max_artifacts_per_build),
        *summary_families(snapshot),
        *health_families(snapshot.health),
    ]


# -- builds and answers ------------------------------------------------------------------------


def forever_building(build_id: str) -> BuildPlan:
    return BuildPlan(build_id, "app", "v1", EPOCH, 10, 10, float("inf"))


def polls(simulator: Simulator, build_id: str) -> int:
    return len(simulator.requests(build_id))


def assert_label_value_is_clean(name: str, label: str, value: str) -> None:
    where = f"{name}{{{label}=...}}"
    assert len(value) <= MAX_LABEL_LENGTH, f"{where} is {len(value)} characters long"
    assert not {"\n", "\r"} & set(value), f"{where} spans lines: {value!r}"
    bad = [c for c in value if unicodedata.category(c) in {"Cc", "Cs", "Zl", "Zp"}]
    assert not bad, f"{where} holds control characters or surrogates: {bad!r}"
    value.encode("utf-8")


# -- hostile answer documents, for property tests -----------------------------------------------

# Deterministic in CI: the same examples on every run, nothing saved between runs.
DETERMINISTIC = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strings -------------------------------------------------------------------------------------

NASTY_CHARACTERS = [
    *"\x00\x01\t\n\r\x0b\x0c\x1b\x7f\x85\u2028\u2029",  # control characters and line breaks
    *"\ud800\udbff\udc00\udfff",  # lone surrogates: JSON can carry them, UTF-8 cannot
    *'"\\{}=,# ',  # what the exposition format escapes or splits on
    *"<>&'",  # what HTML would read as markup
    *"…\ufffd\ufeff\u200b\uffffé😀",
]
characters = st.one_of(st.characters(), st.sampled_from(NASTY_CHARACTERS))
short_texts = st.text(characters, max_size=12)
texts = st.one_of(
    short_texts,
    short_texts,
    st.sampled_from(["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", '"><b x="']),
    # Long ones, cheaply: past the 256-character limit, with nasty characters at the cut.
    st.builds(lambda unit, count: unit * count, short_texts, st.integers(20, 400)),
    st.builds(
        lambda unit, count: unit * count,
        st.sampled_from(["x", "é", "\n", "\ud800", "😀", '"\\']),
        st.integers(250, 3000),
    ),
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | texts,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=5,
)


def mostly(right: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The right kind of value most of the time, any JSON value otherwise."""
    return st.one_of(right, right, right, json_values)


# -- timestamps ----------------------------------------------------------------------------------

offsets = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
# From year 1 to 9999, naive or with a UTC offset of up to a day either way.
moments = st.one_of(
    st.datetimes(datetime(1, 1, 1), datetime(9999, 12, 31)),  # noqa: DTZ001 (naive on purpose)
    st.datetimes(
        datetime(1, 1, 2),  # noqa: DTZ001 (the zone comes from the strategy)
        datetime(9999, 12, 30),  # noqa: DTZ001
        timezones=st.one_of(st.just(UTC), offsets),
    ),
)
TIMESTAMP_STYLES = (
    "iso",
    "iso-milliseconds",
    "iso-z",
    "space",
    "date",
    "rfc2822",
    "unix",
    "compact",
    "nanoseconds",
)


def format_moment(moment: datetime, style: str) -> str:
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    match style:
        case "iso":
            return moment.isoformat()
        case "iso-milliseconds":
            return moment.isoformat(timespec="milliseconds")
        case "iso-z":
            return aware.astimezone(UTC).isoformat().replace("+00:00", "Z")
        case "space":
            return moment.isoformat(sep=" ")
        case "date":
            return moment.date().isoformat()
        case "rfc2822":
            return email.utils.format_datetime(moment)
        case "unix":
            return str(int(aware.timestamp()))
        case "compact":
            return moment.strftime("%Y%m%dT%H%M%S")
        case _:
            return moment.strftime("%Y-%m-%dT%H:%M:%S") + ".123456789Z"


timestamps = st.one_of(
    st.builds(format_moment, moments, st.sampled_from(TIMESTAMP_STYLES)),
    st.sampled_from(
        [
            "",
            "now",
            "2026-13-45T25:61:61Z",
            "2026-06-30T23:59:60Z",
            "0000-00-00T00:00:00Z",
            "-0001-01-01T00:00:00Z",
            "1e308",
            "-1",
            "9" * 30,
            "\uff12\uff10\uff12\uff16-01-01T00:00:00Z",  # full-width digits
            "2026-01-01T00:00:00+24:00",
        ]
    ),
    texts,
    json_values,
)

# -- documents -----------------------------------------------------------------------------------


def shaped(
    required: dict[str, st.SearchStrategy[Any]], optional: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with all required fields (most often) or a random subset, plus unknown ones."""
    complete = st.fixed_dictionaries(required, optional=optional)
    partial = st.fixed_dictionaries({}, optional={**required, **optional})
    extras = st.dictionaries(st.text(max_size=8), json_values, max_size=2)
    return st.builds(lambda extra, known: {**extra, **known}, extras, complete | complete | partial)


statuses = mostly(st.sampled_from([*BUILD_STATUSES, "UNKNOWN", "", "building"]) | texts)
optional_texts = st.none() | texts

artifacts = shaped(
    {
        "id": mostly(st.sampled_from(["a1", "a2", "a1\n"]) | texts),
        "status": statuses,
        "createdAt": timestamps,
    },
    {
        "artifactType": mostly(st.sampled_from([*ARTIFACT_TYPES, "WASM_MODULE", None]) | texts),
        "fullImagePath": mostly(optional_texts),
        "errorMessage": mostly(optional_texts),
        "startedAt": st.none() | timestamps,
        "completedAt": st.none() | timestamps,
    },
)


def documents(build_id: str) -> st.SearchStrategy[dict[str, Any]]:
    other_ids = st.sampled_from([build_id, build_id, "someone-else", build_id.upper()])
    return shaped(
        {
            "id": mostly(other_ids),
            "imageName": mostly(texts),
            "imageTag": mostly(texts),
            "status": statuses,
            "createdAt": timestamps,
        },
        {
            "startedAt": st.none() | timestamps,
            "completedAt": st.none() | timestamps,
            "errorMessage": mostly(optional_texts),
            "error_message": mostly(optional_texts),
            "artifacts": mostly(st.none() | st.lists(mostly(artifacts), max_size=4)),
        },
    )
