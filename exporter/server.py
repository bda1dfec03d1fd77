"""The HTTP endpoints: ``/metrics``, ``/-/healthy``, ``/-/ready`` and a status page at ``/``.

With a web config file (exporter-toolkit format, see ``exporter.webconfig``) it serves HTTPS
and/or requires basic auth on every path.
"""

from __future__ import annotations

import contextlib
import html
import logging
import selectors
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast
from urllib.parse import urlsplit

from exporter import __version__
from exporter.config import parse_listen_address
from exporter.exposition import Body
from exporter.metrics import ExpositionFormat
from exporter.store import BuildRecord, BuildState, Snapshot
from exporter.webconfig import AUTH_REALM, TlsSettings, WebConfig, WebConfigWatcher

log = logging.getLogger(__name__)

STATUS_PAGE_MAX_ROWS = 1000
CLIENT_SOCKET_TIMEOUT = 30.0
# Connections served at once, each by its own thread; more are closed at once, so that a
# flood of connections cannot exhaust the process.
MAX_CONNECTIONS = 64
# A TLS client has this long, in total, to complete its handshake.
TLS_HANDSHAKE_TIMEOUT = 5.0
# What Go's servers answer to plain HTTP on a TLS port.
_PLAIN_HTTP_ON_TLS_PORT = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
)
# A refused connection is logged at warning level at most this often.
_REFUSAL_LOG_INTERVAL = 60.0


class ExpositionSource(Protocol):
    """Where ``/metrics`` bodies come from (an ExpositionCache in the exporter)."""

    def body(self, format: ExpositionFormat, *, gzip: bool) -> Body: ...


@dataclass(frozen=True)
class Endpoints:
    """What the handlers use: the exposition cache, the store, health checks and reload."""

    metrics: ExpositionSource
    snapshot: Callable[[], Snapshot]
    unhealthy_reason: Callable[[], str | None]
    unready_reason: Callable[[], str | None]
    # Reloads the configuration and returns the error, or None; None when the lifecycle
    # API is disabled.
    reload: Callable[[], str | None] | None
    # Counts and logs an unexpected exception of a component, such as the renderer.
    internal_error: Callable[[str, BaseException], None]


def negotiate_format(accept: str) -> ExpositionFormat:
    """OpenMetrics when the Accept header prefers it over the Prometheus text format."""
    best_openmetrics = best_text = 0.0
    for media_range, params, quality in _parse_header_list(accept):
        major_version = params.get("version", "1").split(".")[0]
        if media_range == "application/openmetrics-text" and major_version == "1":
            best_openmetrics = max(best_openmetrics, quality)
        elif media_range in {"text/plain", "text/*", "*/*"}:
            best_text = max(best_text, quality)
    if best_openmetrics > 0 and best_openmetrics >= best_text:
        return ExpositionFormat.OPENMETRICS
    return ExpositionFormat.TEXT


def accepts_gzip(accept_encoding: str) -> bool:
    """True when ``Accept-Encoding`` allows gzip."""
    return any(
        coding in {"gzip", "*"} and quality > 0
        for coding, _, quality in _parse_header_list(accept_encoding)
    )


