"""Benchmarks: how fast /metrics is served, how cheap a refresh is, how fast builds are polled,
how much memory a build costs, and how many requests finished builds save. Prints one table.

    .venv/bin/python benchmarks/bench.py          # or: make bench

The simulated API runs in its own process, so it does not compete with the exporter for the
interpreter lock; the scrapes use a minimal keep-alive HTTP client, so they measure the
server rather than a client library.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import logging
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import httpx
from prometheus_client.core import Metric
from pydantic import SecretStr

from exporter.api import ApiClient
from exporter.app import PerScrapeFamilies
from exporter.config.credentials import ApiKeySource
from exporter.config.schema import Config
from exporter.demo.simulator import ArtifactPlan, BuildPlan, Simulator, random_plans
from exporter.exposition import ExpositionFormat, render
from exporter.exposition_cache import Body, ExpositionCache
from exporter.metrics import exporter_families
from exporter.models import parse_build
from exporter.poller import Poller, PollSettings
from exporter.state import StateFile, StateSync, open_state
from exporter.store import BuildStore
from exporter.telemetry import Telemetry
from exporter.web.server import Endpoints, ExpositionSource, MetricsServer
from tests.helpers.support import RunningExporter, build_families, make_config

API_KEY = "pk-bench"
TEAM = "bench-team"
# The sample line of a complete image listing (not its HELP line).
LISTED = "\nprimeintellect_exporter_image_list_last_success_timestamp_seconds "
BUILDS_LISTED = "\nprimeintellect_exporter_build_list_last_success_timestamp_seconds "
SCRIPT = Path(sys.executable).parent / "primeintellect-build-exporter"
PROMETHEUS_ACCEPT = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


class FastClock:
    """A clock that runs ``speed`` times faster than the real one, waits included, so a
    benchmark sees minutes of schedule in seconds; ``wall`` is the matching wall clock."""

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self._started = time.monotonic()
        self._wall_started = time.time()

    def elapsed(self) -> float:
        return (time.monotonic() - self._started) * self.speed

    def monotonic(self) -> float:
        return self._started + self.elapsed()

    def wall(self) -> float:
        return self._wall_started + self.elapsed()

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds / self.speed):
                await event.wait()
        except TimeoutError:
            pass


@dataclass
class Row:
    measure: str
    value: str
    against: str = ""
    ratio: str = ""
    target: str = ""


# -- helpers ---------------------------------------------------------------------------------


def held_plans(count: int, prefix: str = "cmbench") -> list[BuildPlan]:
    """Builds that stay in BUILDING, two artifacts each, so every poll is a full answer."""
    return [
        BuildPlan(
            plan.build_id,
            plan.image_name,
            plan.image_tag,
            plan.created_at,
            pending=1,
            uploading=1,
            building=float("inf"),
            artifacts=plan.artifacts,
        )
        for plan in random_plans(count, time.time() - 60, random.Random(1), prefix=prefix)
    ]


def filled_store(count: int) -> BuildStore:
    """A store holding ``count`` builds in varied states, as polls would leave it."""
    rng = random.Random(2)
    now = time.time()
    plans = random_plans(count, now - 900, rng)
    store = BuildStore()
    store.track(plan.build_id for plan in plans)
    for plan in plans:
        answer = json.dumps(plan.payload(now - rng.uniform(0, 900))).encode()
        store.record_success(plan.build_id, parse_build(answer), now)
    return store


def _serve_canned(
    plans: list[BuildPlan], ready: multiprocessing.Queue[str], stop: EventType
) -> None:
    """A minimal keep-alive HTTP server with every answer made in advance.

    The threaded simulator spends its time on the interpreter lock; this one answers fast
    enough that the client side, the exporter or a bare httpx loop, is what gets measured.
    """
    now = time.time()
    answers = {}
    for plan in plans:
        body = json.dumps(plan.payload(now)).encode()
        answers[f"/api/v1/images/build/{plan.build_id}".encode()] = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    not_found = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request_line := await reader.readline():
                while await reader.readline() not in {b"\r\n", b""}:
                    pass
                path = request_line.split(b" ")[1]
                writer.write(answers.get(path, not_found))
                await writer.drain()
        except (ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ready.put(f"http://127.0.0.1:{port}")
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        server.close()

    asyncio.run(main())


def _serve_simulator(
    plans: list[BuildPlan], ready: multiprocessing.Queue[str], stop: EventType
) -> None:
    with Simulator(API_KEY, plans, team_id=TEAM) as simulator:
        ready.put(simulator.base_url)
        stop.wait()


@contextmanager
def simulator_process(plans: list[BuildPlan], *, canned: bool = False) -> Iterator[str]:
    """A simulator (or canned answers) in a child process; yields its base URL. Its builds'
    artifacts are also TEAM's image listing."""
    context = multiprocessing.get_context("fork")
    ready: multiprocessing.Queue[str] = context.Queue()
    stop = context.Event()
    target = _serve_canned if canned else _serve_simulator
    process = context.Process(target=target, args=(plans, ready, stop), daemon=True)
    process.start()
    try:
        yield ready.get(timeout=60)
    finally:
        stop.set()
        process.join(10)


