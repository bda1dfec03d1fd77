"""Image discovery: every image of the key's scope from ``GET /api/v1/images``, no build IDs.

Every ``discovery.images.interval`` the whole listing is read, page by page, each request
taking a slot of the key's one request budget (exporter.budget: its rate, its 429 and key
pauses, its concurrency bound; build polls go first). Of each image name, tag and artifact
type the most recently updated row is kept, as the official CLI shows it; older rows, stale
BUILDING ones the backend leaves behind included, are ignored. A listing that fails part-way
changes nothing: the previous complete one stays, and the failure is reported.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from exporter.api import Answer
from exporter.budget import Clock, SystemClock
from exporter.config.schema import ImageDiscoverySettings
from exporter.listing import ListingCut, PassPages
from exporter.models import ImagePage, ImageRow
from exporter.store import ImageInventory, latest_rows
from exporter.telemetry import IMAGE_LIST_ENDPOINT, Telemetry

log = logging.getLogger(__name__)

# The largest page the API serves; fewer requests for the same listing.
PAGE_LIMIT = 250
# What a listing cut short logs: what happened, and what to do about it.
_CUT_MESSAGES = {
    ListingCut.TRUNCATED: (
        "image listing cut short at discovery.images.max_pages: the previous complete listing "
        "stays; raise discovery.images.max_pages, or narrow discovery.images.search"
    ),
    ListingCut.REPEATED_PAGE: (
        "image listing answered a page it had already sent, at another offset: the API, or a "
        "proxy before it, ignores offset; the previous complete listing stays; point "
        "api.base_url at the Prime Intellect API itself, or have the proxy pass query "
        "parameters on"
    ),
    ListingCut.OVER_TOTAL: (
        "image listing holds more images than its total count says: the previous complete "
        "listing stays; point api.base_url at the Prime Intellect API itself (a proxy or cache "
        "may mix answers), and report it if it does"
    ),
}


class ImageLister(Protocol):
    async def list_images(
        self, *, offset: int, limit: int, search: str = "", team_id: str = ""
    ) -> Answer[ImagePage]: ...


class RequestSlots(Protocol):
    """The request budget's side (``RequestBudget.listing``): one request slot at a time."""

    async def listing_slot(self) -> None: ...

    def listing_done(self, result: Answer[ImagePage] | None) -> None:
        """The request's result, or None if it was never made (cancelled)."""
        ...