def _parse_header_list(value: str) -> list[tuple[str, dict[str, str], float]]:
    items = []
    for item in value.split(","):
        name, *raw_params = (part.strip() for part in item.split(";"))
        if not name:
            continue
        params = {}
        for raw in raw_params:
            key, _, param_value = raw.partition("=")
            params[key.strip().lower()] = param_value.strip().strip('"')
        try:
            quality = float(params.pop("q", "1"))
        except ValueError:
            quality = 0.0
        items.append((name.lower(), params, quality))
    return items


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"primeintellect-build-exporter/{__version__}"
    sys_version = ""
    timeout = CLIENT_SOCKET_TIMEOUT
    # Headers and body leave in one write, and without Nagle's delay: otherwise a keep-alive
    # scrape waits ~40 ms for the client's delayed ACK.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True
    endpoints: ClassVar[Endpoints]
    # The web config of the request being answered, if the server has one.
    _web_config: WebConfig | None = None

    _ROUTES: ClassVar[dict[str, str]] = {
        "/metrics": "_serve_metrics",
        "/-/healthy": "_serve_healthy",
        "/-/ready": "_serve_ready",
        "/": "_serve_status_page",
    }
    _RELOAD_PATH = "/-/reload"

    def parse_request(self) -> bool:
        # Runs before any method or path is looked at: rate limit and authentication apply
        # to every request, as in exporter-toolkit.
        if not super().parse_request():
            return False
        web_config = self._web_config = cast("_Server", self.server).current_web_config()
        if web_config is None:
            return True
        if web_config.rate_limiter is not None and not web_config.rate_limiter.allow():
            self._refuse(HTTPStatus.TOO_MANY_REQUESTS, b"Too many requests\n", {})
            return False
        if web_config.basic_auth is not None and not web_config.basic_auth.authorized(
            self.headers.get("Authorization")
        ):
            self._refuse(
                HTTPStatus.UNAUTHORIZED,
                b"Unauthorized\n",
                {"WWW-Authenticate": f'Basic realm="{AUTH_REALM}"'},
            )
            return False
        return True

    def _refuse(self, status: HTTPStatus, body: bytes, headers: dict[str, str]) -> None:
        # The connection closes: a request body, if any, is left unread.
        self._respond(
            status,
            body,
            headers={**headers, "Connection": "close"},
            send_body=self.command != "HEAD",
        )
        self.wfile.flush()

    def do_GET(self) -> None:
        self._route(send_body=True)

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    def _method_not_allowed(self) -> None:
        path = self._path()
        if path in self._ROUTES or path == self._RELOAD_PATH:
            allow = "POST, PUT" if path == self._RELOAD_PATH else "GET, HEAD"
            self._respond(
                HTTPStatus.METHOD_NOT_ALLOWED, b"Method not allowed\n", headers={"Allow": allow}
            )
        else:
            self._respond(HTTPStatus.NOT_FOUND, b"Not found\n")

    def do_POST(self) -> None:
        if self._path() == self._RELOAD_PATH:
            self._serve_reload()
        else:
            self._method_not_allowed()

    def do_PUT(self) -> None:
        self.do_POST()

    def do_DELETE(self) -> None:
        self._method_not_allowed()

    def do_PATCH(self) -> None:
        self._method_not_allowed()

    def do_OPTIONS(self) -> None:
        self._method_not_allowed()

    def _path(self) -> str:
        return urlsplit(self.path).path

    def _route(self, *, send_body: bool) -> None:
        path = self._path()
        route = self._ROUTES.get(path)
        if route is None:
            if path == self._RELOAD_PATH:
                self._method_not_allowed()
            else:
                self._respond(HTTPStatus.NOT_FOUND, b"Not found\n", send_body=send_body)
            return
        getattr(self, route)(send_body)

    def _serve_reload(self) -> None:
        reload = self.endpoints.reload
        if reload is None:
            self._respond(
                HTTPStatus.FORBIDDEN,
                b"Lifecycle API is not enabled: start with --web.enable-lifecycle\n",
            )
            return
        error = reload()
        if error is None:
            self._respond(HTTPStatus.OK, b"Configuration reloaded\n")
        else:
            self._respond(HTTPStatus.INTERNAL_SERVER_ERROR, f"Failed to reload: {error}\n".encode())

    def _serve_metrics(self, send_body: bool) -> None:
        format = negotiate_format(self.headers.get("Accept", ""))
        gzip = accepts_gzip(self.headers.get("Accept-Encoding", ""))
        try:
            body = self.endpoints.metrics.body(format, gzip=gzip)
        except Exception as error:  # noqa: BLE001 (a renderer bug answers 500, nothing worse)
            self.endpoints.internal_error("renderer", error)
            self._respond(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                b"Error rendering metrics; see the exporter's log\n",
                send_body=send_body,
            )
            return
        headers = {"Content-Type": format.content_type, "Vary": "Accept, Accept-Encoding"}
        if gzip:
            headers["Content-Encoding"] = "gzip"
        self._respond(HTTPStatus.OK, body, headers=headers, send_body=send_body)

    def _serve_healthy(self, send_body: bool) -> None:
        self._serve_check(self.endpoints.unhealthy_reason(), "Healthy", send_body)

    def _serve_ready(self, send_body: bool) -> None:
        self._serve_check(self.endpoints.unready_reason(), "Ready", send_body)

    def _serve_check(self, problem: str | None, good: str, send_body: bool) -> None:
        if problem is None:
            self._respond(HTTPStatus.OK, f"{good}\n".encode(), send_body=send_body)
        else:
            self._respond(
                HTTPStatus.SERVICE_UNAVAILABLE, f"{problem}\n".encode(), send_body=send_body
            )

    def _serve_status_page(self, send_body: bool) -> None:
        page = render_status_page(self.endpoints.snapshot(), time.time())
        self._respond(
            HTTPStatus.OK,
            page.encode(),
            headers={"Content-Type": "text/html; charset=utf-8"},
            send_body=send_body,
        )

    def _respond(
        self,
        status: HTTPStatus,
        body: bytes | Body,
        *,
        headers: dict[str, str] | None = None,
        send_body: bool = True,
    ) -> None:
        self.send_response(status)
        all_headers = {"Content-Type": "text/plain; charset=utf-8", **(headers or {})}
        for name, value in all_headers.items():
            self.send_header(name, value)
        pieces = body.pieces if isinstance(body, Body) else (body,)
        length = body.length if isinstance(body, Body) else len(body)
        self.send_header("Content-Length", str(length))
        configured = self._web_config.headers if self._web_config is not None else ()
        if not any(name == "X-Content-Type-Options" for name, _ in configured):
            self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in configured:
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            for piece in pieces:
                self.wfile.write(piece)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(
            "http request", extra={"client": self.client_address[0], "request": format % args}
        )


