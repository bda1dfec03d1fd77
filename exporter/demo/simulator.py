"""A fake Prime Intellect API on loopback: build lifecycles that move, and faults on demand.

It serves ``GET /api/v1/images/build/{build_id}`` as the published spec describes,
``GET /api/v1/images`` as the official client reads it (paged, searchable, team-scoped) and
``GET /api/v1/images/builds`` as its published spec describes, in each of the ways the spec
leaves open (``BuildListing``); either listing can page wrongly on request (``ImageListing``,
``BuildListing``: an offset ignored, a total that lies). It checks the bearer token and
records every request so tests can count them. ``--demo``, the tests and the benchmarks use it;
``primeintellect-build-simulator`` (exporter.demo.cli) runs it on its own.
"""

from __future__ import annotations

import json
import math
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

BUILD_PATH_PREFIX = "/api/v1/images/build/"
# The listing of a scope's images, paged by logical image (name:tag), at most 250 a page.
IMAGES_PATH = "/api/v1/images"
# What a fault is set on: a build ID, or a listing page's offset (None: every build, every
# page).
Key = TypeVar("Key", str | None, int | None)
MAX_IMAGE_PAGE = 250
# The listing of the key's builds, each item the build's status answer; no maximum page.
BUILDS_PATH = "/api/v1/images/builds"
DEFAULT_BUILD_PAGE = 100
Outcome = Literal["COMPLETED", "FAILED", "CANCELLED"]


@dataclass(frozen=True)
class ArtifactPlan:
    """One artifact of a simulated build; it fails with ``error_message`` if the build fails."""

    artifact_type: str = "CONTAINER_IMAGE"
    error_message: str | None = None


@dataclass(frozen=True)
class BuildPlan:
    """A build's whole life, as seconds spent in each phase from ``created_at``.

    ``building=math.inf`` holds the build in BUILDING forever. A CANCELLED build with no
    uploading or building time is cancelled before it starts.
    """

    build_id: str
    image_name: str
    image_tag: str
    created_at: float
    pending: float = 5.0
    uploading: float = 5.0
    building: float = 30.0
    outcome: Outcome = "COMPLETED"
    artifacts: tuple[ArtifactPlan, ...] = (ArtifactPlan(),)

    def payload(self, now: float) -> dict[str, Any]:
        """The BuildStatusResponse this build has at wall-clock time ``now``."""
        started = self.created_at + self.pending
        building_from = started + self.uploading
        ends = building_from + self.building
        never_started = self.outcome == "CANCELLED" and self.uploading == self.building == 0
        if now < started:
            status, started_at, completed_at = "PENDING", None, None
        elif never_started:
            status, started_at, completed_at = "CANCELLED", None, started
        elif now < building_from:
            status, started_at, completed_at = "UPLOADING", started, None
        elif now < ends:
            status, started_at, completed_at = "BUILDING", started, None
        else:
            status, started_at, completed_at = self.outcome, started, ends
        return {
            "id": self.build_id,
            "imageName": self.image_name,
            "imageTag": self.image_tag,
            "status": status,
            "createdAt": _iso(self.created_at),
            "startedAt": _iso(started_at),
            "completedAt": _iso(completed_at),
            "artifacts": [
                self._artifact_payload(index, plan, status, building_from, completed_at)
                for index, plan in enumerate(self.artifacts)
            ],
        }

    def _artifact_payload(
        self,
        index: int,
        plan: ArtifactPlan,
        build_status: str,
        building_from: float,
        completed_at: float | None,
    ) -> dict[str, Any]:
        failed = build_status == "FAILED" and plan.error_message is not None
        if build_status in {"PENDING", "UPLOADING"}:
            status = "PENDING"
        elif build_status == "FAILED":
            status = "FAILED" if failed else "CANCELLED"
        else:
            status = build_status
        artifact_started = building_from if build_status not in {"PENDING", "UPLOADING"} else None
        if (
            build_status == "CANCELLED"
            and completed_at is not None
            and completed_at <= building_from
        ):
            artifact_started = None
        path = None
        if status == "COMPLETED":
            path = (
                f"registry.primeintellect.ai/team/{self.image_name}:{self.image_tag}"
                if plan.artifact_type == "CONTAINER_IMAGE"
                else f"sandbox://team/{self.image_name}/{self.image_tag}"
            )
        return {
            "id": f"{self.build_id}-{plan.artifact_type.lower().replace('_', '-')}-{index}",
            "artifactType": plan.artifact_type,
            "status": status,
            "fullImagePath": path,
            "errorMessage": plan.error_message if failed else None,
            "createdAt": _iso(self.created_at),
            "startedAt": _iso(artifact_started),
            "completedAt": _iso(
                completed_at if status in {"COMPLETED", "FAILED", "CANCELLED"} else None
            ),
        }