class RawClient:
    """A keep-alive HTTP/1.1 client that only reads the body: the server is what is timed."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self._socket = socket.create_connection((host, int(port)))
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = self._socket.makefile("rb")

    def get(self, path: str, headers: dict[str, str]) -> bytes:
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self._socket.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n{lines}\r\n".encode())
        length = 0
        while line := self._reader.readline():
            if line == b"\r\n":
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return self._reader.read(length)

    def close(self) -> None:
        self._reader.close()
        self._socket.close()


def scrape_times(
    urls: dict[str, str], headers: dict[str, str], count: int
) -> dict[str, tuple[float, float, int]]:
    """Per server: median and 95th percentile seconds of ``count`` scrapes, and the body size.

    The servers take turns, scrape by scrape, so a change in the machine's speed during the
    run weighs on all of them alike and the ratios stay fair.
    """
    clients: dict[str, RawClient] = {}
    sizes: dict[str, int] = {}
    try:
        for name, url in urls.items():
            # Connected just before its first request, which the server expects within its
            # head deadline; this first scrape also renders what is rendered once.
            clients[name] = RawClient(url)
            sizes[name] = len(clients[name].get("/metrics", headers))
        times: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(count):
            for name, client in clients.items():
                started = time.perf_counter()
                client.get("/metrics", headers)
                times[name].append(time.perf_counter() - started)
    finally:
        for client in clients.values():
            client.close()
    results = {}
    for name, measured in times.items():
        measured.sort()
        results[name] = (
            statistics.median(measured),
            measured[int(0.95 * (len(measured) - 1))],
            sizes[name],
        )
    return results


class GenerateLatestSource:
    """What an exporter built on prometheus_client does: render every scrape, gzip level 9."""

    def __init__(self, store: BuildStore, telemetry: Telemetry) -> None:
        self._store = store
        self._telemetry = telemetry

    def kept_body(self, format: ExpositionFormat, *, gzip: bool) -> Body | None:
        return None

    def body(self, format: ExpositionFormat, *, gzip: bool) -> Body:
        families = [
            *build_families(self._store.snapshot()),
            *exporter_families(self._telemetry.snapshot()),
        ]
        data = _as_prometheus_client_writes(families, format, compress=gzip)
        return Body((data,), len(data))


class StaticSource:
    """The floor: the same bytes, already made and joined, served as one object."""

    def __init__(self, source: ExpositionCache) -> None:
        self._bodies = {
            gzip: source.body(ExpositionFormat.TEXT, gzip=gzip).join() for gzip in (False, True)
        }

    def body(self, format: ExpositionFormat, *, gzip: bool) -> Body:
        data = self._bodies[gzip]
        return Body((data,), len(data))

    def kept_body(self, format: ExpositionFormat, *, gzip: bool) -> Body | None:
        return self.body(format, gzip=gzip)


def _as_prometheus_client_writes(
    families: list[Metric], format: ExpositionFormat, *, compress: bool
) -> bytes:
    """What an exporter on prometheus_client writes on every scrape: ``generate_latest``, and
    gzip at level 9 as its own handler does."""
    data = render(families, format)
    return gzip.compress(data) if compress else data


@contextmanager
def serving(sources: dict[str, ExpositionSource]) -> Iterator[dict[str, str]]:
    """Each source behind its own MetricsServer, all on one event loop in a background thread;
    yields their URLs by name."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servers = {
        name: MetricsServer(
            "127.0.0.1:0",
            Endpoints(
                metrics=source,
                snapshot=BuildStore().snapshot,
                unhealthy_reason=lambda: None,
                unready_reason=lambda: None,
                reload=None,
                internal_error=lambda component, error: None,
            ),
        )
        for name, source in sources.items()
    }
    try:
        for server in servers.values():
            asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        yield {name: server.url for name, server in servers.items()}
    finally:
        for server in servers.values():
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def rss_kib(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0])


# -- the measurements ------------------------------------------------------------------------


def measure_scrapes(count: int, scrapes: int, floor_scrapes: int) -> list[Row]:
    store = filled_store(count)
    telemetry = Telemetry()
    # What the exporter collects on every scrape: its own families and the process's.
    cache = ExpositionCache(store.snapshot, PerScrapeFamilies(telemetry).collect)
    rows = []
    # The reference renders for seconds per scrape, so it gets few scrapes; the floor is a
    # difference of tenths of a millisecond, so it gets many, in a run of its own where no
    # multi-second render (and the garbage it leaves) falls between them.
    against_reference: dict[str, ExpositionSource] = {
        "ours": cache,
        "generate_latest": GenerateLatestSource(store, telemetry),
    }
    against_floor: dict[str, ExpositionSource] = {
        "ours": cache,
        "static": StaticSource(cache),
        # The kept body without the exporter's own per-scrape families: what the server adds.
        "builds_only": ExpositionCache(store.snapshot, list),
    }
    with serving(against_reference) as reference_urls, serving(against_floor) as floor_urls:
        for label, headers in (("plain", {}), ("gzip", {"Accept-Encoding": "gzip"})):
            timings = scrape_times(reference_urls, headers, scrapes)
            ours, reference = timings["ours"], timings["generate_latest"]
            rows.append(
                Row(
                    f"/metrics {label}, {count:,} builds ({ours[2] / 1e6:.1f} MB), median / p95",
                    f"{ours[0] * 1000:.1f} / {ours[1] * 1000:.1f} ms",
                    f"generate_latest {reference[0] * 1000:.0f} / {reference[1] * 1000:.0f} ms",
                    f"{reference[0] / ours[0]:.0f}x faster",
                    ">= 20x at 10,000" if count == 10_000 else "",
                )
            )
            timings = scrape_times(floor_urls, headers, floor_scrapes)
            ours, floor, builds_only = timings["ours"], timings["static"], timings["builds_only"]
            rows.append(
                Row(
                    f"  same, against static bytes (the floor), {floor_scrapes} scrapes",
                    f"{ours[0] * 1000:.2f} ms",
                    f"static {floor[0] * 1000:.2f} ms",
                    f"{ours[0] / floor[0]:.2f}x the floor",
                    "<= 1.5x at 10,000" if count == 10_000 else "",
                )
            )
            rows.append(
                Row(
                    "  same, without the exporter's own per-scrape families",
                    f"{builds_only[0] * 1000:.2f} ms",
                    f"static {floor[0] * 1000:.2f} ms",
                    f"{builds_only[0] / floor[0]:.2f}x the floor",
                )
            )
    return rows


