"""What an image listing tells the log: a listing whose scope or size changed, never an
unchanged one, and a warning with what to check when a named team's listing is empty; and a
listing cut short (its page cap, a repeated page, more images than its total), which keeps the
last complete one with the reason beside it. Scripted pages, no HTTP; a driven clock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from exporter.api import Answer
from exporter.config.schema import ImageDiscoverySettings
from exporter.discovery import ImageDiscovery
from exporter.listing import ListingCut
from exporter.metrics import inventory_families
from exporter.models import IMAGE_ROW, ImagePage, ImageRow, Outcome
from exporter.store import ImageInventory, Inventory
from exporter.telemetry import Telemetry
from tests.helpers.clock import DrivenClock

COMPLETE = "image listing complete"


def row(name: str) -> ImageRow:
    return IMAGE_ROW.validate_python(
        {
            "id": f"{name}-artifact",
            "imageName": name,
            "imageTag": "v1",
            "status": "COMPLETED",
            "createdAt": "2026-01-01T00:00:00Z",
        }
    )


class FakeImages:
    """The image listing as a script: one page of these images, or a failure."""

    def __init__(self, *names: str) -> None:
        self.rows = [row(name) for name in names]
        self.failing = False

    async def list_images(
        self, *, offset: int, limit: int, search: str = "", team_id: str = ""
    ) -> Answer[ImagePage]:
        if self.failing:
            return Answer(Outcome.SERVER_ERROR, detail="HTTP 500")
        page = tuple(self.rows[offset : offset + limit])
        return Answer(Outcome.OK, ImagePage(page, 0, len(self.rows)))


class FreeSlots:
    async def listing_slot(self) -> None:
        return None

    def listing_done(self, result: Answer[ImagePage] | None) -> None:
        return None


def discovery(images: FakeImages, team_id: str = "", search: str = "") -> ImageDiscovery:
    clock = DrivenClock()
    settings = ImageDiscoverySettings(enabled=True, team_id=team_id, search=search)
    return ImageDiscovery(
        lambda: images,
        FreeSlots(),
        ImageInventory(),
        Telemetry(clock.monotonic),
        settings,
        wall_clock=clock.wall,
        clock=clock,
    )


def told(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str, dict[str, object]]]:
    """The level, message and fields of each complete listing told so far."""
    fields = ("images", "team_id", "search", "previous_images", "previous_team_id")
    return [
        (
            record.levelno,
            record.getMessage(),
            {name: getattr(record, name) for name in fields if hasattr(record, name)},
        )
        for record in caplog.records
        if record.getMessage() == COMPLETE or "is empty" in record.getMessage()
    ]


def test_a_listing_is_told_when_its_team_or_its_size_changes_and_never_when_unchanged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    images = FakeImages("trainer", "eval")
    lister = discovery(images)
    with caplog.at_level(logging.DEBUG, logger="exporter.discovery"):
        for _ in range(2):
            assert asyncio.run(lister.list_all())
        images.rows.append(row("gateway"))
        for _ in range(2):
            asyncio.run(lister.list_all())
        lister.update(lister.settings.model_copy(update={"team_id": "team-1"}))
        for _ in range(2):
            asyncio.run(lister.list_all())
    base = {"search": ""}
    assert told(caplog) == [
        (logging.INFO, COMPLETE, {**base, "images": 2, "team_id": ""}),
        (
            logging.INFO,
            COMPLETE,
            {**base, "images": 3, "team_id": "", "previous_images": 2, "previous_team_id": ""},
        ),
        (
            logging.INFO,
            COMPLETE,
            {
                **base,
                "images": 3,
                "team_id": "team-1",
                "previous_images": 3,
                "previous_team_id": "",
            },
        ),
    ]


def test_a_listing_after_a_failed_one_is_told_even_unchanged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    images = FakeImages("trainer")
    lister = discovery(images)
    with caplog.at_level(logging.DEBUG, logger="exporter.discovery"):
        asyncio.run(lister.list_all())
        images.failing = True
        assert not asyncio.run(lister.list_all())
        images.failing = False
        asyncio.run(lister.list_all())
    assert [fields["images"] for _, _, fields in told(caplog)] == [1, 1]


def test_a_named_teams_empty_listing_is_warned_about_once_with_what_to_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lister = discovery(FakeImages(), team_id="team-1", search="train")
    with caplog.at_level(logging.DEBUG, logger="exporter.discovery"):
        asyncio.run(lister.list_all())
        asyncio.run(lister.list_all())
    [(level, message, fields)] = told(caplog)
    assert level == logging.WARNING
    assert fields == {"images": 0, "team_id": "team-1", "search": "train"}
    for what in ("discovery.images.team_id", "PRIME_TEAM_ID", "member", "discovery.images.search"):
        assert what in message


def test_an_empty_listing_without_a_team_is_told_as_any_other(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lister = discovery(FakeImages())
    with caplog.at_level(logging.DEBUG, logger="exporter.discovery"):
        asyncio.run(lister.list_all())
    assert told(caplog) == [(logging.INFO, COMPLETE, {"images": 0, "team_id": "", "search": ""})]


# --- listings cut short ------------------------------------------------------------------------

TYPES = ("CONTAINER_IMAGE", "VM_SANDBOX")


def artifact_row(name: str, artifact_type: str) -> ImageRow:
    return IMAGE_ROW.validate_python(
        {
            "id": f"{name}-{artifact_type.lower()}",
            "artifactType": artifact_type,
            "imageName": name,
            "imageTag": "v1",
            "status": "COMPLETED",
            "createdAt": "2026-01-01T00:00:00Z",
        }
    )


@dataclass
class PagedImages:
    """The image listing as the API pages it, by logical image (a name and tag) with a row per
    artifact type, and the ways paging goes wrong: an offset ignored, a total left out or off
    by ``total_skew``, a listing of ``count`` images that has no end (``count`` None)."""

    count: int | None
    ignore_offset: bool = False
    with_total: bool = True
    total_skew: int = 0
    offsets: list[int] = field(default_factory=list)

    async def list_images(
        self, *, offset: int, limit: int, search: str = "", team_id: str = ""
    ) -> Answer[ImagePage]:
        self.offsets.append(offset)
        start = 0 if self.ignore_offset else offset
        end = start + limit if self.count is None else min(start + limit, self.count)
        rows = tuple(
            artifact_row(f"image-{n:06}", artifact_type)
            for n in range(start, end)
            for artifact_type in TYPES
        )
        total = None
        if self.with_total and self.count is not None:
            total = max(0, self.count + self.total_skew)
        return Answer(Outcome.OK, ImagePage(rows, 0, total))


@dataclass
class Listed:
    images: PagedImages
    discovery: ImageDiscovery
    inventory: ImageInventory

    def list_once(self) -> bool:
        """One listing; the offsets it asked for are those asked from here on."""
        self.images.offsets.clear()
        return asyncio.run(self.discovery.list_all())

    def error_reasons(self) -> list[str]:
        """The reason labels of image_list_last_error in /metrics."""
        [family] = [
            family
            for family in inventory_families(self.inventory.snapshot())
            if family.name == "primeintellect_exporter_image_list_last_error"
        ]
        return [sample.labels["reason"] for sample in family.samples]

    def image_names(self) -> set[str]:
        return {name for name, _, _ in self.inventory.snapshot().images}


def listed(images: PagedImages, *, max_pages: int = 400) -> Listed:
    clock = DrivenClock()
    inventory = ImageInventory()
    settings = ImageDiscoverySettings(enabled=True, max_pages=max_pages)
    lister = ImageDiscovery(
        lambda: images,
        FreeSlots(),
        inventory,
        Telemetry(clock.monotonic),
        settings,
        wall_clock=clock.wall,
        clock=clock,
    )
    return Listed(images, lister, inventory)


def names(count: int) -> set[str]:
    return {f"image-{n:06}" for n in range(count)}


def after_a_complete_listing_of_300(**paging: object) -> tuple[Listed, Inventory]:
    """A complete listing of 300 images (two pages), then the listing pages as ``paging``
    says; the inventory the complete listing left."""
    test = listed(PagedImages(300))
    assert test.list_once()
    assert test.images.offsets == [0, 250]
    for name, value in paging.items():
        setattr(test.images, name, value)
    return test, test.inventory.snapshot()


def assert_kept(test: Listed, complete: Inventory, reason: ListingCut) -> None:
    """The last complete listing is what /metrics shows, and the cut's reason beside it."""
    now = test.inventory.snapshot()
    assert now.images == complete.images
    assert now.listed_at == complete.listed_at
    assert test.image_names() == names(300)
    assert now.last_error is reason
    assert test.error_reasons() == [reason.value]


