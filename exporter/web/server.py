"""The HTTP endpoints: ``/metrics``, ``/-/healthy``, ``/-/ready``, ``/-/reload``, the status
page ``/`` and a page per build, ``/build/{id}``.

aiohttp's low-level server parses requests and writes answers on the exporter's event loop;
``exporter.web.connections`` puts deadlines and caps around every connection. With a web config
file (exporter-toolkit format, see ``exporter.web.webconfig``) it serves HTTPS and/or requires
basic auth on every path.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from exporter import __version__
from exporter.blocking import in_daemon_thread
from exporter.config.grammar import parse_listen_address
from exporter.exposition import ExpositionFormat, accepts_gzip, negotiate_format
from exporter.exposition_cache import Body
from exporter.store import Inventory, Snapshot
from exporter.telemetry import Component, TelemetrySnapshot
from exporter.web.auth import AUTH_REALM
from exporter.web.connections import Listener, ServerLimits
from exporter.web.status_page import (
    CONTENT_SECURITY_POLICY,
    PageContext,
    PageQuery,
    render_build_page,
    render_status_page,
)
from exporter.web.webconfig import WebConfig, WebConfigWatcher

log = logging.getLogger(__name__)

SERVER_SOFTWARE = f"primeintellect-build-exporter/{__version__}"
# Renders of builds run in these threads, so a cold render of a large body never stalls the
# loop.
RENDER_THREADS = 2
# Bodies are written in parts of about this size: few enough writes to be cheap, and small
# enough that a client that stops reading holds one part in the buffer, not the whole body.
WRITE_PART_BYTES = 256 * 1024
# How often the web config file and its certificates are checked for changes.
WEB_CONFIG_CHECK_INTERVAL = 1.0
# File descriptors kept for everything but HTTP clients: API connections, files, the loop.
_RESERVED_FILE_DESCRIPTORS = 128
_RELOAD_PATH = "/-/reload"
_ROUTES = ("/metrics", "/-/healthy", "/-/ready", "/")
_BUILD_PAGE_PREFIX = "/build/"
# Rendered pages kept, per snapshot, query and second: a page open in many tabs, or
# refreshing, costs one render.
_KEPT_PAGES = 8
_PAGE_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class ExpositionSource(Protocol):
    """Where ``/metrics`` bodies come from (an ExpositionCache in the exporter)."""

    def body(self, format: ExpositionFormat, *, gzip: bool) -> Body: ...

    def kept_body(self, format: ExpositionFormat, *, gzip: bool) -> Body | None:
        """The body if it needs no rendering of builds, else None."""
        ...


@dataclass(frozen=True)
class Endpoints:
    """What the handlers use: the exposition cache, the store, health checks and reload."""

    metrics: ExpositionSource
    snapshot: Callable[[], Snapshot]
    unhealthy_reason: Callable[[], str | None]
    unready_reason: Callable[[], str | None]
    # Reloads the configuration and returns the error, or None; None when the lifecycle
    # API is disabled.
    reload: Callable[[], Awaitable[str | None]] | None
    # Counts and logs an unexpected exception of a component, such as the renderer.
    internal_error: Callable[[Component, BaseException], None]
    # The requests per second this replica may spend, and the exporter's own state (API up,
    # rate-limit pause), for the status page.
    request_budget: Callable[[], float | None] = lambda: None
    telemetry: Callable[[], TelemetrySnapshot | None] = lambda: None
    # The scope's images, with discovery.images on.
    inventory: Callable[[], Inventory | None] = lambda: None
    # The wall clock the pages count ages against: the one the store stamps builds with.
    now: Callable[[], float] = time.time


class _ClientMistakeLogger(logging.Logger):
    """aiohttp logs each malformed request at error level; on a port anyone can reach, those
    are the clients' mistakes, so they go to debug."""

    def error(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        self.debug(msg, *args, exc_info=exc_info, **kwargs)


class MetricsServer:
    """The HTTP server, bound at construction, served on the running loop by ``start``.

    ``web_config_file`` (exporter-toolkit format) adds TLS and basic auth; it and the
    certificates it names are re-read when they change. Raises ``WebConfigError`` when it is
    invalid, and OSError when the address cannot be bound.
    """

    def __init__(
        self,
        listen_address: str,
        endpoints: Endpoints,
        web_config_file: Path | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        self._endpoints = endpoints
        self._limits = _within_file_limit(limits or ServerLimits())
        self._web_config = None if web_config_file is None else WebConfigWatcher(web_config_file)
        self._tls = self._web_config is not None and self._web_config.current().tls is not None
        host, port = parse_listen_address(listen_address)
        self._socket = _bind(host, port)
        self._render = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="render")
        # Pages render in a thread of their own, so a flood of them never delays /metrics.
        self._page_render = ThreadPoolExecutor(1, thread_name_prefix="page")
        self._pages: dict[
            tuple[str, PageQuery | None, int, int],
            tuple[TelemetrySnapshot | None, Inventory | None, str | None],
        ] = {}
        self._http: web.Server | None = None
        self._listener: Listener | None = None
        self._watching: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        host = str(self._socket.getsockname()[0])
        if host in {"::", "0.0.0.0"}:  # noqa: S104 (reporting, not binding)
            host = "localhost"
        elif ":" in host:
            host = f"[{host}]"
        scheme = "https" if self._tls else "http"
        return f"{scheme}://{host}:{self.port}"

    def open_connections(self) -> int:
        """Connections being set up or served now; refused ones are not counted."""
        return 0 if self._listener is None else self._listener.open_connections

    async def start(self) -> None:
        """Accept connections on the running event loop."""
        logger = _ClientMistakeLogger(f"{__name__}.http")
        logger.parent = log
        limits = self._limits
        self._http = web.Server(
            self._handle,
            keepalive_timeout=limits.idle_timeout,
            access_log=None,
            logger=logger,
            # The head is capped as a whole by the connection layer, answering 431.
            max_line_size=limits.max_request_head_bytes,
            max_field_size=limits.max_request_head_bytes,
            max_headers=limits.max_request_head_bytes // 4,
            lingering_time=1.0,
        )
        self._listener = Listener(
            self._socket,
            self._http,
            limits,
            tls_context=self._tls_context,
            admit=self._admit if self._tls else None,
        )
        self._listener.start()
        if self._web_config is not None:
            self._watching = asyncio.get_running_loop().create_task(
                self._watch_web_config(self._web_config), name="web-config"
            )

    async def stop(self) -> None:
        """Stop accepting, close every connection, and release the address."""
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)
        if self._listener is not None:
            await self._listener.stop()
        else:
            self._socket.close()
        if self._http is not None:
            await self._http.shutdown(timeout=1.0)
            # Aborted connections learn it on the next turns of the loop; their request tasks
            # end on the one after.
            for _ in range(3):
                await asyncio.sleep(0)
        self._render.shutdown(wait=False, cancel_futures=True)
        self._page_render.shutdown(wait=False, cancel_futures=True)

    # -- TLS -------------------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext | None:
        config = None if self._web_config is None else self._web_config.current()
        return None if config is None or config.tls is None else config.tls.context

    def _admit(self, transport: asyncio.BaseTransport) -> bool:
        config = None if self._web_config is None else self._web_config.current()
        if config is None or config.tls is None:
            return True
        if config.tls.allows_client(transport.get_extra_info("peercert")):
            return True
        peer = transport.get_extra_info("peername")
        log.debug(
            "client certificate names none of client_allowed_sans",
            extra={"client": peer[0] if peer else "unknown"},
        )
        return False

    async def _watch_web_config(self, watcher: WebConfigWatcher) -> None:
        while True:
            await asyncio.sleep(WEB_CONFIG_CHECK_INTERVAL)
            try:
                # Reading certificates and hashing the dummy password take time: not on the loop,
                # and in a thread that a hung read cannot use to hold up shutdown.
                await in_daemon_thread(watcher.check, "web-config-check")
            except Exception as error:  # noqa: BLE001 (counted and logged by internal_error)
                self._endpoints.internal_error(Component.SERVER, error)

    # -- requests --------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        connection = (
            None if self._listener is None else self._listener.connection(request.transport)
        )
        if connection is not None:
            connection.request_started()
        web_config = None if self._web_config is None else self._web_config.current()
        try:
            return await self._answer(request, web_config)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as error:  # noqa: BLE001 (a bug answers 500, nothing worse)
            self._endpoints.internal_error(Component.SERVER, error)
            return self._respond(
                web_config, 500, "Internal error; see the exporter's log\n", close=True
            )
        finally:
            if connection is not None:
                connection.request_finished(had_body=request.body_exists)

    async def _answer(
        self, request: web.BaseRequest, web_config: WebConfig | None
    ) -> web.StreamResponse:
        if web_config is not None:
            if web_config.rate_limiter is not None and not web_config.rate_limiter.allow():
                return self._respond(web_config, 429, "Too many requests\n", close=True)
            if web_config.basic_auth is not None and not await web_config.basic_auth.authorized(
                request.headers.get("Authorization")
            ):
                return self._respond(
                    web_config,
                    401,
                    "Unauthorized\n",
                    {"WWW-Authenticate": f'Basic realm="{AUTH_REALM}"'},
                )
        refusal = await self._discard_body(request, web_config)
        if refusal is not None:
            return refusal
        path, method = request.path, request.method
        if path == _RELOAD_PATH:
            if method in {"POST", "PUT"}:
                return await self._reload(web_config)
            return self._respond(web_config, 405, "Method not allowed\n", {"Allow": "POST, PUT"})
        is_page = path == "/" or path.startswith(_BUILD_PAGE_PREFIX)
        if path not in _ROUTES and not is_page:
            return self._respond(web_config, 404, "Not found\n")
        if method not in {"GET", "HEAD"}:
            return self._respond(web_config, 405, "Method not allowed\n", {"Allow": "GET, HEAD"})
        if path == "/metrics":
            return await self._metrics(request, web_config)
        if is_page:
            page = await self._page(path, request.query)
            if page is None:
                return self._respond(web_config, 404, "No such build is tracked\n")
            return self._respond(web_config, 200, page, _PAGE_HEADERS)
        problem = (
            self._endpoints.unhealthy_reason()
            if path == "/-/healthy"
            else self._endpoints.unready_reason()
        )
        if problem is None:
            return self._respond(
                web_config, 200, "Healthy\n" if path == "/-/healthy" else "Ready\n"
            )
        return self._respond(web_config, 503, f"{problem}\n")

    async def _page(self, path: str, params: Mapping[str, str]) -> str | None:
        """The status page or a build's page, rendered off the loop, once per snapshot, query
        and second; None for a build that is not tracked."""
        snapshot, telemetry = self._endpoints.snapshot(), self._endpoints.telemetry()
        inventory = self._endpoints.inventory()
        now = self._endpoints.now()
        query = PageQuery.from_params(params) if path == "/" else None
        key = (path, query, snapshot.version, int(now))
        kept = self._pages.get(key)
        if kept is not None and kept[0] is telemetry and kept[1] is inventory:
            return kept[2]
        context = PageContext(snapshot, telemetry, now, self._endpoints.request_budget(), inventory)
        render = (
            partial(render_status_page, context, query)
            if query is not None
            else partial(render_build_page, context, path.removeprefix(_BUILD_PAGE_PREFIX))
        )
        page = await asyncio.get_running_loop().run_in_executor(self._page_render, render)
        self._pages[key] = (telemetry, inventory, page)
        while len(self._pages) > _KEPT_PAGES:
            del self._pages[next(iter(self._pages))]
        return page

    async def _discard_body(
        self, request: web.BaseRequest, web_config: WebConfig | None
    ) -> web.StreamResponse | None:
        # No endpoint takes a body; one is read and dropped, so it is never taken for the next
        # request, or refused.
        if not request.body_exists:
            return None
        limit = self._limits.max_request_body_bytes
        if (request.content_length or 0) <= limit:
            received = 0
            try:
                async with asyncio.timeout(self._limits.request_head_timeout):
                    while received <= limit and (chunk := await request.content.readany()):
                        received += len(chunk)
            except TimeoutError:
                return self._respond(
                    web_config, 408, "Request body not received in time\n", close=True
                )
            if received <= limit:
                return None
        return self._respond(web_config, 413, "Request body too large\n", close=True)

    async def _metrics(
        self, request: web.BaseRequest, web_config: WebConfig | None
    ) -> web.StreamResponse:
        format = negotiate_format(request.headers.get("Accept", ""))
        gzip = accepts_gzip(request.headers.get("Accept-Encoding", ""))
        metrics = self._endpoints.metrics
        try:
            # A kept body is served from the loop: a hop to a thread would cost more than it.
            body = metrics.kept_body(format, gzip=gzip)
            if body is None:
                loop = asyncio.get_running_loop()
                body = await loop.run_in_executor(
                    self._render, partial(metrics.body, format, gzip=gzip)
                )
        except Exception as error:  # noqa: BLE001 (a renderer bug answers 500, nothing worse)
            self._endpoints.internal_error(Component.RENDERER, error)
            return self._respond(
                web_config, 500, "Error rendering metrics; see the exporter's log\n"
            )
        headers = {"Content-Type": format.content_type, "Vary": "Accept, Accept-Encoding"}
        if gzip:
            headers["Content-Encoding"] = "gzip"
        response = web.StreamResponse(headers=self._headers(web_config, headers))
        response.content_length = body.length
        await response.prepare(request)
        if request.method != "HEAD":
            for part in write_parts(body.pieces, WRITE_PART_BYTES):
                await response.write(part)
        await response.write_eof()
        return response

    async def _reload(self, web_config: WebConfig | None) -> web.StreamResponse:
        reload = self._endpoints.reload
        if reload is None:
            return self._respond(
                web_config, 403, "Lifecycle API is not enabled: start with --web.enable-lifecycle\n"
            )
        error = await reload()
        if error is None:
            return self._respond(web_config, 200, "Configuration reloaded\n")
        return self._respond(web_config, 500, f"Failed to reload: {error}\n")

    def _respond(
        self,
        web_config: WebConfig | None,
        status: int,
        text: str,
        headers: Mapping[str, str] | None = None,
        *,
        close: bool = False,
    ) -> web.Response:
        response = web.Response(
            status=status,
            body=text.encode(),
            headers=self._headers(
                web_config, {"Content-Type": "text/plain; charset=utf-8", **(headers or {})}
            ),
        )
        if close:
            response.force_close()
        return response

    def _headers(self, web_config: WebConfig | None, headers: Mapping[str, str]) -> dict[str, str]:
        configured = () if web_config is None else web_config.headers
        return {
            "Server": SERVER_SOFTWARE,
            "X-Content-Type-Options": "nosniff",
            **headers,
            **dict(configured),
        }


