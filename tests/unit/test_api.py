"""Unit tests of the API client over ``httpx.MockTransport``: every answer becomes one outcome."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from pydantic import SecretStr

from exporter.api import (
    DEFAULT_MAX_RESPONSE_BYTES,
    Answer,
    ApiClient,
    parse_retry_after,
)
from exporter.config.credentials import ApiKeySource
from exporter.models import Build, BuildPage, Outcome
from tests.helpers.support import CANARY_API_KEY, EPOCH

BASE_URL = "https://api.example.test"
BUILD_ID = "build-1"
BUILD_PREFIX = b"/api/v1/images/build/"
# An HTTP date exactly 30 seconds after EPOCH (2026-01-01T00:00:00Z was a Thursday).
THIRTY_SECONDS_AFTER_EPOCH = "Thu, 01 Jan 2026 00:00:30 GMT"

T = TypeVar("T")
Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


def build_document(build_id: str = BUILD_ID, **overrides: Any) -> dict[str, Any]:
    """A build status answer as the spec describes it."""
    document: dict[str, Any] = {
        "id": build_id,
        "imageName": "trainer",
        "imageTag": "v1",
        "status": "BUILDING",
        "createdAt": "2026-01-01T00:00:00Z",
        "startedAt": "2026-01-01T00:00:30Z",
        "completedAt": None,
        "artifacts": [
            {
                "id": "artifact-1",
                "artifactType": "CONTAINER_IMAGE",
                "status": "BUILDING",
                "createdAt": "2026-01-01T00:00:00Z",
                "startedAt": "2026-01-01T00:00:30Z",
            }
        ],
    }
    document.update(overrides)
    return document


def json_body(document: object) -> bytes:
    return json.dumps(document).encode()


def answer(
    status: int, body: bytes = b"", headers: dict[str, str] | None = None
) -> Callable[[httpx.Request], httpx.Response]:
    """A handler giving the same answer to every request."""

    def handler(request: httpx.Request) -> httpx.Response:
        return wire_response(status, body, headers)

    return handler


def wire_response(
    status: int, body: bytes = b"", headers: dict[str, str] | None = None
) -> httpx.Response:
    """A response still to be read, as from a network transport (``content=`` would preload)."""
    all_headers = {"Content-Length": str(len(body)), **(headers or {})}
    return httpx.Response(status, headers=all_headers, stream=httpx.ByteStream(body))


def failing(error: Exception) -> Callable[[httpx.Request], httpx.Response]:
    """A handler whose transport fails the way ``error`` says."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    return handler


