"""The HTTP endpoints: ``/metrics``, ``/-/healthy``, ``/-/ready`` and a status page at ``/``."""

from __future__ import annotations

import html
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from exporter import __version__
from exporter.config import parse_listen_address
from exporter.metrics import ExpositionCache, ExpositionFormat
from exporter.store import BuildRecord, BuildState, Snapshot

log = logging.getLogger(__name__)

STATUS_PAGE_MAX_ROWS = 1000
CLIENT_SOCKET_TIMEOUT = 30.0


@dataclass(frozen=True)
class Endpoints:
    """What the handlers use: the exposition cache, the store, health checks and reload."""

    metrics: ExpositionCache
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

    _ROUTES: ClassVar[dict[str, str]] = {
        "/metrics": "_serve_metrics",
        "/-/healthy": "_serve_healthy",
        "/-/ready": "_serve_ready",
        "/": "_serve_status_page",
    }
    _RELOAD_PATH = "/-/reload"

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
        body: bytes,
        *,
        headers: dict[str, str] | None = None,
        send_body: bool = True,
    ) -> None:
        self.send_response(status)
        all_headers = {"Content-Type": "text/plain; charset=utf-8", **(headers or {})}
        for name, value in all_headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(
            "http request", extra={"client": self.client_address[0], "request": format % args}
        )


class _DualStackServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # ":port" means every address, IPv4 included, as in the Go exporters.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class MetricsServer:
    """A threaded HTTP server for the endpoints, started and stopped explicitly."""

    def __init__(
        self, listen_address: str, endpoints: Endpoints, web_config_file: Path | None = None
    ) -> None:
        host, port = parse_listen_address(listen_address)
        handler = type("Handler", (_Handler,), {"endpoints": endpoints})
        family, address = _resolve(host, port)
        server_class = type("Server", (_DualStackServer,), {"address_family": family})
        self._server = server_class(address, handler)
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
        return f"http://{host}:{self.port}"

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
