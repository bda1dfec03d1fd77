"""The Prime Intellect API client: one GET per request, every failure a typed outcome."""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Generic, TypeVar
from urllib.parse import quote, urlsplit

import httpx

from exporter import __version__
from exporter.config.credentials import ApiKeySource
from exporter.config.grammar import is_loopback_host
from exporter.models import (
    Build,
    BuildPage,
    ImagePage,
    InvalidAnswerError,
    InvalidBuildError,
    Outcome,
    parse_build,
    parse_build_page,
    parse_image_page,
)

USER_AGENT = f"primeintellect-build-exporter/{__version__} python-httpx/{httpx.__version__}"
DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024
BUILD_PATH = "/api/v1/images/build/"
IMAGES_PATH = "/api/v1/images"
BUILDS_PATH = "/api/v1/images/builds"
# What says "no such thing here": for a build, 404; for the build listing, which older APIs do
# not serve, also 405 (another route holding the path for other methods).
_NOT_FOUND = frozenset({404})
_NOT_SERVED = frozenset({404, 405})
_DELAY_SECONDS = re.compile(r"[0-9]+")
# "Sun Nov  6 08:49:37 1994": the third HTTP-date form, after RFC 1123 and RFC 850.
_ASCTIME_DATE = re.compile(r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}")


# Covariant: an answer of a build is an answer, for code that reads only its outcome.
T = TypeVar("T", covariant=True)


@dataclass(frozen=True, slots=True)
class Answer(Generic[T]):
    """What one request came to: the parsed answer (a build, a listing page) when the outcome
    is OK, else a reason safe to log and, for a 429, the seconds the API asked to wait."""

    outcome: Outcome
    value: T | None = None
    detail: str = ""
    retry_after: float | None = None


class _UnreadableBodyError(Exception):
    """The body is too large, cut short or not decodable; the message says which."""