class ImageDiscovery:
    """Lists the scope's images into an ImageInventory, every interval, until cancelled."""

    def __init__(
        self,
        lister: Callable[[], ImageLister],
        slots: RequestSlots,
        inventory: ImageInventory,
        telemetry: Telemetry,
        settings: ImageDiscoverySettings,
        *,
        wall_clock: Callable[[], float] = time.time,
        clock: Clock | None = None,
    ) -> None:
        # The client is asked for at each request: a reload may have replaced it.
        self._lister = lister
        self._slots = slots
        self._inventory = inventory
        self._telemetry = telemetry
        self.settings = settings
        self._wall_clock = wall_clock
        self._time = clock or SystemClock()
        self._wakeup = asyncio.Event()
        # The scope (team, search) and size of the last listing that was logged: a listing
        # that changes neither logs nothing.
        self._logged_listing: tuple[str, str, int] | None = None
        # The cut last warned about: one that repeats at every interval is told once.
        self._warned: ListingCut | None = None

    def update(self, settings: ImageDiscoverySettings) -> None:
        """New settings: a changed scope, search or page cap is listed at once, and a cut
        warned about is told again."""
        changed = (settings.search, settings.team_id, settings.max_pages) != (
            self.settings.search,
            self.settings.team_id,
            self.settings.max_pages,
        )
        self.settings = settings
        if changed:
            self._warned = None
            self._wakeup.set()

    async def run(self) -> None:
        """List now, then every interval; returns only by cancellation."""
        while True:
            self._wakeup.clear()
            await self.list_all()
            await self._time.wait(self._wakeup, self.settings.interval)

    async def list_all(self) -> bool:
        """Read every page; on success replace the inventory and return True."""
        settings = self.settings
        rows: list[ImageRow] = []
        unusable = 0
        offset = 0
        pages = PassPages()
        for page_number in range(1, settings.max_pages + 1):
            result = await self._request(offset, settings)
            page = result.value
            if page is None:
                self._inventory.failed(result.outcome)
                self._warned = None
                log.warning(
                    "image listing failed: the previous complete listing stays",
                    extra={
                        "page": page_number,
                        "reason": result.outcome.value,
                        "detail": result.detail,
                    },
                )
                return False
            cut = pages.take(
                offset,
                (row.id for row in page.rows),
                # The total counts logical images (name:tag), not rows: an image has a row
                # per artifact type, and older rows of a rebuilt tag.
                ((row.image_name, row.image_tag) for row in page.rows),
                page.total_count,
            )
            if cut is not None:
                return self._cut(cut, page_number, pages, settings)
            rows.extend(page.rows)
            unusable += page.unusable_rows
            offset += PAGE_LIMIT
            if not page.rows and not page.unusable_rows:
                break
            if pages.total is not None and offset >= pages.total:
                break
        else:
            return self._cut(ListingCut.TRUNCATED, settings.max_pages, pages, settings)
        if unusable:
            log.warning("image rows without an id or createdAt ignored", extra={"rows": unusable})
        images = latest_rows(rows)
        recovered = self._inventory.snapshot().last_error is not None
        self._inventory.replace(images, self._wall_clock())
        self._warned = None
        self._log_complete(len(images), len(rows), settings, recovered=recovered)
        return True

    def _cut(
        self, cut: ListingCut, page_number: int, pages: PassPages, settings: ImageDiscoverySettings
    ) -> bool:
        """A pass that stopped before the listing's end: reported, and nothing replaced (its
        rows are no complete view, so images it did not reach would wrongly vanish)."""
        self._inventory.failed(cut)
        extra: dict[str, object] = {
            "reason": cut.value,
            "page": page_number,
            "images": pages.counted,
            "max_pages": settings.max_pages,
        }
        if pages.total is not None:
            extra["total"] = pages.total
        # A cut comes back at every interval until its cause is fixed: said once, until a
        # complete listing or another cut.
        level = logging.DEBUG if self._warned is cut else logging.WARNING
        self._warned = cut
        log.log(level, _CUT_MESSAGES[cut], extra=extra)
        return False

    def _log_complete(
        self, images: int, rows: int, settings: ImageDiscoverySettings, *, recovered: bool
    ) -> None:
        """Tell a listing whose scope or size changed, the first, and one after a failure; a
        named team's empty listing is a warning."""
        shown = (settings.team_id, settings.search, images)
        if shown == self._logged_listing and not recovered:
            return
        previous = self._logged_listing
        self._logged_listing = shown
        extra: dict[str, object] = {
            "images": images,
            "rows": rows,
            "team_id": settings.team_id,
            "search": settings.search,
        }
        if previous is not None and previous != shown:
            extra |= {
                "previous_team_id": previous[0],
                "previous_search": previous[1],
                "previous_images": previous[2],
            }
        if settings.team_id and not images:
            message = (
                "image listing of team_id is empty: check that discovery.images.team_id (or "
                "PRIME_TEAM_ID) is the team's ID, and that the API key's user is a member of the "
                "team with access to its images"
            )
            if settings.search:
                message += ", and that discovery.images.search matches them"
            log.warning(
                message,
                extra=extra,
            )
            return
        log.info("image listing complete", extra=extra)

    async def _request(self, offset: int, settings: ImageDiscoverySettings) -> Answer[ImagePage]:
        await self._slots.listing_slot()
        started = self._time.monotonic()
        try:
            result = await self._lister().list_images(
                offset=offset,
                limit=PAGE_LIMIT,
                search=settings.search,
                team_id=settings.team_id,
            )
        except BaseException:
            self._slots.listing_done(None)
            raise
        self._telemetry.observe_request(
            result.outcome, self._time.monotonic() - started, IMAGE_LIST_ENDPOINT
        )
        self._slots.listing_done(result)
        return result
