"""Builds a listing pass brought: tracked beside the configured ones, each item an answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from exporter.api import Answer
from exporter.budget import LISTING_PATIENCE, RequestBudget
from exporter.demo.simulator import BuildPlan
from exporter.models import Build, Outcome, parse_build
from exporter.poller import Poller, PollSettings
from exporter.store import BuildStore
from exporter.telemetry import Telemetry
from tests.helpers.clock import DrivenClock
from tests.helpers.support import EPOCH, forever_building

INTERVAL = 30.0
HOLD = 75.0


def building(build_id: str, at: float = EPOCH + 600) -> Build:
    return parse_build(json.dumps(forever_building(build_id).payload(at)).encode())


def finished(build_id: str) -> Build:
    plan = BuildPlan(build_id, "app", "v1", EPOCH, 10, 10, 10)
    return parse_build(json.dumps(plan.payload(EPOCH + 600)).encode())


class CountingFetcher:
    """Answers every build as still building, and counts the requests per build."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def fetch(self, build_id: str) -> Answer[Build]:
        self.calls[build_id] = self.calls.get(build_id, 0) + 1
        return Answer(Outcome.OK, building(build_id))

    def credentials_generation(self) -> int:
        return 0


class Harness:
    """A poller on a driven clock, run on this thread's event loop without I/O."""

    def __init__(self, requests_per_second: float = 128) -> None:
        self.clock = DrivenClock()
        self.fetcher = CountingFetcher()
        self.store = BuildStore()
        self.telemetry = Telemetry(self.clock.monotonic)
        settings = PollSettings(
            interval=INTERVAL,
            stale_after=900,
            requests_per_second=requests_per_second,
            max_concurrency=4,
        )
        self.budget = RequestBudget(
            self.fetcher,
            self.telemetry,
            settings.budget,
            wall_clock=self.clock.wall,
            clock=self.clock,
        )
        self.poller = Poller(
            self.fetcher,
            self.store,
            self.telemetry,
            settings,
            wall_clock=self.clock.wall,
            clock=self.clock,
            jitter=lambda: 0.5,
            budget=self.budget,
        )

    def run(self, steps: Callable[[Harness], object]) -> None:
        async def main() -> None:
            task = asyncio.create_task(self.poller.run())
            await self.turn()
            try:
                result = steps(self)
                if asyncio.iscoroutine(result):
                    await result
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        asyncio.run(main())

    async def turn(self) -> None:
        # The poller and its fetches run on this loop without I/O: a hundred turns of it let
        # them do all they can at this moment.
        for _ in range(100):
            await asyncio.sleep(0)

    async def advance(self, seconds: float, step: float = 1.0) -> None:
        moved = 0.0
        while moved < seconds:
            self.clock.advance(step)
            moved += step
            await self.turn()

    def tracked(self) -> dict[str, bool]:
        """Each tracked build, and whether only discovery brought it."""
        return {b: r.discovered for b, r in self.store.snapshot().records.items()}


def test_listed_builds_are_tracked_and_answered_without_a_request_of_their_own() -> None:
    harness = Harness()

    async def steps(h: Harness) -> None:
        h.poller.listed([building("a"), building("b")], complete=True, hold=HOLD)
        await h.turn()
        assert h.tracked() == {"a": True, "b": True}
        records = h.store.snapshot().records
        assert records["a"].last_poll_ok
        assert records["a"].build == building("a")
        assert h.telemetry.snapshot().builds_discovered == 2
        # Within the hold no request is made; past it, each build is polled once.
        await h.advance(HOLD - 1)
        assert h.fetcher.calls == {}
        await h.advance(2)
        assert h.fetcher.calls == {"a": 1, "b": 1}

    harness.run(steps)


def test_each_pass_holds_its_builds_off_again_so_a_steady_listing_makes_no_poll() -> None:
    harness = Harness()

    async def steps(h: Harness) -> None:
        for _ in range(6):
            h.poller.listed([building("a")], complete=True, hold=HOLD)
            await h.advance(INTERVAL + 5)
        assert h.fetcher.calls == {}

    harness.run(steps)


def test_a_complete_pass_drops_a_discovered_build_it_no_longer_lists_not_a_configured_one() -> None:
    harness = Harness()

    async def steps(h: Harness) -> None:
        h.poller.set_builds(["configured"])
        h.poller.listed(
            [building("configured"), building("gone"), building("kept")], complete=True, hold=HOLD
        )
        assert h.tracked() == {"configured": False, "gone": True, "kept": True}
        h.poller.listed([building("kept")], complete=True, hold=HOLD)
        assert h.tracked() == {"configured": False, "kept": True}
        assert h.telemetry.snapshot().builds_discovered == 1

    harness.run(steps)


