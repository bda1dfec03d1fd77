"""Polling behaviour: schedule, rate limits, back-off, isolation of failures, staleness."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

from exporter.api import Answer
from exporter.demo.simulator import BuildPlan, Fault, Simulator
from exporter.models import Build, Outcome, parse_build
from exporter.poller import MAX_BACKOFF, Poller, PollSettings, backoff_delay
from exporter.store import BuildRecord, BuildStore
from exporter.telemetry import API_DOWN_AFTER_SECONDS, Telemetry
from tests.conftest import StartExporter
from tests.helpers.clock import DrivenClock, requests_made
from tests.helpers.support import (
    CANARY_API_KEY,
    EPOCH,
    RunningExporter,
    forever_building,
    make_config,
    polls,
    wait_until,
)


@pytest.fixture
def clock() -> DrivenClock:
    """The exporter's and the simulator's time: it moves only when the test advances it."""
    return DrivenClock()


@pytest.fixture
def driven_simulator(clock: DrivenClock) -> Iterator[Simulator]:
    """A fake API that dates its answers and records its requests on the driven clock."""
    with Simulator(CANARY_API_KEY, clock=clock.wall, monotonic=clock.monotonic) as running:
        yield running


def lifecycle(build_id: str, start: float, *, seconds: float) -> BuildPlan:
    """A build created at wall time ``start`` that completes ``seconds`` later."""
    third = seconds / 3
    return BuildPlan(build_id, "app", "v1", start, third, third, third)


def record(running: RunningExporter, build_id: str) -> BuildRecord:
    return running.exporter.store.snapshot().records[build_id]


def handled_now(running: RunningExporter, build_id: str, clock: DrivenClock) -> bool:
    """Whether the answer to a poll of the build made at this driven moment is handled (its
    next poll is scheduled in the same step)."""
    return record(running, build_id).last_poll_time == clock.wall()


# -- pure scheduling rules ---------------------------------------------------------------------


def test_backoff_doubles_from_the_interval_up_to_a_ceiling() -> None:
    middle = 0.5  # jitter value that leaves the delay unchanged
    fifteen_minutes = 900
    assert backoff_delay(1, 30, middle, fifteen_minutes) == 30
    assert backoff_delay(2, 30, middle, fifteen_minutes) == 60
    assert backoff_delay(3, 30, middle, fifteen_minutes) == 120
    assert backoff_delay(50, 30, middle, fifteen_minutes) == MAX_BACKOFF
    assert backoff_delay(50, 3600, middle, fifteen_minutes) == 3600


def test_backoff_stays_well_inside_stale_after() -> None:
    middle = 0.5
    assert backoff_delay(50, 2, middle, stale_after=60) == 30
    assert backoff_delay(50, 2, middle, stale_after=1) == 2


def test_backoff_jitter_spreads_by_at_most_twenty_percent() -> None:
    assert backoff_delay(2, 10, 0.0, 900) == pytest.approx(16)
    assert backoff_delay(2, 10, 0.999999, 900) == pytest.approx(24, rel=1e-5)


# -- against the simulator ---------------------------------------------------------------------


def test_finished_build_is_not_polled_again(
    clock: DrivenClock, driven_simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator = driven_simulator
    simulator.add(lifecycle("finishing", clock.wall(), seconds=1.5))
    simulator.add(forever_building("clock"))
    done = BuildPlan("done", "app", "v0", EPOCH, 1, 1, 1)
    simulator.add(done)
    running = start_exporter(
        make_config(simulator.base_url, ["finishing", "clock", "done"]),
        clock=clock,
    )
    clock.run_until(
        running.exporter,
        lambda: record(running, "finishing").finished,
        step=0.25,
        limit=10,
        message="the build to finish",
    )
    finishing_polls = polls(simulator, "finishing")
    # Three more intervals of driven time: the unfinished build is polled three more times.
    clock_polls = polls(simulator, "clock")
    clock.run_until(
        running.exporter,
        lambda: polls(simulator, "clock") >= clock_polls + 3,
        step=0.25,
        limit=10,
        message="three more polls of the unfinished build",
    )
    assert polls(simulator, "finishing") == finishing_polls
    assert polls(simulator, "done") == 1
    assert running.value("primeintellect_exporter_builds", state="finished") == 2.0


def test_first_polls_start_at_once_spread_over_the_rate_limit(
    clock: DrivenClock, driven_simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator = driven_simulator
    build_ids = [f"spread-{index}" for index in range(5)]
    for build_id in build_ids:
        simulator.add(forever_building(build_id))
    started = clock.monotonic()
    start_exporter(
        make_config(simulator.base_url, build_ids, requests_per_second=4, interval="1m"),
        clock=clock,
    )
    # Four requests a second: after each poll the exporter waits a quarter of a second for the
    # next slot, and makes no request while the driven clock stands still.
    for sent in range(1, 5):
        clock.wait_for_sleep(0.25, message=f"the wait for a slot after poll {sent}")
        requests_made(simulator, sent)
        clock.advance(0.25)
    requests = requests_made(simulator, 5)
    assert sorted(request.build_id for request in requests) == build_ids
    # The first at once, the others one slot apart.
    assert [round(request.at - started, 6) for request in requests] == [0, 0.25, 0.5, 0.75, 1]


def test_rate_limit_with_retry_after_pauses_every_request_for_that_long(
    clock: DrivenClock, driven_simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator = driven_simulator
    build_ids = ["limited", "other-1", "other-2"]
    for build_id in build_ids:
        simulator.add(forever_building(build_id))
    running = start_exporter(
        make_config(simulator.base_url, build_ids, max_concurrency=1, requests_per_second=4),
        clock=clock,
    )
    # The first polls a quarter of a second apart; then the first build is due again at 1 s.
    for sent in (1, 2):
        clock.wait_for_sleep(0.25, message=f"the wait for a slot after poll {sent}")
        requests_made(simulator, sent)
        clock.advance(0.25)
    requests_made(simulator, 3)
    running.wait_until_all_polled()
    clock.wait_for_sleep(0.5, message="the wait until the first build is due again")
    simulator.set_fault("limited", Fault.rate_limited(retry_after="2", times=1))
    clock.advance(0.5)
    limited = requests_made(simulator, 4)[-1]
    assert (limited.build_id, limited.status) == ("limited", 429)
    pause_end = wait_until(
        lambda: running.value("primeintellect_exporter_rate_limited_until_timestamp_seconds"),
        message="the rate-limit gauge",
    )
    assert pause_end == pytest.approx(clock.wall() + 2, abs=0.001)
    assert (
        running.value(
            "primeintellect_image_build_last_poll_error", build_id="limited", reason="rate_limited"
        )
        == 1
    )
    # Every build waits out the pause, the two that were due during it too.
    clock.advance(1.0)
    clock.wait_for_sleep(1.0, message="the wait for the rest of the pause")
    clock.advance(0.75)
    clock.wait_for_sleep(0.25, message="the wait for the last quarter second of the pause")
    requests_made(simulator, 4)
    clock.advance(0.25)
    resumed = requests_made(simulator, 5)[-1]
    assert resumed.build_id == "other-1"
    assert round(resumed.at - limited.at, 6) == 2.0
    wait_until(
        lambda: (
            running.value("primeintellect_exporter_rate_limited_until_timestamp_seconds") == 0.0
        ),
        message="the pause to end",
    )
    requests = "primeintellect_exporter_api_requests_total"
    assert running.value(requests, endpoint="build_status", outcome="rate_limited") == 1


def test_one_build_failing_or_timing_out_leaves_the_others_fresh(
    clock: DrivenClock, driven_simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator = driven_simulator
    for build_id in ("broken", "slow", "healthy"):
        simulator.add(forever_building(build_id))
    simulator.set_fault("broken", Fault.server_error(503))
    # The client's timeout is real time: the slow build's answer takes six times as long.
    simulator.set_fault("slow", Fault.slow(delay=3))
    running = start_exporter(
        make_config(simulator.base_url, ["broken", "slow", "healthy"], timeout="500ms"),
        clock=clock,
    )
    clock.run_until(
        running.exporter,
        lambda: record(running, "healthy").last_poll_ok,
        step=0.25,
        limit=5,
        message="a good poll of the healthy build",
    )
    first_success = running.value(
        "primeintellect_image_build_last_poll_success_timestamp_seconds", build_id="healthy"
    )
    assert first_success is not None
    clock.run_until(
        running.exporter,
        lambda: polls(simulator, "healthy") >= 4,
        step=0.25,
        limit=10,
        message="4 requests for the healthy build",
    )
    wait_until(
        lambda: (
            running.value(
                "primeintellect_image_build_last_poll_success_timestamp_seconds", build_id="healthy"
            )
            != first_success
        ),
        message="a newer successful poll",
    )
    assert running.value("primeintellect_image_build_last_poll_success", build_id="healthy") == 1
    assert (
        running.value(
            "primeintellect_image_build_last_poll_error", build_id="broken", reason="server_error"
        )
        == 1
    )
    wait_until(
        lambda: running.value(
            "primeintellect_image_build_last_poll_error", build_id="slow", reason="timeout"
        ),
        message="the slow build to time out",
    )
    assert running.value("primeintellect_image_build_last_poll_success", build_id="broken") == 0
    assert running.value("primeintellect_exporter_builds", state="failing") == 2
    # The failing build backs off: fewer requests than the healthy one.
    assert polls(simulator, "broken") < polls(simulator, "healthy")


def test_unknown_build_reports_not_found_and_the_daemon_keeps_running(
    clock: DrivenClock, driven_simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator = driven_simulator
    simulator.add(forever_building("known"))
    running = start_exporter(
        make_config(simulator.base_url, ["known", "no-such-build"]),
        clock=clock,
    )
    clock.run_until(
        running.exporter,
        lambda: running.exporter.store.snapshot().all_polled,
        step=0.25,
        limit=5,
        message="every build polled once",
    )
    assert (
        running.value(
            "primeintellect_image_build_last_poll_error",
            build_id="no-such-build",
            reason="not_found",
        )
        == 1
    )
    assert (
        running.value("primeintellect_image_build_last_poll_success", build_id="no-such-build") == 0
    )
    assert not any(
        name == "primeintellect_image_build_info" and ("build_id", "no-such-build") in labels
        for name, labels in running.samples()
    )
    assert running.get("/-/healthy").status_code == 200
    assert running.get("/-/ready").status_code == 200
    known_polls = polls(simulator, "known")
    clock.run_until(
        running.exporter,
        lambda: polls(simulator, "known") > known_polls,
        step=0.25,
        limit=5,
        message="another poll of the known build",
    )
    assert running.value("primeintellect_image_build_last_poll_success", build_id="known") == 1


def test_values_of_a_build_without_a_good_poll_go_stale_and_are_dropped(
    clock: DrivenClock, driven_simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator = driven_simulator
    simulator.add(forever_building("fading"))
    running = start_exporter(
        make_config(simulator.base_url, ["fading"], stale_after="2s", interval="1s"),
        clock=clock,
    )
    running.wait_until_all_polled()
    assert (
        running.value(
            "primeintellect_image_build_info", build_id="fading", image_name="app", image_tag="v1"
        )
        == 1
    )
    simulator.set_fault("fading", Fault.server_error(500))
    waited = clock.run_until(
        running.exporter,
        lambda: record(running, "fading").build is None,
        step=0.25,
        limit=10,
        message="the stale values to be dropped",
    )
    # Kept until stale_after has passed since the last good poll, the first one.
    assert waited >= 2.0
    assert (
        running.value(
            "primeintellect_image_build_info", build_id="fading", image_name="app", image_tag="v1"
        )
        is None
    )
    assert running.value("primeintellect_image_build_last_poll_success", build_id="fading") == 0
    # The time of the last good poll stays, so "how stale" remains answerable.
    assert running.value(
        "primeintellect_image_build_last_poll_success_timestamp_seconds", build_id="fading"
    )


def test_rejected_api_key_turns_api_up_off_after_a_minute_of_rejections(
    clock: DrivenClock, driven_simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator = driven_simulator
    simulator.add(forever_building("secret"))
    running = start_exporter(
        make_config(simulator.base_url, ["secret"], api_key="wrong-key"),
        clock=clock,
    )
    running.wait_until_all_polled()
    assert (
        running.value(
            "primeintellect_image_build_last_poll_error", build_id="secret", reason="unauthorized"
        )
        == 1
    )
    assert running.value("primeintellect_exporter_api_up") is None
    unauthorized = {"endpoint": "build_status", "outcome": "unauthorized"}
    # The key is asked again after a pause of 30 s, then of 60 s. While paused the exporter
    # only wakes once a second: the test jumps ahead to the last second of each pause.
    clock.wait_for_sleep(1.0, message="the key's first pause")
    clock.advance(29.0)
    clock.wait_for_sleep(1.0, message="the last second of the key's first pause")
    requests_made(simulator, 1)
    clock.advance(1.0)
    wait_until(
        lambda: running.value("primeintellect_exporter_api_requests_total", **unauthorized) == 2,
        message="the second rejection",
    )
    assert clock.elapsed() == 30
    # Rejected for half a minute: unknown, not down.
    assert running.value("primeintellect_exporter_api_up") is None
    clock.wait_for_sleep(1.0, message="the key's second pause")
    clock.advance(29.0)
    clock.wait_for_sleep(1.0, message="the key's second pause, at 59 s")
    # Just before a minute of rejections: still unknown.
    assert running.value("primeintellect_exporter_api_up") is None
    clock.advance(30.0)
    clock.wait_for_sleep(1.0, message="the last second of the key's second pause")
    requests_made(simulator, 2)
    clock.advance(1.0)
    wait_until(
        lambda: running.value("primeintellect_exporter_api_requests_total", **unauthorized) == 3,
        message="the third rejection",
    )
    assert running.value("primeintellect_exporter_api_up") == 0
    assert clock.elapsed() >= API_DOWN_AFTER_SECONDS
    assert len(simulator.requests("secret")) == 3


def test_running_exporter_shows_a_build_moving_through_its_lifecycle(
    clock: DrivenClock, driven_simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator = driven_simulator
    # A second in each status, polled once a second, each poll half-way through a status.
    simulator.add(BuildPlan("moving", "app", "v1", clock.wall() - 0.5, 1, 1, 1))
    running: RunningExporter = start_exporter(
        make_config(simulator.base_url, ["moving"]), clock=clock
    )

    def current_status() -> str | None:
        for (name, labels), value in running.samples().items():
            if name == "primeintellect_image_build_status" and value == 1:
                return dict(labels)["status"]
        return None

    seen = []
    for second in range(4):
        if second:
            clock.advance(1.0)
        requests_made(simulator, second + 1)
        wait_until(lambda: handled_now(running, "moving", clock), message="the answer handled")
        seen.append(current_status())
    assert seen == ["PENDING", "UPLOADING", "BUILDING", "COMPLETED"]
    assert polls(simulator, "moving") == 4


# -- supervision -------------------------------------------------------------------------------


class _FlakyFetcher:
    """Raises for one build (a bug in a parser, say) and answers the other normally."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def fetch(self, build_id: str) -> Answer[Build]:
        self.calls[build_id] = self.calls.get(build_id, 0) + 1
        if build_id == "explodes":
            raise RuntimeError("unexpected bug")
        payload = forever_building(build_id).payload(time.time())
        return Answer(Outcome.OK, parse_build(json.dumps(payload).encode()))

    def credentials_generation(self) -> int:
        return 0


