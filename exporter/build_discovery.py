"""Build discovery: every build of the key from ``GET /api/v1/images/builds``, no build IDs.

Every ``discovery.builds.interval`` one pass reads the build listing, 100 builds a page, each
request taking a slot of the key's one request budget (exporter.budget: its rate, its 429 and
key pauses, its concurrency bound; build polls go first). The API does not say in which order
it lists builds (tests/contract/BUILDS_LIST.md), so a pass learns it from ``createdAt`` down
the pages: newest first, it stops at the first page that reaches past the window; oldest
first with a total, it reads from the end backwards; otherwise it reads until an empty page,
the total or ``max_pages``. The builds created within the window, of this replica's share, go
to a ``ListedBuilds`` sink. A pass that fails part-way gives it nothing; one cut short
(``max_pages`` reached, a page repeated, more builds than the total: exporter.listing) gives
it what it read, to add and update but never to remove by.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from exporter.api import Answer
from exporter.budget import Clock, SystemClock
from exporter.config.grammar import validate_build_id
from exporter.config.schema import BuildDiscoverySettings
from exporter.listing import ListingCut, PassPages
from exporter.models import Build, BuildPage, Outcome
from exporter.telemetry import BUILD_LIST_ENDPOINT, BUILD_LIST_UNAVAILABLE, Telemetry

log = logging.getLogger(__name__)

# The spec's default page size: no larger one is published.
PAGE_LIMIT = 100
# Refused IDs named in the log line that reports them: enough to find them, never a flood.
REFUSED_IDS_LOGGED = 3
_CUTS = frozenset(ListingCut)
# What a pass cut short logs: what happened, and what to do about it.
_CUT_MESSAGES = {
    ListingCut.TRUNCATED: (
        "build listing cut short at discovery.builds.max_pages before the window's end: its "
        "builds are tracked, none is removed; raise max_pages or shorten window"
    ),
    ListingCut.REPEATED_PAGE: (
        "build listing answered a page it had already sent, at another offset: the API, or a "
        "proxy before it, ignores offset; its builds are tracked, none is removed; point "
        "api.base_url at the Prime Intellect API itself, or have the proxy pass query "
        "parameters on"
    ),
    ListingCut.OVER_TOTAL: (
        "build listing holds more builds than its total_count says: its builds are tracked, "
        "none is removed; point api.base_url at the Prime Intellect API itself (a proxy or "
        "cache may mix answers), and report it if it does"
    ),
}


class BuildLister(Protocol):
    async def list_builds(
        self, *, offset: int, limit: int, team_id: str = ""
    ) -> Answer[BuildPage]: ...


class RequestSlots(Protocol):
    """The request budget's side (``RequestBudget.listing``): one request slot at a time."""

    async def listing_slot(self) -> None: ...

    def listing_done(self, result: Answer[BuildPage] | None) -> None:
        """The request's result, or None if it was never made (cancelled)."""
        ...


class ListedBuilds(Protocol):
    """Where a pass's builds go: the side that tracks and polls builds."""

    def listed(self, builds: Sequence[Build], *, complete: bool, hold: float) -> None:
        """The builds a pass found created within the window, of this replica's share, each
        as good as a successful poll of it (duplicates removed, the latest answer kept).

        ``complete``: the pass read to the window's end, so a discovered build not among
        ``builds`` leaves. False: the pass was cut short (a ListingCut); add and update
        only, remove nothing. ``hold``: for how long the next pass answers for these builds.
        """
        ...


class Order(enum.StrEnum):
    """How the listing runs, by ``createdAt``, as a pass learned it."""

    NEWEST_FIRST = "newest_first"
    OLDEST_FIRST = "oldest_first"


@dataclass(frozen=True)
class PassResult:
    """What one pass came to."""

    # The builds given to the sink: within the window, this replica's, valid IDs. Empty when
    # the pass failed (the sink was given nothing).
    builds: tuple[Build, ...]
    pages: int
    # None: complete. A ListingCut: applied, cut short. Anything else: failed part-way,
    # nothing applied (the reason of build_list_last_error).
    reason: str | None = None
    order: Order | None = None
    # Items that were no build, or whose ID the config's build-ID rule refuses.
    skipped: int = 0

    @property
    def complete(self) -> bool:
        return self.reason is None

    @property
    def applied(self) -> bool:
        return self.reason is None or self.reason in _CUTS


