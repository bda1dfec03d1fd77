"""Build discovery end to end: the simulator's build listing → the exporter → /metrics."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Literal

import httpx
import pytest

from exporter.config.schema import Config
from exporter.demo.simulator import BuildListing, BuildPlan, Fault, Simulator
from tests.helpers.clock import DrivenClock
from tests.helpers.support import CANARY_API_KEY, RunningExporter, make_config, wait_until

HOUR = 3600.0
DAY = 24 * HOUR
PASS_INTERVAL = 30.0
# A request budget whose slot (1/64 s) is exact in binary, as are the driven times it makes: a
# wait that ends a rounding error after a deadline would never be woken by the driven clock.
REQUESTS_PER_SECOND = 64
# The exporter's time: the simulator's builds are dated against it.
NOW = 1_800_000_000.0
BUILD_PATH = "/api/v1/images/build/"


@pytest.fixture
def clock() -> DrivenClock:
    return DrivenClock(start=NOW)


def simulator_on(clock: DrivenClock, plans: list[BuildPlan], **options: object) -> Simulator:
    return Simulator(
        CANARY_API_KEY,
        plans,
        clock=clock.wall,
        monotonic=clock.monotonic,
        **options,  # type: ignore[arg-type]
    )


def discovering(
    simulator: Simulator,
    clock: DrivenClock,
    builds: list[str] | None = None,
    state_path: Path | None = None,
    **settings: object,
) -> RunningExporter:
    config = make_config(
        simulator.base_url,
        builds or [],
        interval="30s",
        requests_per_second=REQUESTS_PER_SECOND,
        state_path=state_path,
        build_discovery={"enabled": True, "interval": "30s", **settings},
    )
    return RunningExporter(config, clock=clock).start()


def per_build_requests(simulator: Simulator) -> int:
    return sum(1 for request in simulator.requests() if request.path.startswith(BUILD_PATH))


def tracked(running: RunningExporter) -> dict[str, bool]:
    """Each tracked build with an answer, and whether only discovery brought it."""
    records = running.exporter.store.snapshot().records
    return {build_id: record.discovered for build_id, record in records.items() if record.build}


def last_answers(running: RunningExporter) -> set[float | None]:
    """When each tracked build was last answered."""
    return {record.last_poll_time for record in running.exporter.store.snapshot().records.values()}


def finished_plan(
    index: int, age: float, outcome: Literal["COMPLETED", "FAILED"] = "COMPLETED"
) -> BuildPlan:
    return BuildPlan(f"done-{index:03}", "trainer", "v1", NOW - age, 10, 10, 10, outcome=outcome)


def building_plan(index: int, age: float) -> BuildPlan:
    return BuildPlan(f"busy-{index:03}", "server", "v2", NOW - age, 5, 5, math.inf)


def first_pass(running: RunningExporter, clock: DrivenClock, count: int) -> None:
    clock.run_until(
        running.exporter,
        lambda: len(tracked(running)) >= count,
        limit=60,
        message=f"{count} builds from the listing",
    )


def test_every_build_of_the_key_within_the_window_is_shown_without_a_configured_id(
    clock: DrivenClock, stopping: list[RunningExporter]
) -> None:
    plans = [
        *(finished_plan(n, age=60 * n, outcome=("COMPLETED", "FAILED")[n % 2]) for n in range(150)),
        *(building_plan(n, age=30 * n) for n in range(100)),
        # Older than the window: never tracked.
        *(finished_plan(900 + n, age=8 * DAY + n) for n in range(20)),
    ]
    with simulator_on(clock, plans) as simulator:
        running = discovering(simulator, clock, window="7d")
        stopping.append(running)
        first_pass(running, clock, 250)
        assert len(tracked(running)) == 250
        assert set(tracked(running).values()) == {True}
        samples = running.samples()
        for plan in plans[:250]:
            status = simulator.payload(plan.build_id)["status"]  # type: ignore[index]
            labels = {
                "build_id": plan.build_id,
                "image_name": plan.image_name,
                "image_tag": plan.image_tag,
                "status": status,
            }
            key = ("primeintellect_image_build_status", frozenset(labels.items()))
            assert samples.get(key) == 1, plan.build_id
        assert samples[("primeintellect_exporter_builds_discovered", frozenset())] == 250
        assert samples[("primeintellect_exporter_build_list_pages", frozenset())] == 3
        assert per_build_requests(simulator) == 0


def test_two_hundred_building_builds_are_kept_fresh_by_the_listing_alone(
    clock: DrivenClock, stopping: list[RunningExporter]
) -> None:
    plans = [building_plan(n, age=10 * n) for n in range(200)]
    with simulator_on(clock, plans) as simulator:
        running = discovering(simulator, clock)
        stopping.append(running)
        first_pass(running, clock, 200)
        # Five more passes over five intervals: every build answered anew by each.
        answered = last_answers(running)
        for passes in range(2, 7):
            pages = 2 * passes
            clock.run_until(
                running.exporter,
                lambda: len(simulator.build_listing_requests()) >= pages,  # noqa: B023
                limit=PASS_INTERVAL + 5,
                message="the next listing pass",
            )
            # The pass hands its builds over once its last page is in.
            previous = answered
            answered = wait_until(
                lambda: (times := last_answers(running)) != previous and len(times) == 1 and times,  # noqa: B023
                message="every build answered by the pass",
            )
        assert per_build_requests(simulator) == 0
        # Two pages a pass (the total says when to stop), six passes.
        assert len(simulator.build_listing_requests()) == 12


def test_a_status_change_in_the_listing_is_seen_within_one_pass(
    clock: DrivenClock, stopping: list[RunningExporter]
) -> None:
    finishing = BuildPlan("finishing", "app", "v1", NOW - 60, 10, 10, 60)  # ends at NOW + 20
    with simulator_on(clock, [finishing]) as simulator:
        running = discovering(simulator, clock)
        stopping.append(running)
        first_pass(running, clock, 1)
        labels = {"build_id": "finishing", "image_name": "app", "image_tag": "v1"}
        assert running.value("primeintellect_image_build_status", **labels, status="BUILDING") == 1
        clock.run_until(
            running.exporter,
            lambda: (
                running.value("primeintellect_image_build_status", **labels, status="COMPLETED")
                == 1
            ),
            limit=PASS_INTERVAL + 1,
            message="the next pass to show the build completed",
        )
        assert per_build_requests(simulator) == 0


def test_an_api_without_the_listing_says_so_once_and_polls_the_configured_ids(
    clock: DrivenClock, stopping: list[RunningExporter], caplog: pytest.LogCaptureFixture
) -> None:
    configured = building_plan(1, age=60)
    with simulator_on(clock, [configured], build_listing=BuildListing(served=False)) as simulator:
        running = discovering(simulator, clock, builds=[configured.build_id])
        stopping.append(running)
        clock.run_until(
            running.exporter,
            lambda: len(simulator.build_listing_requests()) >= 3,
            limit=3 * PASS_INTERVAL + 5,
            message="three listing passes",
        )
        assert (
            running.value("primeintellect_exporter_build_list_last_error", reason="unavailable")
            == 1
        )
        assert tracked(running) == {configured.build_id: False}
        assert per_build_requests(simulator) >= 3
    warnings = [
        record
        for record in caplog.records
        if record.levelno == logging.WARNING and "images/builds" in record.getMessage()
    ]
    assert len(warnings) == 1


def test_a_pass_failing_on_page_two_keeps_the_builds_and_shows_the_reason(
    clock: DrivenClock, stopping: list[RunningExporter]
) -> None:
    plans = [building_plan(n, age=10 * n) for n in range(150)]
    with simulator_on(clock, plans) as simulator:
        running = discovering(simulator, clock)
        stopping.append(running)
        first_pass(running, clock, 150)
        simulator.set_build_listing_fault(Fault.server_error(503), offset=100)
        clock.run_until(
            running.exporter,
            lambda: (
                running.value(
                    "primeintellect_exporter_build_list_last_error", reason="server_error"
                )
                == 1
            ),
            limit=PASS_INTERVAL + 5,
            message="the failed pass",
        )
        assert len(tracked(running)) == 150


@pytest.mark.parametrize(
    ("paging", "reason"),
    [
        # No total, and every page the first: a listing that would never end.
        pytest.param({"offset": "ignored", "total_field": ""}, "repeated_page", id="endless"),
        pytest.param({"total_skew": -1}, "over_total", id="short-total"),
    ],
)
def test_a_pass_cut_short_removes_no_build_costs_two_requests_and_shows_the_reason(
    clock: DrivenClock,
    stopping: list[RunningExporter],
    paging: dict[str, object],
    reason: str,
) -> None:
    plans = [building_plan(n, age=10 * n) for n in range(150)]
    with simulator_on(clock, plans) as simulator:
        running = discovering(simulator, clock)
        stopping.append(running)
        first_pass(running, clock, 150)
        assert len(simulator.build_listing_requests()) == 2
        # A build the listing no longer holds: a complete pass would drop it, a cut one not.
        gone = plans[-1].build_id
        simulator.remove(gone)
        simulator.set_build_listing(replace(BuildListing(), **paging))  # type: ignore[arg-type]
        clock.run_until(
            running.exporter,
            lambda: running.value("primeintellect_exporter_build_list_last_error", reason=reason),
            limit=PASS_INTERVAL + 5,
            message=f"the pass cut short as {reason}",
        )
        assert len(simulator.build_listing_requests()) == 4
        assert gone in running.exporter.store.snapshot().records
        assert f'build_id="{gone}"' in running.metrics_text()
        simulator.set_build_listing(BuildListing())
        clock.run_until(
            running.exporter,
            lambda: gone not in running.exporter.store.snapshot().records,
            limit=PASS_INTERVAL + 5,
            message="the complete pass without the build",
        )
        assert running.value("primeintellect_exporter_build_list_last_error", reason=reason) is None


def test_a_discovered_build_that_leaves_the_listing_leaves_metrics_a_configured_one_stays(
    clock: DrivenClock, stopping: list[RunningExporter]
) -> None:
    kept, configured, gone = (building_plan(n, age=60 * n) for n in range(3))
    with simulator_on(clock, [kept, configured, gone]) as simulator:
        running = discovering(simulator, clock, builds=[configured.build_id])
        stopping.append(running)
        first_pass(running, clock, 3)
        assert tracked(running) == {
            kept.build_id: True,
            configured.build_id: False,
            gone.build_id: True,
        }
        simulator.remove(gone.build_id)
        simulator.remove(configured.build_id)
        clock.run_until(
            running.exporter,
            lambda: gone.build_id not in tracked(running),
            limit=PASS_INTERVAL + 5,
            message="the pass without the build",
        )
        assert set(running.exporter.store.snapshot().records) == {
            kept.build_id,
            configured.build_id,
        }
        text = running.metrics_text()
        assert f'build_id="{gone.build_id}"' not in text
        assert f'build_id="{configured.build_id}"' in text


def test_a_restart_from_state_shows_discovered_finished_builds_at_once_without_a_request(
    clock: DrivenClock, stopping: list[RunningExporter], tmp_path: Path
) -> None:
    state_path = tmp_path / "state.db"
    plans = [finished_plan(n, age=60 * n) for n in range(20)]
    with simulator_on(clock, plans) as simulator:
        first = discovering(simulator, clock, state_path=state_path)
        first_pass(first, clock, 20)
        first.stop()
        # The listing is gone after the restart: what /metrics shows comes from the state.
        simulator.set_build_listing(BuildListing(served=False))
        before = len(simulator.requests())
        second = discovering(simulator, clock, state_path=state_path)
        stopping.append(second)
        assert tracked(second) == {plan.build_id: True for plan in plans}
        wait_until(
            lambda: second.value("primeintellect_exporter_builds_discovered") == 20,
            message="the discovered count",
        )
        clock.settle(second.exporter)
        assert per_build_requests(simulator) == 0
        assert [r.path for r in simulator.requests()[before:]] == ["/api/v1/images/builds"]


def test_a_reload_that_turns_discovery_off_keeps_only_the_configured_builds(
    clock: DrivenClock, stopping: list[RunningExporter]
) -> None:
    configured, found = building_plan(1, age=60), building_plan(2, age=60)
    with simulator_on(clock, [configured, found]) as simulator:
        settings: dict[str, object] = {"enabled": True, "interval": "30s"}

        def load() -> Config:
            return make_config(
                simulator.base_url,
                [configured.build_id],
                requests_per_second=REQUESTS_PER_SECOND,
                build_discovery=dict(settings),
            )

        running = RunningExporter(
            load(), clock=clock, load_config=load, enable_lifecycle=True
        ).start()
        stopping.append(running)
        first_pass(running, clock, 2)
        assert running.value("primeintellect_exporter_builds_discovered") == 1
        settings["enabled"] = False
        assert httpx.post(running.url + "/-/reload", timeout=30).status_code == 200
        assert set(running.exporter.store.snapshot().records) == {configured.build_id}
        names = {name for name, _ in running.samples()}
        assert "primeintellect_exporter_builds_discovered" not in names
        assert "primeintellect_exporter_build_list_pages" not in names