async def never_answer(request: httpx.Request) -> httpx.Response:
    """A server that accepts the request and never sends the status line."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable: the event is never set")


async def stalled_body() -> AsyncIterator[bytes]:
    """A body that starts, then never finishes."""
    yield b'{"id": "build-1", '
    await asyncio.Event().wait()


def answer_with_stalled_body(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=stalled_body())


def fetch_once(
    handler: Handler,
    build_id: str = BUILD_ID,
    *,
    api_key: ApiKeySource | None = None,
    timeout: float = 5.0,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    wall_clock: Callable[[], float] = lambda: EPOCH,
) -> tuple[Answer[Build], list[httpx.Request]]:
    """Run one ``fetch`` against ``handler``; return its result and every request sent."""
    return call_once(
        handler,
        lambda client: client.fetch(build_id),
        api_key=api_key,
        timeout=timeout,
        max_response_bytes=max_response_bytes,
        wall_clock=wall_clock,
    )


def call_once(
    handler: Handler,
    call: Callable[[ApiClient], Awaitable[Answer[T]]],
    *,
    api_key: ApiKeySource | None = None,
    timeout: float = 5.0,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    wall_clock: Callable[[], float] = lambda: EPOCH,
) -> tuple[Answer[T], list[httpx.Request]]:
    """Run one ``call`` of a client against ``handler``; return its result and every request."""
    if api_key is None:
        api_key = ApiKeySource(value=SecretStr(CANARY_API_KEY))
    requests: list[httpx.Request] = []

    async def recording(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        response = handler(request)
        if isinstance(response, httpx.Response):
            return response
        return await response

    async def run() -> Answer[T]:
        client = ApiClient(
            BASE_URL,
            api_key,
            timeout=timeout,
            max_connections=2,
            max_response_bytes=max_response_bytes,
            transport=httpx.MockTransport(recording),
            wall_clock=wall_clock,
        )
        try:
            return await call(client)
        finally:
            await client.aclose()

    return asyncio.run(run()), requests


@dataclass(frozen=True)
class Case:
    handler: Handler
    outcome: Outcome
    detail: str
    retry_after: float | None = None
    timeout: float = 5.0
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES


def rate_limited(retry_after: str | None) -> Handler:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    return answer(429, b'{"errors": []}', headers)


def oversized_stream(size: int, chunk: int = 4096) -> Handler:
    """A 200 answer of ``size`` bytes sent in chunks, with no Content-Length."""

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, size, chunk):
            yield b" " * min(chunk, size - start)

    def handler(request: httpx.Request) -> httpx.Response:
        response = httpx.Response(200, content=chunks())
        assert "Content-Length" not in response.headers
        return response

    return handler


SMALL_CAP = 2048
ERROR_BODY = json_body({"errors": [{"param": "build_id", "details": "not a build id"}]})

CASES = {
    "200 valid": Case(answer(200, json_body(build_document())), Outcome.OK, ""),
    "200 HTML": Case(
        answer(200, b"<html><body>Bad gateway</body></html>", {"Content-Type": "text/html"}),
        Outcome.INVALID_RESPONSE,
        "body is not JSON",
    ),
    "200 JSON array": Case(
        answer(200, json_body([build_document()])),
        Outcome.INVALID_RESPONSE,
        "body is not a JSON object",
    ),
    "200 missing createdAt": Case(
        answer(200, json_body({k: v for k, v in build_document().items() if k != "createdAt"})),
        Outcome.INVALID_RESPONSE,
        "createdAt: Field required",
    ),
    "200 status is a number": Case(
        answer(200, json_body(build_document(status=3))),
        Outcome.INVALID_RESPONSE,
        "status: Input should be a valid string",
    ),
    "200 createdAt is a number": Case(
        answer(200, json_body(build_document(createdAt=EPOCH))),
        Outcome.INVALID_RESPONSE,
        "createdAt: Value error, timestamps must be ISO 8601 strings",
    ),
    "200 another build": Case(
        answer(200, json_body(build_document("build-2"))),
        Outcome.INVALID_RESPONSE,
        "answer is about a different build id",
    ),
    "200 empty body": Case(answer(200), Outcome.INVALID_RESPONSE, "body is not JSON"),
    "204": Case(answer(204), Outcome.INVALID_RESPONSE, "unexpected HTTP 204"),
    "404": Case(
        answer(404, b'{"detail": "Not Found"}'),
        Outcome.NOT_FOUND,
        "HTTP 404 for /api/v1/images/build/build-1",
    ),
    "401": Case(answer(401), Outcome.UNAUTHORIZED, "HTTP 401"),
    "403": Case(answer(403), Outcome.FORBIDDEN, "HTTP 403"),
    "429 Retry-After 7": Case(rate_limited("7"), Outcome.RATE_LIMITED, "HTTP 429", 7.0),
    "429 Retry-After date": Case(
        rate_limited(THIRTY_SECONDS_AFTER_EPOCH), Outcome.RATE_LIMITED, "HTTP 429", 30.0
    ),
    "429 Retry-After 0": Case(rate_limited("0"), Outcome.RATE_LIMITED, "HTTP 429", 0.0),
    "429 Retry-After -5": Case(rate_limited("-5"), Outcome.RATE_LIMITED, "HTTP 429", None),
    "429 Retry-After garbage": Case(rate_limited("garbage"), Outcome.RATE_LIMITED, "HTTP 429"),
    "429 no Retry-After": Case(rate_limited(None), Outcome.RATE_LIMITED, "HTTP 429"),
    "422 with error body": Case(
        answer(422, ERROR_BODY, {"Content-Type": "application/json"}),
        Outcome.CLIENT_ERROR,
        "HTTP 422",
    ),
    "422 without body": Case(answer(422), Outcome.CLIENT_ERROR, "HTTP 422"),
    "400": Case(answer(400), Outcome.CLIENT_ERROR, "HTTP 400"),
    "418": Case(answer(418), Outcome.CLIENT_ERROR, "HTTP 418"),
    # Only the build listing, which older APIs do not serve, reads 405 as not found.
    "405": Case(answer(405), Outcome.CLIENT_ERROR, "HTTP 405"),
    "500": Case(answer(500), Outcome.SERVER_ERROR, "HTTP 500"),
    "502": Case(answer(502, b"<html>Bad Gateway</html>"), Outcome.SERVER_ERROR, "HTTP 502"),
    "503": Case(answer(503, headers={"Retry-After": "5"}), Outcome.SERVER_ERROR, "HTTP 503"),
    "504": Case(answer(504), Outcome.SERVER_ERROR, "HTTP 504"),
    "301 elsewhere": Case(
        answer(301, headers={"Location": "https://evil.example/api/v1/images/build/build-1"}),
        Outcome.INVALID_RESPONSE,
        "HTTP 301 redirect to https://evil.example/api/v1/images/build/build-1, not followed",
    ),
    "302 elsewhere": Case(
        answer(302, headers={"Location": "https://evil.example/steal"}),
        Outcome.INVALID_RESPONSE,
        "HTTP 302 redirect to https://evil.example/steal, not followed",
    ),
    "302 with credentials in the Location": Case(
        answer(302, headers={"Location": "https://user:pw@evil.example:8443/x?token=s3cret#k"}),
        Outcome.INVALID_RESPONSE,
        "HTTP 302 redirect to https://evil.example:8443/x, not followed",
    ),
    "302 without a Location": Case(
        answer(302), Outcome.INVALID_RESPONSE, "HTTP 302 redirect to (no Location), not followed"
    ),
    "connection refused": Case(
        failing(httpx.ConnectError("[Errno 111] Connection refused")),
        Outcome.CONNECTION_ERROR,
        "ConnectError: [Errno 111] Connection refused (api.example.test:443)",
    ),
    "connection dropped": Case(
        failing(httpx.RemoteProtocolError("Server disconnected without sending a response.")),
        Outcome.CONNECTION_ERROR,
        "RemoteProtocolError: Server disconnected without sending a response. "
        "(api.example.test:443)",
    ),
    "read timeout": Case(
        failing(httpx.ReadTimeout("timed out")), Outcome.TIMEOUT, "no complete answer within 5s"
    ),
    "connect timeout": Case(
        failing(httpx.ConnectTimeout("timed out")), Outcome.TIMEOUT, "no complete answer within 5s"
    ),
    "Content-Length over the cap": Case(
        answer(200, b" " * (SMALL_CAP + 1)),
        Outcome.INVALID_RESPONSE,
        f"body larger than {SMALL_CAP} bytes",
        max_response_bytes=SMALL_CAP,
    ),
    "chunked body over the cap": Case(
        oversized_stream(SMALL_CAP * 4),
        Outcome.INVALID_RESPONSE,
        f"body larger than {SMALL_CAP} bytes",
        max_response_bytes=SMALL_CAP,
    ),
    "gzip body inflating over the cap": Case(
        answer(200, gzip.compress(b" " * SMALL_CAP * 50), {"Content-Encoding": "gzip"}),
        Outcome.INVALID_RESPONSE,
        f"body larger than {SMALL_CAP} bytes",
        max_response_bytes=SMALL_CAP,
    ),
    "body that is not gzip": Case(
        answer(200, b"not gzip at all", {"Content-Encoding": "gzip"}),
        Outcome.INVALID_RESPONSE,
        "compressed body is corrupt",
    ),
    "gzip body cut short": Case(
        answer(200, gzip.compress(b'{"id": "x"}')[:-12], {"Content-Encoding": "gzip"}),
        Outcome.INVALID_RESPONSE,
        "compressed body ends early",
    ),
    "brotli body": Case(
        answer(200, b"\x0b\x02\x80", {"Content-Encoding": "br"}),
        Outcome.INVALID_RESPONSE,
        "unsupported Content-Encoding 'br'",
    ),
    "small gzip body": Case(
        answer(200, gzip.compress(json_body(build_document())), {"Content-Encoding": "gzip"}),
        Outcome.OK,
        "",
    ),
    "no status line ever": Case(
        never_answer, Outcome.TIMEOUT, "no complete answer within 0.2s", timeout=0.2
    ),
    "body never finishes": Case(
        answer_with_stalled_body, Outcome.TIMEOUT, "no complete answer within 0.2s", timeout=0.2
    ),
}


def run_case(case: Case) -> tuple[Answer[Build], list[httpx.Request]]:
    return fetch_once(
        case.handler, timeout=case.timeout, max_response_bytes=case.max_response_bytes
    )


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_each_answer_maps_to_one_outcome_with_a_safe_detail(case: Case) -> None:
    result, requests = run_case(case)

    assert result.outcome is case.outcome
    assert result.detail == case.detail
    assert result.retry_after == case.retry_after
    assert (result.value is not None) == (case.outcome is Outcome.OK)
    assert len(requests) == 1


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_detail_never_contains_the_api_key(case: Case) -> None:
    result, requests = run_case(case)

    assert requests[0].headers["Authorization"] == f"Bearer {CANARY_API_KEY}"
    assert CANARY_API_KEY not in result.detail
    assert CANARY_API_KEY not in repr(result)


def test_valid_answer_gives_the_parsed_build() -> None:
    result, _ = fetch_once(answer(200, json_body(build_document())))

    assert result.outcome is Outcome.OK
    assert result.detail == ""
    assert result.value is not None
    assert result.value.id == BUILD_ID
    assert result.value.image_name == "trainer"
    assert result.value.image_tag == "v1"
    assert result.value.status == "BUILDING"
    assert result.value.created_at == EPOCH
    assert result.value.queued_seconds == 30.0
    assert [artifact.id for artifact in result.value.artifacts] == ["artifact-1"]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_not_followed_and_counts_as_invalid_response(status: int) -> None:
    def redirect(request: httpx.Request) -> httpx.Response:
        if request.url.host != "api.example.test":
            return wire_response(200, json_body(build_document()))
        return httpx.Response(status, headers={"Location": "https://evil.example/build-1"})

    result, requests = fetch_once(redirect)

    assert result.outcome is Outcome.INVALID_RESPONSE
    assert result.detail == f"HTTP {status} redirect to https://evil.example/build-1, not followed"
    assert [request.url.host for request in requests] == ["api.example.test"]


def test_request_carries_bearer_key_user_agent_and_asks_for_uncompressed_json() -> None:
    _, requests = fetch_once(answer(404))

    (request,) = requests
    assert request.method == "GET"
    assert request.headers["Authorization"] == f"Bearer {CANARY_API_KEY}"
    assert request.headers["User-Agent"].startswith("primeintellect-build-exporter/")
    assert request.headers["Accept"] == "application/json"
    assert request.headers["Accept-Encoding"] == "identity"
    assert str(request.url) == f"{BASE_URL}/api/v1/images/build/{BUILD_ID}"


def test_client_without_a_key_sends_no_authorization_header() -> None:
    requests: list[httpx.Request] = []

    async def run() -> Answer[Build]:
        def handler(request: httpx.Request) -> httpx.Response:
            requests.append(request)
            return httpx.Response(401)

        client = ApiClient(
            "http://127.0.0.1:8080",
            None,
            timeout=5.0,
            max_connections=1,
            transport=httpx.MockTransport(handler),
        )
        try:
            return await client.fetch(BUILD_ID)
        finally:
            await client.aclose()

    result = asyncio.run(run())

    assert result.outcome is Outcome.UNAUTHORIZED
    assert len(requests) == 1
    assert "Authorization" not in requests[0].headers


def test_rotated_key_file_is_sent_on_the_next_request(tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("pk-first-key\n", encoding="utf-8")
    source = ApiKeySource(file=key_file)
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        return httpx.Response(404)

    fetch_once(handler, api_key=source)
    key_file.write_text("pk-second-and-longer-key\n", encoding="utf-8")
    fetch_once(handler, api_key=source)

    assert seen == ["Bearer pk-first-key", "Bearer pk-second-and-longer-key"]


@pytest.mark.parametrize(
    ("build_id", "raw_path"),
    [
        ("a.b_c-1", b"/api/v1/images/build/a.b_c-1"),
        ("x/../y", b"/api/v1/images/build/x%2F..%2Fy"),
        ("a?b", b"/api/v1/images/build/a%3Fb"),
        ("a#b", b"/api/v1/images/build/a%23b"),
        ("50%", b"/api/v1/images/build/50%25"),
        ("a b", b"/api/v1/images/build/a%20b"),
        ("../../admin", b"/api/v1/images/build/..%2F..%2Fadmin"),
    ],
)
def test_build_id_is_sent_as_one_percent_encoded_path_segment(
    build_id: str, raw_path: bytes
) -> None:
    _, requests = fetch_once(answer(404), build_id)

    (request,) = requests
    assert request.url.raw_path == raw_path
    assert request.url.host == "api.example.test"
    assert request.url.query == b""
    assert request.url.fragment == ""


@pytest.mark.parametrize("build_id", [".", ".."])
def test_dot_segment_build_id_stays_inside_the_build_path(build_id: str) -> None:
    _, requests = fetch_once(answer(404), build_id)

    for request in requests:
        assert request.url.raw_path.startswith(BUILD_PREFIX)
        assert len(request.url.raw_path) > len(BUILD_PREFIX)


@pytest.mark.parametrize(
    "base_url",
    [
        "http://api.primeintellect.ai",
        "http://10.0.0.1:8080",
        "http://localhost.evil.example",
        "http://127.0.0.1.evil.example",
        "http://127.0.0.1@evil.example",
    ],
)
def test_plain_http_to_a_remote_host_is_refused(base_url: str) -> None:
    with pytest.raises(ValueError, match="only sent over https or to a loopback address"):
        ApiClient(base_url, None, timeout=1.0, max_connections=1)


@pytest.mark.parametrize(
    "base_url",
    [
        "https://api.primeintellect.ai",
        "http://127.0.0.1:8080",
        "http://localhost:8080",
        "http://[::1]:8080",
    ],
)
def test_https_or_loopback_base_url_is_accepted(base_url: str) -> None:
    async def build_url() -> str:
        client = ApiClient(base_url + "/", None, timeout=1.0, max_connections=1)
        try:
            return client.build_url("b-1")
        finally:
            await client.aclose()

    assert asyncio.run(build_url()) == base_url + "/api/v1/images/build/b-1"


def test_declared_content_length_over_the_cap_is_refused_without_reading_the_body() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        # The body never ends: only the header check can give an answer before the timeout.
        return httpx.Response(200, headers={"Content-Length": "5000"}, content=stalled_body())

    result, _ = fetch_once(handler, timeout=5.0, max_response_bytes=4999)

    assert result.outcome is Outcome.INVALID_RESPONSE
    assert result.detail == "body larger than 4999 bytes"


def test_endless_chunked_body_is_read_only_up_to_the_cap() -> None:
    sent: list[int] = []

    async def endless() -> AsyncIterator[bytes]:
        while True:
            sent.append(100)
            yield b" " * 100

    result, _ = fetch_once(
        lambda request: httpx.Response(200, content=endless()), max_response_bytes=1000
    )

    assert result.outcome is Outcome.INVALID_RESPONSE
    assert result.detail == "body larger than 1000 bytes"
    assert sum(sent) == 1100


def test_body_exactly_at_the_cap_is_accepted_and_one_byte_more_is_not() -> None:
    body = json_body(build_document())
    padded = body + b" " * (SMALL_CAP - len(body))
    assert len(padded) == SMALL_CAP

    def streamed(content: bytes) -> Handler:
        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(content), 100):
                yield content[start : start + 100]

        return lambda request: httpx.Response(200, content=chunks())

    at_cap, _ = fetch_once(streamed(padded), max_response_bytes=SMALL_CAP)
    over_cap, _ = fetch_once(streamed(padded + b" "), max_response_bytes=SMALL_CAP)
    declared_over_cap, _ = fetch_once(answer(200, padded + b" "), max_response_bytes=SMALL_CAP)

    assert at_cap.outcome is Outcome.OK
    assert over_cap.outcome is Outcome.INVALID_RESPONSE
    assert declared_over_cap.outcome is Outcome.INVALID_RESPONSE
    assert over_cap.detail == declared_over_cap.detail == f"body larger than {SMALL_CAP} bytes"


@pytest.mark.parametrize(
    "handler", [never_answer, answer_with_stalled_body], ids=["no status line", "stalled body"]
)
def test_stalled_server_gives_timeout_within_the_deadline(handler: Handler) -> None:
    started = time.monotonic()
    result, _ = fetch_once(handler, timeout=0.2)
    elapsed = time.monotonic() - started

    assert result.outcome is Outcome.TIMEOUT
    assert result.detail == "no complete answer within 0.2s"
    # A client deadline is real time: 0.2 s on a quiet machine (measured), ten times that here.
    assert elapsed < 2.0


@pytest.mark.parametrize(
    ("error", "detail"),
    [
        (
            httpx.ConnectError("refused\nTraceback: more lines"),
            "ConnectError: refused (api.example.test:443)",
        ),
        (httpx.ConnectError(""), "ConnectError (api.example.test:443)"),
        (httpx.ReadError("x" * 500), "ReadError: " + "x" * 200 + " (api.example.test:443)"),
    ],
    ids=["first line only", "no message", "long message cut"],
)
def test_transport_error_detail_is_one_short_line(error: httpx.HTTPError, detail: str) -> None:
    result, _ = fetch_once(failing(error))

    assert result.outcome is Outcome.CONNECTION_ERROR
    assert result.detail == detail


@pytest.mark.parametrize(
    "error",
    [httpx.ReadTimeout("slow"), httpx.WriteTimeout("slow"), httpx.PoolTimeout("busy")],
    ids=["read", "write", "pool"],
)
def test_every_httpx_timeout_counts_as_timeout(error: httpx.TimeoutException) -> None:
    result, _ = fetch_once(failing(error), timeout=3.0)

    assert result.outcome is Outcome.TIMEOUT
    assert result.detail == "no complete answer within 3s"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("-5", None),
        (THIRTY_SECONDS_AFTER_EPOCH, 30.0),
        ("Wed, 31 Dec 2025 23:59:00 GMT", 0.0),
        ("Thu, 01 Jan 2026 01:00:00 +0100", 0.0),
        ("Thu, 01 Jan 2026 00:00:30 -0000", None),
        # The other two HTTP-date forms: RFC 850, and asctime (always GMT).
        ("Thursday, 01-Jan-26 00:00:30 GMT", 30.0),
        ("Thu Jan  1 00:00:30 2026", 30.0),
        ("Thu Jan 01 00:00:30 2026", 30.0),
        ("garbage", None),
        ("", None),
        ("-", None),
        ("5.5", None),
        ("1e3", None),
        ("+5", None),
        ("999999999999", 999999999999.0),
        (None, None),
    ],
)
def test_retry_after_is_read_as_seconds_or_http_date(
    value: str | None, expected: float | None
) -> None:
    assert parse_retry_after(value, EPOCH) == expected


@pytest.mark.parametrize("value", ["--5", "\xb2"])
def test_retry_after_that_only_looks_numeric_is_unreadable(value: str) -> None:
    assert parse_retry_after(value, EPOCH) is None


@pytest.mark.parametrize("raw_value", [b"--5", b"\xb2"])
def test_rate_limit_with_malformed_numeric_retry_after_is_still_rate_limited(
    raw_value: bytes,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers=[(b"Retry-After", raw_value)])

    result, _ = fetch_once(handler)

    assert result.outcome is Outcome.RATE_LIMITED
    assert result.retry_after is None


# -- the build listing ---------------------------------------------------------------------------

BUILDS_URL = f"{BASE_URL}/api/v1/images/builds"


def list_builds_once(
    handler: Handler, *, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES, **query: Any
) -> tuple[Answer[BuildPage], list[httpx.Request]]:
    """Run one ``list_builds`` (offset 0, limit 100 unless given) against ``handler``."""
    arguments = {"offset": 0, "limit": 100, **query}
    return call_once(
        handler,
        lambda client: client.list_builds(**arguments),
        max_response_bytes=max_response_bytes,
    )


def test_a_build_page_is_asked_with_offset_limit_and_a_team_only_when_there_is_one() -> None:
    page = json_body({"data": [build_document()], "total_count": 1, "offset": 0, "limit": 2})
    result, requests = list_builds_once(answer(200, page), offset=0, limit=2)
    _, with_team = list_builds_once(answer(200, page), offset=2, limit=2, team_id="team-1")
    _, empty_team = list_builds_once(answer(200, page), offset=4, limit=2, team_id="")

    assert result.outcome is Outcome.OK
    assert result.value is not None
    assert [build.id for build in result.value.builds] == [BUILD_ID]
    assert (result.value.total, result.value.skipped) == (1, 0)
    urls = [str(request.url) for request in (*requests, *with_team, *empty_team)]
    assert urls == [
        f"{BUILDS_URL}?offset=0&limit=2",
        f"{BUILDS_URL}?offset=2&limit=2&teamId=team-1",
        f"{BUILDS_URL}?offset=4&limit=2",
    ]
    (request,) = requests
    assert request.method == "GET"
    assert request.headers["Authorization"] == f"Bearer {CANARY_API_KEY}"
    assert request.headers["Accept-Encoding"] == "identity"


BUILD_LIST_CASES = {
    "200 page": Case(answer(200, json_body({"data": []})), Outcome.OK, ""),
    "200 items that are no builds": Case(
        answer(200, json_body({"data": [1, "x", {"id": "b"}]})), Outcome.OK, ""
    ),
    "200 no data": Case(
        answer(200, json_body({"items": []})),
        Outcome.INVALID_RESPONSE,
        "data: not a list of builds",
    ),
    "200 HTML": Case(answer(200, b"<html>ok</html>"), Outcome.INVALID_RESPONSE, "body is not JSON"),
    "404, an API without the listing": Case(
        answer(404, b'{"detail": "Not Found"}'),
        Outcome.NOT_FOUND,
        "HTTP 404 for /api/v1/images/builds",
    ),
    "405, another route on the path": Case(
        answer(405, b'{"detail": "Method Not Allowed"}'),
        Outcome.NOT_FOUND,
        "HTTP 405 for /api/v1/images/builds",
    ),
    "422, a refused parameter": Case(
        answer(422, ERROR_BODY, {"Content-Type": "application/json"}),
        Outcome.CLIENT_ERROR,
        "HTTP 422",
    ),
    "401": Case(answer(401), Outcome.UNAUTHORIZED, "HTTP 401"),
    "403": Case(answer(403), Outcome.FORBIDDEN, "HTTP 403"),
    "429 Retry-After date": Case(
        rate_limited(THIRTY_SECONDS_AFTER_EPOCH), Outcome.RATE_LIMITED, "HTTP 429", 30.0
    ),
    "503": Case(answer(503), Outcome.SERVER_ERROR, "HTTP 503"),
    "302": Case(
        answer(302, headers={"Location": "https://evil.example/builds?token=s3cret"}),
        Outcome.INVALID_RESPONSE,
        "HTTP 302 redirect to https://evil.example/builds, not followed",
    ),
    "chunked body over the cap": Case(
        oversized_stream(SMALL_CAP * 4),
        Outcome.INVALID_RESPONSE,
        f"body larger than {SMALL_CAP} bytes",
        max_response_bytes=SMALL_CAP,
    ),
    "connection refused": Case(
        failing(httpx.ConnectError("[Errno 111] Connection refused")),
        Outcome.CONNECTION_ERROR,
        "ConnectError: [Errno 111] Connection refused (api.example.test:443)",
    ),
    "read timeout": Case(
        failing(httpx.ReadTimeout("timed out")), Outcome.TIMEOUT, "no complete answer within 5s"
    ),
}


@pytest.mark.parametrize("case", BUILD_LIST_CASES.values(), ids=BUILD_LIST_CASES.keys())
def test_each_answer_of_the_build_listing_maps_to_one_outcome(case: Case) -> None:
    result, requests = list_builds_once(case.handler, max_response_bytes=case.max_response_bytes)

    assert (result.outcome, result.detail, result.retry_after) == (
        case.outcome,
        case.detail,
        case.retry_after,
    )
    assert (result.value is not None) == (case.outcome is Outcome.OK)
    assert [request.url.path for request in requests] == ["/api/v1/images/builds"]
    assert CANARY_API_KEY not in repr(result)