def test_a_pass_cut_short_adds_builds_and_removes_none() -> None:
    harness = Harness()

    async def steps(h: Harness) -> None:
        h.poller.listed([building("first")], complete=True, hold=HOLD)
        h.poller.listed([building("second")], complete=False, hold=HOLD)
        assert h.tracked() == {"first": True, "second": True}

    harness.run(steps)


def test_a_configured_build_that_discovery_also_lists_stays_configured_after_it_leaves() -> None:
    harness = Harness()

    async def steps(h: Harness) -> None:
        h.poller.listed([building("both")], complete=True, hold=HOLD)
        h.poller.set_builds(["both"])
        assert h.tracked() == {"both": False}
        assert h.telemetry.snapshot().builds_discovered == 0
        h.poller.listed([], complete=True, hold=HOLD)
        assert h.tracked() == {"both": False}
        # Taken out of the config while discovery still lists it: it stays, discovered.
        h.poller.listed([building("both")], complete=True, hold=HOLD)
        h.poller.set_builds([])
        assert h.tracked() == {"both": True}

    harness.run(steps)


def test_a_finished_build_from_a_listing_is_never_requested() -> None:
    harness = Harness()

    async def steps(h: Harness) -> None:
        h.poller.listed([finished("done")], complete=True, hold=HOLD)
        await h.advance(10 * INTERVAL, step=5)
        assert h.fetcher.calls == {}
        assert h.store.snapshot().records["done"].finished

    harness.run(steps)


def test_turning_discovery_off_forgets_the_discovered_builds_only() -> None:
    harness = Harness()

    async def steps(h: Harness) -> None:
        h.poller.set_builds(["configured"])
        h.poller.listed([building("found")], complete=True, hold=HOLD)
        h.poller.forget_discovered()
        assert h.tracked() == {"configured": False}
        assert h.telemetry.snapshot().builds_discovered == 0

    harness.run(steps)


def test_a_configured_build_polled_once_then_covered_by_listings_is_not_polled_again() -> None:
    harness = Harness()

    async def steps(h: Harness) -> None:
        h.poller.set_builds(["configured"])
        await h.turn()
        assert h.fetcher.calls == {"configured": 1}
        for _ in range(4):
            await h.advance(INTERVAL - 5)
            h.poller.listed([building("configured")], complete=True, hold=HOLD)
        assert h.fetcher.calls == {"configured": 1}

    harness.run(steps)


async def one_page(h: Harness, granted: list[tuple[float, int]]) -> None:
    """One listing request: when it was granted, and how many polls were made by then."""
    slots = h.budget.listing("build listing")
    await slots.listing_slot()
    granted.append((h.clock.elapsed(), sum(h.fetcher.calls.values())))
    slots.listing_done(None)


def test_a_listing_request_waits_for_due_builds_at_most_its_patience() -> None:
    # Four requests a second and forty builds due: ten seconds of polls ahead of the listing.
    harness = Harness(requests_per_second=4)

    async def steps(h: Harness) -> None:
        h.poller.set_builds([f"b{n:02}" for n in range(40)])
        granted: list[tuple[float, int]] = []
        page = asyncio.create_task(one_page(h, granted))
        await h.turn()
        await h.advance(2, step=0.25)
        await page
        # Builds went first for a second (polls at 0, 0.25, 0.5 and 0.75 s), then the page.
        assert granted == [(LISTING_PATIENCE, 4)]

    harness.run(steps)


def test_waiting_through_a_pause_does_not_put_a_listing_before_due_builds() -> None:
    harness = Harness(requests_per_second=4)

    async def steps(h: Harness) -> None:
        h.poller.set_builds([f"b{n:02}" for n in range(40)])
        h.budget.answered(Answer(Outcome.RATE_LIMITED, retry_after=5.0), {"build_id": "b00"})
        granted: list[tuple[float, int]] = []
        page = asyncio.create_task(one_page(h, granted))
        await h.turn()
        polled = sum(h.fetcher.calls.values())
        await h.advance(7, step=0.25)
        await page
        # The pause ends at 5 s: builds first for a second again, then the page.
        assert granted == [(5 + LISTING_PATIENCE, polled + 4)]

    harness.run(steps)
