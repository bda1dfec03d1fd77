"""What an image listing tells the log: a listing whose scope or size changed, never an
unchanged one, and a warning with what to check when a named team's listing is empty. Scripted
pages, no HTTP; a driven clock."""

from __future__ import annotations

import asyncio
import logging

import pytest

from exporter.api import Answer
from exporter.config.schema import ImageDiscoverySettings
from exporter.discovery import ImageDiscovery
from exporter.models import IMAGE_ROW, ImagePage, ImageRow, Outcome
from exporter.store import ImageInventory
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
