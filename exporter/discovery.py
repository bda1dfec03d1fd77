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
from exporter.models import ImagePage, ImageRow
from exporter.store import ImageInventory, latest_rows
from exporter.telemetry import IMAGE_LIST_ENDPOINT, Telemetry

log = logging.getLogger(__name__)

# The largest page the API serves; fewer requests for the same listing.
PAGE_LIMIT = 250
# A listing that goes on past this many pages is cut there (400 pages: 100,000 images).
MAX_PAGES = 400


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

    def update(self, settings: ImageDiscoverySettings) -> None:
        """New settings: a changed scope or search is listed at once."""
        changed = (settings.search, settings.team_id) != (
            self.settings.search,
            self.settings.team_id,
        )
        self.settings = settings
        if changed:
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
        for page_number in range(1, MAX_PAGES + 1):
            result = await self._request(offset, settings)
            page = result.value
            if page is None:
                self._inventory.failed(result.outcome)
                log.warning(
                    "image listing failed: the previous complete listing stays",
                    extra={
                        "page": page_number,
                        "reason": result.outcome.value,
                        "detail": result.detail,
                    },
                )
                return False
            rows.extend(page.rows)
            unusable += page.unusable_rows
            offset += PAGE_LIMIT
            if not page.rows and not page.unusable_rows:
                break
            if page.total_count is not None and offset >= page.total_count:
                break
        else:
            log.warning(
                "image listing cut short: more pages than the exporter reads",
                extra={"pages": MAX_PAGES, "rows": len(rows)},
            )
        if unusable:
            log.warning("image rows without an id or createdAt ignored", extra={"rows": unusable})
        images = latest_rows(rows)
        recovered = self._inventory.snapshot().last_error is not None
        self._inventory.replace(images, self._wall_clock())
        self._log_complete(len(images), len(rows), settings, recovered=recovered)
        return True

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