def _owns_all(build_id: str) -> bool:
    return True


@dataclass
class _Pass:
    """What one pass has read so far."""

    window_start: float
    pages: int = 0
    skipped: int = 0
    order: Order | None = None
    first_created: float | None = None
    # By ID, in order of first appearance; a later answer replaces an earlier one (pages shift
    # while new builds arrive, and the later read is the more recent answer).
    builds: dict[str, Build] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    # What decides whether the pass is cut short by what its pages hold.
    checked: PassPages = field(default_factory=PassPages)

    def add(self, page: BuildPage, *, learn_order: bool) -> int:
        """Take one page; return how many items it held (builds and skipped alike)."""
        self.pages += 1
        self.skipped += page.skipped
        for build in page.builds:
            try:
                validate_build_id(build.id)
            except ValueError:
                # The poller could never request it, and it would make an unsafe URL.
                self.refused.append(build.id)
                continue
            self.builds[build.id] = build
        if learn_order and self.order is None and page.builds:
            self._learn_order(page.builds[0].created_at, page.builds[-1].created_at)
        return len(page.builds) + page.skipped

    def _learn_order(self, first: float, last: float) -> None:
        # The first item read against the latest: robust to a few builds out of place.
        if self.first_created is None:
            self.first_created = first
        if last < self.first_created:
            self.order = Order.NEWEST_FIRST
        elif last > self.first_created:
            self.order = Order.OLDEST_FIRST

    def check(self, offset: int, page: BuildPage) -> ListingCut | None:
        """Whether the page read at ``offset`` cuts the pass short (exporter.listing)."""
        ids = [build.id for build in page.builds]
        return self.checked.take(offset, ids, ids, page.total)

    def reaches_past_window(self, page: BuildPage) -> bool:
        return any(build.created_at < self.window_start for build in page.builds)

    def in_window(self, owns: Callable[[str], bool]) -> tuple[Build, ...]:
        return tuple(
            build
            for build in self.builds.values()
            if build.created_at >= self.window_start and owns(build.id)
        )


class _PageFailedError(Exception):
    """A page of the pass was not answered with a listing page."""

    def __init__(self, answer: Answer[BuildPage], page_number: int) -> None:
        super().__init__(answer.outcome.value)
        self.answer = answer
        self.page_number = page_number


