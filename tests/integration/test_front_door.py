"""The HTTP front door under attack, over real sockets on loopback.

Each attack runs while a well-behaved scraper keeps scraping; the scraper must keep getting
answers. Every wait is for a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit

import bcrypt
import httpx
import pytest

from exporter.exposition import ExpositionFormat
from exporter.exposition_cache import Body
from exporter.store import BuildStore
from exporter.web.connections import ServerLimits
from exporter.web.server import Endpoints, MetricsServer
from tests.helpers.pki import Pki, client_context, tls_section
from tests.helpers.support import ServerThread, wait_until

SCRAPES = 100
BODY_BYTES = 8 * 1024 * 1024
PASSWORD = "scraper password"


class StaticMetrics:
    """A fixed multi-megabyte body: these tests are about the connections, not the content."""

    def __init__(self, size: int = BODY_BYTES) -> None:
        line = b'primeintellect_image_build_info{build_id="b",image_name="i",image_tag="t"} 1.0\n'
        self.plain = line * (size // len(line))
        self.compressed = gzip.compress(self.plain, compresslevel=1)

    def body(self, format: ExpositionFormat, *, gzip: bool) -> Body:
        data = self.compressed if gzip else self.plain
        return Body((data,), len(data))

    def kept_body(self, format: ExpositionFormat, *, gzip: bool) -> Body | None:
        return self.body(format, gzip=gzip)


class Reloads:
    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> str | None:
        self.count += 1
        return None


def serve(
    *,
    limits: ServerLimits | None = None,
    web_config_file: Path | None = None,
    reload: Reloads | None = None,
    metrics: StaticMetrics | None = None,
) -> ServerThread:
    server = MetricsServer(
        "127.0.0.1:0",
        Endpoints(
            metrics=metrics or StaticMetrics(),
            snapshot=BuildStore().snapshot,
            unhealthy_reason=lambda: None,
            unready_reason=lambda: None,
            reload=reload,
            internal_error=lambda component, error: None,
        ),
        web_config_file=web_config_file,
        limits=limits,
    )
    return ServerThread(server)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Raw client sockets a test opens; all closed afterwards."""
    opened: list[socket.socket] = []
    yield opened
    for opened_socket in opened:
        opened_socket.close()


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def connect(url: str, *, receive_buffer: int | None = None) -> socket.socket:
    connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    connection.settimeout(5)
    connection.connect(address(url))
    return connection


