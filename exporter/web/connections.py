"""The sockets in front of aiohttp: what Go's ``net/http`` gives a server and aiohttp does not.

aiohttp parses requests and writes responses. This layer owns each connection around it:
the accept loop, a cap on connections (an HTTP 503 past it, never a bare close), the TLS
handshake with its own deadline, a deadline and a size cap for every request head (408 and
431), and a write deadline that drops a client that stops reading. An idle connection costs a
file descriptor and a few kilobytes, never a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# A TLS record starts with this byte when the client says hello; anything else on a TLS port
# is most likely plain HTTP.
_TLS_HANDSHAKE_RECORD = b"\x16"
# How long a refused connection is read from, and discarded, before it is closed: closing with
# unread data would reset the connection, and the client could lose the answer.
_LINGER = 1.0
_END_OF_HEAD = b"\r\n\r\n"
# The first line of the preface an HTTP/2 client sends with prior knowledge (RFC 9113, 3.4).
_HTTP2_PREFACE_LINE = b"PRI * HTTP/2.0\r\n"
# Accepting stops for this long when the process runs out of file descriptors.
_ACCEPT_BACKOFF = 0.1
# A refused or failed accept is logged at warning level at most this often.
_WARNING_INTERVAL = 60.0


@dataclass(frozen=True)
class ServerLimits:
    """Limits on every connection; docs/security-and-limits.md lists each with its default."""

    # Connections served at once; past it, new ones get an HTTP 503.
    max_connections: int = 4096
    # From accept, or from the first byte of a later request, to the end of the request head.
    request_head_timeout: float = 5.0
    # A kept-alive connection with no request in flight is closed after this long.
    idle_timeout: float = 120.0
    # A response that cannot be handed to the client for this long (it stopped reading) is
    # dropped with its connection.
    write_timeout: float = 30.0
    # The request line and every header together; past it, 431.
    max_request_head_bytes: int = 32 * 1024
    # Request bodies are read and discarded up to this size; past it, 413.
    max_request_body_bytes: int = 64 * 1024
    # From accept to a completed TLS handshake.
    tls_handshake_timeout: float = 5.0


def _canned_response(status: int, reason: str, body: str, *extra_headers: str) -> bytes:
    # A complete HTTP/1.1 answer that closes the connection.
    payload = body.encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(payload)}",
        "Connection: close",
        "X-Content-Type-Options: nosniff",
        *extra_headers,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


REQUEST_TIMEOUT = _canned_response(408, "Request Timeout", "Request head not received in time\n")
HEAD_TOO_LARGE = _canned_response(
    431, "Request Header Fields Too Large", "Request header fields too large\n"
)
TOO_MANY_CONNECTIONS = _canned_response(
    503, "Service Unavailable", "Too many connections; try again\n", "Retry-After: 1"
)
# What Go's HTTP/1 server answers to HTTP/2 with prior knowledge, with the way out.
HTTP2_NOT_SERVED = _canned_response(
    505, "HTTP Version Not Supported", "HTTP/2 is not served here; use HTTP/1.1.\n"
)
# What Go's servers answer to plain HTTP on a TLS port.
PLAIN_HTTP_ON_TLS_PORT = _canned_response(
    400, "Bad Request", "Client sent an HTTP request to an HTTPS server.\n"
)


class _Lingering:
    """Answers, then reads and discards what the client still sends, then closes."""

    def __init__(self, transport: asyncio.Transport, answer: bytes) -> None:
        transport.write(answer)
        if transport.can_write_eof():
            transport.write_eof()
        self._handle = asyncio.get_running_loop().call_later(_LINGER, transport.abort)

    def cancel(self) -> None:
        self._handle.cancel()


class GuardedConnection(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, deadlines and caps around it.

    The request handler calls ``request_started`` and ``request_finished``, which is how this
    layer knows where a request head ends without parsing HTTP itself.
    """

    def __init__(
        self,
        inner: asyncio.Protocol,
        limits: ServerLimits,
        connections: dict[asyncio.BaseTransport, GuardedConnection],
        admit: Callable[[asyncio.BaseTransport], bool] | None = None,
        set_up: Callable[[], None] = lambda: None,
    ) -> None:
        self._inner = inner
        self._limits = limits
        self._connections = connections
        self._admit = admit
        self._set_up = set_up
        self._inner_connected = False
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # Bytes of the request head being received, and whether its end has been seen.
        self._head_bytes = 0
        # The head's first bytes, as many as it takes to tell an HTTP/2 preface.
        self._head_start = b""
        self._head_started = False
        self._head_complete = False
        self._tail = b""
        # Bytes received after the end of the current head: a body, or pipelined requests.
        self._unparsed = 0
        self._overflowed = False
        self._end_of_input = False
        self._in_request = False
        self._head_deadline: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None
        self._lingering: _Lingering | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._connections[transport] = self
        self._set_up()
        if self._admit is not None and not self._admit(transport):
            transport.abort()
            return
        # Paused as soon as anything waits in user space, so the write deadline sees every
        # stall, including the last bytes of an answer that the client never reads.
        transport.set_write_buffer_limits(high=1, low=0)
        self._inner.connection_made(transport)
        self._inner_connected = True
        self._expect_head()

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None or self._overflowed:
            return
        if not self._in_request and self._head_deadline is None:
            # The first byte of a request on a kept-alive connection.
            self._expect_head()
        if self._head_deadline is not None and not self._head_complete:
            self._head_started = True
            if len(self._head_start) < len(_HTTP2_PREFACE_LINE):
                self._head_start = (self._head_start + data)[: len(_HTTP2_PREFACE_LINE)]
                if self._head_start == _HTTP2_PREFACE_LINE:
                    # aiohttp would pause on it and answer an odd 400, or nothing at all.
                    self._refuse(HTTP2_NOT_SERVED)
                    return
            end = (self._tail + data).find(_END_OF_HEAD)
            if end < 0:
                self._head_bytes += len(data)
                self._tail = (self._tail + data)[-3:]
            else:
                self._head_bytes += end + len(_END_OF_HEAD) - len(self._tail)
                self._head_complete = True
                self._unparsed = len(self._tail) + len(data) - end - len(_END_OF_HEAD)
            if self._head_bytes > self._limits.max_request_head_bytes:
                self._refuse(HEAD_TOO_LARGE)
                return
        else:
            self._unparsed += len(data)
        limits = self._limits
        excess = self._unparsed - limits.max_request_head_bytes - limits.max_request_body_bytes
        if excess > 0:
            # More than a body and the next head ahead of the answer: aiohttp would buffer
            # all of it, uncounted. What fits goes on, the rest is dropped, and the next
            # head's deadline ends the connection.
            self._overflowed = True
            log.debug("client sent too much ahead of its answers", extra=self._peer())
            data = data[: len(data) - excess]
        if data:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._lingering is not None:
            return None
        self._inner.eof_received()
        if self._in_request or self._head_complete:
            # A client that sends its request and then closes its side, as `nc -N` does,
            # still gets its answer; the head deadline closes the connection after it.
            self._end_of_input = True
            return True
        return None

    def pause_writing(self) -> None:
        if self._write_deadline is None:
            self._write_deadline = self._loop.call_later(
                self._limits.write_timeout, self._write_timed_out
            )
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._cancel_write_deadline()
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        self._cancel_write_deadline()
        if self._lingering is not None:
            self._lingering.cancel()
        if self.transport is not None:
            self._connections.pop(self.transport, None)
        if self._inner_connected:
            self._inner.connection_lost(exc)

    # -- what the request handler tells -----------------------------------------------------

    def request_started(self) -> None:
        """aiohttp has parsed a request head and handed the request over."""
        self._in_request = True
        self._cancel_head_deadline()

    def request_finished(self, *, had_body: bool) -> None:
        """The answer is written; the next byte starts the next request's head deadline."""
        self._in_request = False
        # Part of the next request may be waiting in aiohttp's buffer already.
        pipelined = self._overflowed or (self._unparsed > 0 and not had_body)
        self._head_bytes = 0
        self._head_start = b""
        self._head_started = pipelined
        self._head_complete = False
        self._tail = b""
        self._unparsed = 0
        if pipelined or self._end_of_input:
            self._expect_head()

    # -- internals -------------------------------------------------------------------------

    def _expect_head(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self._loop.call_later(
            self._limits.request_head_timeout, self._head_timed_out
        )

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._head_started:
            self._refuse(REQUEST_TIMEOUT)
        elif self.transport is not None:
            # No request is coming: close once the last answer is out (a client that stops
            # reading it meets the write deadline instead).
            self.transport.close()

    def _write_timed_out(self) -> None:
        self._write_deadline = None
        log.debug("client stopped reading; connection dropped", extra=self._peer())
        if self.transport is not None:
            self.transport.abort()

    def _refuse(self, answer: bytes) -> None:
        self._cancel_head_deadline()
        if self.transport is None or self.transport.is_closing():
            return
        log.debug("request refused", extra={**self._peer(), "status": answer[9:12].decode()})
        # aiohttp sees no more data; its own timers end with the connection.
        self._lingering = _Lingering(self.transport, answer)

    def _peer(self) -> dict[str, Any]:
        peer = None if self.transport is None else self.transport.get_extra_info("peername")
        return {"client": peer[0] if peer else "unknown"}

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _cancel_write_deadline(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None


class _Refused(asyncio.Protocol):
    """A connection past the cap, or plain HTTP on the TLS port: one canned answer, then close."""

    def __init__(self, answer: bytes, refusing: set[asyncio.Transport]) -> None:
        self._answer = answer
        self._refusing = refusing
        self._transport: asyncio.Transport | None = None
        self._lingering: _Lingering | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._refusing.add(transport)
        self._lingering = _Lingering(transport, self._answer)

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._refusing.discard(self._transport)
        if self._lingering is not None:
            self._lingering.cancel()


ProtocolFactory = Callable[[], asyncio.Protocol]


class Listener:
    """Accepts connections on a bound socket and wraps each in a ``GuardedConnection``.

    ``tls_context`` is called for every new connection, so a reloaded certificate serves the
    next handshake; ``admit`` checks a TLS client after its handshake (``client_allowed_sans``).
    """

    def __init__(
        self,
        listening: socket.socket,
        protocol_factory: ProtocolFactory,
        limits: ServerLimits,
        *,
        tls_context: Callable[[], ssl.SSLContext | None] = lambda: None,
        admit: Callable[[asyncio.BaseTransport], bool] | None = None,
    ) -> None:
        self._socket = listening
        self._protocol_factory = protocol_factory
        self._limits = limits
        self._tls_context = tls_context
        self._admit = admit
        self._connections: dict[asyncio.BaseTransport, GuardedConnection] = {}
        self._refusing: set[asyncio.Transport] = set()
        self._pending: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        self._next_warning = 0.0

    @property
    def open_connections(self) -> int:
        """Connections being served or set up, refused ones excluded."""
        return len(self._connections) + len(self._pending)

    def connection(self, transport: asyncio.BaseTransport | None) -> GuardedConnection | None:
        """The guard of the connection a request came on."""
        return None if transport is None else self._connections.get(transport)

    def start(self) -> None:
        self._socket.setblocking(False)
        self._accepting = asyncio.get_running_loop().create_task(
            self._accept_forever(), name="http-accept"
        )

    async def stop(self) -> None:
        """Stop accepting and drop every connection still open."""
        tasks = [task for task in (self._accepting, *self._pending) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._socket.close()
        for transport in [*self._connections, *self._refusing]:
            if isinstance(transport, asyncio.Transport):
                transport.abort()

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, address = await loop.sock_accept(self._socket)
            except OSError as error:
                if error.errno != errno.ECONNABORTED:
                    # Out of descriptors, most likely: the connection waits in the listen
                    # backlog until some free up, and this loop does not spin meanwhile.
                    self._warn("cannot accept connections; trying again shortly", error)
                    await asyncio.sleep(_ACCEPT_BACKOFF)
                continue
            task = loop.create_task(self._set_up(connection, address))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _set_up(self, connection: socket.socket, address: Any) -> None:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self._limits.tls_handshake_timeout
        full = self.open_connections > self._limits.max_connections
        if full:
            self._warn("too many connections; answering 503 to new ones", None)
        try:
            connection.setblocking(False)
            context = self._tls_context()
            if context is not None:
                first = await _first_byte(connection, self._limits.tls_handshake_timeout)
                if not first:
                    connection.close()
                    return
                if first != _TLS_HANDSHAKE_RECORD:
                    await loop.connect_accepted_socket(
                        lambda: self._refused(PLAIN_HTTP_ON_TLS_PORT), connection
                    )
                    return
            factory: ProtocolFactory = (
                (lambda: self._refused(TOO_MANY_CONNECTIONS)) if full else self._guarded
            )
            await loop.connect_accepted_socket(
                factory,
                connection,
                ssl=context,
                ssl_handshake_timeout=max(0.01, deadline - time.monotonic())
                if context is not None
                else None,
            )
        except (OSError, ssl.SSLError, TimeoutError) as error:
            # A client that vanished or failed its handshake; asyncio closed the socket.
            log.debug(
                "connection not set up",
                extra={"client": _host(address), "error": str(error) or type(error).__name__},
            )
            connection.close()
        except asyncio.CancelledError:
            connection.close()
            raise

    def _guarded(self) -> asyncio.Protocol:
        # Called in the connection's set-up task; the connection leaves the pending ones as it
        # joins the open ones (after its TLS handshake), so it is never counted twice.
        setting_up = asyncio.current_task()
        return GuardedConnection(
            self._protocol_factory(),
            self._limits,
            self._connections,
            admit=self._admit,
            set_up=lambda: self._pending.discard(setting_up),
        )

    def _refused(self, answer: bytes) -> asyncio.Protocol:
        return _Refused(answer, self._refusing)

    def _warn(self, message: str, error: OSError | None) -> None:
        now = time.monotonic()
        extra: dict[str, object] = {"limit": self._limits.max_connections}
        if error is not None:
            extra["error"] = str(error)
        if now >= self._next_warning:
            self._next_warning = now + _WARNING_INTERVAL
            log.warning(message, extra=extra)
        else:
            log.debug(message, extra=extra)


async def _first_byte(connection: socket.socket, wait: float) -> bytes:
    """The first byte the client sent, left in the socket; empty if none came in time."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(connection.fileno(), ready)
    try:
        async with asyncio.timeout(wait):
            await readable
    except TimeoutError:
        return b""
    finally:
        loop.remove_reader(connection.fileno())
    with contextlib.suppress(OSError):
        return connection.recv(1, socket.MSG_PEEK)
    return b""


def _host(address: Any) -> str:
    return str(address[0]) if isinstance(address, tuple) and address else "unknown"
