"""The driven clock the timing tests stand on: nothing moves until the test advances it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from tests.helpers.clock import DrivenClock
from tests.helpers.support import wait_until


class LoopThread:
    """An event loop in a thread of its own, as the exporter under test runs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="clock-test-loop")

    def __enter__(self) -> LoopThread:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    with LoopThread() as running:
        yield running


def test_a_wait_ends_only_once_the_clock_is_advanced_past_its_deadline(
    loop_thread: LoopThread,
) -> None:
    clock = DrivenClock()

    async def sleep() -> float:
        await clock.wait(asyncio.Event(), 2.0)
        return clock.elapsed()

    done = asyncio.run_coroutine_threadsafe(sleep(), loop_thread.loop)
    clock.wait_for_sleep(2.0)
    clock.advance(1.5)
    assert clock.deadlines() == [0.5]
    assert not done.done()
    clock.advance(0.5)
    assert done.result(10) == 2.0
    assert clock.deadlines() == []


def test_a_wait_ends_when_its_event_is_set_without_time_passing(loop_thread: LoopThread) -> None:
    clock = DrivenClock()
    event = asyncio.Event()

    async def sleep() -> float:
        await clock.wait(event, 60.0)
        return clock.elapsed()

    done = asyncio.run_coroutine_threadsafe(sleep(), loop_thread.loop)
    clock.wait_for_sleep(60.0)
    loop_thread.loop.call_soon_threadsafe(event.set)
    assert done.result(10) == 0.0
    wait_until(lambda: clock.deadlines() == [], message="the wait to be forgotten")


def test_monotonic_and_wall_time_move_together_and_only_when_advanced() -> None:
    clock = DrivenClock(start=1_000_000.0)
    assert (clock.monotonic(), clock.wall()) == (1000.0, 1_000_000.0)
    clock.advance(30)
    assert (clock.elapsed(), clock.wall()) == (30.0, 1_000_030.0)
    with pytest.raises(AssertionError):
        clock.advance(-1)