class _Server(ThreadingHTTPServer):
    # One thread per connection, at most MAX_CONNECTIONS, and TLS handshakes in that thread,
    # not while accepting: a client that never completes its handshake holds up only its own
    # thread, and only for TLS_HANDSHAKE_TIMEOUT.

    daemon_threads = True
    block_on_close = False
    # socketserver's default of 5 makes a burst of connections wait for SYN retransmits
    # (1 s, 3 s, ...) instead of being accepted, and refused beyond the bound, at once.
    request_queue_size = socket.SOMAXCONN

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        web_config: WebConfigWatcher | None,
    ) -> None:
        self.web_config = web_config
        self.tls = web_config is not None and web_config.current().tls is not None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._next_refusal_warning = 0.0
        super().__init__(address, handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # ":port" means every address, IPv4 included, as in the Go exporters.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def current_web_config(self) -> WebConfig | None:
        return None if self.web_config is None else self.web_config.current()

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        if not self._slots.acquire(blocking=False):
            self._log_refusal(client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        web_config = self.current_web_config()
        if web_config is None or web_config.tls is None:
            super().finish_request(request, client_address)
            return
        assert isinstance(request, socket.socket)
        connection = self._tls_handshake(request, client_address, web_config.tls)
        if connection is None:
            return
        try:
            super().finish_request(connection, client_address)
        finally:
            self.shutdown_request(connection)

    def _tls_handshake(
        self, request: socket.socket, client_address: Any, tls: TlsSettings
    ) -> ssl.SSLSocket | None:
        # The connection after a complete handshake, or None and the socket closed.
        request.setblocking(False)
        connection = tls.context.wrap_socket(
            request, server_side=True, do_handshake_on_connect=False
        )
        try:
            _handshake(connection, time.monotonic() + TLS_HANDSHAKE_TIMEOUT)
            allowed = tls.allows_client(connection.getpeercert())
        except OSError as error:  # ssl.SSLError, TimeoutError, or the client went away
            reason = getattr(error, "reason", None) or str(error) or type(error).__name__
            if reason == "HTTP_REQUEST":
                _answer_plain_http(connection)
            log.debug("TLS handshake failed", extra={"client": client_address[0], "error": reason})
            self.shutdown_request(connection)
            return None
        if not allowed:
            log.debug(
                "client certificate names none of client_allowed_sans",
                extra={"client": client_address[0]},
            )
            self.shutdown_request(connection)
            return None
        connection.setblocking(True)
        return connection

    def _log_refusal(self, client_address: Any) -> None:
        now = time.monotonic()
        if now >= self._next_refusal_warning:
            self._next_refusal_warning = now + _REFUSAL_LOG_INTERVAL
            log.warning(
                "too many connections; closing new ones until some finish",
                extra={"limit": MAX_CONNECTIONS, "client": client_address[0]},
            )
        else:
            log.debug("too many connections", extra={"client": client_address[0]})

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        # socketserver would print a traceback to stderr; a client that vanishes mid-request
        # is routine, anything else is a bug worth a log line.
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("connection failed", extra={"client": client_address[0], "error": str(error)})
        else:
            log.error(
                "unexpected error while serving a connection",
                exc_info=error,
                extra={"client": client_address[0]},
            )


def _handshake(connection: ssl.SSLSocket, deadline: float) -> None:
    # A total deadline, not a timeout per read: a client sending one byte at a time must not
    # hold its thread any longer than one that sends nothing.
    with selectors.DefaultSelector() as selector:
        while True:
            try:
                connection.do_handshake()
            except ssl.SSLWantReadError:
                events = selectors.EVENT_READ
            except ssl.SSLWantWriteError:
                events = selectors.EVENT_WRITE
            else:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no complete TLS handshake in time")
            selector.register(connection, events)
            ready = selector.select(remaining)
            selector.unregister(connection)
            if not ready:
                raise TimeoutError("no complete TLS handshake in time")


def _answer_plain_http(connection: ssl.SSLSocket) -> None:
    # Written past the TLS layer, straight to the socket, as Go's servers do. The rest of the
    # request is read first: closing with unread data would reset the connection, and the
    # client could lose the answer.
    with contextlib.suppress(OSError):
        socket.socket.recv(connection, 1 << 16, socket.MSG_DONTWAIT)
    with contextlib.suppress(OSError):
        socket.socket.send(connection, _PLAIN_HTTP_ON_TLS_PORT)


class MetricsServer:
    """A threaded HTTP server for the endpoints, started and stopped explicitly.

    ``web_config_file`` (exporter-toolkit format) adds TLS and basic auth; it and the
    certificates it names are re-read when they change. Raises ``WebConfigError`` when it is
    invalid, and OSError when the address cannot be bound.
    """

    def __init__(
        self, listen_address: str, endpoints: Endpoints, web_config_file: Path | None = None
    ) -> None:
        host, port = parse_listen_address(listen_address)
        handler = type("Handler", (_Handler,), {"endpoints": endpoints})
        family, address = _resolve(host, port)
        web_config = None if web_config_file is None else WebConfigWatcher(web_config_file)
        server_class = type("Server", (_Server,), {"address_family": family})
        self._server = server_class(address, handler, web_config)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="http-server",
            daemon=True,
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self._server.server_address[0]
        if host in {"::", "0.0.0.0"}:  # noqa: S104 (reporting, not binding)
            host = "localhost"
        elif ":" in str(host):
            host = f"[{host}]"
        scheme = "https" if self._server.tls else "http"
        return f"{scheme}://{host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    if not host:
        if socket.has_dualstack_ipv6():
            return socket.AF_INET6, ("::", port)
        return socket.AF_INET, ("0.0.0.0", port)  # noqa: S104 (":port" means all interfaces)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    return family, (str(address[0]), port)


_STATE_ORDER = {BuildState.FAILING: 0, BuildState.ACTIVE: 1, BuildState.FINISHED: 2}


def render_status_page(snapshot: Snapshot, now: float) -> str:
    """A small HTML page listing every tracked build; all API strings escaped."""
    records = sorted(
        snapshot.records.values(), key=lambda record: (_STATE_ORDER[record.state], record.build_id)
    )
    rows = "\n".join(_status_row(record, now) for record in records[:STATUS_PAGE_MAX_ROWS])
    hidden = len(records) - STATUS_PAGE_MAX_ROWS
    more = f"<p>and {hidden} more builds, see /metrics.</p>" if hidden > 0 else ""
    counts = dict.fromkeys(BuildState, 0)
    for record in records:
        counts[record.state] += 1
    summary = ", ".join(f"{count} {state.value}" for state, count in counts.items())
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Prime Intellect build exporter</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
.failing {{ background: #fdd; }}
</style></head>
<body>
<h1>Prime Intellect build exporter</h1>
<p>Version {html.escape(__version__)}. Tracking {len(records)} builds: {summary}.</p>
<ul>
<li><a href="/metrics">Metrics</a></li>
<li><a href="/-/healthy">Health</a></li>
<li><a href="/-/ready">Readiness</a></li>
</ul>
<table>
<thead><tr><th>Build ID</th><th>Image</th><th>Tag</th><th>Status</th><th>Age</th>
<th>Last poll</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
{more}
</body>
</html>
"""


def _status_row(record: BuildRecord, now: float) -> str:
    build = record.build
    if not record.polled:
        poll = "not yet"
    elif record.last_poll_ok:
        poll = "ok"
    else:
        poll = record.last_error.value if record.last_error else "failed"
    cells = [
        record.build_id,
        build.image_name if build else "",
        build.image_tag if build else "",
        build.status if build else "",
        _age(now - build.created_at) if build else "",
        poll,
    ]
    css = ' class="failing"' if record.state is BuildState.FAILING else ""
    return f"<tr{css}>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>"


def _age(seconds: float) -> str:
    days, rest = divmod(max(0, int(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds_left = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{seconds_left}s"
    return f"{seconds_left}s"