def _reference_body(store: BuildStore, format: ExpositionFormat, compress: bool) -> bytes:
    # The families are made inside the timing, as such an exporter makes them per scrape.
    return _as_prometheus_client_writes(build_families(store.snapshot()), format, compress=compress)


def _timed(action: Callable[..., object], *args: object, **kwargs: object) -> float:
    started = time.perf_counter()
    action(*args, **kwargs)
    return time.perf_counter() - started


def _cold_body(store: BuildStore, format: ExpositionFormat, *, gzip: bool) -> Body:
    return ExpositionCache(store.snapshot, list).body(format, gzip=gzip)


def measure_full_render(count: int) -> list[Row]:
    """A render of every build from nothing, as the first scrape after a start makes it."""
    store = filled_store(count)
    rows = []
    for label, format, compressed, target in (
        ("text", ExpositionFormat.TEXT, False, "<= 170 ms (1/10 of 1.7 s)"),
        ("OpenMetrics + gzip", ExpositionFormat.OPENMETRICS, True, "<= 290 ms (1/10 of 2.9 s)"),
    ):
        ours = min(_timed(_cold_body, store, format, gzip=compressed) for _ in range(3))
        reference = _timed(
            _as_prometheus_client_writes,
            build_families(store.snapshot()),
            format,
            compress=compressed,
        )
        rows.append(
            Row(
                f"full render, {count:,} builds, {label}",
                f"{ours * 1000:.0f} ms",
                f"generate_latest {reference * 1000:,.0f} ms",
                f"{reference / ours:.1f}x faster",
                target if count == 10_000 else "",
            )
        )
    cache = ExpositionCache(store.snapshot, list)
    ours_size = cache.body(ExpositionFormat.TEXT, gzip=True).length
    whole = len(gzip.compress(cache.body(ExpositionFormat.TEXT, gzip=False).join(), 6))
    rows.append(
        Row(
            f"  gzip body at {count:,} builds (ISA-L level 2, in primed segments)",
            f"{ours_size / 1e6:.2f} MB",
            f"zlib -6 of the whole {whole / 1e6:.2f} MB",
            f"{ours_size / whole:.2f}x its size",
        )
    )
    return rows


def measure_tracked_set_changes(count: int, repeats: int = 5) -> list[Row]:
    """The next scrape after one build is added to or removed from the tracked set."""
    store = filled_store(count)
    format = ExpositionFormat.OPENMETRICS
    full = _timed(_cold_body, store, format, gzip=True)
    cache = ExpositionCache(store.snapshot, list)
    cache.body(format, gzip=True)
    tracked = list(store.snapshot().records)
    rng = random.Random(5)
    added, removed = [], []
    for repeat in range(repeats):
        # In the middle of the IDs, where position-based chunks would all shift.
        new = f"{rng.choice(tracked)}-added-{repeat}"
        store.track([*tracked, new])
        added.append(_timed(cache.body, format, gzip=True))
        store.track(tracked)
        removed.append(_timed(cache.body, format, gzip=True))
    rows = []
    for label, times in (("adding one build to", added), ("removing one build from", removed)):
        cost = statistics.median(times)
        rows.append(
            Row(
                f"next scrape after {label} {count:,} tracked (OpenMetrics + gzip)",
                f"{cost * 1000:.1f} ms",
                f"full render {full * 1000:.0f} ms",
                f"{cost / full * 100:.1f} % of it",
                "<= 5 %",
            )
        )
    return rows


def measure_churn(count: int, changed: int, scrapes: int) -> list[Row]:
    """Scrapes with ``changed`` builds answered anew before each, against warm scrapes."""
    store = filled_store(count)
    cache = ExpositionCache(store.snapshot, PerScrapeFamilies(Telemetry()).collect)
    build_ids = list(store.snapshot().records)
    rng = random.Random(6)

    def change() -> None:
        for build_id in rng.sample(build_ids, changed):
            record = store.snapshot().records[build_id]
            assert record.build is not None
            store.record_success(build_id, record.build, time.time())

    rows = []
    with serving({"ours": cache}) as urls:
        client = RawClient(urls["ours"])
        try:
            for label, headers in (("plain", {}), ("gzip", {"Accept-Encoding": "gzip"})):
                client.get("/metrics", headers)
                # Taking turns, so a change in the machine's speed weighs on both alike.
                warm_times, churned = [], []
                for _ in range(scrapes):
                    warm_times.append(_timed(client.get, "/metrics", headers))
                    change()
                    churned.append(_timed(client.get, "/metrics", headers))
                warm = statistics.median(warm_times)
                cost = statistics.median(churned)
                rows.append(
                    Row(
                        f"/metrics {label} after {changed} of {count:,} builds changed",
                        f"{cost * 1000:.1f} ms",
                        f"warm {warm * 1000:.1f} ms",
                        f"{cost / warm:.1f}x the warm scrape",
                        "<= 2x",
                    )
                )
        finally:
            client.close()
    return rows


