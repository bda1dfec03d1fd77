"""The API key's request budget: how fast, how many at once, and when not at all.

Every request the exporter makes, a build poll or a page of a listing, spends the same budget:
a token bucket at ``requests_per_second``, at most ``max_concurrency`` under way, a pause of
every request after an HTTP 429, and a pause after the key was rejected, lifted at once when
the key changes. The poller's loop dispatches: it starts build polls itself and grants the
slots that listings queue for (builds go first); every answer is reported back here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from exporter.api import Answer
from exporter.models import KEY_ACCEPTED_OUTCOMES, Outcome
from exporter.telemetry import Telemetry

log = logging.getLogger(__name__)

MIN_RATE_LIMIT_PAUSE = 1.0
MAX_RATE_LIMIT_PAUSE = 600.0
DEFAULT_RATE_LIMIT_PAUSES = (10.0, 30.0, 60.0)
FIRST_KEY_REJECTED_PAUSE = 30.0
# Builds go first, but a listing request waits for them at most this long: when more builds
# are due than the budget allows, listings still get about every third request (and one
# listing page answers for up to a hundred builds).
LISTING_PATIENCE = 1.0


class Clock(Protocol):
    """Where the exporter reads the time and waits: the system's, or one a test drives."""

    def monotonic(self) -> float: ...

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        """Return when ``event`` is set or ``seconds`` have passed, whichever comes first."""
        ...


class SystemClock:
    """The real monotonic clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await event.wait()
        except TimeoutError:
            pass


class Credentials(Protocol):
    def credentials_generation(self) -> int:
        """A number that changes whenever the credentials change."""
        ...


@dataclass(frozen=True)
class BudgetSettings:
    """The key's budget for this replica."""

    requests_per_second: float
    max_concurrency: int
    # The longest pause after the key was rejected.
    max_key_pause: float


class TokenBucket:
    """Allows ``rate`` requests per second on average, and bursts of at most ``burst``."""

    def __init__(self, rate: float, now: float, burst: float = 1.0) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._updated = now

    def delay(self, now: float) -> float:
        """Seconds until a token is available; 0 if one is."""
        self._refill(now)
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self._tokens -= 1.0

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now


def rate_limit_pause(retry_after: float | None, consecutive: int) -> float:
    """How long to pause every request after a 429, honouring ``Retry-After`` within bounds."""
    if retry_after is None:
        retry_after = DEFAULT_RATE_LIMIT_PAUSES[
            min(consecutive - 1, len(DEFAULT_RATE_LIMIT_PAUSES) - 1)
        ]
    return min(max(retry_after, MIN_RATE_LIMIT_PAUSE), MAX_RATE_LIMIT_PAUSE)


