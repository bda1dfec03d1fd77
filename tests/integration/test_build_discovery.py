"""A build listing pass over loopback against the simulator: the real client, the key's request
budget and its slots, and exactly the builds within the window handed to the poller side,
whichever order the listing runs in. Time is the driven clock: the test dispatches the budget's
slots as the poller would, moving the clock on by each wait the budget asks for."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence

import pytest
from pydantic import SecretStr

from exporter.api import ApiClient
from exporter.budget import BudgetSettings, RequestBudget
from exporter.build_discovery import BuildDiscovery, PassResult
from exporter.config.credentials import ApiKeySource
from exporter.config.schema import BuildDiscoverySettings
from exporter.demo.simulator import BuildListing, BuildPlan, Simulator
from exporter.models import Build, parse_build
from exporter.telemetry import BUILD_LIST_ENDPOINT, Telemetry
from tests.helpers.clock import DrivenClock
from tests.helpers.support import CANARY_API_KEY, EPOCH

NOW = EPOCH + 86400
# 250 builds, one every 20 s: an hour's window holds the newest 181.
BUILDS = 250
SPACING = 20.0
IN_AN_HOUR = 181
# Four requests a second: each page after the first waits 0.25 s (exact in binary) for a token.
REQUESTS_PER_SECOND = 4.0


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[list[Build], bool]] = []

    def listed(self, builds: Sequence[Build], *, complete: bool, hold: float) -> None:
        self.calls.append((list(builds), complete))


async def dispatch(budget: RequestBudget, clock: DrivenClock) -> None:
    """Grant queued listing slots as the poller's loop does, moving the driven clock on by the
    wait the token bucket asks for."""
    while True:
        budget.wakeup.clear()
        now = clock.monotonic()
        delay = budget.queued_delay(now)
        if delay == 0:
            budget.grant_queued(now)
        elif delay != math.inf:
            clock.advance(delay)
        else:
            await budget.wakeup.wait()


def one_pass(simulator: Simulator, clock: DrivenClock, sink: Sink) -> tuple[PassResult, Telemetry]:
    async def run() -> tuple[PassResult, Telemetry]:
        client = ApiClient(
            simulator.base_url,
            ApiKeySource(value=SecretStr(CANARY_API_KEY)),
            timeout=5.0,
            max_connections=2,
        )
        telemetry = Telemetry(clock.monotonic)
        budget = RequestBudget(
            client,
            telemetry,
            BudgetSettings(REQUESTS_PER_SECOND, 2, 300.0),
            wall_clock=clock.wall,
            clock=clock,
        )
        discovery = BuildDiscovery(
            lambda: client,
            budget.listing("build listing"),
            sink,
            telemetry,
            BuildDiscoverySettings.model_validate({"enabled": True, "window": "1h"}),
            wall_clock=clock.wall,
            clock=clock,
        )
        dispatcher = asyncio.create_task(dispatch(budget, clock))
        try:
            return await discovery.list_once(), telemetry
        finally:
            dispatcher.cancel()
            await client.aclose()

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("listing", "offsets"),
    [
        pytest.param(BuildListing(order="newest"), [0, 100], id="newest-first"),
        pytest.param(
            BuildListing(order="oldest", total_field=""), [0, 100, 200, 250], id="oldest-first"
        ),
    ],
)
def test_a_pass_hands_over_exactly_the_builds_within_the_window(
    listing: BuildListing, offsets: list[int]
) -> None:
    clock = DrivenClock(start=NOW)
    plans = [
        BuildPlan(f"b{index:03d}", "trainer", f"v{index}", NOW - index * SPACING)
        for index in range(BUILDS)
    ]
    sink = Sink()
    with Simulator(
        CANARY_API_KEY, plans, clock=lambda: NOW, monotonic=clock.monotonic, build_listing=listing
    ) as simulator:
        result, telemetry = one_pass(simulator, clock, sink)
        requests = simulator.build_listing_requests()
        polls = {
            plan.build_id: parse_build(simulator_body(simulator, plan.build_id))
            for plan in plans[:IN_AN_HOUR]
        }

    assert [request.query for request in requests] == [
        f"offset={offset}&limit=100" for offset in offsets
    ]
    # Each page waited for its token of the key's budget, the first none.
    started = requests[0].at
    assert [request.at - started for request in requests] == [
        page / REQUESTS_PER_SECOND for page in range(len(offsets))
    ]
    [(builds, complete)] = sink.calls
    assert complete
    assert result.reason is None
    assert sorted(build.id for build in builds) == sorted(polls)
    # Each listed build is the build a poll of it answers.
    assert all(build == polls[build.id] for build in builds)
    snapshot = telemetry.snapshot()
    assert (snapshot.build_list_last_success, snapshot.build_list_pages) == (
        clock.wall(),
        len(offsets),
    )
    assert sum(snapshot.requests_by_endpoint[BUILD_LIST_ENDPOINT].values()) == len(offsets)


def simulator_body(simulator: Simulator, build_id: str) -> bytes:
    """The body a poll of the build gets from the simulator now."""
    payload = simulator.payload(build_id)
    assert payload is not None
    return json.dumps(payload).encode()