@dataclass
class Fault:
    """A wrong answer the simulator gives instead of, or before, the real one.

    A fault with status 200 and an empty body serves the build's correct answer, delivered
    the fault's way (``delay``, ``drip_interval``, ``truncate_to``).
    """

    status: int = 500
    body: bytes = b'{"detail": "Internal Server Error"}'
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    delay: float = 0.0
    times: int | None = None
    # Above 0: the body goes out ``drip_size`` bytes at a time, ``drip_interval`` seconds apart.
    drip_interval: float = 0.0
    drip_size: int = 1
    # Not None: only this many body bytes are sent, then the connection is closed.
    truncate_to: int | None = None
    # Not None: the answer waits until it is set, for at most ``delay`` seconds.
    release: threading.Event | None = None

    @classmethod
    def not_found(cls) -> Fault:
        return cls(status=404, body=b'{"detail": "Build not found"}')

    @classmethod
    def rate_limited(cls, retry_after: str | None = "1", *, times: int | None = None) -> Fault:
        headers = {"Content-Type": "application/json"}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        return cls(
            status=429, body=b'{"detail": "Too Many Requests"}', headers=headers, times=times
        )

    @classmethod
    def server_error(cls, status: int = 500, *, times: int | None = None) -> Fault:
        return cls(status=status, times=times)

    @classmethod
    def html_error(cls, status: int = 502) -> Fault:
        body = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
        return cls(status=status, body=body, headers={"Content-Type": "text/html"})

    @classmethod
    def garbage(cls, body: bytes = b"<html>not json</html>") -> Fault:
        return cls(status=200, body=body, headers={"Content-Type": "text/html"})

    @classmethod
    def slow(cls, delay: float) -> Fault:
        """Answer correctly, but only after ``delay`` seconds."""
        return cls(status=200, body=b"", delay=delay)

    @classmethod
    def held(cls, release: threading.Event, *, at_most: float = 60.0) -> Fault:
        """Answer correctly once ``release`` is set (after ``at_most`` seconds at the latest):
        a request under way for as long as the caller needs, however busy the machine."""
        return cls(status=200, body=b"", delay=at_most, release=release)

    @classmethod
    def drip(cls, interval: float = 0.1, *, size: int = 1, body: bytes = b"") -> Fault:
        """Answer 200 with the headers at once, then the body ``size`` bytes every ``interval`` s.

        The body is ``body``, or the correct answer when empty. The whole answer takes about
        ``len(body) / size * interval`` seconds, so a client that times out only the wait for
        each byte, rather than the whole answer, would wait that long. Dripping stops when the
        client hangs up.
        """
        if interval <= 0 or size < 1:
            raise ValueError("a drip needs a positive interval and at least one byte per write")
        return cls(status=200, body=body, drip_interval=interval, drip_size=size)

    @classmethod
    def truncated(cls, sent: int = 16, *, body: bytes = b"") -> Fault:
        """Answer 200 declaring the whole body's length, send ``sent`` bytes of it, then hang up.

        The body is ``body``, or the correct answer when empty. The declared Content-Length is
        always larger than what is sent, so the client sees the connection close mid-body.
        """
        if sent < 0:
            raise ValueError("sent must not be negative")
        return cls(status=200, body=body, truncate_to=sent)