def test_an_exception_in_one_poll_never_stops_polling() -> None:
    fetcher = _FlakyFetcher()
    store = BuildStore()
    clock = DrivenClock()
    poller = Poller(
        fetcher,
        store,
        Telemetry(clock.monotonic),
        PollSettings(interval=1, stale_after=60, requests_per_second=100, max_concurrency=2),
        clock=clock,
        jitter=lambda: 0.0,
    )
    poller.set_builds(["explodes", "fine"])

    async def run_until_both_retried() -> None:
        task = asyncio.create_task(poller.run())
        while fetcher.calls.get("explodes", 0) < 2 or fetcher.calls.get("fine", 0) < 2:
            # The poller and its fetches run on this loop, without I/O: a hundred turns of it
            # let them do all they can at this moment.
            for _ in range(100):
                await asyncio.sleep(0)
            assert not task.done(), "the poller stopped"
            assert clock.elapsed() < 10, fetcher.calls
            clock.advance(0.25)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run_until_both_retried())
    assert store.snapshot().records["fine"].last_poll_ok


def test_a_rate_limit_at_start_up_does_not_hold_back_readiness(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    for build_id in ("first", "second", "third"):
        simulator.add(forever_building(build_id))
    simulator.set_fault("first", Fault.rate_limited(retry_after="300", times=1))
    running = start_exporter(
        make_config(simulator.base_url, ["first", "second", "third"], max_concurrency=1)
    )
    running.wait_until_all_polled()
    assert running.get("/-/ready").status_code == 200
    assert [request.build_id for request in simulator.requests()] == ["first"]
    for build_id in ("second", "third"):
        assert (
            running.value(
                "primeintellect_image_build_last_poll_error",
                build_id=build_id,
                reason="rate_limited",
            )
            == 1
        )
