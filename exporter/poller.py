"""The polling schedule: every unfinished build on its interval, gently.

One scheduler loop hands due builds to request tasks within the key's request budget
(exporter.budget), and grants the slots that listings queue for there when no build is due.
Failing builds back off on their own; finished builds are never requested again; a build whose
answer stays the same is asked less and less often. When the budget is short, new builds and
builds that just changed go first.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from exporter.api import Answer
from exporter.budget import BudgetSettings, Clock, RequestBudget, SystemClock
from exporter.models import Build, Outcome
from exporter.store import BuildStore, Transition
from exporter.telemetry import Component, Telemetry

log = logging.getLogger(__name__)

MAX_BACKOFF = 300.0
TICK = 1.0
# The longest --once runs: a one-shot check must not sit out a long 429 pause or a tiny
# request budget.
ONCE_DEADLINE = 60.0
# The adaptive cadence: an unfinished build is polled again after a tenth of the time its
# answer has stayed the same (within polling.interval and polling.max_interval), so a change
# is seen at most that fraction late, and stale BUILDING rows cost little.
CADENCE_FRACTION = 0.1


class BuildFetcher(Protocol):
    async def fetch(self, build_id: str) -> Answer[Build]: ...

    def credentials_generation(self) -> int:
        """A number that changes whenever the credentials change."""
        ...


@dataclass(frozen=True)
class PollSettings:
    """How often and how hard to poll."""

    interval: float
    stale_after: float
    requests_per_second: float
    max_concurrency: int
    # The longest gap the adaptive cadence leaves; equal to interval turns it off.
    max_interval: float = 0.0
    # Finished builds lose their answer this long after completedAt; 0 keeps them.
    finished_build_retention: float = 0.0

    @property
    def budget(self) -> BudgetSettings:
        """The request budget's share of these settings."""
        return BudgetSettings(
            requests_per_second=self.requests_per_second,
            max_concurrency=self.max_concurrency,
            # A rejected key is tried again at least as often as a failing build.
            max_key_pause=max(MAX_BACKOFF, self.interval),
        )


def backoff_delay(failures: int, interval: float, jitter: float, stale_after: float) -> float:
    """Delay before the next poll of a build that failed ``failures`` times in a row.

    Doubles from the normal interval up to ``MAX_BACKOFF``, and to at most half of
    ``stale_after`` so that a build does not go stale for want of trying, but never below the
    interval. ``jitter`` in [0, 1) spreads it by up to ±20 % so failing builds do not retry in
    lockstep.
    """
    ceiling = max(interval, min(MAX_BACKOFF, stale_after / 2))
    delay = min(interval * 2.0 ** min(failures - 1, 32), ceiling)
    return delay * (0.8 + 0.4 * jitter)


def cadence_gap(interval: float, max_interval: float, unchanged_for: float) -> float:
    """Seconds until the next poll of an unfinished build whose answer has not changed for
    ``unchanged_for`` seconds."""
    return min(max(interval, unchanged_for * CADENCE_FRACTION), max(interval, max_interval))