@pytest.mark.parametrize("with_total", [False, True], ids=["without-total", "with-total"])
def test_a_listing_that_ignores_offset_stops_at_the_repeated_page_and_keeps_the_last_one(
    with_total: bool,
) -> None:
    test, complete = after_a_complete_listing_of_300(ignore_offset=True, with_total=with_total)
    assert not test.list_once()
    # Page two repeats page one: no third request, however many pages the cap allows.
    assert test.images.offsets == [0, 250]
    assert_kept(test, complete, ListingCut.REPEATED_PAGE)


def test_an_endless_listing_of_new_images_fails_at_max_pages_as_truncated() -> None:
    test = listed(PagedImages(300), max_pages=2)
    assert test.list_once()
    complete = test.inventory.snapshot()
    # No total and every page full of images not seen before: it would never end.
    test.images.count = None
    assert not test.list_once()
    assert test.images.offsets == [0, 250]
    assert_kept(test, complete, ListingCut.TRUNCATED)


def test_a_listing_longer_than_max_pages_fails_as_truncated_but_one_ending_there_completes() -> (
    None
):
    test = listed(PagedImages(500), max_pages=2)
    assert test.list_once()
    assert test.images.offsets == [0, 250]
    assert test.image_names() == names(500)
    complete = test.inventory.snapshot()
    test.images.count = 501
    assert not test.list_once()
    assert test.images.offsets == [0, 250]
    assert test.image_names() == names(500)
    assert test.inventory.snapshot().images == complete.images
    assert test.error_reasons() == [ListingCut.TRUNCATED.value]


