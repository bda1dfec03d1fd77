"""Polling behaviour: schedule, rate limits, back-off, isolation of failures, staleness."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest

from exporter.api import FetchResult
from exporter.models import Outcome, parse_build
from exporter.poller import (
    MAX_BACKOFF,
    MAX_RATE_LIMIT_PAUSE,
    MIN_RATE_LIMIT_PAUSE,
    Poller,
    PollSettings,
    TokenBucket,
    backoff_delay,
    rate_limit_pause,
)
from exporter.simulator import BuildPlan, Fault, Simulator
from exporter.store import BuildStore
from exporter.telemetry import API_DOWN_AFTER_SECONDS, Telemetry
from tests.conftest import StartExporter
from tests.support import (
    EPOCH,
    FastClock,
    RunningExporter,
    forever_building,
    make_config,
    polls,
    wait_until,
)


def lifecycle(build_id: str, *, seconds: float) -> BuildPlan:
    """A build that starts now and completes after about ``seconds``."""
    third = seconds / 3
    return BuildPlan(build_id, "app", "v1", time.time(), third, third, third)


def wait_for_polls(simulator: Simulator, build_id: str, count: int, timeout: float = 15) -> None:
    wait_until(
        lambda: polls(simulator, build_id) >= count,
        timeout=timeout,
        message=f"{count} requests for {build_id}",
    )


# -- pure scheduling rules ---------------------------------------------------------------------


def test_token_bucket_spaces_requests_at_the_configured_rate() -> None:
    bucket = TokenBucket(rate=2.0, now=100.0)
    assert bucket.delay(100.0) == 0.0
    bucket.take(100.0)
    assert bucket.delay(100.0) == pytest.approx(0.5)
    assert bucket.delay(100.25) == pytest.approx(0.25)
    assert bucket.delay(100.5) == 0.0


def test_token_bucket_allows_fractional_rates() -> None:
    bucket = TokenBucket(rate=0.25, now=0.0)
    bucket.take(0.0)
    assert bucket.delay(0.0) == pytest.approx(4.0)


def test_token_bucket_does_not_save_up_a_burst_while_idle() -> None:
    bucket = TokenBucket(rate=10.0, now=0.0)
    bucket.take(1000.0)
    assert bucket.delay(1000.0) == pytest.approx(0.1)


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


@pytest.mark.parametrize(
    ("retry_after", "consecutive", "expected"),
    [
        (7.0, 1, 7.0),
        (0.0, 1, MIN_RATE_LIMIT_PAUSE),
        (1e9, 1, MAX_RATE_LIMIT_PAUSE),
        (None, 1, 10.0),
        (None, 2, 30.0),
        (None, 9, 60.0),
    ],
)
def test_rate_limit_pause_honours_retry_after_within_bounds(
    retry_after: float | None, consecutive: int, expected: float
) -> None:
    assert rate_limit_pause(retry_after, consecutive) == expected


# -- against the simulator ---------------------------------------------------------------------


def test_finished_build_is_not_polled_again(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator.add(lifecycle("finishing", seconds=1.5))
    simulator.add(forever_building("clock"))
    done = BuildPlan("done", "app", "v0", EPOCH, 1, 1, 1)
    simulator.add(done)
    running = start_exporter(make_config(simulator.base_url, ["finishing", "clock", "done"]))
    wait_until(
        lambda: running.exporter.store.snapshot().records["finishing"].finished,
        message="the build to finish",
    )
    finishing_polls = polls(simulator, "finishing")
    # Let the unfinished build be polled three more times: three intervals pass.
    wait_for_polls(simulator, "clock", polls(simulator, "clock") + 3)
    assert polls(simulator, "finishing") == finishing_polls
    assert polls(simulator, "done") == 1
    assert running.value("primeintellect_exporter_builds", state="finished") == 2.0


def test_first_polls_start_at_once_spread_over_the_rate_limit(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    build_ids = [f"spread-{index}" for index in range(5)]
    for build_id in build_ids:
        simulator.add(forever_building(build_id))
    started = time.monotonic()
    running = start_exporter(
        make_config(simulator.base_url, build_ids, requests_per_second=5, interval="1m")
    )
    running.wait_until_all_polled()
    arrivals = sorted(request.at for request in simulator.requests()[:5])
    assert arrivals[0] - started < 1.0
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert min(gaps) >= 0.18, gaps


def test_rate_limit_with_retry_after_pauses_every_request_for_that_long(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    build_ids = ["limited", "other-1", "other-2"]
    for build_id in build_ids:
        simulator.add(forever_building(build_id))
    running = start_exporter(make_config(simulator.base_url, build_ids, max_concurrency=1))
    running.wait_until_all_polled()
    simulator.set_fault("limited", Fault.rate_limited(retry_after="2", times=1))
    limited = wait_until(
        lambda: [r for r in simulator.requests("limited") if r.status == 429],
        message="a 429 answer",
    )[0]
    pause_end = wait_until(
        lambda: running.value("primeintellect_exporter_rate_limited_until_timestamp_seconds"),
        message="the rate-limit gauge",
    )
    assert pause_end == pytest.approx(time.time() + 2, abs=1.0)
    assert (
        running.value(
            "primeintellect_image_build_last_poll_error", build_id="limited", reason="rate_limited"
        )
        == 1
    )
    wait_until(
        lambda: [r for r in simulator.requests() if r.at > limited.at],
        timeout=10,
        message="polling to resume",
    )
    resumed = min(r.at for r in simulator.requests() if r.at > limited.at)
    assert resumed - limited.at >= 1.95
    wait_until(
        lambda: (
            running.value("primeintellect_exporter_rate_limited_until_timestamp_seconds") == 0.0
        ),
        message="the pause to end",
    )
    requests = "primeintellect_exporter_api_requests_total"
    assert running.value(requests, endpoint="build_status", outcome="rate_limited") == 1


def test_one_build_failing_or_timing_out_leaves_the_others_fresh(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    for build_id in ("broken", "slow", "healthy"):
        simulator.add(forever_building(build_id))
    simulator.set_fault("broken", Fault.server_error(503))
    simulator.set_fault("slow", Fault.slow(delay=3))
    running = start_exporter(
        make_config(simulator.base_url, ["broken", "slow", "healthy"], timeout="500ms")
    )
    running.wait_until_all_polled()
    first_success = running.value(
        "primeintellect_image_build_last_poll_success_timestamp_seconds", build_id="healthy"
    )
    wait_for_polls(simulator, "healthy", 4)
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
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator.add(forever_building("known"))
    running = start_exporter(make_config(simulator.base_url, ["known", "no-such-build"]))
    running.wait_until_all_polled()
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
    wait_for_polls(simulator, "known", known_polls + 1)
    assert running.value("primeintellect_image_build_last_poll_success", build_id="known") == 1


def test_values_of_a_build_without_a_good_poll_go_stale_and_are_dropped(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator.add(forever_building("fading"))
    running = start_exporter(
        make_config(simulator.base_url, ["fading"], stale_after="2s", interval="1s")
    )
    running.wait_until_all_polled()
    assert (
        running.value(
            "primeintellect_image_build_info", build_id="fading", image_name="app", image_tag="v1"
        )
        == 1
    )
    simulator.set_fault("fading", Fault.server_error(500))
    wait_until(
        lambda: (
            running.value(
                "primeintellect_image_build_info",
                build_id="fading",
                image_name="app",
                image_tag="v1",
            )
            is None
        ),
        message="the stale values to be dropped",
    )
    assert running.value("primeintellect_image_build_last_poll_success", build_id="fading") == 0
    # The time of the last good poll stays, so "how stale" remains answerable.
    assert running.value(
        "primeintellect_image_build_last_poll_success_timestamp_seconds", build_id="fading"
    )


def test_rejected_api_key_turns_api_up_off_after_a_minute_of_rejections(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator.add(forever_building("secret"))
    # Thirty times real time: the minute of rejections, and the pauses between them, pass in
    # about two seconds.
    clock = FastClock(speed=30)
    running = start_exporter(
        make_config(simulator.base_url, ["secret"], api_key="wrong-key"), clock=clock
    )
    running.wait_until_all_polled()
    assert (
        running.value(
            "primeintellect_image_build_last_poll_error", build_id="secret", reason="unauthorized"
        )
        == 1
    )
    # Read before the clock: a reading taken under a minute in says unknown, not down. (On a
    # machine slow enough to take that minute to get here, there is no such reading.)
    early_reading = running.value("primeintellect_exporter_api_up")
    if clock.elapsed() < API_DOWN_AFTER_SECONDS:
        assert early_reading is None
    wait_until(
        lambda: running.value("primeintellect_exporter_api_up") == 0,
        message="api_up to read 0 after a minute of rejections",
    )
    assert clock.elapsed() >= API_DOWN_AFTER_SECONDS
    assert len(simulator.requests("secret")) >= 2


def test_running_exporter_shows_a_build_moving_through_its_lifecycle(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator.add(lifecycle("moving", seconds=3))
    running: RunningExporter = start_exporter(make_config(simulator.base_url, ["moving"]))
    seen: set[str] = set()

    def current_status() -> str | None:
        for (name, labels), value in running.samples().items():
            if name == "primeintellect_image_build_status" and value == 1:
                seen.add(dict(labels)["status"])
                return dict(labels)["status"]
        return None

    wait_until(lambda: current_status() == "COMPLETED", message="the build to complete")
    assert len(seen) >= 2, seen


# -- supervision -------------------------------------------------------------------------------


class _FlakyFetcher:
    """Raises for one build (a bug in a parser, say) and answers the other normally."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def fetch(self, build_id: str) -> FetchResult:
        self.calls[build_id] = self.calls.get(build_id, 0) + 1
        if build_id == "explodes":
            raise RuntimeError("unexpected bug")
        payload = forever_building(build_id).payload(time.time())
        return FetchResult(Outcome.OK, build=parse_build(json.dumps(payload).encode()))

    def credentials_generation(self) -> int:
        return 0


def test_an_exception_in_one_poll_never_stops_polling() -> None:
    fetcher = _FlakyFetcher()
    store = BuildStore()
    poller = Poller(
        fetcher,
        store,
        Telemetry(),
        PollSettings(interval=1, stale_after=60, requests_per_second=100, max_concurrency=2),
        jitter=lambda: 0.0,
    )
    poller.set_builds(["explodes", "fine"])

    async def run_until_both_retried() -> None:
        task = asyncio.create_task(poller.run())
        deadline = time.monotonic() + 10
        while fetcher.calls.get("explodes", 0) < 2 or fetcher.calls.get("fine", 0) < 2:
            assert not task.done(), "the poller stopped"
            assert time.monotonic() < deadline, fetcher.calls
            await asyncio.sleep(0.02)
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
