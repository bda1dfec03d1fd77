"""The request budget: shared by shards, made visible when short, spent where it matters."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from exporter.config.schema import Config, ShardSettings
from exporter.demo.simulator import BuildPlan, Simulator
from exporter.poller import cadence_gap
from tests.helpers.clock import DrivenClock, requests_made
from tests.helpers.support import CANARY_API_KEY, EPOCH, RunningExporter, make_config, wait_until

DEMAND = "primeintellect_exporter_poll_demand_ratio"
LAG = "primeintellect_exporter_poll_lag_seconds"


def forever_building(build_id: str) -> BuildPlan:
    return BuildPlan(build_id, "app", "v1", EPOCH, 10, 10, float("inf"))


@contextmanager
def busy_simulator(clock: DrivenClock) -> Iterator[Simulator]:
    """200 builds that stay BUILDING, served on the driven clock."""
    plans = [forever_building(f"busy-{i:03d}") for i in range(200)]
    with Simulator(CANARY_API_KEY, plans, clock=clock.wall, monotonic=clock.monotonic) as s:
        yield s


def test_cadence_gap_grows_with_the_time_unchanged_within_its_bounds() -> None:
    assert cadence_gap(30, 600, 0) == 30
    assert cadence_gap(30, 600, 299) == 30
    assert cadence_gap(30, 600, 1_200) == 120
    assert cadence_gap(30, 600, 86_400) == 600
    # max_interval equal to interval turns the adaptive cadence off.
    assert cadence_gap(30, 30, 86_400) == 30


def expected_gap(unchanged_for: float) -> float:
    """The cadence of interval 1s and max_interval 4s: a tenth of the time unchanged."""
    return min(max(1.0, unchanged_for / 10), 4.0)


def next_poll(
    exporter: RunningExporter, simulator: Simulator, clock: DrivenClock, gap: float
) -> float:
    """Move the driven clock through the exporter's waits, one at a time, to its next poll of
    "steady", which the cadence puts ``gap`` seconds after the last one; returns the gap."""
    requests = simulator.requests("steady")
    count, last = len(requests), requests[-1].at
    clock.run_until(
        exporter.exporter,
        lambda: len(simulator.requests("steady")) > count,
        limit=gap + 1,
        message=f"a poll {gap}s after the last",
    )
    polled_at = requests_made(simulator, count + 1)[-1].at
    assert round(polled_at - last, 4) == round(gap, 4), f"the gap after the poll at {last}"
    return polled_at - last


def test_an_unchanged_build_is_polled_less_often_and_at_interval_again_after_a_change() -> None:
    clock = DrivenClock()
    plan = forever_building("steady")
    with Simulator(
        CANARY_API_KEY, [plan], clock=clock.wall, monotonic=clock.monotonic
    ) as simulator:
        config = make_config(simulator.base_url, ["steady"], interval="1s", max_interval="4s")
        exporter = RunningExporter(config, clock=clock).start()
        try:
            first = requests_made(simulator, 1)[0]
            clock.settle(exporter.exporter)
            # A gap of 4s needs 40s unchanged (a tenth of it), then a second gap at the ceiling.
            grown: list[float] = []
            while grown[-2:] != [4.0, 4.0]:
                unchanged_for = clock.monotonic() - first.at
                gap = next_poll(exporter, simulator, clock, expected_gap(unchanged_for))
                grown.append(round(gap, 4))
            changed = plan.payload(clock.wall())
            changed["status"] = "UPLOADING"
            simulator.set_payload("steady", changed)
            # The change is seen at the next poll, still at the ceiling; then polls at interval.
            seen_after = round(next_poll(exporter, simulator, clock, 4.0), 4)
            after_change = [round(next_poll(exporter, simulator, clock, 1.0), 4) for _ in range(2)]
        finally:
            exporter.stop()
    assert grown[:10] == [1.0] * 10
    assert all(later >= earlier for earlier, later in itertools.pairwise(grown))
    assert max(grown) == 4.0
    assert seen_after == 4.0
    assert after_change == [1.0, 1.0]


def test_demand_and_lag_rise_when_builds_outgrow_the_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = DrivenClock()
    with (
        busy_simulator(clock) as simulator,
        caplog.at_level(logging.WARNING, logger="exporter.poller"),
    ):
        config = make_config(
            simulator.base_url, simulator.build_ids, interval="10s", requests_per_second=1
        )
        exporter = RunningExporter(config, clock=clock).start()
        try:
            # 200 builds every 10s need 20 requests/s; the budget is 1: one request a second,
            # and the builds not polled yet wait longer and longer.
            for count in range(1, 4):
                clock.wait_for_sleep(1.0, only=True)
                requests_made(simulator, count)
                clock.advance(1.0)
            # Three seconds in: measured again, just before the fourth request.
            clock.wait_for_sleep(1.0, only=True)
            assert exporter.value(DEMAND) == 20
            assert exporter.value(LAG) == 3
        finally:
            exporter.stop()
    warnings = [r for r in caplog.records if r.getMessage().startswith("more polls due")]
    assert len(warnings) == 1
    assert warnings[0].__dict__["interval_that_can_be_kept_seconds"] == 200


def test_demand_below_one_and_no_lag_while_the_budget_suffices() -> None:
    clock = DrivenClock()
    with busy_simulator(clock) as simulator:
        config = make_config(
            simulator.base_url, simulator.build_ids[:5], interval="10s", requests_per_second=8
        )
        exporter = RunningExporter(config, clock=clock).start()
        try:
            # Five builds every 10s need half a request a second, of a budget of 8: each first
            # poll waits only for its slot, an eighth of a second.
            for count in range(1, 5):
                clock.wait_for_sleep(0.125, only=True)
                requests_made(simulator, count)
                clock.advance(0.125)
            requests_made(simulator, 5)
            wait_until(
                lambda: exporter.exporter.store.snapshot().all_polled,
                message="every build polled",
            )
            # Measured once a second: a second on, every build polled and none due for 9s.
            clock.wait_for_sleep(1.0, only=True)
            clock.advance(1.0)
            clock.wait_for_sleep(1.0, only=True)
            assert exporter.value(DEMAND) == 5 / 10 / 8
            assert exporter.value(LAG) == 0
        finally:
            exporter.stop()


def shard_config(simulator: Simulator, index: int) -> Config:
    return make_config(
        simulator.base_url,
        simulator.build_ids,
        interval="1s",
        requests_per_second=4,
        shard=(index, 2),
    )


def test_two_shards_spend_half_of_the_key_budget_each() -> None:
    clock = DrivenClock()
    started = clock.monotonic()
    shards = [ShardSettings(index=index, count=2) for index in range(2)]
    with busy_simulator(clock) as simulator:
        exporters = [
            RunningExporter(shard_config(simulator, i), clock=clock).start() for i in range(2)
        ]
        try:
            # Each replica has far more builds due than its budget allows, all the time: ten
            # seconds, half a second at a time, each replica waiting half a second for a slot.
            for count in range(1, 21):
                clock.wait_for_sleep(0.5, 0.5, only=True)
                for shard in shards:
                    requests_made(simulator, count, shard.owns)
                clock.advance(0.5)
        finally:
            for exporter in exporters:
                exporter.stop()
    for shard in shards:
        times = [r.at - started for r in simulator.requests() if shard.owns(r.build_id)]
        # 4 requests/s for the key, so 2 for each of two replicas, in every second.
        assert [sum(second <= t < second + 1 for t in times) for second in range(10)] == [2] * 10


def test_a_new_build_is_polled_ahead_of_a_backlog() -> None:
    clock = DrivenClock()
    slot = 1 / 16
    with busy_simulator(clock) as simulator:
        simulator.add(forever_building("newcomer"))
        builds = simulator.build_ids[:100]
        # 100 builds every second need 100 requests/s; at 16, a backlog that only grows.
        current = {"config": make_config(simulator.base_url, builds, requests_per_second=16)}
        exporter = RunningExporter(
            current["config"],
            load_config=lambda: current["config"],
            enable_lifecycle=True,
            clock=clock,
        ).start()
        try:
            # Every build polled once, a slot apart.
            for count in range(1, 101):
                clock.wait_for_sleep(slot, only=True)
                requests_made(simulator, count)
                if count < 100:
                    clock.advance(slot)
            wait_until(
                lambda: exporter.exporter.store.snapshot().all_polled,
                message="every build polled",
            )
            assert (exporter.value(LAG) or 0) > 2
            current["config"] = make_config(
                simulator.base_url, [*builds, "newcomer"], requests_per_second=16
            )
            added_at = clock.monotonic()
            assert httpx.post(exporter.url + "/-/reload").status_code == 200
            clock.advance(slot)
            newest = requests_made(simulator, 101)[-1]
        finally:
            exporter.stop()
    # The very next slot goes to the new build, ahead of the 100 overdue ones.
    assert newest.build_id == "newcomer"
    assert newest.at - added_at == slot