@pytest.mark.parametrize(
    ("skew", "offsets"),
    [pytest.param(-1, [0, 250], id="one-short"), pytest.param(-250, [0], id="page-one-over")],
)
def test_a_listing_with_more_images_than_its_total_fails_as_over_total(
    skew: int, offsets: list[int]
) -> None:
    test, complete = after_a_complete_listing_of_300(total_skew=skew)
    assert not test.list_once()
    # It stops at the page that goes over: 299 says page two is over, 50 says page one is.
    assert test.images.offsets == offsets
    assert_kept(test, complete, ListingCut.OVER_TOTAL)


def test_the_total_counts_images_not_their_rows_and_ends_the_listing() -> None:
    # 500 images of two rows each: 1,000 rows against a total of 500 is no excess.
    test = listed(PagedImages(500))
    assert test.list_once()
    # The total says page two was the last: no empty page is asked for.
    assert test.images.offsets == [0, 250]
    assert test.inventory.snapshot().last_error is None
    assert len(test.inventory.snapshot().images) == 1000


def test_a_complete_listing_after_a_cut_one_replaces_it_and_clears_the_reason() -> None:
    test, _ = after_a_complete_listing_of_300(ignore_offset=True)
    assert not test.list_once()
    test.images.ignore_offset = False
    test.images.count = 301
    assert test.list_once()
    assert test.image_names() == names(301)
    assert test.error_reasons() == []


def test_a_cut_listing_is_warned_about_once_with_what_to_do_until_a_listing_completes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    test, _ = after_a_complete_listing_of_300(ignore_offset=True)
    with caplog.at_level(logging.DEBUG, logger="exporter.discovery"):
        for _ in range(3):
            test.list_once()
        test.images.ignore_offset = False
        test.list_once()
        test.images.ignore_offset = True
        test.list_once()
    cuts = [
        (record.levelno, record.getMessage(), getattr(record, "reason", None))
        for record in caplog.records
        if "offset" in record.getMessage()
    ]
    assert [level for level, _, _ in cuts] == [
        logging.WARNING,
        logging.DEBUG,
        logging.DEBUG,
        logging.WARNING,
    ]
    _, message, reason = cuts[0]
    assert reason == "repeated_page"
    for what in ("previous complete listing stays", "ignores offset", "api.base_url"):
        assert what in message


def test_a_raised_page_cap_is_listed_at_once_and_a_cut_told_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = DrivenClock()
    images = PagedImages(600)
    inventory = ImageInventory()
    lister = ImageDiscovery(
        lambda: images,
        FreeSlots(),
        inventory,
        Telemetry(clock.monotonic),
        ImageDiscoverySettings(enabled=True, max_pages=2),
        wall_clock=clock.wall,
        clock=clock,
    )

    async def scenario() -> None:
        running = asyncio.create_task(lister.run())
        try:
            await until(lambda: len(images.offsets) == 2)
            assert inventory.snapshot().last_error is ListingCut.TRUNCATED
            # The same cap again changes nothing; a raised one lists without waiting for the
            # interval (the driven clock never moves here).
            lister.update(lister.settings.model_copy(update={"max_pages": 2}))
            lister.update(lister.settings.model_copy(update={"max_pages": 3}))
            await until(lambda: inventory.snapshot().listed_at is not None)
            assert images.offsets == [0, 250, 0, 250, 500]
            lister.update(lister.settings.model_copy(update={"max_pages": 1}))
            await until(lambda: len(images.offsets) == 6)
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running

    with caplog.at_level(logging.DEBUG, logger="exporter.discovery"):
        asyncio.run(scenario())
    cuts = [record.levelno for record in caplog.records if "max_pages" in record.getMessage()]
    assert cuts == [logging.WARNING, logging.WARNING]


async def until(condition: Callable[[], bool]) -> None:
    """Let the discovery run until ``condition`` holds; it needs no driven time to get there."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    pytest.fail("the discovery never got there")
