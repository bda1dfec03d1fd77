"""A clock the test moves by hand: the exporter's schedule, budget, pauses and windows run on
it, and nothing happens on it unless the test advances it, however busy the machine is."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from exporter.app import Exporter
from exporter.demo.simulator import RecordedRequest, Simulator

# Real seconds a test may wait for the exporter to reach a state that needs no time to pass
# on the driven clock (an answer parsed, the next wait begun): a bound for a machine that is
# very busy, never a measure of speed.
SETTLE_TIMEOUT = 30.0
# Shorter waits end at once: they are rounding errors of a sum of floats (a token bucket's
# delay at the moment it refills), not time the exporter means to wait.
MIN_WAIT = 1e-9


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
            if seconds < MIN_WAIT:
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
            target = self._monotonic + seconds
            # Land exactly on a deadline that ``deadlines()`` rounded: advancing by what it
            # reports must end that wait, not stop a rounding error short of it.
            near = [s.deadline for s in self._sleepers if target < s.deadline <= target + 1e-6]
            self._monotonic = max([target, *near])
            due = [s for s in self._sleepers if s.deadline <= self._monotonic]
        for sleeper in due:
            if not sleeper.loop.is_closed():
                sleeper.loop.call_soon_threadsafe(_wake, sleeper.woken)

    def deadlines(self) -> list[float]:
        """Seconds from now until each current wait ends, soonest first."""
        with self._lock:
            return sorted(round(s.deadline - self._monotonic, 6) for s in self._sleepers)

    def wait_for_sleep(self, *seconds: float, only: bool = False, message: str = "") -> None:
        """Block until waits on this clock end exactly ``seconds`` from now (with ``only``,
        no other wait): the exporter has done all it can at this moment and waits for that
        much time to pass. Fails after SETTLE_TIMEOUT real seconds, naming the waits found."""
        wanted = sorted(round(wait, 6) for wait in seconds)

        def found() -> bool:
            waits = self.deadlines()
            return waits == wanted if only else all(wait in waits for wait in wanted)

        _block_until(
            found,
            lambda: (
                f"{message or 'the exporter'}: {wanted}s expected, "
                f"the exporter waits {self.deadlines()}"
            ),
        )

    def settle(self, exporter: Exporter) -> None:
        """Block until ``exporter`` has done all it can at this driven moment: its poller waits
        on this clock for a time still to come, and no request is under way (each one it made
        has been answered and recorded)."""
        _block_until(
            lambda: self._settled(exporter),
            lambda: (
                f"the exporter did not settle: it waits {self.deadlines()}, "
                f"{exporter.budget.requests_in_flight} requests under way"
            ),
        )

    def _settled(self, exporter: Exporter) -> bool:
        # A wait the clock has just ended reads 0 until its loop has woken from it.
        waits = self.deadlines()
        return bool(waits) and waits[0] > 0 and exporter.budget.requests_in_flight == 0

    def wake_next(self, exporter: Exporter, step: float | None = None) -> None:
        """Advance by ``step``, or else to the end of the exporter's current wait, once it has
        settled; then let it settle again."""
        self.settle(exporter)
        self.advance(self.deadlines()[0] if step is None else step)
        self.settle(exporter)

    def run_until(
        self,
        exporter: Exporter,
        condition: Callable[[], object],
        *,
        limit: float,
        message: str,
        step: float | None = None,
    ) -> float:
        """Advance until ``condition()`` holds, by ``step`` or else to the end of the
        exporter's next wait, letting the exporter settle after each; fail once ``limit``
        driven seconds have passed without it. Returns the driven seconds it took."""
        started = self.elapsed()
        self.settle(exporter)
        while not condition():
            if self.elapsed() - started >= limit:
                pytest.fail(f"{message}: not within {limit}s of driven time")
            self.wake_next(exporter, step)
        return self.elapsed() - started


def _block_until(condition: Callable[[], bool], failure: Callable[[], str]) -> None:
    """Poll ``condition`` until it holds; fail with ``failure()`` after SETTLE_TIMEOUT real
    seconds (a bound for a very busy machine, never a measure of speed)."""
    give_up = time.monotonic() + SETTLE_TIMEOUT
    while not condition():
        if time.monotonic() > give_up:
            pytest.fail(failure())
        time.sleep(0.001)


def _wake(woken: asyncio.Future[object]) -> None:
    if not woken.done():
        woken.set_result(None)


def requests_made(
    simulator: Simulator, count: int, owned: Callable[[str], bool] = lambda _: True
) -> list[RecordedRequest]:
    """The simulator's requests (for the builds ``owned``) once ``count`` have arrived, while
    the driven clock stands still: the exporter must have made no more by now."""

    def made() -> list[RecordedRequest]:
        return [request for request in simulator.requests() if owned(request.build_id)]

    _block_until(lambda: len(made()) >= count, lambda: f"{count} requests expected: {made()}")
    requests = made()
    assert len(requests) == count, [(request.build_id, request.at) for request in requests]
    return requests
