"""The build listing fetched by the API client over loopback against the simulator: each item as
good as a poll of its build, and each way the listing may fail one outcome."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import SecretStr

from exporter.api import Answer, ApiClient
from exporter.config.credentials import ApiKeySource
from exporter.demo.simulator import BuildListing, Fault, Simulator, random_plans
from exporter.models import Build, BuildPage, Outcome
from tests.helpers.support import CANARY_API_KEY, EPOCH

T = TypeVar("T")
NOW = EPOCH + 900


def with_client(base_url: str, use: Callable[[ApiClient], Awaitable[T]]) -> T:
    async def run() -> T:
        client = ApiClient(
            base_url,
            ApiKeySource(value=SecretStr(CANARY_API_KEY)),
            timeout=2.0,
            max_connections=1,
        )
        try:
            return await use(client)
        finally:
            await client.aclose()

    return asyncio.run(run())


def list_once(
    base_url: str, *, offset: int = 0, limit: int = 10, team_id: str = ""
) -> Answer[BuildPage]:
    return with_client(
        base_url, lambda client: client.list_builds(offset=offset, limit=limit, team_id=team_id)
    )


def test_every_listed_build_is_the_build_a_poll_gives() -> None:
    plans = random_plans(23, EPOCH, random.Random(5))
    with Simulator(CANARY_API_KEY, plans, clock=lambda: NOW) as simulator:

        async def list_and_poll(client: ApiClient) -> tuple[list[Build], list[Answer[Build]]]:
            listed: list[Build] = []
            for offset in range(0, 100, 10):
                answer = await client.list_builds(offset=offset, limit=10)
                assert answer.value is not None, answer.detail
                if not answer.value.builds:
                    break
                assert (answer.value.total, answer.value.skipped) == (23, 0)
                listed += answer.value.builds
            polls = [await client.fetch(build.id) for build in listed]
            return listed, polls

        listed, polls = with_client(simulator.base_url, list_and_poll)

        assert sorted(build.id for build in listed) == simulator.build_ids
        assert listed == [poll.value for poll in polls]
        created = [build.created_at for build in listed]
        assert created == sorted(created, reverse=True)
        queries = [request.query for request in simulator.build_listing_requests()]
        assert queries == [f"offset={offset}&limit=10" for offset in (0, 10, 20, 30)]


def test_an_item_that_is_no_build_is_skipped_and_the_rest_listed() -> None:
    plans = random_plans(3, EPOCH, random.Random(6))
    with Simulator(CANARY_API_KEY, plans, clock=lambda: NOW) as simulator:
        simulator.set_payload("broken", {"id": "broken", "createdAt": None})
        simulator.set_build_listing(BuildListing(total_field="totalCount"))

        answer = list_once(simulator.base_url)

    assert answer.value is not None
    assert sorted(build.id for build in answer.value.builds) == [plan.build_id for plan in plans]
    assert (answer.value.skipped, answer.value.total) == (1, 4)


def test_a_team_id_is_sent_and_each_way_of_taking_it_is_told_apart() -> None:
    plans = random_plans(4, EPOCH, random.Random(7))
    with Simulator(CANARY_API_KEY, plans, clock=lambda: NOW, team_id="team-1") as simulator:
        ignored = list_once(simulator.base_url, team_id="team-2")
        simulator.set_build_listing(BuildListing(team_id="honoured"))
        honoured = list_once(simulator.base_url, team_id="team-2")
        simulator.set_build_listing(BuildListing(team_id="refused"))
        refused = list_once(simulator.base_url, team_id="team-1")
        unscoped = list_once(simulator.base_url)
        queries = [request.query for request in simulator.build_listing_requests()]

    assert ignored.value is not None
    assert len(ignored.value.builds) == 4
    assert honoured.value is not None
    assert (honoured.value.builds, honoured.value.total) == ((), 0)
    assert (refused.outcome, refused.detail) == (Outcome.CLIENT_ERROR, "HTTP 422")
    assert unscoped.outcome is Outcome.OK
    assert queries == [
        "offset=0&limit=10&teamId=team-2",
        "offset=0&limit=10&teamId=team-2",
        "offset=0&limit=10&teamId=team-1",
        "offset=0&limit=10",
    ]


def test_an_api_without_the_listing_is_not_found_whether_it_answers_404_or_405() -> None:
    with Simulator(CANARY_API_KEY, build_listing=BuildListing(served=False)) as simulator:
        missing = list_once(simulator.base_url)
        simulator.set_build_listing(BuildListing())
        simulator.set_build_listing_fault(
            Fault(status=405, body=b'{"detail": "Method Not Allowed"}')
        )
        not_allowed = list_once(simulator.base_url)

    assert (missing.outcome, missing.detail) == (
        Outcome.NOT_FOUND,
        "HTTP 404 for /api/v1/images/builds",
    )
    assert (not_allowed.outcome, not_allowed.detail) == (
        Outcome.NOT_FOUND,
        "HTTP 405 for /api/v1/images/builds",
    )


def test_listing_failures_are_the_same_outcomes_as_a_polls() -> None:
    with Simulator(CANARY_API_KEY, random_plans(30, EPOCH, random.Random(8))) as simulator:
        simulator.set_build_listing_fault(Fault.rate_limited("30", times=1), offset=10)
        first = list_once(simulator.base_url, offset=0)
        limited = list_once(simulator.base_url, offset=10)
        again = list_once(simulator.base_url, offset=10)
        simulator.set_build_listing_fault(Fault.garbage())
        garbage = list_once(simulator.base_url)
        simulator.set_build_listing_fault(Fault.server_error(502))
        failing = list_once(simulator.base_url)

    assert (first.outcome, again.outcome) == (Outcome.OK, Outcome.OK)
    assert (limited.outcome, limited.retry_after) == (Outcome.RATE_LIMITED, 30.0)
    assert (garbage.outcome, garbage.detail) == (Outcome.INVALID_RESPONSE, "body is not JSON")
    assert failing.outcome is Outcome.SERVER_ERROR