@dataclass(frozen=True)
class Reply:
    """One answer as the simulator sends it: what to send, and how to deliver it."""

    status: int
    headers: dict[str, str]
    body: bytes
    delay: float = 0.0
    drip_interval: float = 0.0
    drip_size: int = 1
    truncate_to: int | None = None
    release: threading.Event | None = None

    @classmethod
    def delivered_as(
        cls, fault: Fault | None, status: int, headers: dict[str, str], body: bytes
    ) -> Reply:
        """``status``, ``headers`` and ``body``, delivered the way ``fault`` says (if any)."""
        if fault is None:
            return cls(status, headers, body)
        return cls(
            status,
            headers,
            body,
            delay=fault.delay,
            drip_interval=fault.drip_interval,
            drip_size=fault.drip_size,
            truncate_to=fault.truncate_to,
            release=fault.release,
        )


@dataclass(frozen=True)
class BuildListing:
    """How the build listing answers, where its spec leaves it open (BUILDS_LIST.md)."""

    # By createdAt: "newest" first, or "oldest" first.
    order: Literal["newest", "oldest"] = "newest"
    # Where the count of builds goes: the spec's key, the image listing's, or "" for nowhere.
    total_field: Literal["total_count", "totalCount", ""] = "total_count"
    # What a teamId does: nothing; scope the listing to that team (the simulator's ``team_id``
    # holds every build, any other team none); or have the request refused with 422.
    team_id: Literal["ignored", "honoured", "refused"] = "ignored"
    # False: 404 to every request, as an API from before the listing.
    served: bool = True
    # Not None: a larger limit is served as this one, and the answer's ``limit`` says so.
    max_limit: int | None = None
    # "ignored": every page is the first, whatever the offset, as from an API (or a proxy
    # before it) that drops the offset; without a total, a listing that never ends.
    offset: Literal["honoured", "ignored"] = "honoured"
    # Added to the total count stated (never below 0): -1 says one build fewer than listed.
    total_skew: int = 0


@dataclass(frozen=True)
class ImageListing:
    """How the image listing pages, beside what IMAGES_LIST.md describes: the ways an API, or
    a proxy before it, gets paging wrong."""

    # Where the count of logical images goes: the SDK's key, the platform schema's, or nowhere.
    total_field: Literal["totalCount", "total_count", ""] = "totalCount"
    # "ignored": every page is the first, whatever the offset; without a total, a listing
    # that never ends.
    offset: Literal["honoured", "ignored"] = "honoured"
    # Added to the total count stated (never below 0): -1 says one image fewer than listed.
    total_skew: int = 0


@dataclass(frozen=True)
class RecordedRequest:
    """One request the simulator received."""

    at: float
    build_id: str
    status: int
    path: str = ""
    query: str = ""