class BuildDiscovery:
    """Lists the key's builds into a ListedBuilds sink, every interval, until cancelled."""

    def __init__(
        self,
        lister: Callable[[], BuildLister],
        slots: RequestSlots,
        sink: ListedBuilds,
        telemetry: Telemetry,
        settings: BuildDiscoverySettings,
        *,
        owns: Callable[[str], bool] = _owns_all,
        wall_clock: Callable[[], float] = time.time,
        clock: Clock | None = None,
    ) -> None:
        # The client is asked for at each request: a reload may have replaced it.
        self._lister = lister
        self._slots = slots
        self._sink = sink
        self._telemetry = telemetry
        self.settings = settings
        self._owns = owns
        self._wall_clock = wall_clock
        self._time = clock or SystemClock()
        self._wakeup = asyncio.Event()
        # The condition last warned about (unavailable, teamId refused, truncated): said once,
        # until a complete pass or new settings.
        self._warned: str | None = None
        self._last_reason: str | None = None
        self._completed_once = False
        self._refused_logged = False
        # The scope (team) and size of the last complete pass that was logged: a pass that
        # changes neither logs nothing.
        self._logged_listing: tuple[str, int] | None = None

    def update(self, settings: BuildDiscoverySettings) -> None:
        """New settings: a pass at once, and conditions warned about are told again."""
        if settings == self.settings:
            return
        self.settings = settings
        self._warned = None
        self._wakeup.set()

    async def run(self) -> None:
        """A pass now, then one every interval after the previous ended; returns only by
        cancellation."""
        while True:
            self._wakeup.clear()
            await self.list_once()
            await self._time.wait(self._wakeup, self.settings.interval)

    async def list_once(self) -> PassResult:
        """One pass: read the pages, then give the sink the builds within the window (unless
        a request failed) and record the pass's health."""
        settings = self.settings
        started = self._time.monotonic()
        listing = _Pass(window_start=self._wall_clock() - settings.window)
        try:
            cut = await self._read(listing, settings)
        except _PageFailedError as failure:
            return self._failed(failure, listing, settings)
        builds = listing.in_window(self._owns)
        skipped = listing.skipped + len(listing.refused)
        self._log_refused(listing.refused)
        # The next pass starts an interval after this one ends and takes about as long: until
        # one more interval has passed on top, its answers stand in for per-build polls.
        hold = 2 * settings.interval + 2 * (self._time.monotonic() - started)
        # A cut pass is applied too: each build it read is a true answer for that build, but
        # a build it did not reach may still be listed, so none is removed by it.
        self._sink.listed(builds, complete=cut is None, hold=hold)
        if cut is None:
            self._telemetry.build_list_succeeded(self._wall_clock(), listing.pages)
            self._log_complete(listing, builds, settings)
            self._completed_once = True
            self._warned = None
            self._last_reason = None
            return PassResult(builds, listing.pages, None, listing.order, skipped)
        self._telemetry.build_list_failed(cut)
        extra: dict[str, object] = {
            "reason": cut.value,
            "pages": listing.pages,
            "builds": len(builds),
            "window_seconds": settings.window,
        }
        if listing.checked.total is not None:
            extra["total"] = listing.checked.total
        self._warn_once(cut, _CUT_MESSAGES[cut], extra)
        self._last_reason = cut
        return PassResult(builds, listing.pages, cut, listing.order, skipped)

    async def _read(self, listing: _Pass, settings: BuildDiscoverySettings) -> ListingCut | None:
        """Read pages into ``listing``; None if the pass reached its end, else why it stopped
        short. Raises _PageFailedError."""
        offset = 0
        step = PAGE_LIMIT
        while listing.pages < settings.max_pages:
            page = await self._page(offset, listing, settings)
            held = listing.add(page, learn_order=True)
            cut = listing.check(offset, page)
            if cut is not None:
                return cut
            if listing.pages == 1:
                step = _page_step(page, held)
            # A short page does not end the listing (a server may cap the limit): the next
            # page starts after the items this one held.
            offset += held
            if held == 0 or (page.total is not None and offset >= page.total):
                return None
            if listing.order is Order.NEWEST_FIRST and listing.reaches_past_window(page):
                return None
            if listing.order is Order.OLDEST_FIRST and page.total is not None:
                return await self._read_from_the_end(listing, settings, offset, page.total, step)
        return ListingCut.TRUNCATED

    async def _read_from_the_end(
        self, listing: _Pass, settings: BuildDiscoverySettings, front: int, total: int, step: int
    ) -> ListingCut | None:
        """Oldest first with a total: the newest builds are at the end. Read pages backwards
        from ``total`` until one reaches past the window or the pages read from the front."""
        # Everything from ``cursor`` to the end has been read.
        cursor = total
        while cursor > front:
            if listing.pages >= settings.max_pages:
                return ListingCut.TRUNCATED
            offset = max(front, cursor - step)
            page = await self._page(offset, listing, settings)
            held = listing.add(page, learn_order=False)
            cut = listing.check(offset, page)
            if cut is not None:
                return cut
            if held > 0 and offset + held < cursor:
                # The server serves fewer than asked: a gap is left below the cursor. Learn
                # its page size and read the gap before going further down.
                step = held
                continue
            cursor = offset
            if listing.reaches_past_window(page):
                return None
        return None

    async def _page(
        self, offset: int, listing: _Pass, settings: BuildDiscoverySettings
    ) -> BuildPage:
        answer = await self._request(offset, settings)
        if answer.value is None:
            raise _PageFailedError(answer, listing.pages + 1)
        return answer.value

    async def _request(self, offset: int, settings: BuildDiscoverySettings) -> Answer[BuildPage]:
        await self._slots.listing_slot()
        started = self._time.monotonic()
        try:
            result = await self._lister().list_builds(
                offset=offset, limit=PAGE_LIMIT, team_id=settings.team_id
            )
        except BaseException:
            self._slots.listing_done(None)
            raise
        self._telemetry.observe_request(
            result.outcome, self._time.monotonic() - started, BUILD_LIST_ENDPOINT
        )
        self._slots.listing_done(result)
        return result

    def _failed(
        self, failure: _PageFailedError, listing: _Pass, settings: BuildDiscoverySettings
    ) -> PassResult:
        answer = failure.answer
        reason = (
            BUILD_LIST_UNAVAILABLE if answer.outcome is Outcome.NOT_FOUND else answer.outcome.value
        )
        self._telemetry.build_list_failed(reason)
        self._last_reason = reason
        extra: dict[str, object] = {
            "page": failure.page_number,
            "reason": reason,
            "detail": answer.detail,
        }
        if reason == BUILD_LIST_UNAVAILABLE:
            self._warn_once(
                reason,
                "the API does not serve GET /api/v1/images/builds: discovery.builds is off in "
                "effect; configured builds are polled as before",
                extra,
            )
        elif answer.outcome is Outcome.CLIENT_ERROR and settings.team_id:
            self._warn_once(
                "team_id_refused",
                f"the API refused teamId {settings.team_id!r} on the build listing: remove "
                "discovery.builds.team_id (and PRIME_TEAM_ID) to list the key's builds; "
                "configured builds are polled as before",
                extra,
            )
        else:
            log.warning("build listing failed: nothing changed", extra=extra)
        return PassResult((), listing.pages, reason, listing.order, listing.skipped)

    def _log_complete(
        self, listing: _Pass, builds: tuple[Build, ...], settings: BuildDiscoverySettings
    ) -> None:
        """Tell a complete pass whose scope or size changed, the first, and one after a
        failure; a named team's pass with no build in the window is a warning."""
        shown = (settings.team_id, len(builds))
        if shown == self._logged_listing and self._last_reason is None:
            return
        previous = self._logged_listing
        self._logged_listing = shown
        extra: dict[str, object] = {
            "builds": len(builds),
            "pages": listing.pages,
            "order": listing.order.value if listing.order else "unknown",
            "team_id": settings.team_id,
        }
        if previous is not None and previous != shown:
            extra |= {"previous_team_id": previous[0], "previous_builds": previous[1]}
        if settings.team_id and not listing.in_window(_owns_all):
            log.warning(
                "build listing of team_id holds no build created within discovery.builds.window: "
                "check that discovery.builds.team_id (or PRIME_TEAM_ID) is the team's ID, that "
                "the API key's user is a member of the team with access to its builds, and that "
                "the window reaches back to its latest build",
                extra=extra | {"listed": len(listing.builds), "window_seconds": settings.window},
            )
            return
        log.info("build listing complete", extra=extra)

    def _warn_once(self, condition: str, message: str, extra: dict[str, object]) -> None:
        level = logging.DEBUG if self._warned == condition else logging.WARNING
        self._warned = condition
        log.log(level, message, extra=extra)

    def _log_refused(self, refused: list[str]) -> None:
        if not refused:
            return
        level = logging.DEBUG if self._refused_logged else logging.INFO
        self._refused_logged = True
        log.log(
            level,
            "listed builds skipped: their IDs break the build-ID rule (1 to 128 letters, "
            "digits, '-', '_' or '.')",
            extra={
                "count": len(refused),
                "build_ids": ",".join(
                    repr(build_id[:40]) for build_id in refused[:REFUSED_IDS_LOGGED]
                ),
            },
        )


def _page_step(page: BuildPage, held: int) -> int:
    """The page size the server serves, from the first page: the limit it states, or the
    items it held when the total says more were there."""
    step = PAGE_LIMIT
    if page.limit is not None and 0 < page.limit < step:
        step = page.limit
    if 0 < held < step and page.total is not None and held < page.total:
        step = held
    return step