def _state_file_of(store: BuildStore, path: Path) -> None:
    opened = open_state(path)
    assert opened.file is not None, "the state file could not be opened"
    sync = StateSync(opened.file, opened.restored)
    sync.sync(store.snapshot())
    sync.close()


def _restarted_exporter(count: int, work: Path) -> tuple[float, float, float]:
    """Cold and warm scrape seconds (as Prometheus asks) and RSS in KiB once all four
    variants are kept, for an exporter restarted with ``count`` builds in its state file."""
    store = filled_store(count)
    _state_file_of(store, work / "state.db")
    (work / "builds.txt").write_text("\n".join(store.snapshot().records))
    config = work / "config.yaml"
    # Nothing answers at this address, and the budget is tiny: the scrapes see the restored
    # state, not polls.
    config.write_text(
        "api:\n  base_url: http://127.0.0.1:9\n  requests_per_second: 0.01\n"
        "polling:\n  interval: 1h\n  stale_after: 2h\nbuild_files: [builds.txt]\n"
        f"state:\n  path: {work}/state.db\nweb:\n  listen_address: 127.0.0.1:19895\n"
    )
    url = "http://127.0.0.1:19895"
    process, _ = _start_daemon(config, url)
    try:
        client = RawClient(url)
        try:
            prometheus = {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}
            cold = _timed(client.get, "/metrics", prometheus)
            warm = statistics.median(_timed(client.get, "/metrics", prometheus) for _ in range(11))
            for headers in ({}, {"Accept-Encoding": "gzip"}, {"Accept": PROMETHEUS_ACCEPT}):
                client.get("/metrics", headers)
        finally:
            client.close()
        return cold, warm, rss_kib(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def measure_growth(sizes: list[int]) -> list[Row]:
    """Scrape cost and memory from 0 to the largest size, each a restart from a state file."""
    results = {}
    for size in [0, *sizes]:
        with tempfile.TemporaryDirectory() as work:
            results[size] = _restarted_exporter(size, Path(work))
    empty_rss = results[0][2]
    rows = [Row("resident memory, no builds", f"{empty_rss / 1024:.1f} MiB")]
    for size in sizes:
        cold, warm, rss = results[size]
        per_build = (rss - empty_rss) / size
        rows.append(
            Row(
                f"{size:,} builds after a restart: first scrape / warm scrape (OpenMetrics + gzip)",
                f"{cold * 1000:,.0f} / {warm * 1000:.1f} ms",
                "",
                "",
                "< 2 s first scrape at 50,000" if size == 50_000 else "",
            )
        )
        rows.append(
            Row(
                "  resident memory with all four variants kept, per build above no builds",
                f"{rss / 1024:.0f} MiB, {per_build:.1f} KiB",
                target="<= 10 KiB",
            )
        )
    return rows


def measure_refresh(count: int) -> list[Row]:
    store = filled_store(count)
    cache = ExpositionCache(store.snapshot, list)
    started = time.perf_counter()
    cache.body(ExpositionFormat.TEXT, gzip=True)
    full = time.perf_counter() - started
    rng = random.Random(3)
    build_ids = list(store.snapshot().records)
    refreshes = []
    for _ in range(9):
        record = store.snapshot().records[rng.choice(build_ids)]
        assert record.build is not None
        store.record_success(record.build_id, record.build, time.time())
        started = time.perf_counter()
        cache.body(ExpositionFormat.TEXT, gzip=True)
        refreshes.append(time.perf_counter() - started)
    refresh = statistics.median(refreshes)
    return [
        Row(
            f"refresh after 1 of {count:,} builds changed (text + gzip)",
            f"{refresh * 1000:.1f} ms",
            f"full render {full * 1000:.0f} ms",
            f"{refresh / full * 100:.1f} % of it",
            "<= 5 %",
        )
    ]


async def _poll_with_exporter(base_url: str, build_ids: list[str], concurrency: int) -> float:
    client = ApiClient(
        base_url, ApiKeySource(value=SecretStr(API_KEY)), timeout=30, max_connections=concurrency
    )
    store = BuildStore()
    poller = Poller(
        client,
        store,
        Telemetry(),
        PollSettings(
            interval=3600, stale_after=7200, requests_per_second=10_000, max_concurrency=concurrency
        ),
    )
    poller.set_builds(build_ids)
    started = time.perf_counter()
    succeeded = await poller.poll_once()
    elapsed = time.perf_counter() - started
    await client.aclose()
    assert succeeded, "some polls failed"
    return len(build_ids) / elapsed


async def _poll_bare(base_url: str, build_ids: list[str], concurrency: int) -> float:
    urls = [f"{base_url}/api/v1/images/build/{build_id}" for build_id in build_ids]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(limits=limits, headers=headers) as client:
        iterator = iter(urls)

        async def worker() -> None:
            for url in iterator:
                response = await client.get(url)
                response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(urls) / (time.perf_counter() - started)


def measure_polling(count: int, concurrency: int) -> list[Row]:
    plans = held_plans(count)
    build_ids = [plan.build_id for plan in plans]
    with simulator_process(plans, canned=True) as base_url:
        asyncio.run(_poll_bare(base_url, build_ids[:500], concurrency))  # warm both sides
        bare = statistics.median(
            asyncio.run(_poll_bare(base_url, build_ids, concurrency)) for _ in range(3)
        )
        ours = statistics.median(
            asyncio.run(_poll_with_exporter(base_url, build_ids, concurrency)) for _ in range(3)
        )
    return [
        Row(
            f"builds polled per second, rate limit off, concurrency {concurrency}",
            f"{ours:,.0f}/s",
            f"bare httpx loop {bare:,.0f}/s",
            f"{ours / bare * 100:.0f} % of it",
            ">= 80 %" if concurrency == 32 else "",
        )
    ]


def measure_requests_saved(count: int, finished: int, interval: float, window: float) -> list[Row]:
    now = time.time()
    plans = [
        BuildPlan(f"done{index:05d}", "app", "v1", now - 3600, 10, 10, 60)
        for index in range(finished)
    ] + held_plans(count - finished, prefix="busy")
    with Simulator(API_KEY, plans) as simulator, tempfile.TemporaryDirectory() as work:
        Path(work, "builds.txt").write_text("\n".join(plan.build_id for plan in plans))
        config = Path(work, "config.yaml")
        config.write_text(
            f"api:\n  base_url: {simulator.base_url}\n  requests_per_second: 10000\n"
            f"  max_concurrency: 16\npolling:\n  interval: {interval:g}s\n"
            "build_files: [builds.txt]\nweb:\n  listen_address: 127.0.0.1:19897\n"
        )
        process = subprocess.Popen(
            [str(SCRIPT), "--config.file", str(config), "--log.level", "error"],
            env={**os.environ, "PRIME_API_KEY": API_KEY},
        )
        try:
            deadline = time.monotonic() + 60
            while (
                len({r.build_id for r in simulator.requests()}) < count
                and time.monotonic() < deadline
            ):
                time.sleep(0.1)
            first_round_end = time.monotonic()
            time.sleep(window)
            late = [r for r in simulator.requests() if r.at > first_round_end]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    finished_late = sum(1 for r in late if r.build_id.startswith("done"))
    per_hour = len(late) / window * 3600
    everything_per_hour = count / interval * 3600
    at_default = per_hour * interval / 30
    return [
        Row(
            f"API requests per hour, {count:,} builds of which {finished:,} finished "
            f"(interval {interval:g}s; at the default 30s: {at_default:,.0f})",
            f"{per_hour:,.0f}",
            f"poll-everything {everything_per_hour:,.0f}",
            f"{per_hour / everything_per_hour * 100:.0f} % of it",
        ),
        Row(
            f"  requests for finished builds after their final poll, over {window:g}s",
            f"{finished_late}",
            target="0",
        ),
    ]


def _start_daemon(config: Path, url: str) -> tuple[subprocess.Popen[bytes], float]:
    """The exporter as a process; returns it and the seconds until /-/ready answered 200."""
    started = time.monotonic()
    process = subprocess.Popen(
        [str(SCRIPT), "--config.file", str(config), "--log.level", "error"],
        env={**os.environ, "PRIME_API_KEY": API_KEY},
    )
    with httpx.Client(timeout=10) as client:
        deadline = started + 120
        while time.monotonic() < deadline:
            try:
                if client.get(url + "/-/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    return process, time.monotonic() - started


def _unpolled(process: subprocess.Popen[bytes], url: str) -> bool:
    """Whether the exporter still has builds waiting for their first poll."""
    if process.poll() is not None:
        return False
    # Asked as Prometheus asks, so that no other format is rendered and kept.
    headers = {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}
    text = httpx.get(url + "/metrics", headers=headers, timeout=120).text
    return 'primeintellect_exporter_builds{state="unpolled"} 0.0\n' not in text


def measure_restart(count: int, finished: int, window: float) -> list[Row]:
    """A restart of an exporter that tracks ``count`` builds, with and without a state file."""
    now = time.time()
    plans = [
        BuildPlan(f"done{index:05d}", "app", "v1", now - 3600, 10, 10, 60)
        for index in range(finished)
    ] + held_plans(count - finished, prefix="busy")
    results: dict[bool, tuple[float, int, int, int]] = {}
    with Simulator(API_KEY, plans) as simulator, tempfile.TemporaryDirectory() as work:
        Path(work, "builds.txt").write_text("\n".join(plan.build_id for plan in plans))
        for with_state in (True, False):
            config = Path(work, "config.yaml")
            state = f"state:\n  path: {work}/state.db\n" if with_state else ""
            config.write_text(
                f"api:\n  base_url: {simulator.base_url}\n  requests_per_second: 10000\n"
                "  max_concurrency: 32\npolling:\n  interval: 30s\n"
                f"build_files: [builds.txt]\nweb:\n  listen_address: 127.0.0.1:19896\n{state}"
            )
            # The first life polls everything once (and fills the state file).
            process, _ = _start_daemon(config, "http://127.0.0.1:19896")
            deadline = time.monotonic() + 300
            while (
                len({r.build_id for r in simulator.requests()}) < count
                and time.monotonic() < deadline
            ):
                time.sleep(0.1)
            time.sleep(2)  # the state is written each second
            process.send_signal(signal.SIGTERM)
            process.wait(60)
            before = len(simulator.requests())
            process, ready_after = _start_daemon(config, "http://127.0.0.1:19896")
            try:
                time.sleep(window)
                requests = simulator.requests()[before:]
                rss = rss_kib(process.pid)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
            finished_requests = sum(1 for r in requests if r.build_id.startswith("done"))
            results[with_state] = (ready_after, len(requests), finished_requests, rss)
    ready, total, for_finished, rss = results[True]
    _, total_without, for_finished_without, _ = results[False]
    label = f"restart, {count:,} tracked builds ({finished:,} finished)"
    return [
        Row(f"{label}: seconds to ready, with a state file", f"{ready:.1f} s", target="<= 5 s"),
        Row(
            f"  requests in the first {window:g}s after the restart (for finished builds)",
            f"{total:,} ({for_finished:,})",
            f"no state file {total_without:,} ({for_finished_without:,})",
            target="0 for finished",
        ),
        Row("  resident memory after the restart", f"{rss / 1024:.1f} MiB"),
    ]


def measure_first_minutes(count: int, finished: int, minutes: float, speed: float) -> list[Row]:
    """Requests in the first minutes after a restart at the default budget (2/s), with and
    without a state file; the exporter runs here on a clock ``speed`` times faster."""
    now = time.time()
    plans = [
        BuildPlan(f"done{index:05d}", "app", "v1", now - 3600, 10, 10, 60)
        for index in range(finished)
    ] + held_plans(count - finished, prefix="busy")
    build_ids = [plan.build_id for plan in plans]
    spent: dict[bool, tuple[int, int]] = {}
    with Simulator(API_KEY, plans) as simulator, tempfile.TemporaryDirectory() as work:
        for with_state in (True, False):
            state_path = Path(work, f"state-{with_state}.db") if with_state else None

            def config(requests_per_second: float, path: Path | None = state_path) -> Config:
                return make_config(
                    simulator.base_url,
                    build_ids,
                    api_key=API_KEY,
                    interval="30s",
                    requests_per_second=requests_per_second,
                    max_concurrency=32,
                    state_path=path,
                )

            # The first life polls everything once, fast, and fills the state file.
            first = RunningExporter(config(10_000)).start()
            try:
                first.wait_until_all_polled(timeout=300)
            finally:
                first.stop()
            before = len(simulator.requests())
            clock = FastClock(speed)
            second = RunningExporter(config(2), clock=clock, wall_clock=clock.wall).start()
            try:
                while clock.elapsed() < minutes * 60:
                    time.sleep(0.1)
                requests = simulator.requests()[before:]
            finally:
                second.stop()
            spent[with_state] = (
                len(requests),
                sum(1 for request in requests if request.build_id.startswith("done")),
            )
    (total, for_finished), (total_without, for_finished_without) = spent[True], spent[False]
    return [
        Row(
            f"  requests in the first {minutes:g} minutes after it, at the default 2/s "
            "(for finished builds)",
            f"{total:,} ({for_finished:,})",
            f"no state file {total_without:,} ({for_finished_without:,})",
            target="0 for finished",
        )
    ]


def measure_state_writes(count: int, batch: int) -> list[Row]:
    """What writing the state costs per poll: one row per changed build, a batch per second."""
    store = filled_store(count)
    records = list(store.snapshot().records.values())
    with tempfile.TemporaryDirectory() as work:
        state = StateFile.open(Path(work, "state.db"))
        try:
            started = time.perf_counter()
            for start in range(0, len(records), batch):
                state.save(records[start : start + batch])
            per_record = (time.perf_counter() - started) / len(records)
            size = Path(work, "state.db").stat().st_size + sum(
                path.stat().st_size for path in Path(work).glob("state.db-*")
            )
        finally:
            state.close()
    return [
        Row(
            f"state write per poll ({count:,} builds, {batch} per transaction)",
            f"{per_record * 1e6:.0f} µs",
            target="",
        ),
        Row("  state file size per build", f"{size / count / 1024:.1f} KiB"),
    ]


def measure_stale_builds(count: int, speed: float) -> list[Row]:
    """Requests in an hour for builds stuck in BUILDING, adaptive cadence on and off.

    The exporter runs in this process on a clock ``speed`` times faster than the real one.
    """
    per_hour = {}
    for max_interval in ("10m", "30s"):
        plans = held_plans(count, prefix="stale")
        with simulator_process(plans, canned=True) as base_url:
            clock = FastClock(speed)
            config = make_config(
                base_url,
                [plan.build_id for plan in plans],
                api_key=API_KEY,
                interval="30s",
                max_interval=max_interval,
                requests_per_second=10_000,
                max_concurrency=32,
            )
            exporter = RunningExporter(config, clock=clock, wall_clock=clock.wall).start()
            try:
                while clock.elapsed() < 3600:
                    time.sleep(0.2)
                requests = exporter.exporter.telemetry.snapshot().requests
            finally:
                exporter.stop()
        per_hour[max_interval] = sum(requests.values())
    scale = 500 / count
    on, off = per_hour["10m"] * scale, per_hour["30s"] * scale
    return [
        Row(
            f"requests in the first hour, 500 stale BUILDING builds (measured with {count}, "
            "x5), adaptive cadence on",
            f"{on:,.0f}",
            f"cadence off {off:,.0f}",
            f"{on / off * 100:.0f} % of it",
        )
    ]


def _metrics_once_shown(url: str, marker: str, *, deadline: float) -> str:
    """The exporter's /metrics once it holds ``marker`` (at once for an empty one)."""
    text = httpx.get(url + "/metrics", timeout=60).text
    while marker not in text:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{marker.strip()!r} not in /metrics in time")
        time.sleep(0.05)
        text = httpx.get(url + "/metrics", timeout=60).text
    return text


def measure_image_listing(images: int, requests_per_second: float) -> list[Row]:
    """A listing of ``images`` builds' worth of rows (two artifact types each): the requests and
    time of the first complete listing, and what the inventory adds to memory and /metrics."""
    types = (ArtifactPlan("CONTAINER_IMAGE"), ArtifactPlan("VM_SANDBOX"))
    now = time.time()
    plans = [
        BuildPlan(
            f"cmimg{n:05}",
            f"image-{n % 500:03}",
            f"v{n // 500}",
            now - 600,
            5,
            5,
            5,
            artifacts=types,
        )
        for n in range(images)
    ]
    measured: dict[bool, tuple[float, int, int, float]] = {}
    with simulator_process(plans) as base_url, tempfile.TemporaryDirectory() as work:
        for discovery in (False, True):
            url = "http://127.0.0.1:19897"
            config = Path(work, f"config-{discovery}.yaml")
            config.write_text(
                f"api:\n  base_url: {base_url}\n  requests_per_second: {requests_per_second}\n"
                "web:\n  listen_address: 127.0.0.1:19897\n"
                f"discovery:\n  images:\n    enabled: {str(discovery).lower()}\n"
                f"    interval: 1h\n    team_id: {TEAM}\n"
            )
            started = time.monotonic()
            process, _ = _start_daemon(config, url)
            try:
                text = _metrics_once_shown(url, LISTED if discovery else "", deadline=started + 300)
                seconds = time.monotonic() - started
                requests = sum(
                    int(float(line.rsplit(" ", 1)[1]))
                    for line in text.splitlines()
                    if line.startswith("primeintellect_exporter_api_requests_total{")
                )
                measured[discovery] = (
                    seconds,
                    requests,
                    len(text.encode()),
                    rss_kib(process.pid) / 1024,
                )
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
    seconds, requests, size, rss = measured[True]
    _, _, size_off, rss_off = measured[False]
    pages = -(-images // 250)
    return [
        Row(
            f"image listing of {images:,} images ({images * 2:,} rows) at "
            f"{requests_per_second:g} requests/s",
            f"{requests} requests, complete {seconds:.1f} s after start",
            f"{pages} pages of 250",
            "",
            f"{pages} requests",
        ),
        Row(
            "resident memory with that inventory",
            f"{rss:.1f} MiB",
            f"{rss_off:.1f} MiB without discovery",
            f"+{(rss - rss_off) * 1024 / (images * 2):.1f} KiB per image row",
        ),
        Row(
            "/metrics with that inventory (text)",
            f"{size / 1e6:.1f} MB",
            f"{size_off / 1e3:.0f} kB without",
        ),
    ]


def _requests_by_endpoint(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("primeintellect_exporter_api_requests_total{"):
            endpoint = line.split('endpoint="', 1)[1].split('"', 1)[0]
            counts[endpoint] = counts.get(endpoint, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts


def measure_build_discovery_requests(count: int, interval: float, window: float) -> list[Row]:
    """Requests per hour to keep ``count`` unfinished builds fresh: each polled on its own,
    against the build listing answering a hundred at a time (both at ``interval``)."""
    plans = held_plans(count, prefix="busy")
    per_hour: dict[bool, float] = {}
    with simulator_process(plans) as base_url, tempfile.TemporaryDirectory() as work:
        Path(work, "builds.txt").write_text("\n".join(plan.build_id for plan in plans))
        for discovery in (False, True):
            url = "http://127.0.0.1:19897"
            config = Path(work, f"config-{discovery}.yaml")
            config.write_text(
                f"api:\n  base_url: {base_url}\n  requests_per_second: 10000\n"
                f"  max_concurrency: 16\npolling:\n  interval: {interval:g}s\n"
                f"{'' if discovery else 'build_files: [builds.txt]'}\n"
                "web:\n  listen_address: 127.0.0.1:19897\n"
                f"discovery:\n  builds:\n    enabled: {str(discovery).lower()}\n"
                f"    interval: {interval:g}s\n"
            )
            process, _ = _start_daemon(config, url)
            try:
                deadline = time.monotonic() + 120
                while _unpolled(process, url) or (
                    discovery and BUILDS_LISTED not in httpx.get(url + "/metrics").text
                ):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the builds were not all answered in 120 s")
                    time.sleep(0.1)
                before = sum(_requests_by_endpoint(httpx.get(url + "/metrics").text).values())
                time.sleep(window)
                after = sum(_requests_by_endpoint(httpx.get(url + "/metrics").text).values())
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
            # Scaled to the default 30 s interval: both make their requests once per interval.
            per_hour[discovery] = (after - before) / window * 3600 * interval / 30
    return [
        Row(
            f"API requests per hour to keep {count:,} unfinished builds fresh at a 30s "
            f"interval (measured at {interval:g}s), with build discovery",
            f"{per_hour[True]:,.0f}",
            f"each build polled {per_hour[False]:,.0f}",
            f"1/{per_hour[False] / max(per_hour[True], 1):.0f}",
            "at most 1/20",
        )
    ]


def measure_build_discovery_start(count: int, requests_per_second: float) -> list[Row]:
    """From start to every one of ``count`` builds in the window shown, at the key's budget,
    and what the discovered builds add to memory."""
    now = time.time()
    plans = [
        BuildPlan(f"cmdisc{n:05}", f"image-{n % 100:02}", "v1", now - 60 - n, 5, 5, 5)
        for n in range(count)
    ]
    measured: dict[bool, tuple[float, int, float]] = {}
    with simulator_process(plans) as base_url, tempfile.TemporaryDirectory() as work:
        for discovery in (False, True):
            url = "http://127.0.0.1:19897"
            config = Path(work, f"config-{discovery}.yaml")
            config.write_text(
                f"api:\n  base_url: {base_url}\n  requests_per_second: {requests_per_second}\n"
                "web:\n  listen_address: 127.0.0.1:19897\n"
                f"discovery:\n  builds:\n    enabled: {str(discovery).lower()}\n"
                f"    interval: 1h\n    max_pages: {count // 100 + 1}\n"
            )
            started = time.monotonic()
            process, _ = _start_daemon(config, url)
            try:
                marker = BUILDS_LISTED if discovery else ""
                text = _metrics_once_shown(url, marker, deadline=started + 600)
                seconds = time.monotonic() - started
                requests = _requests_by_endpoint(text).get("build_list", 0)
                measured[discovery] = (seconds, requests, rss_kib(process.pid) / 1024)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
    seconds, requests, rss = measured[True]
    rss_off = measured[False][2]
    return [
        Row(
            f"build discovery of {count:,} builds in the window at {requests_per_second:g} "
            "requests/s: every build shown",
            f"{seconds:.1f} s after start, {requests} requests",
            f"{-(-count // 100)} pages of 100",
        ),
        Row(
            "resident memory with those builds discovered",
            f"{rss:.1f} MiB",
            f"{rss_off:.1f} MiB without",
            f"+{(rss - rss_off) * 1024 / count:.1f} KiB per discovered build",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark the exporter; prints one table.")
    parser.add_argument("--scrapes", type=int, default=21)
    parser.add_argument("--floor-scrapes", type=int, default=301)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    arguments = parser.parse_args()
    # The exporters run here too (on fast clocks); their warnings are expected, not news.
    logging.basicConfig(level=logging.ERROR)
    sizes = [100, 1_000] if arguments.quick else [1_000, 10_000]
    growth = [100, 1_000] if arguments.quick else [1_000, 10_000, 25_000, 50_000]
    rows: list[Row] = []
    steps: list[Callable[[], list[Row]]] = [
        *(
            lambda size=size: measure_scrapes(size, arguments.scrapes, arguments.floor_scrapes)
            for size in sizes
        ),
        lambda: measure_refresh(sizes[-1]),
        lambda: measure_full_render(sizes[-1]),
        lambda: measure_tracked_set_changes(sizes[-1]),
        lambda: measure_churn(sizes[-1], changed=30, scrapes=arguments.scrapes),
        lambda: measure_polling(sizes[-1] // 2, 32),
        # Where a bare httpx loop is at its best (its pool degrades at 32), for an honest ratio.
        lambda: measure_polling(sizes[-1] // 2, 4),
        lambda: measure_growth(growth),
        lambda: measure_requests_saved(
            1_000, 900, interval=2, window=10 if arguments.quick else 20
        ),
        lambda: measure_restart(
            sizes[-1], sizes[-1] * 9 // 10, window=10 if arguments.quick else 20
        ),
        lambda: measure_first_minutes(
            sizes[-1], sizes[-1] * 9 // 10, minutes=10, speed=60 if arguments.quick else 30
        ),
        lambda: measure_state_writes(sizes[-1], batch=100),
        lambda: measure_stale_builds(100, speed=120 if arguments.quick else 60),
        lambda: measure_image_listing(1_000 if arguments.quick else 5_000, requests_per_second=2),
        lambda: measure_build_discovery_requests(
            1_000, interval=10, window=10 if arguments.quick else 30
        ),
        lambda: measure_build_discovery_start(
            1_000 if arguments.quick else 10_000, requests_per_second=2
        ),
    ]
    for step in steps:
        rows.extend(step())
        print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    widths = [
        max(len(getattr(row, field)) for row in rows)
        for field in ("measure", "value", "against", "ratio", "target")
    ]
    header = Row("measure", "value", "compared with", "ratio", "target")
    for row in [header, *rows]:
        cells = (row.measure, row.value, row.against, row.ratio, row.target)
        print(
            " | ".join(
                cell.ljust(width) for cell, width in zip(cells, widths, strict=True)
            ).rstrip()
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