class RequestBudget:
    """The key's one request budget, shared by the poller and every listing.

    A request starts with ``start`` (a token and a slot) and ends with ``end``; its answer
    goes to ``answered``. Listings queue with ``slot`` and the dispatcher grants them with
    ``grant_queued``; ``listing`` gives a listing the slots discovery takes.
    """

    def __init__(
        self,
        credentials: Credentials,
        telemetry: Telemetry,
        settings: BudgetSettings,
        *,
        wall_clock: Callable[[], float] = time.time,
        clock: Clock | None = None,
    ) -> None:
        self._credentials = credentials
        self._telemetry = telemetry
        self._settings = settings
        self._wall_clock = wall_clock
        self._clock = (clock or SystemClock()).monotonic
        # Set when a request queues for a slot or ends: the dispatcher waits on it.
        self.wakeup = asyncio.Event()
        self._bucket = TokenBucket(settings.requests_per_second, now=self._clock())
        self._in_flight = 0
        # Listing requests waiting for a slot, each with the time it began to wait.
        self._queued: deque[tuple[float, asyncio.Future[None]]] = deque()
        # Every request waits for both pauses: after a 429, and after the key was rejected.
        self._rate_limit_pause_until = 0.0
        self._consecutive_rate_limits = 0
        self._key_pause_until = 0.0
        # When the last pause ended: waiting through a pause is not waiting for builds.
        self._resumed_at = 0.0
        self._key_rejections = 0
        self._key_accepted: bool | None = None
        self._rejected_generation: int | None = None

    @property
    def paused_until(self) -> float:
        """The monotonic time every request waits for; 0 without a pause."""
        return max(self._rate_limit_pause_until, self._key_pause_until)

    @property
    def key_rejected(self) -> bool:
        """Whether requests wait because the API rejected the key."""
        return bool(self._key_pause_until)

    @property
    def requests_in_flight(self) -> int:
        """Requests under way, build polls and listing pages: 0 when none is."""
        return self._in_flight

    def update(self, settings: BudgetSettings, credentials: Credentials) -> bool:
        """Apply new settings and credentials; True if new credentials lifted the key pause."""
        replaced = credentials is not self._credentials
        self._credentials = credentials
        self._settings = settings
        self._bucket.rate = settings.requests_per_second
        return replaced and self._lift_key_pause("API client replaced")

    def refresh(self, now: float) -> bool:
        """End the pauses that are over; True if the key changed and its pause was lifted
        early."""
        if self._rate_limit_pause_until and now >= self._rate_limit_pause_until:
            self._rate_limit_pause_until = 0.0
            self._resumed_at = now
            self._telemetry.set_rate_limited_until(0.0)
            log.info("rate limit pause over, polling resumes")
        if self._key_pause_until and now >= self._key_pause_until:
            self._key_pause_until = 0.0
            self._resumed_at = now
        if (
            self._key_pause_until
            and self._credentials.credentials_generation() != self._rejected_generation
        ):
            return self._lift_key_pause("API key changed")
        return False

    # -- starting and ending requests -------------------------------------------------------------

    def delay(self, now: float) -> float:
        """Seconds until a request may start: 0 if one may now, infinite without a free slot."""
        if self._in_flight >= self._settings.max_concurrency:
            return math.inf
        return max(self.paused_until - now, self._bucket.delay(now))

    def start(self, now: float) -> None:
        """A request starts: it spends a token and holds a slot until ``end``."""
        self._bucket.take(now)
        self._in_flight += 1

    def end(self) -> None:
        """A request ended (answered or not): its slot is free."""
        self._in_flight -= 1
        self.wakeup.set()

    async def slot(self) -> None:
        """Queue for a request slot, granted by the dispatcher; ``end`` must follow."""
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued.append((self._clock(), slot))
        self.wakeup.set()
        try:
            await slot
        except asyncio.CancelledError:
            # Granted, then cancelled before the request began: the slot is not used.
            if slot.done() and not slot.cancelled():
                self._in_flight -= 1
            raise

    def queued_delay(self, now: float) -> float:
        """Seconds until the first queued request may start; infinite if none is queued."""
        while self._queued and self._queued[0][1].done():
            self._queued.popleft()
        return self.delay(now) if self._queued else math.inf

    def queued_overdue(self, now: float) -> bool:
        """Whether the first queued request has waited LISTING_PATIENCE for builds to go
        first (since it queued, or since the last pause ended): then it goes before them."""
        if not self._queued:
            return False
        return now - max(self._queued[0][0], self._resumed_at) >= LISTING_PATIENCE

    def grant_queued(self, now: float) -> None:
        """Start the first queued request now (``queued_delay`` said it may)."""
        self.start(now)
        self._queued.popleft()[1].set_result(None)

    def listing(self, name: str) -> ListingSlots:
        """The request slots of one kind of listing, reported under ``name`` in the logs."""
        return ListingSlots(self, name)

    # -- what answers do to the budget -------------------------------------------------------------

    def answered(
        self, answer: Answer[object], subject: Mapping[str, str], *, key_rejected: bool = False
    ) -> None:
        """A request's answer: a 429 pauses every request, a 401 (or an answer the caller
        takes as the key's rejection) pauses them until the key changes or the pause ends,
        and any answer that proves the key good ends the count of its rejections."""
        now = self._clock()
        if answer.outcome is Outcome.RATE_LIMITED:
            self._rate_limited(now, answer.retry_after, subject)
        else:
            self._consecutive_rate_limits = 0
        if key_rejected or answer.outcome is Outcome.UNAUTHORIZED:
            self._key_rejected(now, answer.detail)
        elif answer.outcome in KEY_ACCEPTED_OUTCOMES:
            self._key_answered()

    def _rate_limited(
        self, now: float, retry_after: float | None, subject: Mapping[str, str]
    ) -> None:
        self._consecutive_rate_limits += 1
        pause = rate_limit_pause(retry_after, self._consecutive_rate_limits)
        if now + pause > self._rate_limit_pause_until:
            self._rate_limit_pause_until = now + pause
            self._telemetry.set_rate_limited_until(self._wall_clock() + pause)
            log.warning(
                "API rate limit hit: pausing all requests",
                extra={**subject, "pause_seconds": round(pause, 3)},
            )

    def _key_answered(self) -> None:
        if self._key_accepted is False:
            log.info("API key accepted again, polling resumes")
        self._key_accepted = True
        self._key_rejections = 0

    def _key_rejected(self, now: float, detail: str) -> None:
        self._key_rejections += 1
        pause = min(
            FIRST_KEY_REJECTED_PAUSE * 2.0 ** min(self._key_rejections - 1, 32),
            self._settings.max_key_pause,
        )
        self._key_pause_until = max(self._key_pause_until, now + pause)
        self._rejected_generation = self._credentials.credentials_generation()
        if self._key_accepted is not False:
            self._key_accepted = False
            log.error(
                "API key rejected: pausing all polls until the key changes or the pause ends",
                extra={"detail": detail, "pause_seconds": round(pause, 3)},
            )

    def _lift_key_pause(self, reason: str) -> bool:
        if not self._key_pause_until:
            return False
        log.info("retrying at once after the API key was rejected", extra={"reason": reason})
        self._key_pause_until = 0.0
        self._resumed_at = self._clock()
        # A new key gets a fresh start, and its own log line if it is rejected too.
        self._key_rejections = 0
        self._key_accepted = None
        return True


class ListingSlots:
    """One kind of listing's requests within the budget: what discovery's ``RequestSlots``
    asks for."""

    def __init__(self, budget: RequestBudget, name: str) -> None:
        self._budget = budget
        self._subject = {"request": name}

    async def listing_slot(self) -> None:
        """Wait until one request of the listing may start: within the budget, when no build
        poll is due (builds go first). ``listing_done`` must follow."""
        await self._budget.slot()

    def listing_done(self, result: Answer[object] | None) -> None:
        """A listing request ended: its answer counts as a build poll's would. None: it was
        never made."""
        self._budget.end()
        if result is not None:
            self._budget.answered(result, self._subject)
