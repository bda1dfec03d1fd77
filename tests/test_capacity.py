"""The request budget: shared by shards, made visible when short, spent where it matters."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator

import httpx
import pytest

from exporter.config import Config, ShardSettings
from exporter.poller import cadence_gap
from exporter.simulator import BuildPlan, Simulator
from tests.support import (
    CANARY_API_KEY,
    EPOCH,
    FastClock,
    RunningExporter,
    make_config,
    wait_until,
)


def forever_building(build_id: str) -> BuildPlan:
    return BuildPlan(build_id, "app", "v1", EPOCH, 10, 10, float("inf"))


@pytest.fixture
def busy_simulator() -> Iterator[Simulator]:
    with Simulator(CANARY_API_KEY, [forever_building(f"busy-{i:03d}") for i in range(200)]) as s:
        yield s


def test_cadence_gap_grows_with_the_time_unchanged_within_its_bounds() -> None:
    assert cadence_gap(30, 600, 0) == 30
    assert cadence_gap(30, 600, 299) == 30
    assert cadence_gap(30, 600, 1_200) == 120
    assert cadence_gap(30, 600, 86_400) == 600
    # max_interval equal to interval turns the adaptive cadence off.
    assert cadence_gap(30, 30, 86_400) == 30


def test_an_unchanged_build_is_polled_less_often_and_at_interval_again_after_a_change() -> None:
    clock = FastClock(speed=20)
    plan = forever_building("steady")
    with Simulator(CANARY_API_KEY, [plan], clock=clock.wall) as simulator:
        config = make_config(simulator.base_url, ["steady"], interval="1s", max_interval="4s")
        exporter = RunningExporter(config, clock=clock, wall_clock=clock.wall).start()
        try:
            # A gap of 4s needs 40s unchanged (a tenth of it), then a few gaps at the ceiling.
            wait_until(
                lambda: len(gaps(simulator, clock)) >= 4 and min(gaps(simulator, clock)[-2:]) > 3.5,
                timeout=30,
                message="gaps at max_interval",
            )
            grown = gaps(simulator, clock)
            changed = plan.payload(clock.wall())
            changed["status"] = "UPLOADING"
            simulator.set_payload("steady", changed)
            seen = len(simulator.requests("steady"))
            wait_until(
                lambda: len(simulator.requests("steady")) >= seen + 4,
                timeout=30,
                message="polls after the change",
            )
            after_change = gaps(simulator, clock)[len(grown) + 1 :]
        finally:
            exporter.stop()
    assert grown[0] < 1.5
    assert 3.5 < max(grown) < 5.5
    assert all(later >= earlier - 0.6 for earlier, later in itertools.pairwise(grown))
    assert after_change
    assert max(after_change[:2]) < 1.6


def gaps(simulator: Simulator, clock: FastClock) -> list[float]:
    """Seconds between polls, on the exporter's fast clock."""
    times = [request.at for request in simulator.requests("steady")]
    return [(later - earlier) * clock.speed for earlier, later in itertools.pairwise(times)]


def test_demand_and_lag_rise_when_builds_outgrow_the_budget(
    busy_simulator: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(
        busy_simulator.base_url, busy_simulator.build_ids, interval="10s", requests_per_second=1
    )
    with caplog.at_level(logging.WARNING, logger="exporter.poller"):
        exporter = RunningExporter(config).start()
        try:
            # 200 builds every 10s need 20 requests/s; the budget is 1.
            wait_until(
                lambda: exporter.value("primeintellect_exporter_poll_demand_ratio") == 20,
                message="demand ratio 20",
            )
            wait_until(
                lambda: (exporter.value("primeintellect_exporter_poll_lag_seconds") or 0) > 2,
                message="lag above 2s",
            )
        finally:
            exporter.stop()
    warnings = [r for r in caplog.records if r.getMessage().startswith("more polls due")]
    assert len(warnings) == 1
    assert warnings[0].__dict__["interval_that_can_be_kept_seconds"] == 200


def test_demand_below_one_and_no_lag_while_the_budget_suffices(
    busy_simulator: Simulator,
) -> None:
    config = make_config(busy_simulator.base_url, busy_simulator.build_ids[:5], interval="10s")
    exporter = RunningExporter(config).start()
    try:
        exporter.wait_until_all_polled()
        wait_until(
            lambda: exporter.value("primeintellect_exporter_poll_demand_ratio") == 0.005,
            message="demand ratio 0.005",
        )
        assert exporter.value("primeintellect_exporter_poll_lag_seconds") == 0
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


def test_two_shards_spend_half_of_the_key_budget_each(busy_simulator: Simulator) -> None:
    shards = [ShardSettings(index=index, count=2) for index in range(2)]

    def requests_of(shard: ShardSettings, since: float) -> list[float]:
        return [r.at for r in busy_simulator.requests() if r.at >= since and shard.owns(r.build_id)]

    exporters = [RunningExporter(shard_config(busy_simulator, i)).start() for i in range(2)]
    try:
        wait_until(lambda: len(busy_simulator.requests()) >= 10, message="polling under way")
        since = time.monotonic()
        wait_until(
            lambda: all(len(requests_of(shard, since)) >= 8 for shard in shards),
            message="8 requests from each shard",
        )
    finally:
        for exporter in exporters:
            exporter.stop()
    for shard in shards:
        times = requests_of(shard, since)
        rate = (len(times) - 1) / (times[-1] - times[0])
        # 4 requests/s for the key, so at most 2 for each of two replicas.
        assert 1.4 < rate <= 2.2


def test_a_new_build_is_polled_ahead_of_a_backlog(busy_simulator: Simulator) -> None:
    busy_simulator.add(forever_building("newcomer"))
    builds = busy_simulator.build_ids[:100]
    # 100 builds every second need 100 requests/s; at 20, each waits about 5s past its due.
    current = {"config": make_config(busy_simulator.base_url, builds, requests_per_second=20)}
    exporter = RunningExporter(
        current["config"], load_config=lambda: current["config"], enable_lifecycle=True
    ).start()
    try:
        exporter.wait_until_all_polled()
        wait_until(
            lambda: (exporter.value("primeintellect_exporter_poll_lag_seconds") or 0) > 2,
            message="a backlog",
        )
        current["config"] = make_config(
            busy_simulator.base_url, [*builds, "newcomer"], requests_per_second=20
        )
        added_at = time.monotonic()
        assert httpx.post(exporter.url + "/-/reload").status_code == 200
        wait_until(lambda: busy_simulator.requests("newcomer"), message="the newcomer polled")
        waited = busy_simulator.requests("newcomer")[0].at - added_at
    finally:
        exporter.stop()
    assert waited < 1
