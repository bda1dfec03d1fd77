"""The HTTP front door under attack, from outside: prints one table.

    .venv/bin/python benchmarks/attacks.py          # or: make attacks

Starts the simulated API and the real exporter as separate processes (2,000 builds, so
/metrics is about 8 MB), then runs each attack from this process while a well-behaved scraper
scrapes ``/-/healthy`` on a new connection each time, and reports the scraper's success rate
and latency and the exporter's resident memory. A second exporter serves HTTPS with basic
auth for the TLS and password attacks. Everything stays on loopback; every loop is bounded.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import bcrypt
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

BIN = Path(sys.executable).parent
BUILDS = 2000
SCRAPES = 200
PASSWORD = "scraper password"


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


class Process:
    """A child process whose output goes to files, so it never blocks on a full pipe."""

    def __init__(self, log: Path, *command: str, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("w") as output:
            self.process = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, **(env or {})},
            )

    def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log.read_text(), re.MULTILINE)
            if match:
                return match
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"no line matching {pattern!r} in {self.log}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def write_certificates(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert, key_file = directory / "tls.crt", directory / "tls.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key_file


@contextmanager
def exporter(directory: Path, web_config: str | None = None) -> Iterator[tuple[str, int]]:
    """The simulated API and an exporter watching its builds; yields the URL and the pid."""
    api_key = "pk-attacks"
    simulator = Process(
        directory / "simulator.log",
        str(BIN / "primeintellect-build-simulator"),
        "--listen-address",
        "127.0.0.1:0",
        "--builds",
        str(BUILDS),
        env={"PRIME_API_KEY": api_key},
    )
    daemon: Process | None = None
    try:
        base_url = simulator.wait_for(r"Simulated API at (\S+)").group(1)
        simulator.wait_for(rf"^Builds:\n(?:  - \S+\n){{{BUILDS}}}")
        listing = simulator.log.read_text().split("Builds:\n", 1)[1]
        build_ids = [line.strip().removeprefix("- ") for line in listing.splitlines()[:BUILDS]]
        config = directory / "config.yaml"
        config.write_text(
            f"api:\n  base_url: {base_url}\n  requests_per_second: 500\n  max_concurrency: 16\n"
            "polling:\n  interval: 5m\n  stale_after: 1h\n"
            "web:\n  listen_address: 127.0.0.1:0\nbuilds:\n"
            + "".join(f"  - {build_id}\n" for build_id in build_ids)
        )
        arguments = ["--config.file", str(config)]
        if web_config is not None:
            path = directory / "web.yml"
            path.write_text(web_config)
            arguments += ["--web.config.file", str(path)]
        daemon = Process(
            directory / "exporter.log",
            str(BIN / "primeintellect-build-exporter"),
            *arguments,
            env={"PRIME_API_KEY": api_key},
        )
        url = daemon.wait_for(r"url=(https?://\S+)").group(1)
        yield url, daemon.process.pid
    finally:
        if daemon is not None:
            daemon.stop()
        simulator.stop()


def connect(url: str, *, receive_buffer: int | None = None, timeout: float = 10) -> socket.socket:
    host, port = url.split("//")[1].rsplit(":", 1)
    connection = socket.socket()
    if receive_buffer is not None:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    connection.settimeout(timeout)
    connection.connect((host, int(port)))
    return connection


def scrape(
    url: str,
    *,
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
    between: Callable[[], None] = lambda: None,
) -> tuple[float, float, float]:
    """Success share, median and worst latency in ms of SCRAPES scrapes of /-/healthy, each
    on a new connection, with a raw client so the figures are the server's."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    request = f"GET /-/healthy HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"
    times, succeeded = [], 0
    for _ in range(SCRAPES):
        between()
        started = time.perf_counter()
        with suppress(OSError):
            connection = connect(url, timeout=2)
            if context is not None:
                connection = context.wrap_socket(connection, server_hostname="127.0.0.1")
            with connection:
                connection.sendall(request.encode())
                answer = b""
                while chunk := connection.recv(65536):
                    answer += chunk
            succeeded += answer.startswith(b"HTTP/1.1 200 ")
        times.append((time.perf_counter() - started) * 1000)
    return succeeded / SCRAPES, statistics.median(times), max(times)


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def run_plain(directory: Path) -> list[tuple[str, str, str]]:
    rows = []
    with exporter(directory) as (url, pid):
        deadline = time.monotonic() + 120
        # Ready does not wait for polls; the attacks want the full multi-megabyte body.
        while 'primeintellect_exporter_builds{state="unpolled"} 0.0' not in (
            metrics := httpx.get(url + "/metrics", timeout=30).text
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the exporter did not poll every build in 120 s")
            time.sleep(0.2)
        size = len(metrics.encode())

        def row(name: str, result: tuple[float, float, float], before: float) -> None:
            # ``before`` is taken as the attack starts, so each row shows its own growth.
            success, median, worst = result
            rows.append(
                (
                    name,
                    f"{success:.1%}, median {median:.1f} ms, worst {worst:.0f} ms",
                    f"{before:.0f} -> {rss_mib(pid):.0f} MiB",
                )
            )

        before = rss_mib(pid)
        row(f"no attack (/metrics is {size / 1e6:.1f} MB)", scrape(url), before)

        before = rss_mib(pid)
        held = [connect(url) for _ in range(500)]
        row("500 idle connections", scrape(url), before)
        for connection in held:
            connection.close()

        before = rss_mib(pid)
        slow = [connect(url) for _ in range(200)]
        for connection in slow:
            connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")

        def trickle() -> None:
            for connection in slow:
                with suppress(OSError):
                    connection.send(b"X")

        row("200 slowloris clients", scrape(url, between=trickle), before)
        for connection in slow:
            connection.close()

        before = rss_mib(pid)
        stalled = [connect(url, receive_buffer=4096) for _ in range(64)]
        for connection in stalled:
            connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        row("64 clients that never read /metrics", scrape(url), before)
        for connection in stalled:
            connection.close()

        line = b"X-Flood: " + b"a" * 65000 + b"\r\n"

        def flood(connection: socket.socket) -> str:
            with suppress(OSError):
                connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                for _ in range(99):
                    connection.sendall(line)
            try:
                return connection.recv(12).decode(errors="replace").removeprefix("HTTP/1.1 ")
            except OSError as error:
                return type(error).__name__

        flooding = [connect(url) for _ in range(64)]
        before = peak = rss_mib(pid)
        with ThreadPoolExecutor(64) as pool:
            futures = [pool.submit(flood, connection) for connection in flooding]
            while not all(future.done() for future in futures):
                peak = max(peak, rss_mib(pid))
                time.sleep(0.01)
        for connection in flooding:
            connection.close()
        answers = Counter(future.result() for future in futures)
        rows.append(
            (
                "64 heads of 99 x 65,000-byte headers",
                "answered " + ", ".join(f"{status} x{count}" for status, count in answers.items()),
                f"{before:.0f} -> peak {peak:.0f} MiB",
            )
        )

        def scrape_metrics(_: int) -> int:
            try:
                return httpx.get(url + "/metrics", timeout=60).status_code
            except httpx.TransportError:
                return 0

        started = time.perf_counter()
        with ThreadPoolExecutor(300) as pool:
            statuses = list(pool.map(scrape_metrics, range(300)))
        rows.append(
            (
                "300 concurrent /metrics scrapers",
                f"{statuses.count(200)} of 300 got 200 in {time.perf_counter() - started:.1f} s",
                f"now {rss_mib(pid):.0f} MiB",
            )
        )

        def metrics_median_ms() -> float:
            times = []
            for _ in range(20):
                started = time.perf_counter()
                httpx.get(url + "/metrics", timeout=60, headers={"Accept-Encoding": "gzip"})
                times.append((time.perf_counter() - started) * 1000)
            return statistics.median(times)

        def fetch_pages(stop: threading.Event, worker: int) -> int:
            # A new query each time (the refresh period), so no page is one of the kept ones,
            # and every page lists the first 1,000 builds.
            fetched = 0
            while not stop.is_set():
                refresh = 1 + (worker * 211 + fetched) % 3600
                with suppress(httpx.TransportError):
                    httpx.get(f"{url}/?sort=created&refresh={refresh}", timeout=60)
                fetched += 1
            return fetched

        before = rss_mib(pid)
        alone = metrics_median_ms()
        stop = threading.Event()
        with ThreadPoolExecutor(16) as pool:
            fetchers = [pool.submit(fetch_pages, stop, worker) for worker in range(16)]
            flooded = metrics_median_ms()
            stop.set()
            pages = sum(fetcher.result() for fetcher in fetchers)
        rows.append(
            (
                "16 clients fetching uncached status pages nonstop",
                f"/metrics median {alone:.0f} ms alone, {flooded:.0f} ms meanwhile "
                f"({pages} pages of {BUILDS} builds)",
                f"{before:.0f} -> {rss_mib(pid):.0f} MiB",
            )
        )
    return rows


def run_tls_and_auth(directory: Path) -> list[tuple[str, str, str]]:
    cert, key = write_certificates(directory)
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    web_config = (
        f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        f"basic_auth_users:\n  prometheus: '{hashed}'\n"
    )
    context = ssl.create_default_context(cafile=cert)
    right = basic("prometheus", PASSWORD)
    rows = []
    with exporter(directory, web_config) as (url, pid):
        before = rss_mib(pid)
        success, median, worst = scrape(url, context=context, headers=right)
        rows.append(
            (
                "HTTPS + basic auth, no attack",
                f"{success:.1%}, median {median:.1f} ms, worst {worst:.0f} ms",
                f"{before:.0f} MiB",
            )
        )
        idle = [connect(url) for _ in range(64)]
        silent = [context.wrap_socket(connect(url), server_hostname="127.0.0.1") for _ in range(64)]
        success, median, worst = scrape(url, context=context, headers=right)
        rows.append(
            (
                "64 idle and 64 silent TLS connections",
                f"{success:.1%}, median {median:.1f} ms, worst {worst:.0f} ms",
                f"now {rss_mib(pid):.0f} MiB",
            )
        )
        for connection in [*idle, *silent]:
            connection.close()

        stop = threading.Event()

        def wrong_passwords() -> None:
            with httpx.Client(verify=context, timeout=30) as client:
                while not stop.is_set():
                    with suppress(httpx.TransportError):
                        client.get(url + "/metrics", headers=basic("prometheus", "guess"))

        with ThreadPoolExecutor(64) as pool:
            for _ in range(64):
                pool.submit(wrong_passwords)
            success, median, worst = scrape(url, context=context, headers=right)
            stop.set()
        rows.append(
            (
                "64 parallel wrong-password floods (bcrypt cost 10)",
                f"{success:.1%}, median {median:.1f} ms, worst {worst:.0f} ms",
                f"now {rss_mib(pid):.0f} MiB",
            )
        )
    return rows


def main() -> int:
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        rows = run_plain(directory) + run_tls_and_auth(directory)
    header = ("attack", "well-behaved scraper of /-/healthy", "exporter RSS")
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(3)]
    for row in [header, *rows]:
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
