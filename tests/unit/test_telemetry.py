"""The exporter's own health: when the API counts as up, on a clock the test drives, and how
the build listing goes."""

from __future__ import annotations

import itertools

import pytest

from exporter.exposition import ExpositionFormat, render
from exporter.listing import ListingCut
from exporter.metrics import build_list_families
from exporter.models import API_DOWN_OUTCOMES, Outcome
from exporter.telemetry import (
    API_DOWN_AFTER_SECONDS,
    BUILD_LIST_UNAVAILABLE,
    Component,
    Telemetry,
)
from tests.helpers.clock import DrivenClock
from tests.helpers.support import parse_samples


@pytest.fixture
def clock() -> DrivenClock:
    return DrivenClock()


def answer(telemetry: Telemetry, clock: DrivenClock, outcome: Outcome, at: float) -> None:
    """Advance the clock to ``at`` seconds after its start, then record one answer."""
    clock.advance(at - clock.elapsed())
    telemetry.observe_request(outcome, 0.01)


def test_api_up_is_absent_before_any_request(clock: DrivenClock) -> None:
    assert Telemetry(clock.monotonic).snapshot().api_up is None


def test_one_failing_build_among_good_ones_never_turns_api_up_off(clock: DrivenClock) -> None:
    telemetry = Telemetry(clock.monotonic)
    outcomes = itertools.cycle([Outcome.OK, Outcome.OK, Outcome.SERVER_ERROR])
    seen = set()
    for second in range(0, 900, 1):
        answer(telemetry, clock, next(outcomes), at=second)
        seen.add(telemetry.snapshot().api_up)
    assert seen == {True}


@pytest.mark.parametrize("outcome", sorted(API_DOWN_OUTCOMES))
def test_api_up_reads_zero_once_unusable_answers_have_come_for_a_minute(
    clock: DrivenClock, outcome: Outcome
) -> None:
    telemetry = Telemetry(clock.monotonic)
    answer(telemetry, clock, Outcome.OK, at=0)
    for second in range(1, int(API_DOWN_AFTER_SECONDS) + 1, 5):
        answer(telemetry, clock, outcome, at=second)
    # 56 s of failures: still up.
    assert telemetry.snapshot().api_up is True
    answer(telemetry, clock, outcome, at=1 + API_DOWN_AFTER_SECONDS)
    assert telemetry.snapshot().api_up is False


def test_api_up_is_one_again_at_the_next_usable_answer(clock: DrivenClock) -> None:
    telemetry = Telemetry(clock.monotonic)
    answer(telemetry, clock, Outcome.TIMEOUT, at=0)
    answer(telemetry, clock, Outcome.TIMEOUT, at=120)
    assert telemetry.snapshot().api_up is False
    answer(telemetry, clock, Outcome.NOT_FOUND, at=121)
    assert telemetry.snapshot().api_up is True
    # A new run of failures counts its minute afresh.
    answer(telemetry, clock, Outcome.TIMEOUT, at=122)
    answer(telemetry, clock, Outcome.TIMEOUT, at=181)
    assert telemetry.snapshot().api_up is True


def test_an_api_that_never_answered_usably_is_unknown_for_a_minute_then_down(
    clock: DrivenClock,
) -> None:
    telemetry = Telemetry(clock.monotonic)
    answer(telemetry, clock, Outcome.CONNECTION_ERROR, at=0)
    answer(telemetry, clock, Outcome.CONNECTION_ERROR, at=30)
    assert telemetry.snapshot().api_up is None
    answer(telemetry, clock, Outcome.CONNECTION_ERROR, at=60)
    assert telemetry.snapshot().api_up is False


@pytest.mark.parametrize(
    "outcome",
    [Outcome.FORBIDDEN, Outcome.RATE_LIMITED, Outcome.INVALID_RESPONSE, Outcome.CLIENT_ERROR],
)
def test_answers_about_one_build_or_the_budget_count_as_usable(
    clock: DrivenClock, outcome: Outcome
) -> None:
    telemetry = Telemetry(clock.monotonic)
    answer(telemetry, clock, Outcome.SERVER_ERROR, at=0)
    answer(telemetry, clock, outcome, at=59)
    answer(telemetry, clock, Outcome.SERVER_ERROR, at=100)
    assert telemetry.snapshot().api_up is True


def test_every_component_counts_internal_errors_from_zero() -> None:
    telemetry = Telemetry()
    assert telemetry.snapshot().internal_errors == dict.fromkeys(Component, 0)
    assert telemetry.record_internal_error(Component.SERVER, RuntimeError("boom"))
    assert not telemetry.record_internal_error(Component.SERVER, RuntimeError("again"))
    assert telemetry.snapshot().internal_errors[Component.SERVER] == 2


def test_the_build_listing_health_starts_empty_and_follows_each_pass() -> None:
    telemetry = Telemetry()
    before = telemetry.snapshot()
    assert (before.build_list_last_success, before.build_list_pages) == (None, 0)
    assert (before.build_list_last_error, before.builds_discovered) == (None, 0)
    telemetry.build_list_failed(BUILD_LIST_UNAVAILABLE)
    telemetry.set_builds_discovered(7)
    failed = telemetry.snapshot()
    assert (failed.build_list_last_error, failed.builds_discovered) == ("unavailable", 7)
    assert failed.build_list_last_success is None
    telemetry.build_list_succeeded(1_700_000_000.0, 3)
    done = telemetry.snapshot()
    assert (done.build_list_last_success, done.build_list_pages) == (1_700_000_000.0, 3)
    assert done.build_list_last_error is None
    telemetry.build_list_failed(ListingCut.TRUNCATED)
    truncated = telemetry.snapshot()
    # A truncated pass is no complete one: the last complete pass's end and pages stay.
    assert (truncated.build_list_last_success, truncated.build_list_pages) == (1_700_000_000.0, 3)
    assert truncated.build_list_last_error == "truncated"


def test_an_unchanged_build_listing_health_keeps_the_same_snapshot() -> None:
    telemetry = Telemetry()
    telemetry.build_list_failed(Outcome.SERVER_ERROR.value)
    telemetry.set_builds_discovered(2)
    snapshot = telemetry.snapshot()
    telemetry.build_list_failed(Outcome.SERVER_ERROR.value)
    telemetry.set_builds_discovered(2)
    assert telemetry.snapshot() is snapshot


def build_list_samples(telemetry: Telemetry) -> dict[str, float]:
    """The build listing families' samples, by name and label text."""
    text = render(build_list_families(telemetry.snapshot()), ExpositionFormat.TEXT).decode()
    return {
        name + "".join(f"{{{key}={value!r}}}" for key, value in sorted(labels)): sample
        for (name, labels), sample in parse_samples(text).items()
    }


def test_the_build_listing_families_show_the_last_pass() -> None:
    telemetry = Telemetry()
    telemetry.set_builds_discovered(4)
    # Before the first complete pass nothing is said about it, and nothing failed.
    assert build_list_samples(telemetry) == {"primeintellect_exporter_builds_discovered": 4.0}
    telemetry.build_list_succeeded(1_700_000_000.0, 3)
    telemetry.build_list_failed(ListingCut.TRUNCATED)
    assert build_list_samples(telemetry) == {
        "primeintellect_exporter_build_list_last_success_timestamp_seconds": 1_700_000_000.0,
        "primeintellect_exporter_build_list_pages": 3.0,
        "primeintellect_exporter_build_list_last_error{reason='truncated'}": 1.0,
        "primeintellect_exporter_builds_discovered": 4.0,
    }