class ApiClient:
    """The API with one key over one pooled ``httpx.AsyncClient``: a build's status, the image
    listing and the build listing."""

    def __init__(
        self,
        base_url: str,
        api_key: ApiKeySource | None,
        *,
        timeout: float,
        max_connections: int,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "https" and not is_loopback_host(parts.hostname or ""):
            raise ValueError("the API key is only sent over https or to a loopback address")
        self._base_url = base_url.rstrip("/")
        # Where a failure happened, for log lines; the config refuses secrets in base_url.
        port = parts.port or (443 if parts.scheme == "https" else 80)
        self._host_and_port = f"{parts.hostname}:{port}"
        self._api_key = api_key
        self._timeout = timeout
        self._max_response_bytes = max_response_bytes
        self._wall_clock = wall_clock
        self._client = httpx.AsyncClient(
            headers={
                "User-Agent": USER_AGENT,
                "Accept": "application/json",
                # Compressed bodies could inflate far past the size cap before it is checked.
                "Accept-Encoding": "identity",
            },
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            follow_redirects=False,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def credentials_generation(self) -> int:
        """Changes whenever the API key changes (a key file is checked for edits)."""
        if self._api_key is None:
            return 0
        self._api_key.current()
        return self._api_key.generation

    def build_url(self, build_id: str) -> str:
        segment = quote(build_id, safe="")
        if segment in {".", ".."}:
            # URL normalisation would climb out of the build path.
            segment = segment.replace(".", "%2E")
        return self._base_url + BUILD_PATH + segment

    async def fetch(self, build_id: str) -> Answer[Build]:
        """GET one build's status; never raises for anything the network or the API does."""

        def parse(body: bytes) -> Build:
            build = parse_build(body)
            if build.id != build_id:
                raise InvalidBuildError("answer is about a different build id")
            return build

        return await self._answer(self.build_url(build_id), parse)

    async def list_images(
        self, *, offset: int, limit: int, search: str = "", team_id: str = ""
    ) -> Answer[ImagePage]:
        """GET one page of the scope's image listing; never raises, as ``fetch``."""
        params = {"offset": str(offset), "limit": str(limit)}
        if search:
            params["search"] = search
        if team_id:
            # As the official client: never an empty teamId.
            params["teamId"] = team_id
        return await self._answer(self._base_url + IMAGES_PATH, parse_image_page, params)

    async def list_builds(self, *, offset: int, limit: int, team_id: str = "") -> Answer[BuildPage]:
        """GET one page of the key's build listing; never raises, as ``fetch``. An API that does
        not serve the listing (404 or 405) is NOT_FOUND; refused parameters (422) CLIENT_ERROR."""
        params = {"offset": str(offset), "limit": str(limit)}
        if team_id:
            # Not published for this endpoint: the API may ignore, honour or refuse it.
            params["teamId"] = team_id
        return await self._answer(
            self._base_url + BUILDS_PATH, parse_build_page, params, not_found=_NOT_SERVED
        )

    async def _answer(
        self,
        url: str,
        parse: Callable[[bytes], T],
        params: dict[str, str] | None = None,
        *,
        not_found: frozenset[int] = _NOT_FOUND,
    ) -> Answer[T]:
        """One GET with its 200 answer parsed; a body ``parse`` refuses is an invalid response."""
        got = await self._get(url, params, not_found)
        if got.value is None:
            return Answer(got.outcome, detail=got.detail, retry_after=got.retry_after)
        try:
            return Answer(Outcome.OK, parse(got.value))
        except InvalidAnswerError as error:
            return Answer(Outcome.INVALID_RESPONSE, detail=str(error))

    async def _get(
        self, url: str, params: dict[str, str] | None, not_found: frozenset[int]
    ) -> Answer[bytes]:
        """One GET: the body of a 200 answer, read within the size cap, or else the outcome."""
        headers = {}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key.current().get_secret_value()}"
        try:
            async with asyncio.timeout(self._timeout):
                request = self._client.build_request("GET", url, headers=headers, params=params)
                response = await self._client.send(request, stream=True)
                try:
                    if response.status_code == 200:
                        return Answer(Outcome.OK, await self._read_capped(response))
                    return self._failure(response, not_found)
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.TimeoutException):
            detail = f"no complete answer within {self._timeout:g}s"
            return Answer(Outcome.TIMEOUT, detail=detail)
        except _UnreadableBodyError as error:
            return Answer(Outcome.INVALID_RESPONSE, detail=str(error))
        except httpx.HTTPError as error:
            detail = f"{_describe_transport_error(error)} ({self._host_and_port})"
            return Answer(Outcome.CONNECTION_ERROR, detail=detail)

    def _failure(self, response: httpx.Response, not_found: frozenset[int]) -> Answer[bytes]:
        status = response.status_code
        detail = f"HTTP {status}"
        if status in not_found:
            # A wrong base path answers 404 for every build: the path shows which was asked.
            return Answer(Outcome.NOT_FOUND, detail=f"{detail} for {response.url.path}")
        if status == 401:
            return Answer(Outcome.UNAUTHORIZED, detail=detail)
        if status == 403:
            # About this build (another team's, a deleted one), not the key as a whole.
            return Answer(Outcome.FORBIDDEN, detail=detail)
        if status == 429:
            return Answer(
                Outcome.RATE_LIMITED,
                detail=detail,
                retry_after=parse_retry_after(
                    response.headers.get("Retry-After"), self._wall_clock()
                ),
            )
        if 500 <= status <= 599:
            return Answer(Outcome.SERVER_ERROR, detail=detail)
        if 400 <= status <= 499:
            return Answer(Outcome.CLIENT_ERROR, detail=detail)
        if 300 <= status <= 399:
            location = _without_secrets(response.headers.get("Location", ""))
            return Answer(
                Outcome.INVALID_RESPONSE,
                detail=f"{detail} redirect to {location or '(no Location)'}, not followed",
            )
        return Answer(Outcome.INVALID_RESPONSE, detail=f"unexpected {detail}")

    async def _read_capped(self, response: httpx.Response) -> bytes:
        """The body, decoded, refusing more than the cap both on the wire and decoded."""
        cap = self._max_response_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > cap:
            raise _too_large(cap)
        decoder = _decoder_for(response.headers.get("Content-Encoding", ""))
        chunks = []
        received = decoded = 0
        # Raw bytes, decoded here with a bound: httpx would inflate a whole chunk at once.
        async for raw in response.aiter_raw():
            received += len(raw)
            if received > cap:
                raise _too_large(cap)
            if decoder is None:
                data = raw
            else:
                try:
                    data = decoder.decompress(raw, cap + 1 - decoded)
                except zlib.error:
                    raise _UnreadableBodyError("compressed body is corrupt") from None
                if decoder.unconsumed_tail:
                    raise _too_large(cap)
            decoded += len(data)
            if decoded > cap:
                raise _too_large(cap)
            chunks.append(data)
        if decoder is not None and not decoder.eof:
            raise _UnreadableBodyError("compressed body ends early")
        return b"".join(chunks)


def _too_large(cap: int) -> _UnreadableBodyError:
    return _UnreadableBodyError(f"body larger than {cap} bytes")


def _decoder_for(content_encoding: str) -> zlib._Decompress | None:
    encoding = content_encoding.strip().lower()
    if encoding in {"", "identity"}:
        return None
    if encoding in {"gzip", "x-gzip", "deflate"}:
        # 47 accepts both gzip and zlib framing.
        return zlib.decompressobj(wbits=47)
    raise _UnreadableBodyError(f"unsupported Content-Encoding {encoding[:40]!r}")


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or HTTP date), if readable."""
    if value is None:
        return None
    text = value.strip()
    if _DELAY_SECONDS.fullmatch(text):
        return float(text)
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        # HTTP's obsolete asctime form carries no zone and is GMT by definition; any other
        # date without one ("-0000") says its zone is unknown.
        if not _ASCTIME_DATE.fullmatch(text):
            return None
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - now)


def _without_secrets(url: str) -> str:
    """``url`` without user information, query or fragment, which may carry credentials."""
    try:
        parts = urlsplit(url.strip()[:1000])
        port = parts.port
    except ValueError:
        return "(unreadable Location)"
    if not parts.scheme and not parts.netloc:
        return parts.path
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}{parts.path}"


def _describe_transport_error(error: httpx.HTTPError) -> str:
    reason = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {reason[:200]}" if reason else type(error).__name__