class Simulator:
    """The fake API. Start it, point the exporter at ``base_url``, stop it."""

    def __init__(
        self,
        api_key: str,
        plans: Iterable[BuildPlan] = (),
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        team_id: str | None = None,
        build_listing: BuildListing | None = None,
        image_listing: ImageListing | None = None,
    ) -> None:
        self.api_key = api_key
        # Answers are dated by ``clock``; each request is recorded at ``monotonic``.
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._plans = {plan.build_id: plan for plan in plans}
        self._overrides: dict[str, dict[str, Any]] = {}
        self._faults: dict[str | None, Fault] = {}
        self.team_id = team_id
        self._image_rows: list[dict[str, Any]] = []
        self._listing_faults: dict[int | None, Fault] = {}
        self._image_listing = image_listing or ImageListing()
        self._build_listing = build_listing or BuildListing()
        self._build_listing_faults: dict[int | None, Fault] = {}
        self._requests: list[RecordedRequest] = []
        # Every this many requests, one is answered 429 instead (None: never).
        self._rate_limit_every: int | None = None
        self._rate_limit_retry_after: str | None = None
        self._counted_for_rate_limit = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- control -------------------------------------------------------------------------------

    def add(self, plan: BuildPlan) -> None:
        with self._lock:
            self._plans[plan.build_id] = plan

    def remove(self, build_id: str) -> None:
        """Forget a build: it is neither listed nor answered (404) any more."""
        with self._lock:
            self._plans.pop(build_id, None)
            self._overrides.pop(build_id, None)

    def set_payload(self, build_id: str, payload: dict[str, Any] | None) -> None:
        """Answer this build with exactly ``payload`` (``None`` returns to its plan)."""
        with self._lock:
            if payload is None:
                self._overrides.pop(build_id, None)
            else:
                self._overrides[build_id] = payload

    def set_fault(self, build_id: str | None, fault: Fault | None) -> None:
        """Answer this build (every build: None) with ``fault`` (``None`` clears it); a build's
        own fault goes before the one of every build."""
        with self._lock:
            _put_fault(self._faults, build_id, fault)

    def set_rate_limit(self, every: int | None, retry_after: str | None = "1") -> None:
        """Answer every ``every``-th request from now on, of any endpoint, with a 429 and this
        ``Retry-After`` (None: without one); ``every`` None stops it."""
        if every is not None and every < 1:
            raise ValueError("every must be 1 or more")
        with self._lock:
            self._rate_limit_every = every
            self._rate_limit_retry_after = retry_after
            self._counted_for_rate_limit = 0

    @property
    def build_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._plans)

    def requests(self, build_id: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self._requests if build_id is None or r.build_id == build_id]

    def listing_requests(self) -> list[RecordedRequest]:
        """The requests of the image listing received so far."""
        with self._lock:
            return [r for r in self._requests if r.path == IMAGES_PATH]

    def build_listing_requests(self) -> list[RecordedRequest]:
        """The requests of the build listing received so far."""
        with self._lock:
            return [r for r in self._requests if r.path == BUILDS_PATH]

    def payload(self, build_id: str) -> dict[str, Any] | None:
        """What a correct answer for the build is right now."""
        with self._lock:
            return self._payload_locked(build_id)

    # -- server --------------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start serving in a background thread; returns the base URL."""
        self._stopping.clear()
        handler = type("Handler", (_Handler,), {"simulator": self})
        self._server = _Server((host, port), handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="simulator",
            daemon=True,
        )
        self._thread.start()
        return self.base_url

    @property
    def base_url(self) -> str:
        assert self._server is not None, "the simulator is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def stop(self) -> None:
        """Stop serving; answers held back by a fault (slow, drip, held) end at once."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- image listing -------------------------------------------------------------------------

    def add_image_rows(self, *rows: dict[str, Any]) -> None:
        """Serve these artifact rows in the image listing too, beside the builds' own (such as
        an older row of a rebuilt tag, or a stale BUILDING row the backend left behind)."""
        with self._lock:
            self._image_rows.extend(rows)

    def set_image_listing(self, listing: ImageListing) -> None:
        """Page the image listing this way from the next request on."""
        with self._lock:
            self._image_listing = listing

    def set_listing_fault(self, fault: Fault | None, *, offset: int | None = None) -> None:
        """Answer the listing's page at ``offset`` (every page: None) with ``fault``."""
        with self._lock:
            _put_fault(self._listing_faults, offset, fault)

    def image_rows(self) -> list[dict[str, Any]]:
        """Every artifact row the listing knows, across scopes."""
        with self._lock:
            return self._image_rows_locked()

    def _image_rows_locked(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for build_id in sorted(self._plans):
            payload = self._payload_locked(build_id)
            if payload is None:
                continue
            rows.extend(
                self._image_row(payload, artifact) for artifact in payload.get("artifacts") or []
            )
        return rows + list(self._image_rows)

    def _image_row(self, build: dict[str, Any], artifact: dict[str, Any]) -> dict[str, Any]:
        name, tag = build.get("imageName"), build.get("imageTag")
        completed = artifact.get("status") == "COMPLETED"
        return {
            "id": artifact["id"],
            "artifactType": artifact.get("artifactType"),
            "imageName": name,
            "imageTag": tag,
            "status": artifact.get("status"),
            "fullImagePath": artifact.get("fullImagePath"),
            "errorMessage": artifact.get("errorMessage"),
            # A size from the name, so it is the same in every answer.
            "sizeBytes": (len(f"{name}:{tag}") + 1) * 50_000_000 if completed else None,
            "visibility": "PRIVATE",
            "createdAt": artifact.get("createdAt"),
            "startedAt": artifact.get("startedAt"),
            "completedAt": artifact.get("completedAt"),
            "pushedAt": artifact.get("completedAt") if completed else None,
            "teamId": self.team_id,
            "ownerType": "team" if self.team_id else "personal",
            "displayRef": f"{name}:{tag}",
        }

    def _listing_locked(self, query: str, authorization: str | None) -> Reply:
        json_headers = {"Content-Type": "application/json"}
        if authorization != f"Bearer {self.api_key}":
            return Reply(401, json_headers, b'{"detail": "Invalid API key"}')
        params = dict(parse_qsl(query))
        offset_text, limit_text = params.get("offset", "0"), params.get("limit", "100")
        if not (offset_text.isdigit() and limit_text.isdigit()):
            return Reply(422, json_headers, b'{"detail": "offset and limit must be integers"}')
        offset, limit = int(offset_text), int(limit_text)
        if not 1 <= limit <= MAX_IMAGE_PAGE:
            return Reply(422, json_headers, b'{"detail": "limit must be 1 to 250"}')
        served, delivery = _take_fault(self._listing_faults, offset)
        if served is not None:
            return served
        team = params.get("teamId") or None
        search = params.get("search", "").lower()
        images: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in self._image_rows_locked():
            if row.get("teamId") != team:
                continue
            texts = (row.get("imageName"), row.get("imageTag"), row.get("displayRef"))
            if search and not any(search in (text or "").lower() for text in texts):
                continue
            key = (str(row.get("imageName")), str(row.get("imageTag")))
            images.setdefault(key, []).append(row)
        listing = self._image_listing
        start = 0 if listing.offset == "ignored" else offset
        page = sorted(images)[start : start + limit]
        body: dict[str, Any] = {"data": [row for key in page for row in images[key]]}
        if listing.total_field:
            body[listing.total_field] = max(0, len(images) + listing.total_skew)
        body |= {"offset": offset, "limit": limit, "status": "success"}
        return Reply.delivered_as(delivery, 200, json_headers, json.dumps(body).encode())

    # -- build listing -------------------------------------------------------------------------

    def set_build_listing(self, listing: BuildListing) -> None:
        """Answer the build listing this way from the next request on."""
        with self._lock:
            self._build_listing = listing

    def set_build_listing_fault(self, fault: Fault | None, *, offset: int | None = None) -> None:
        """Answer the build listing's page at ``offset`` (every page: None) with ``fault``."""
        with self._lock:
            _put_fault(self._build_listing_faults, offset, fault)

    def listed_builds(self, team_id: str | None = None) -> list[dict[str, Any]]:
        """Every item of the build listing, in its order: each build's status answer now (a
        plan's, or the payload set for it)."""
        with self._lock:
            return self._listed_builds_locked(team_id)

    def _listed_builds_locked(self, team_id: str | None) -> list[dict[str, Any]]:
        listing = self._build_listing
        if team_id is not None and listing.team_id == "honoured" and team_id != self.team_id:
            return []
        payloads = [
            (build_id, payload)
            for build_id in self._plans.keys() | self._overrides.keys()
            if (payload := self._payload_locked(build_id)) is not None
        ]
        payloads.sort(
            key=lambda entry: (_created_at(entry[1]), entry[0]),
            reverse=listing.order == "newest",
        )
        return [payload for _, payload in payloads]

    def _build_listing_locked(self, query: str, authorization: str | None) -> Reply:
        json_headers = {"Content-Type": "application/json"}
        listing = self._build_listing
        if not listing.served:
            return Reply(404, json_headers, b'{"detail": "Not Found"}')
        if authorization != f"Bearer {self.api_key}":
            return Reply(401, json_headers, b'{"detail": "Invalid API key"}')
        params = dict(parse_qsl(query))
        offset_text = params.get("offset", "0")
        limit_text = params.get("limit", str(DEFAULT_BUILD_PAGE))
        for name, text in (("offset", offset_text), ("limit", limit_text)):
            if not (text.isascii() and text.isdigit()):
                return _refused(name, "must be a whole number, 0 or more")
        team = params.get("teamId")
        if team is not None and listing.team_id == "refused":
            return _refused("teamId", "unknown query parameter")
        offset = int(offset_text)
        served, delivery = _take_fault(self._build_listing_faults, offset)
        if served is not None:
            return served
        limit = int(limit_text)
        if listing.max_limit is not None:
            limit = min(limit, listing.max_limit)
        builds = self._listed_builds_locked(team)
        start = 0 if listing.offset == "ignored" else offset
        body: dict[str, Any] = {"data": builds[start : start + limit]}
        if listing.total_field:
            body[listing.total_field] = max(0, len(builds) + listing.total_skew)
        body |= {"offset": offset, "limit": limit, "status": "success"}
        return Reply.delivered_as(delivery, 200, json_headers, json.dumps(body).encode())

    # -- answering -----------------------------------------------------------------------------

    def _payload_locked(self, build_id: str) -> dict[str, Any] | None:
        if build_id in self._overrides:
            return self._overrides[build_id]
        plan = self._plans.get(build_id)
        return plan.payload(self._clock()) if plan else None

    def pause(self, seconds: float, release: threading.Event | None = None) -> bool:
        """Wait ``seconds``, or until ``release`` is set; False if the simulator stopped
        meanwhile (the answer is then not sent)."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if release is not None and release.is_set():
                break
            if self._stopping.wait(min(remaining, 0.05)):
                return False
        return not self._stopping.is_set()

    def respond(self, path: str, authorization: str | None, query: str = "") -> Reply:
        """The whole reply to one request, including how to deliver it; records the request."""
        build_id = (
            unquote(path[len(BUILD_PATH_PREFIX) :]) if path.startswith(BUILD_PATH_PREFIX) else ""
        )
        with self._lock:
            limited = self._rate_limited_locked()
            if limited is not None:
                reply = limited
            elif path == IMAGES_PATH:
                reply = self._listing_locked(query, authorization)
            elif path == BUILDS_PATH:
                reply = self._build_listing_locked(query, authorization)
            else:
                reply = self._reply_locked(build_id, path, authorization)
            self._requests.append(
                RecordedRequest(self._monotonic(), build_id, reply.status, path, query)
            )
        return reply

    def _rate_limited_locked(self) -> Reply | None:
        """The 429 that this request gets from ``set_rate_limit``, if it is its turn."""
        if self._rate_limit_every is None:
            return None
        self._counted_for_rate_limit += 1
        if self._counted_for_rate_limit % self._rate_limit_every:
            return None
        fault = Fault.rate_limited(self._rate_limit_retry_after)
        return Reply(fault.status, fault.headers, fault.body)

    def _reply_locked(self, build_id: str, path: str, authorization: str | None) -> Reply:
        json_headers = {"Content-Type": "application/json"}
        if not path.startswith(BUILD_PATH_PREFIX) or not build_id or "/" in build_id:
            return Reply(404, json_headers, b'{"detail": "Not Found"}')
        if authorization != f"Bearer {self.api_key}":
            return Reply(401, json_headers, b'{"detail": "Invalid API key"}')
        served, delivery = _take_fault(self._faults, build_id)
        if served is not None:
            return served
        payload = self._payload_locked(build_id)
        if payload is None:
            return Reply.delivered_as(delivery, 404, json_headers, b'{"detail": "Build not found"}')
        return Reply.delivered_as(delivery, 200, json_headers, json.dumps(payload).encode())


def _put_fault(faults: dict[Key, Fault], key: Key, fault: Fault | None) -> None:
    """Set the fault at ``key``, or clear it with None."""
    if fault is None:
        faults.pop(key, None)
    else:
        faults[key] = fault


def _refused(param: str, details: str) -> Reply:
    """A 422 with the spec's ErrorResponse body."""
    body = {"errors": [{"param": param, "details": details}]}
    return Reply(422, {"Content-Type": "application/json"}, json.dumps(body).encode())


def _created_at(payload: dict[str, Any]) -> float:
    """When a build status answer says the build was created; unreadable is before all."""
    created = payload.get("createdAt")
    if not isinstance(created, str):
        return -math.inf
    try:
        moment = datetime.fromisoformat(created)
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    except (ValueError, OverflowError):
        return -math.inf


def _take_fault(faults: dict[Key, Fault], key: Key) -> tuple[Reply | None, Fault | None]:
    """The fault at ``key``, else the one for every key (``None``), used once (one fewer of its
    ``times``): the reply it sends instead of the answer, or else itself, to deliver the real
    answer its way."""
    if key not in faults:
        key = None
    fault = faults.get(key)
    if fault is None:
        return None, None
    if fault.times is not None:
        fault.times -= 1
        if fault.times <= 0:
            del faults[key]
    if fault.body or fault.status != 200:
        return Reply.delivered_as(fault, fault.status, dict(fault.headers), fault.body), None
    return None, fault


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up (an exporter stopping with connections open) is no error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "primeintellect-api-simulator"
    sys_version = ""
    # One write per answer, without Nagle's delay (see exporter.web.server).
    wbufsize = 1 << 16
    disable_nagle_algorithm = True
    simulator: ClassVar[Simulator]

    def do_GET(self) -> None:
        target = urlsplit(self.path)
        reply = self.simulator.respond(target.path, self.headers.get("Authorization"), target.query)
        if reply.delay and not self.simulator.pause(reply.delay, reply.release):
            self.close_connection = True
            return
        body = reply.body
        declared = len(body)
        if reply.truncate_to is not None:
            body = body[: reply.truncate_to]
            declared = max(declared, len(body) + 1)
            self.close_connection = True
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        if reply.drip_interval > 0:
            self._drip(body, reply.drip_size, reply.drip_interval)
        else:
            self.wfile.write(body)

    def _drip(self, body: bytes, size: int, interval: float) -> None:
        # Past the write buffer, so that a client hanging up fails one send, not the final flush.
        self.wfile.flush()
        for start in range(0, len(body), size):
            if start and not self.simulator.pause(interval):
                self.close_connection = True
                return
            try:
                self.connection.sendall(body[start : start + size])
            except OSError:
                self.close_connection = True
                return

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None or math.isinf(timestamp):
        return None
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def demo_plans(now: float) -> list[BuildPlan]:
    """A handful of builds that move through every status within a few minutes."""
    container, sandbox = ArtifactPlan("CONTAINER_IMAGE"), ArtifactPlan("VM_SANDBOX")
    return [
        BuildPlan("cmdemo0web0001", "web-frontend", "v1.4.2", now - 2, 5, 8, 30),
        BuildPlan(
            "cmdemo0trn0002",
            "trainer",
            "2026.11.28",
            now,
            10,
            15,
            75,
            artifacts=(container, sandbox),
        ),
        BuildPlan(
            "cmdemo0inf0003",
            "inference-server",
            "canary",
            now,
            8,
            10,
            40,
            outcome="FAILED",
            artifacts=(
                ArtifactPlan(
                    "CONTAINER_IMAGE",
                    error_message="step 7/12 RUN pip install -r requirements.txt: exit code 1",
                ),
            ),
        ),
        BuildPlan("cmdemo0dat0004", "data-loader", "nightly", now, 15, 10, 20, outcome="CANCELLED"),
        BuildPlan("cmdemo0evl0005", "eval-harness", "v0.9.0", now, 20, 30, 420),
        BuildPlan(
            "cmdemo0sbx0006", "sandbox-base", "ubuntu-24.04", now, 5, 20, 150, artifacts=(sandbox,)
        ),
        BuildPlan("cmdemo0tok0007", "tokenizer-svc", "v2.0.1", now - 1800, 60, 120, math.inf),
        BuildPlan(
            "cmdemo0env0008",
            "rl-environment",
            "latest",
            now - 3600,
            30,
            60,
            600,
            artifacts=(container, sandbox),
        ),
    ]


def random_plans(
    count: int, now: float, rng: random.Random, *, prefix: str = "cmsim"
) -> list[BuildPlan]:
    """``count`` builds with varied lifecycles and two artifacts each, for soak and benchmarks."""
    images = ("trainer", "inference", "eval", "data-prep", "sandbox", "gateway", "tokenizer")
    plans = []
    for index in range(count):
        outcome: Outcome = rng.choices(("COMPLETED", "FAILED", "CANCELLED"), weights=(8, 1, 1))[0]
        error = "build step failed: exit code 1" if outcome == "FAILED" else None
        plans.append(
            BuildPlan(
                build_id=f"{prefix}{index:08d}",
                image_name=rng.choice(images),
                image_tag=f"v{rng.randint(0, 9)}.{rng.randint(0, 99)}",
                created_at=now - rng.uniform(0, 600),
                pending=rng.uniform(1, 60),
                uploading=rng.uniform(1, 60),
                building=rng.uniform(30, 1800),
                outcome=outcome,
                artifacts=(ArtifactPlan("CONTAINER_IMAGE", error), ArtifactPlan("VM_SANDBOX")),
            )
        )
    return plans
