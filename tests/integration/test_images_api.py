"""The image listing's page, parsed as tolerantly as a build's answer, and fetched by the same
client over loopback against the simulator."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic import SecretStr

from exporter.api import Answer, ApiClient
from exporter.config.credentials import ApiKeySource
from exporter.demo.simulator import ArtifactPlan, BuildPlan, Fault, Simulator
from exporter.models import ImagePage, InvalidPageError, Outcome, parse_image_page
from tests.helpers.support import CANARY_API_KEY, EPOCH

ROW: dict[str, Any] = {
    "id": "art-1",
    "artifactType": "VM_SANDBOX",
    "imageName": "trainer",
    "imageTag": "v1",
    "status": "COMPLETED",
    "createdAt": "2026-01-01T00:00:00Z",
    "completedAt": "2026-01-01T00:10:00Z",
}


def page_of(*rows: Any, **fields: Any) -> bytes:
    return json.dumps({"data": list(rows), **fields}).encode()


def test_unknown_fields_are_ignored_and_unknown_enums_kept_raw_but_labelled_unknown() -> None:
    page = parse_image_page(
        page_of({**ROW, "status": "QUEUED", "artifactType": "WASM", "flavour": "new"})
    )
    [row] = page.rows
    assert (row.status, row.status_label) == ("QUEUED", "UNKNOWN")
    assert (row.artifact_type, row.type_label) == ("WASM", "UNKNOWN")


def test_a_missing_or_odd_total_count_is_no_count() -> None:
    assert parse_image_page(page_of(ROW)).total_count is None
    for odd in (-1, "7", True, 1.5, None):
        assert parse_image_page(page_of(ROW, totalCount=odd)).total_count is None
    assert parse_image_page(page_of(ROW, totalCount=7)).total_count == 7


def test_the_total_is_read_as_the_platform_spells_it_and_as_the_sdk_does() -> None:
    assert parse_image_page(page_of(ROW, total_count=7)).total_count == 7
    assert parse_image_page(page_of(ROW, totalCount=7)).total_count == 7
    # Both: the platform schema's spelling; an odd one leaves the other.
    assert parse_image_page(page_of(ROW, total_count=3, totalCount=4)).total_count == 3
    assert parse_image_page(page_of(ROW, total_count="3", totalCount=4)).total_count == 4
    for odd in (-1, "7", True, 1.5, None):
        assert parse_image_page(page_of(ROW, total_count=odd)).total_count is None


def test_a_page_with_more_rows_than_its_limit_is_taken_whole() -> None:
    rows = [{**ROW, "id": f"art-{n}"} for n in range(300)]
    assert len(parse_image_page(page_of(*rows, limit=100)).rows) == 300


def test_a_row_that_is_no_artifact_row_is_counted_and_left_out() -> None:
    page = parse_image_page(
        page_of(ROW, {**ROW, "createdAt": None}, {"imageName": "x"}, "text", 7, None)
    )
    assert [row.id for row in page.rows] == ["art-1"]
    assert page.unusable_rows == 5


@pytest.mark.parametrize(
    ("size", "kept"), [(0, 0), (5_000_000_000, 5_000_000_000), (-1, None), (1.5, None), ("9", None)]
)
def test_a_size_is_a_whole_number_of_bytes_or_none(size: object, kept: int | None) -> None:
    [row] = parse_image_page(page_of({**ROW, "sizeBytes": size})).rows
    assert row.size_bytes == kept


def test_api_strings_are_cleaned_like_a_builds() -> None:
    hostile = {**ROW, "imageName": "a\x1b[31mb\nc", "errorMessage": "x" * 5000 + " the end"}
    [row] = parse_image_page(page_of(hostile)).rows
    assert row.image_name == "ab c"
    assert row.error_message is not None
    assert len(row.error_message) == 256
    assert row.error_message.endswith("the end")


def test_the_row_is_dated_by_pushed_else_completed_else_started_else_created() -> None:
    created = {**ROW, "completedAt": None}
    [row] = parse_image_page(page_of(created)).rows
    assert row.updated_at == row.created_at
    started = {**created, "startedAt": "2026-01-01T00:01:00Z"}
    pushed = {**ROW, "pushedAt": "2026-01-01T00:11:00"}
    rows = parse_image_page(page_of(started, ROW, pushed)).rows
    assert [row.updated_at - row.created_at for row in rows] == [60, 600, 660]


@pytest.mark.parametrize("body", [b"", b"[]", b'{"data": {}}', b'{"items": []}', b"\xff"])
def test_a_body_that_is_no_listing_is_refused(body: bytes) -> None:
    with pytest.raises(InvalidPageError):
        parse_image_page(body)


def list_once(base_url: str, **query: Any) -> Answer[ImagePage]:
    async def run() -> Answer[ImagePage]:
        client = ApiClient(
            base_url,
            ApiKeySource(value=SecretStr(CANARY_API_KEY)),
            timeout=2.0,
            max_connections=1,
        )
        try:
            return await client.list_images(**query)
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_a_page_is_listed_with_the_team_scope_and_search_sent_as_the_official_client_does() -> None:
    plans = [
        BuildPlan("b1", "trainer", "v1", EPOCH, 1, 1, 1, artifacts=(ArtifactPlan("VM_SANDBOX"),)),
        BuildPlan("b2", "eval", "v1", EPOCH, 1, 1, 1),
    ]
    with Simulator(CANARY_API_KEY, plans, team_id="team-1") as simulator:
        result = list_once(simulator.base_url, offset=0, limit=50, search="TRAIN", team_id="team-1")
        assert result.outcome is Outcome.OK
        assert result.value is not None
        assert [row.image_name for row in result.value.rows] == ["trainer"]
        assert result.value.total_count == 1
        # No team: no teamId at all, never an empty one.
        list_once(simulator.base_url, offset=50, limit=50)
        queries = [request.query for request in simulator.listing_requests()]
        assert queries == [
            "offset=0&limit=50&search=TRAIN&teamId=team-1",
            "offset=50&limit=50",
        ]


def test_listing_failures_are_the_same_outcomes_as_a_builds() -> None:
    with Simulator(CANARY_API_KEY, team_id="team-1") as simulator:
        simulator.set_listing_fault(Fault.rate_limited("30"))
        limited = list_once(simulator.base_url, offset=0, limit=10, team_id="team-1")
        assert (limited.outcome, limited.retry_after) == (Outcome.RATE_LIMITED, 30.0)
        simulator.set_listing_fault(Fault.garbage())
        assert list_once(simulator.base_url, offset=0, limit=10).outcome is Outcome.INVALID_RESPONSE
        simulator.set_listing_fault(None)
        # The simulator refuses a limit outside 1 to 250 with 422, as the API's client does.
        assert list_once(simulator.base_url, offset=0, limit=0).outcome is Outcome.CLIENT_ERROR
