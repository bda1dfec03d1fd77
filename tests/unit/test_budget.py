"""The key's request budget on a driven clock: its rate, its slots, its pauses and who gets a
slot first. Nothing here waits for real time."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest

from exporter.api import Answer
from exporter.budget import (
    FIRST_KEY_REJECTED_PAUSE,
    MAX_RATE_LIMIT_PAUSE,
    MIN_RATE_LIMIT_PAUSE,
    BudgetSettings,
    RequestBudget,
    TokenBucket,
    rate_limit_pause,
)
from exporter.models import Outcome
from exporter.telemetry import Telemetry
from tests.helpers.clock import DrivenClock

RATE_LIMITED = "API rate limit hit: pausing all requests"
PAUSE_OVER = "rate limit pause over, polling resumes"
KEY_REJECTED = "API key rejected: pausing all polls until the key changes or the pause ends"
KEY_ACCEPTED = "API key accepted again, polling resumes"
KEY_RETRIED = "retrying at once after the API key was rejected"


class Key:
    """Credentials whose generation the test moves, as a rotated key file would."""

    def __init__(self) -> None:
        self.generation = 0

    def credentials_generation(self) -> int:
        return self.generation


def settings(
    requests_per_second: float = 4.0, max_concurrency: int = 2, max_key_pause: float = 300.0
) -> BudgetSettings:
    return BudgetSettings(requests_per_second, max_concurrency, max_key_pause)


class Budget:
    """A budget on a driven clock, with the parts it reports to."""

    def __init__(self, budget_settings: BudgetSettings | None = None) -> None:
        self.clock = DrivenClock(start=1_700_000_000.0)
        self.key = Key()
        self.telemetry = Telemetry(self.clock.monotonic)
        self.budget = RequestBudget(
            self.key,
            self.telemetry,
            budget_settings or settings(),
            wall_clock=self.clock.wall,
            clock=self.clock,
        )

    def now(self) -> float:
        return self.clock.monotonic()

    def pause(self) -> float:
        """Seconds from now until requests may start again, slots and tokens aside."""
        return max(0.0, self.budget.paused_until - self.now())

    def answer(self, outcome: Outcome, retry_after: float | None = None) -> None:
        self.budget.answered(
            Answer(outcome, detail=outcome.value, retry_after=retry_after), {"build_id": "b"}
        )

    def pass_time(self, seconds: float) -> bool:
        """Advance the clock; whether the budget then lifted the key pause early."""
        self.clock.advance(seconds)
        return self.budget.refresh(self.now())


def messages(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.getMessage() == message]


# -- the token bucket and the 429 pause, alone ---------------------------------------------------


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


# -- rate and slots -------------------------------------------------------------------------------


def test_a_request_may_start_at_once_and_the_next_one_a_slot_later() -> None:
    running = Budget(settings(requests_per_second=4.0))
    budget = running.budget
    assert budget.delay(running.now()) == 0.0
    budget.start(running.now())
    budget.end()
    assert budget.delay(running.now()) == 0.25
    running.clock.advance(0.25)
    assert budget.delay(running.now()) == 0.0


def test_no_request_may_start_while_every_slot_is_taken() -> None:
    running = Budget(settings(requests_per_second=1000.0, max_concurrency=2))
    budget = running.budget
    budget.start(running.now())
    running.clock.advance(1)
    budget.start(running.now())
    running.clock.advance(1)
    assert budget.requests_in_flight == 2
    assert budget.delay(running.now()) == math.inf
    budget.end()
    assert budget.requests_in_flight == 1
    assert budget.delay(running.now()) == 0.0


def test_updated_settings_change_the_rate_and_the_slots_at_once() -> None:
    running = Budget(settings(requests_per_second=4.0, max_concurrency=2))
    budget = running.budget
    key = running.key
    assert not budget.update(settings(requests_per_second=1.0, max_concurrency=1), key)
    budget.start(running.now())
    assert budget.delay(running.now()) == math.inf
    budget.end()
    assert budget.delay(running.now()) == 1.0


def test_the_dispatcher_is_woken_when_a_request_queues_for_a_slot_or_ends() -> None:
    running = Budget()
    budget = running.budget

    async def queue_and_end() -> list[bool]:
        woken = []
        budget.wakeup.clear()
        waiter = asyncio.create_task(budget.slot())
        await asyncio.sleep(0)
        woken.append(budget.wakeup.is_set())
        budget.wakeup.clear()
        budget.grant_queued(running.now())
        await waiter
        woken.append(budget.wakeup.is_set())
        budget.end()
        woken.append(budget.wakeup.is_set())
        return woken

    # Granting is the dispatcher's own doing: it needs no wake-up.
    assert asyncio.run(queue_and_end()) == [True, False, True]


def test_queued_requests_are_granted_in_the_order_they_queued_one_token_each() -> None:
    running = Budget(settings(requests_per_second=4.0, max_concurrency=3))
    budget = running.budget
    granted: list[tuple[str, float]] = []

    async def request(name: str) -> None:
        await budget.slot()
        granted.append((name, running.clock.elapsed()))

    async def dispatch() -> list[float]:
        tasks = [asyncio.create_task(request(name)) for name in ("first", "second", "third")]
        await asyncio.sleep(0)
        waits = []
        while len(granted) < 3:
            wait = budget.queued_delay(running.now())
            waits.append(wait)
            if wait > 0:
                running.clock.advance(wait)
                continue
            budget.grant_queued(running.now())
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert budget.queued_delay(running.now()) == math.inf
        return waits

    assert asyncio.run(dispatch()) == [0.0, 0.25, 0.0, 0.25, 0.0]
    assert granted == [("first", 0.0), ("second", 0.25), ("third", 0.5)]
    assert budget.requests_in_flight == 3


def test_a_request_cancelled_while_queued_is_passed_over_and_one_granted_frees_its_slot() -> None:
    running = Budget(settings(requests_per_second=1000.0, max_concurrency=2))
    budget = running.budget

    async def cancel_both() -> None:
        queued = asyncio.create_task(budget.slot())
        granted = asyncio.create_task(budget.slot())
        await asyncio.sleep(0)
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        # The cancelled one is passed over: the grant goes to the one still waiting.
        assert budget.queued_delay(running.now()) == 0.0
        budget.grant_queued(running.now())
        assert budget.requests_in_flight == 1
        granted.cancel()
        await asyncio.gather(granted, return_exceptions=True)

    asyncio.run(cancel_both())
    assert budget.requests_in_flight == 0
    assert budget.queued_delay(running.now()) == math.inf


# -- the 429 pause --------------------------------------------------------------------------------


def test_a_429_pauses_every_request_for_its_retry_after_and_shows_until_when(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    running = Budget()
    running.answer(Outcome.RATE_LIMITED, retry_after=7.0)
    assert running.budget.delay(running.now()) == 7.0
    assert running.telemetry.snapshot().rate_limited_until == running.clock.wall() + 7.0
    assert not running.pass_time(6.5)
    assert running.pause() == 0.5
    assert not running.pass_time(0.5)
    assert running.budget.paused_until == 0.0
    assert running.telemetry.snapshot().rate_limited_until == 0.0
    (hit,) = messages(caplog, RATE_LIMITED)
    assert (getattr(hit, "build_id", None), getattr(hit, "pause_seconds", None)) == ("b", 7.0)
    assert len(messages(caplog, PAUSE_OVER)) == 1


def test_429s_without_retry_after_pause_longer_each_time_until_another_answer_comes() -> None:
    running = Budget()
    pauses = []
    for outcome in [Outcome.RATE_LIMITED] * 4 + [Outcome.OK, Outcome.RATE_LIMITED]:
        running.answer(outcome)
        pauses.append(running.pause())
        running.pass_time(running.pause())
    assert pauses == [10.0, 30.0, 60.0, 60.0, 0.0, 10.0]


def test_a_shorter_429_pause_never_cuts_a_longer_one_short(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    running = Budget()
    running.answer(Outcome.RATE_LIMITED, retry_after=60.0)
    running.clock.advance(1)
    running.answer(Outcome.RATE_LIMITED, retry_after=5.0)
    assert running.pause() == 59.0
    assert len(messages(caplog, RATE_LIMITED)) == 1


def test_a_listing_429_pauses_every_request_and_names_the_listing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    running = Budget()
    budget = running.budget
    slots = budget.listing("image listing")

    async def one_listing_request() -> None:
        waiter = asyncio.create_task(slots.listing_slot())
        await asyncio.sleep(0)
        budget.grant_queued(running.now())
        await waiter
        assert budget.requests_in_flight == 1
        slots.listing_done(Answer(Outcome.RATE_LIMITED, retry_after=3.0))

    asyncio.run(one_listing_request())
    assert budget.requests_in_flight == 0
    assert budget.delay(running.now()) == 3.0
    (hit,) = messages(caplog, RATE_LIMITED)
    assert getattr(hit, "request", None) == "image listing"


def test_a_listing_request_never_made_frees_its_slot_and_changes_nothing_else() -> None:
    running = Budget(settings(requests_per_second=1000.0))
    budget = running.budget
    budget.start(running.now())
    running.clock.advance(1)
    budget.listing("image listing").listing_done(None)
    assert budget.requests_in_flight == 0
    assert budget.delay(running.now()) == 0.0


# -- the rejected key -----------------------------------------------------------------------------


def test_a_rejected_key_pauses_every_request_doubling_up_to_the_ceiling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    running = Budget(settings(max_key_pause=100.0))
    pauses = []
    for _ in range(4):
        running.answer(Outcome.UNAUTHORIZED)
        pauses.append(running.pause())
        assert not running.pass_time(running.pause())
    assert pauses == [FIRST_KEY_REJECTED_PAUSE, 60.0, 100.0, 100.0]
    assert len(messages(caplog, KEY_REJECTED)) == 1
    assert not messages(caplog, KEY_RETRIED)


def test_a_403_the_caller_takes_for_the_key_pauses_like_a_401_and_one_it_does_not_never() -> None:
    running = Budget()
    running.budget.answered(Answer(Outcome.FORBIDDEN), {"build_id": "b"})
    assert running.pause() == 0.0
    running.budget.answered(Answer(Outcome.FORBIDDEN), {"build_id": "b"}, key_rejected=True)
    assert running.pause() == FIRST_KEY_REJECTED_PAUSE


def test_a_changed_key_lifts_the_pause_at_once_and_starts_afresh(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    running = Budget()
    running.answer(Outcome.UNAUTHORIZED)
    running.pass_time(FIRST_KEY_REJECTED_PAUSE)
    running.answer(Outcome.UNAUTHORIZED)
    assert running.pause() == 2 * FIRST_KEY_REJECTED_PAUSE
    assert not running.pass_time(1)
    running.key.generation += 1
    assert running.pass_time(0)
    assert running.budget.paused_until == 0.0
    # A fresh start: the new key's first rejection pauses for the first pause, and is logged.
    running.answer(Outcome.UNAUTHORIZED)
    assert running.pause() == FIRST_KEY_REJECTED_PAUSE
    assert len(messages(caplog, KEY_REJECTED)) == 2
    (retried,) = messages(caplog, KEY_RETRIED)
    assert getattr(retried, "reason", None) == "API key changed"


def test_new_credentials_lift_the_key_pause_and_the_same_ones_do_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    running = Budget()
    budget = running.budget
    running.answer(Outcome.UNAUTHORIZED)
    assert not budget.update(settings(), running.key)
    assert running.pause() == FIRST_KEY_REJECTED_PAUSE
    assert budget.update(settings(), Key())
    assert budget.paused_until == 0.0
    # Without a pause to lift, new credentials change nothing more.
    assert not budget.update(settings(), Key())
    (retried,) = messages(caplog, KEY_RETRIED)
    assert getattr(retried, "reason", None) == "API client replaced"


def test_new_credentials_leave_a_429_pause_in_place() -> None:
    running = Budget()
    running.answer(Outcome.RATE_LIMITED, retry_after=20.0)
    running.answer(Outcome.UNAUTHORIZED)
    assert running.budget.update(settings(), Key())
    assert running.pause() == 20.0


def test_an_answer_that_proves_the_key_good_is_logged_once_and_restarts_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    running = Budget()
    for outcome in (Outcome.UNAUTHORIZED, Outcome.UNAUTHORIZED):
        running.answer(outcome)
        running.pass_time(running.pause())
    for outcome in (Outcome.NOT_FOUND, Outcome.OK):
        running.answer(outcome)
    running.answer(Outcome.UNAUTHORIZED)
    assert running.pause() == FIRST_KEY_REJECTED_PAUSE
    assert len(messages(caplog, KEY_ACCEPTED)) == 1
    assert len(messages(caplog, KEY_REJECTED)) == 2


def test_an_answer_that_proves_nothing_about_the_key_keeps_the_count() -> None:
    running = Budget()
    running.answer(Outcome.UNAUTHORIZED)
    running.pass_time(running.pause())
    running.answer(Outcome.SERVER_ERROR)
    running.answer(Outcome.UNAUTHORIZED)
    assert running.pause() == 2 * FIRST_KEY_REJECTED_PAUSE