class Poller:
    """Polls tracked builds into the store until cancelled."""

    def __init__(
        self,
        fetcher: BuildFetcher,
        store: BuildStore,
        telemetry: Telemetry,
        settings: PollSettings,
        *,
        wall_clock: Callable[[], float] = time.time,
        clock: Clock | None = None,
        jitter: Callable[[], float] = random.random,
        on_internal_error: Callable[[Component, BaseException], None] | None = None,
        budget: RequestBudget | None = None,
    ) -> None:
        """``budget`` is the key's request budget, shared with the listings; without it the
        poller has one of its own."""
        self._fetcher = fetcher
        self._on_internal_error = on_internal_error
        self._store = store
        self._telemetry = telemetry
        self._settings = settings
        self._wall_clock = wall_clock
        self._time = clock or SystemClock()
        self._clock = self._time.monotonic
        self._jitter = jitter
        # The configured builds, and those only build discovery brought: one tracked set.
        self._configured: list[str] = []
        self._discovered: set[str] = set()
        self._tracked: set[str] = set()
        # Tracked builds whose last answer was 403: when that is all of them, the key is
        # taken as rejected, as for a 401.
        self._forbidden: set[str] = set()
        # Two heaps of (due, sequence, build_id): builds never polled or just changed, then
        # the rest. An entry whose sequence differs from _entries is outdated.
        self._urgent: list[tuple[float, int, str]] = []
        self._queue: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}
        self._entries: dict[str, int] = {}
        self._failures: dict[str, int] = {}
        self._sequence = 0
        self._in_flight: dict[asyncio.Task[None], str] = {}
        if budget is None:
            budget = RequestBudget(
                fetcher, telemetry, settings.budget, wall_clock=wall_clock, clock=self._time
            )
        self._budget = budget
        # One loop dispatches every request: it wakes for the budget's changes and its own.
        self._wakeup = self._budget.wakeup
        # Builds waiting for the budget's pause (after a 429 or a rejected key) to end.
        self._parked: set[str] = set()
        self._last_sweep = 0.0
        self._behind = False
        self.heartbeat = time.monotonic()

    def update(self, settings: PollSettings, fetcher: BuildFetcher) -> None:
        """Apply new settings and a new client, to the schedule and to the request budget,
        keeping every build's schedule."""
        self._fetcher = fetcher
        if self._budget.update(settings.budget, fetcher):
            self._resume_parked()
        self._settings = settings
        self._wakeup.set()

    def set_builds(self, build_ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Track exactly these configured builds, besides those discovery brought: new ones are
        polled at once, removed ones forgotten.

        Returns the added and the removed build IDs.
        """
        self._configured = list(build_ids)
        return self._track()

    def listed(self, builds: Sequence[Build], *, complete: bool, hold: float) -> None:
        """A listing pass's builds (within its window, this replica's share), each an answer.

        They are tracked: exactly these besides the configured ones when the pass was
        ``complete``, else added to those discovered before (a pass cut short removes
        nothing; discovery never drops a configured build). Each counts as a successful poll
        of its build, which then needs no request of its own for ``hold`` seconds (the next
        pass answers for it) or its cadence gap, whichever is longer.
        """
        listed = {build.id for build in builds}
        self._discovered = listed if complete else self._discovered | listed
        self._track()
        now = self._clock()
        wall = self._wall_clock()
        polling = set(self._in_flight.values())
        for build in builds:
            if build.id in polling:
                continue  # its own answer is on the way
            self._forbidden.discard(build.id)
            self._parked.discard(build.id)
            transition = self._store.record_success(build.id, build, wall)
            self._failures.pop(build.id, None)
            if transition is None:
                continue
            _log_success(transition)
            self._due.pop(build.id, None)
            self._entries.pop(build.id, None)
            if not build.finished:
                gap = self._gap(transition.after.last_change_time, wall)
                self._schedule(build.id, now + max(gap, hold))
        self._wakeup.set()

    def restore_discovered(self, build_ids: Iterable[str]) -> None:
        """Before the first ``set_builds``: builds discovery had brought before a restart,
        tracked again with their saved answers until the next complete pass says otherwise."""
        self._discovered = set(build_ids)

    def forget_discovered(self) -> None:
        """Discovery is off: only the configured builds stay tracked."""
        self._discovered = set()
        self._track()

    @property
    def discovered_count(self) -> int:
        """Tracked builds that only discovery brought."""
        return len(self._discovered.difference(self._configured))

    def _track(self) -> tuple[list[str], list[str]]:
        added, removed = self._store.track(self._configured, self._discovered)
        self._tracked = {*self._configured, *self._discovered}
        self._telemetry.set_builds_discovered(self.discovered_count)
        self._forbidden &= self._tracked
        for build_id in removed:
            self._due.pop(build_id, None)
            self._entries.pop(build_id, None)
            self._failures.pop(build_id, None)
        self._schedule_added(added)
        self._wakeup.set()
        return added, removed

    def _schedule_added(self, added: list[str]) -> None:
        """New builds at once, first; restored ones where their schedule left them, spread."""
        now = self._clock()
        wall = self._wall_clock()
        records = self._store.snapshot().records
        resuming = []
        for build_id in added:
            record = records.get(build_id)
            if record is None or not record.restored or record.last_poll_time is None:
                self._schedule(build_id, now, urgent=True)
            elif not record.finished:
                gap = self._gap(record.last_change_time, wall)
                resuming.append((record.last_poll_time + gap - wall, build_id))
        # Overdue ones one budget slot apart, in the order they fell due: not all at once.
        resuming.sort()
        slot = 1.0 / self._settings.requests_per_second
        overdue = 0
        for wait, build_id in resuming:
            if wait <= overdue * slot:
                wait = overdue * slot
                overdue += 1
            self._schedule(build_id, now + wait)

    async def run(self) -> None:
        """Poll forever; returns only by cancellation."""
        await self._dispatch(once=False)

    async def poll_once(self) -> bool:
        """Poll every tracked build without a good answer yet (a listing pass may have given
        one) once, for at most ONCE_DEADLINE seconds; True if every build has a good answer.
        Builds it could not poll in time are reported as rate limited."""
        records = self._store.snapshot().records
        now = self._clock()
        for build_id in list(self._due):
            record = records.get(build_id)
            if record is not None and record.last_poll_ok:
                del self._due[build_id], self._entries[build_id]
            else:
                self._schedule(build_id, now, urgent=True)
        await self._dispatch(once=True)
        self._store.mark_unpolled(Outcome.RATE_LIMITED)
        snapshot = self._store.snapshot()
        return all(record.last_poll_ok for record in snapshot.records.values())

    async def grant_listings(self) -> None:
        """Start only the listings' queued requests, within the budget, until cancelled: the
        listing pass of a ``--once`` run, before its polls."""
        while True:
            self._wakeup.clear()
            now = self._clock()
            self._budget.refresh(now)
            wait = self._budget.queued_delay(now)
            if wait <= 0:
                self._budget.grant_queued(now)
                continue
            await self._time.wait(self._wakeup, min(wait, TICK))

    async def _dispatch(self, *, once: bool) -> None:
        deadline = self._clock() + ONCE_DEADLINE
        try:
            while True:
                self._wakeup.clear()
                now = self._clock()
                self._beat(now)
                if once and (
                    not (self._due or self._in_flight)
                    or now >= deadline
                    # A pause that outlasts the deadline is not sat out, nor a rejected key:
                    # only another key could make the next request succeed.
                    or self._budget.paused_until >= deadline
                    or self._budget.key_rejected
                ):
                    return
                wait = self._next_dispatch_wait(now)
                listing_wait = self._budget.queued_delay(now)
                # Builds first, unless a listing has waited too long for them.
                if listing_wait <= 0 and (wait > 0 or self._budget.queued_overdue(now)):
                    self._budget.grant_queued(now)
                    continue
                if wait <= 0:
                    self._start_next_poll(now, once=once)
                    continue
                await self._time.wait(self._wakeup, min(wait, listing_wait, TICK))
        finally:
            interrupted = list(self._in_flight.values())
            for task in list(self._in_flight):
                task.cancel()
            if self._in_flight:
                await asyncio.gather(*self._in_flight, return_exceptions=True)
            # A restarted loop must still poll the builds whose requests were cut short.
            for build_id in interrupted:
                if build_id in self._tracked and build_id not in self._due:
                    self._schedule(build_id, self._clock())

    def _beat(self, now: float) -> None:
        self.heartbeat = time.monotonic()
        if self._budget.refresh(now):
            self._resume_parked()
        if not self._budget.paused_until:
            self._parked.clear()
        if now - self._last_sweep >= TICK:
            self._last_sweep = now
            self._measure_capacity(now)
            settings = self._settings
            swept = self._store.sweep(
                self._wall_clock(), settings.stale_after, settings.finished_build_retention
            )
            if swept.retired:
                log.info(
                    "finished builds past their retention: series dropped",
                    extra={
                        "builds": len(swept.retired),
                        "retention_seconds": settings.finished_build_retention,
                    },
                )
            for build_id in swept.expired:
                log.warning(
                    "build values dropped: no successful poll for too long",
                    extra={"build_id": build_id, "stale_after": self._settings.stale_after},
                )

    def _measure_capacity(self, now: float) -> None:
        """Poll lag and demand for the telemetry; a log line when demand crosses 1."""
        settings = self._settings
        earliest = self._earliest_due()
        lag = 0.0 if earliest is None else now - earliest
        # Dispatch is a matter of milliseconds: under a tick late counts as on time.
        lag = lag if lag >= TICK else 0.0
        # A poll that has just ended has its build due again before its task's done callback
        # leaves _in_flight: counted once.
        in_flight_only = sum(
            1 for build_id in self._in_flight.values() if build_id not in self._due
        )
        unfinished = len(self._due) + in_flight_only
        demand = unfinished / settings.interval / settings.requests_per_second
        self._telemetry.set_capacity(round(lag, 3), demand)
        if demand > 1 and not self._behind:
            log.warning(
                "more polls due than the request budget allows: builds are polled late",
                extra={
                    "unfinished_builds": unfinished,
                    "interval_seconds": settings.interval,
                    "requests_per_second": settings.requests_per_second,
                    "interval_that_can_be_kept_seconds": round(
                        unfinished / settings.requests_per_second, 1
                    ),
                },
            )
        elif demand <= 1 and self._behind:
            log.info("the request budget covers the polling interval again")
        self._behind = demand > 1

    def _earliest_due(self) -> float | None:
        self._drop_outdated_queue_entries()
        heads = [queue[0][0] for queue in (self._urgent, self._queue) if queue]
        return min(heads, default=None)

    def _next_queue(self, now: float) -> list[tuple[float, int, str]] | None:
        """The queue to take the next build from: the urgent one while its head is due."""
        self._drop_outdated_queue_entries()
        if not self._urgent:
            return self._queue or None
        urgent_due = self._urgent[0][0]
        if urgent_due <= now or not self._queue or urgent_due <= self._queue[0][0]:
            return self._urgent
        return self._queue

    def _next_dispatch_wait(self, now: float) -> float:
        """Seconds until the next poll may start: TICK when no build is scheduled, infinite
        while every request slot is taken."""
        queue = self._next_queue(now)
        if queue is None:
            return TICK
        return max(queue[0][0] - now, self._budget.delay(now))

    def _drop_outdated_queue_entries(self) -> None:
        for queue in (self._urgent, self._queue):
            while queue:
                _, sequence, build_id = queue[0]
                if self._entries.get(build_id) == sequence:
                    break
                heapq.heappop(queue)

    def _start_next_poll(self, now: float, *, once: bool) -> None:
        queue = self._next_queue(now)
        assert queue is not None
        _, _, build_id = heapq.heappop(queue)
        del self._due[build_id]
        del self._entries[build_id]
        self._budget.start(now)
        task = asyncio.create_task(self._poll(build_id, once=once), name=f"poll {build_id}")
        self._in_flight[task] = build_id
        task.add_done_callback(self._poll_done)

    def _poll_done(self, task: asyncio.Task[None]) -> None:
        if self._in_flight.pop(task, None) is not None:
            self._budget.end()

    async def _poll(self, build_id: str, *, once: bool) -> None:
        started = self._clock()
        next_poll: tuple[float, bool] | None
        try:
            result = await self._fetcher.fetch(build_id)
            now = self._clock()
            self._telemetry.observe_request(result.outcome, now - started)
            next_poll = self._apply(build_id, result, now)
        except Exception as error:
            # A bug must cost one poll, never the build's place in the schedule.
            if self._on_internal_error is not None:
                self._on_internal_error(Component.POLLER, error)
            else:
                log.exception("unexpected error while polling", extra={"build_id": build_id})
            next_poll = self._clock() + self._backoff(build_id), False
        if next_poll is not None and not once and build_id in self._tracked:
            due, urgent = next_poll
            self._schedule(build_id, due, urgent=urgent)

    def _apply(self, build_id: str, result: Answer[Build], now: float) -> tuple[float, bool] | None:
        """Record a result; returns when to poll this build next and whether ahead of others
        (it just changed), or None for never."""
        if result.outcome is Outcome.FORBIDDEN and build_id in self._tracked:
            self._forbidden.add(build_id)
        else:
            self._forbidden.discard(build_id)
        # One build's 403 is that build's problem; a 401, or a 403 for every build, the key's.
        rejected = result.outcome is Outcome.UNAUTHORIZED or (
            result.outcome is Outcome.FORBIDDEN and len(self._forbidden) >= len(self._tracked)
        )
        self._budget.answered(result, {"build_id": build_id}, key_rejected=rejected)

        wall = self._wall_clock()
        if result.value is not None:
            transition = self._store.record_success(build_id, result.value, wall)
            self._failures.pop(build_id, None)
            if transition is None:
                return None
            _log_success(transition)
            if result.value.finished:
                return None
            gap = self._gap(transition.after.last_change_time, wall)
            return now + gap, transition.answer_changed

        transition = self._store.record_failure(build_id, result.outcome, wall)
        if transition is not None and not rejected:
            _log_failure(transition, result)
        if result.outcome is Outcome.RATE_LIMITED or rejected:
            # Not this build's fault: it waits for the pause, without backing off; and builds
            # never polled wait with it, reported with the pause's reason.
            self._parked.add(build_id)
            self._store.mark_unpolled(result.outcome)
            return self._budget.paused_until, False
        return now + self._backoff(build_id), False

    def _gap(self, last_change_time: float | None, wall: float) -> float:
        """The adaptive cadence: the wait before polling an unfinished build again."""
        unchanged_for = 0.0 if last_change_time is None else max(0.0, wall - last_change_time)
        settings = self._settings
        return cadence_gap(settings.interval, settings.max_interval, unchanged_for)

    def _backoff(self, build_id: str) -> float:
        """Count one more failure of the build; the delay before its next poll."""
        failures = self._failures[build_id] = self._failures.get(build_id, 0) + 1
        settings = self._settings
        return backoff_delay(failures, settings.interval, self._jitter(), settings.stale_after)

    def _resume_parked(self) -> None:
        """The key's pause was lifted early: the builds that waited for it are due now, or
        when a rate limit pause ends."""
        now = self._clock()
        for build_id in self._parked:
            if build_id in self._due:
                self._schedule(build_id, max(now, self._budget.paused_until))
        self._parked.clear()

    def _schedule(self, build_id: str, due: float, *, urgent: bool = False) -> None:
        self._due[build_id] = due
        self._sequence += 1
        self._entries[build_id] = self._sequence
        heapq.heappush(self._urgent if urgent else self._queue, (due, self._sequence, build_id))


def _log_success(transition: Transition) -> None:
    before, after = transition.before, transition.after
    assert after.build is not None
    if before.last_error is not None:
        log.info(
            "poll recovered",
            extra={"build_id": after.build_id, "previous_reason": before.last_error.value},
        )
    previous_status = before.build.status if before.build is not None else None
    if previous_status != after.build.status or before.finished != after.finished:
        log.info(
            "build status changed",
            extra={
                "build_id": after.build_id,
                "image_name": after.build.image_name,
                "image_tag": after.build.image_tag,
                "status": after.build.status,
                "previous_status": previous_status or "",
                "finished": after.finished,
                # What it failed with: its own message, else its artifacts'.
                "error_message": after.build.failure_reason or "",
            },
        )


def _log_failure(transition: Transition, result: Answer[Build]) -> None:
    if transition.before.last_error == transition.after.last_error:
        return
    log.warning(
        "poll failed",
        extra={
            "build_id": transition.after.build_id,
            "reason": result.outcome.value,
            "detail": result.detail,
        },
    )