def write_parts(pieces: Iterable[bytes], size: int) -> Iterator[bytes | memoryview]:
    """The pieces as parts of at least ``size`` bytes (the last may be shorter): large pieces
    are sliced, small ones joined with their neighbours."""
    pending: list[bytes | memoryview] = []
    pending_bytes = 0
    for piece in pieces:
        view = memoryview(piece)
        for start in range(0, len(view), size):
            part = view[start : start + size] if len(view) > size else piece
            pending.append(part)
            pending_bytes += len(part)
            if pending_bytes >= size:
                yield pending[0] if len(pending) == 1 else b"".join(pending)
                pending, pending_bytes = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else b"".join(pending)


def _bind(host: str, port: int) -> socket.socket:
    family, address = _resolve(host, port)
    listening = socket.socket(family, socket.SOCK_STREAM)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and not host:
            # ":port" means every address, IPv4 included, as in the Go exporters.
            listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listening.bind(address)
        listening.listen(socket.SOMAXCONN)
    except OSError:
        listening.close()
        raise
    return listening


def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    if not host:
        if socket.has_dualstack_ipv6():
            return socket.AF_INET6, ("::", port)
        return socket.AF_INET, ("0.0.0.0", port)  # noqa: S104 (":port" means all interfaces)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    return family, (str(address[0]), port)


def _within_file_limit(limits: ServerLimits) -> ServerLimits:
    # Each connection holds a file descriptor; past the process's limit, accepting would fail
    # instead of answering 503.
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limits
    available = max(16, soft - _RESERVED_FILE_DESCRIPTORS)
    if limits.max_connections <= available:
        return limits
    log.warning(
        "the open-file limit caps concurrent HTTP connections",
        extra={"max_connections": available, "open_file_limit": soft},
    )
    return replace(limits, max_connections=available)