def read_response(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 answer read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a complete head: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_by_server(connection: socket.socket) -> bool:
    try:
        return connection.recv(65536, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def scrape_success(
    url: str,
    *,
    scrapes: int = SCRAPES,
    path: str = "/-/healthy",
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
    between: Callable[[], None] = lambda: None,
) -> float:
    """The share of ``scrapes`` back-to-back scrapes, each on a new connection, that got 200."""
    succeeded = 0
    for _ in range(scrapes):
        between()
        try:
            # A client timeout is real time: 0.3 s at most when quiet (measured), ten times that.
            response = httpx.get(
                url + path, verify=context or True, headers=headers or {}, timeout=3.0
            )
            succeeded += response.status_code == 200
        except httpx.TransportError:
            pass
    return succeeded / scrapes


def tls_config_file(pki: Pki, directory: Path) -> Path:
    path = directory / "web.yml"
    path.write_text(tls_section(pki))
    return path


def rss_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


@contextmanager
def in_background(work: Callable[[threading.Event], None], workers: int) -> Iterator[None]:
    """Run ``work`` in ``workers`` threads until the block ends."""
    stop = threading.Event()
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(work, stop) for _ in range(workers)]
        try:
            yield
        finally:
            stop.set()
            for future in futures:
                future.result(timeout=30)


# --- the attacks of the issue, each beside a well-behaved scraper --------------------------


def test_500_idle_connections_leave_scrapes_answered(sockets: list[socket.socket]) -> None:
    with serve() as served:
        sockets.extend(connect(served.url) for _ in range(500))
        assert scrape_success(served.url) >= 0.99
        assert scrape_success(served.url, scrapes=5, path="/metrics") == 1.0


def test_200_slowloris_clients_leave_scrapes_answered(sockets: list[socket.socket]) -> None:
    with serve() as served:
        for _ in range(200):
            slow = connect(served.url)
            slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            sockets.append(slow)

        def trickle() -> None:
            # One more header byte from every slow client before each scrape.
            for slow in sockets:
                with suppress(OSError):
                    slow.send(b"X")

        assert scrape_success(served.url, between=trickle) >= 0.99


def test_64_clients_that_never_read_leave_scrapes_answered_and_memory_flat(
    sockets: list[socket.socket],
) -> None:
    with serve() as served:
        assert scrape_success(served.url, scrapes=1, path="/metrics") == 1.0
        before = rss_bytes()
        for _ in range(64):
            stalled = connect(served.url, receive_buffer=4096)
            stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            sockets.append(stalled)
        assert scrape_success(served.url) >= 0.99
        # Each stalled answer holds at most a small buffer, never a copy of the 8 MB body.
        assert rss_bytes() - before < 50 * 1024 * 1024


def test_idle_and_silent_tls_clients_leave_scrapes_answered(
    pki: Pki, tmp_path: Path, sockets: list[socket.socket]
) -> None:
    web_config = tls_config_file(pki, tmp_path)
    context = client_context(pki)
    with serve(web_config_file=web_config) as served:
        # 64 that never send a ClientHello, 64 that finish the handshake and say nothing.
        sockets.extend(connect(served.url) for _ in range(64))
        for _ in range(64):
            sockets.append(context.wrap_socket(connect(served.url), server_hostname="127.0.0.1"))
        assert scrape_success(served.url, context=context) >= 0.99


def test_wrong_password_floods_leave_a_verified_scraper_answered(tmp_path: Path) -> None:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    web_config = tmp_path / "web.yml"
    web_config.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    right = basic("prometheus", PASSWORD)
    with serve(web_config_file=web_config) as served:
        assert scrape_success(served.url, scrapes=1, headers=right) == 1.0

        def flood(stop: threading.Event) -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    client.get(served.url + "/metrics", headers=basic("prometheus", "guess"))

        with in_background(flood, workers=64):
            assert scrape_success(served.url, headers=right) >= 0.99


def test_header_floods_are_refused_with_431_and_keep_memory_flat(
    sockets: list[socket.socket],
) -> None:
    line = b"X-Flood: " + b"a" * 65000 + b"\r\n"
    with serve() as served:
        assert scrape_success(served.url, scrapes=1) == 1.0
        before = rss_bytes()
        peak = before

        def send_flood(flooding: socket.socket) -> int:
            try:
                flooding.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                for _ in range(99):
                    flooding.sendall(line)
            except OSError:
                pass  # refused before the end, as it should be
            status, _, _ = read_response(flooding)
            return status

        for _ in range(64):
            sockets.append(connect(served.url))
        with ThreadPoolExecutor(64) as pool:
            statuses = pool.map(send_flood, sockets)
            for _ in range(20):
                peak = max(peak, rss_bytes())
            assert set(statuses) == {431}
        assert peak - before < 50 * 1024 * 1024
        assert scrape_success(served.url) >= 0.99


@pytest.mark.parametrize(
    "smuggled",
    [
        b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{inner}",
        b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"{length_hex}\r\n{inner}\r\n0\r\n\r\n",
    ],
    ids=["content_length", "chunked"],
)
def test_a_request_hidden_in_a_body_performs_nothing(smuggled: bytes) -> None:
    inner = b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    request = (
        smuggled.replace(b"{length}", str(len(inner)).encode())
        .replace(b"{length_hex}", f"{len(inner):x}".encode())
        .replace(b"{inner}", inner)
    )
    reloads = Reloads()
    with serve(reload=reloads) as served:
        connection = connect(served.url)
        with connection:
            connection.sendall(request)
            status, _, body = read_response(connection)
            assert (status, body) == (200, b"Healthy\n")
            # The body was read and dropped: the connection is ready for a real next request.
            connection.sendall(b"GET /-/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(connection)[0] == 200
    assert reloads.count == 0


def test_requests_pipelined_far_ahead_are_dropped_not_buffered(
    sockets: list[socket.socket],
) -> None:
    junk = b"X-Junk: " + b"j" * 30_000 + b"\r\n"
    with serve() as served:
        assert scrape_success(served.url, scrapes=1, path="/metrics") == 1.0
        before = rss_bytes()

        def pipeline(connection: socket.socket) -> None:
            # An answer that will not be read, then 90 MB of the next request's head: far
            # more than the kernel's socket buffers hold, so the server must read most of it.
            connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n")
            for _ in range(3000):
                connection.sendall(junk)

        for _ in range(4):
            sockets.append(connect(served.url, receive_buffer=4096))
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(pipeline, sockets))
        assert scrape_success(served.url) >= 0.99
        assert rss_bytes() - before < 50 * 1024 * 1024


def test_a_request_followed_by_a_half_close_is_answered() -> None:
    with serve(limits=SHORT) as served, connect(served.url) as client:
        client.sendall(b"GET /-/healthy HTTP/1.0\r\n\r\n")
        client.shutdown(socket.SHUT_WR)
        assert read_response(client)[:1] == (200,)
        wait_until(lambda: closed_by_server(client), message="the connection to be closed")


def test_300_concurrent_scrapers_all_get_an_answer() -> None:
    async def scrape(port: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status_line = await reader.readline()
        await reader.read()  # the whole body, until the server closes
        writer.close()
        return int(status_line.split()[1])

    async def scrape_all(port: int) -> list[int]:
        async with asyncio.timeout(60):
            return await asyncio.gather(*(scrape(port) for _ in range(300)))

    with serve() as served:
        statuses = asyncio.run(scrape_all(address(served.url)[1]))
    assert statuses == [200] * 300


def test_unknown_users_take_as_long_as_wrong_passwords_across_costs(tmp_path: Path) -> None:
    cheap = bcrypt.hashpw(b"cheap", bcrypt.gensalt(rounds=4)).decode()
    costly = bcrypt.hashpw(b"costly", bcrypt.gensalt(rounds=11)).decode()
    web_config = tmp_path / "web.yml"
    web_config.write_text(f"basic_auth_users:\n  cheap: '{cheap}'\n  costly: '{costly}'\n")

    users = ("cheap", "costly", "nobody")
    durations: dict[str, list[float]] = {user: [] for user in users}
    with serve(web_config_file=web_config) as served, httpx.Client(timeout=10) as client:
        # Taken in turns, so that however busy the machine is, it weighs on each user alike.
        for _ in range(7):
            for user in users:
                started = time.perf_counter()
                response = client.get(served.url + "/-/healthy", headers=basic(user, "wrong"))
                durations[user].append(time.perf_counter() - started)
                assert response.status_code == 401
    timings = {user: statistics.median(durations[user]) for user in users}
    assert max(timings.values()) < 2 * min(timings.values()), timings


# --- each limit on its own -----------------------------------------------------------------

# The idle timeout stays longer than the head deadline, as with the defaults.
SHORT = ServerLimits(
    request_head_timeout=0.5, idle_timeout=1.0, write_timeout=0.5, tls_handshake_timeout=0.5
)


def test_a_head_not_finished_in_time_is_answered_408_and_closed() -> None:
    with serve(limits=SHORT) as served, connect(served.url) as slow:
        slow.settimeout(30)  # the bound below judges the deadline, not the socket's timeout
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        status, headers, _ = read_response(slow)
        assert (status, headers["connection"]) == (408, "close")
        # A server deadline is real time: 0.5 s on a quiet machine (measured), ten times that.
        assert time.monotonic() - started < 5
        wait_until(lambda: closed_by_server(slow), message="the slow client to be closed")


def test_a_connection_that_sends_nothing_is_closed_after_the_head_deadline() -> None:
    with serve(limits=SHORT) as served, connect(served.url) as idle:
        wait_until(lambda: closed_by_server(idle), message="the idle connection to be closed")


def test_a_kept_alive_connection_is_closed_after_the_idle_timeout() -> None:
    with serve(limits=SHORT) as served, connect(served.url) as kept:
        kept.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(kept)[0] == 200
        wait_until(lambda: closed_by_server(kept), message="the idle keep-alive to be closed")


def test_the_head_deadline_applies_to_every_request_on_a_connection() -> None:
    with serve(limits=SHORT) as served, connect(served.url) as slow:
        slow.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\nGET /-/healthy HTTP/1.1\r\n")
        assert read_response(slow)[0] == 200
        assert read_response(slow)[0] == 408


def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout() -> None:
    # Larger than what the kernel's socket buffers can hold on the way.
    metrics = StaticMetrics(4 * BODY_BYTES)
    with (
        serve(limits=SHORT, metrics=metrics) as served,
        connect(served.url, receive_buffer=4096) as stalled,
    ):
        stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        open_connections = served.server.open_connections
        wait_until(lambda: open_connections() == 1, message="the connection to be served")
        wait_until(lambda: open_connections() == 0, message="the stalled connection to be dropped")
        received = 0
        try:
            while chunk := stalled.recv(1 << 20):
                received += len(chunk)
        except ConnectionError:
            pass
        assert received < len(metrics.plain)


def test_a_head_over_the_cap_is_answered_431() -> None:
    with serve() as served, connect(served.url) as client:
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        status, headers, _ = read_response(client)
        assert (status, headers["connection"]) == (431, "close")


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# An empty SETTINGS frame: what an HTTP/2 client sends right after the preface.
HTTP2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@pytest.mark.parametrize(
    "sent",
    [HTTP2_PREFACE, HTTP2_PREFACE + HTTP2_SETTINGS, HTTP2_PREFACE[:16], b"PRI * HTTP/2.0\r\n"],
    ids=["preface", "preface_and_settings", "request_line_and_blank", "request_line"],
)
def test_http2_prior_knowledge_is_refused_with_505_over_http1(sent: bytes) -> None:
    with serve() as served, connect(served.url) as client:
        client.sendall(sent)
        status, headers, body = read_response(client)
        assert (status, headers["connection"]) == (505, "close")
        assert b"HTTP/1.1" in body
        # The connection is then closed by the server, once the client is done sending.
        client.shutdown(socket.SHUT_WR)
        assert client.recv(100) == b""


def test_a_preface_after_a_request_on_the_same_connection_is_refused_too() -> None:
    with serve() as served, connect(served.url) as client:
        client.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(client)[0] == 200
        client.sendall(HTTP2_PREFACE + HTTP2_SETTINGS)
        assert read_response(client)[0] == 505


def test_a_body_over_the_cap_is_answered_413() -> None:
    with serve() as served, connect(served.url) as client:
        client.sendall(b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        assert read_response(client)[0] == 413


def test_a_chunked_body_over_the_cap_is_answered_413() -> None:
    chunk = b"a" * 16384
    with serve() as served, connect(served.url) as client:
        client.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(8):
                client.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        except OSError:
            pass
        assert read_response(client)[0] == 413


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: gzip\r\n",
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Content-Length: -1\r\n",
    ],
    ids=["length_and_chunked", "unknown_coding", "two_lengths", "negative_length"],
)
def test_ambiguous_request_framing_is_refused(head: bytes) -> None:
    reloads = Reloads()
    with serve(reload=reloads) as served, connect(served.url) as client:
        client.sendall(b"POST /-/reload HTTP/1.1\r\nHost: x\r\n" + head + b"\r\nhello")
        assert read_response(client)[0] == 400
    assert reloads.count == 0


def test_connections_past_the_cap_are_answered_503(sockets: list[socket.socket]) -> None:
    with serve(limits=ServerLimits(max_connections=8)) as served:
        sockets.extend(connect(served.url) for _ in range(8))
        wait_until(lambda: served.server.open_connections() >= 8, message="8 connections")
        with connect(served.url) as extra:
            extra.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _ = read_response(extra)
        assert (status, headers["connection"], headers["retry-after"]) == (503, "close", "1")
        for held in sockets:
            held.close()
        sockets.clear()
        wait_until(lambda: served.server.open_connections() == 0, message="the slots to free up")
        assert scrape_success(served.url, scrapes=3) == 1.0


def test_tls_connections_past_the_cap_are_answered_503_over_tls(
    pki: Pki, tmp_path: Path, sockets: list[socket.socket]
) -> None:
    web_config = tls_config_file(pki, tmp_path)
    context = client_context(pki)
    with serve(limits=ServerLimits(max_connections=4), web_config_file=web_config) as served:
        for _ in range(4):
            sockets.append(context.wrap_socket(connect(served.url), server_hostname="127.0.0.1"))
        wait_until(lambda: served.server.open_connections() >= 4, message="4 connections")
        response = httpx.get(served.url + "/metrics", verify=context, timeout=5)
        assert response.status_code == 503


def test_an_unfinished_tls_handshake_is_dropped_after_its_deadline(
    pki: Pki, tmp_path: Path
) -> None:
    web_config = tls_config_file(pki, tmp_path)
    with serve(limits=SHORT, web_config_file=web_config) as served, connect(served.url) as idle:
        # Half a ClientHello, then silence.
        idle.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        wait_until(lambda: closed_by_server(idle), message="the handshake to time out")
        wait_until(lambda: served.server.open_connections() == 0, message="its slot to free up")


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}
