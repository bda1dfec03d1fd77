"""A clock the test moves by hand: the exporter's schedule, budget, pauses and windows run on
it, and nothing happens on it unless the test advances it, however busy the machine is."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.support import wait_until

# Real seconds a test may wait for the exporter to reach a state that needs no time to pass
# on the driven clock (an answer parsed, the next wait begun): a bound for a machine that is
# very busy, never a measure of speed.
SETTLE_TIMEOUT = 30.0


@dataclass
class _Sleeper:
    deadline: float
    loop: asyncio.AbstractEventLoop
    woken: asyncio.Future[object]


class DrivenClock:
    """Monotonic and wall time that stand still until :meth:`advance`.

    ``monotonic`` starts at 1,000 s and ``wall`` at ``start`` (the real time by default);
    both move together. ``wait`` returns when its event is set or the test has advanced the clock
    past its deadline. Safe to advance from the test's thread while the exporter's loop runs
    in another.
    """

    def __init__(self, start: float | None = None) -> None:
        self._lock = threading.Lock()
        self._monotonic = 1000.0
        self._wall_offset = (time.time() if start is None else start) - self._monotonic
        self._sleepers: list[_Sleeper] = []

    def monotonic(self) -> float:
        with self._lock:
            return self._monotonic

    def wall(self) -> float:
        with self._lock:
            return self._monotonic + self._wall_offset

    def elapsed(self) -> float:
        """Seconds advanced since the clock was made."""
        return self.monotonic() - 1000.0

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        if event.is_set():
            return
        loop = asyncio.get_running_loop()
        with self._lock:
            if seconds <= 0:
                return
            sleeper = _Sleeper(self._monotonic + seconds, loop, loop.create_future())
            self._sleepers.append(sleeper)
        event_waiter: asyncio.Future[object] = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({event_waiter, sleeper.woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            event_waiter.cancel()
            sleeper.woken.cancel()
            with self._lock:
                if sleeper in self._sleepers:
                    self._sleepers.remove(sleeper)

    def advance(self, seconds: float) -> None:
        """Move both clocks on and wake every wait whose deadline has come."""
        assert seconds >= 0, "time never runs backwards"
        with self._lock:
            self._monotonic += seconds
            due = [s for s in self._sleepers if s.deadline <= self._monotonic]
        for sleeper in due:
            if not sleeper.loop.is_closed():
                sleeper.loop.call_soon_threadsafe(_wake, sleeper.woken)

    def deadlines(self) -> list[float]:
        """Seconds from now until each current wait ends, soonest first."""
        with self._lock:
            return sorted(round(s.deadline - self._monotonic, 6) for s in self._sleepers)

    def wait_for_sleep(self, seconds: float, *, message: str = "") -> None:
        """Block until some wait on this clock ends exactly ``seconds`` from now: the exporter
        has done all it can at this moment and waits for that much time to pass."""
        wait_until(
            lambda: round(seconds, 6) in self.deadlines(),
            timeout=SETTLE_TIMEOUT,
            message=message
            or f"a wait of {seconds}s on the driven clock (now: {self.deadlines()})",
        )

    def run_until(
        self, condition: Callable[[], object], *, step: float, limit: float, message: str
    ) -> float:
        """Advance by ``step`` until ``condition()`` holds, giving the exporter a moment of real
        time after each step; fail once ``limit`` driven seconds have passed without it.
        Returns the driven seconds it took. For conditions that hold from some moment on, and
        stay: the exporter may lag the driven clock on a busy machine."""
        started = self.elapsed()
        while not condition():
            if self.elapsed() - started >= limit:
                pytest.fail(f"{message}: not within {limit}s of driven time")
            self.advance(step)
            settled = time.monotonic() + 0.05
            while time.monotonic() < settled and not condition():
                time.sleep(0.005)
        return self.elapsed() - started


def _wake(woken: asyncio.Future[object]) -> None:
    if not woken.done():
        woken.set_result(None)
