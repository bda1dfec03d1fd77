"""Blocking work in daemon threads: results, errors, and a cancelled wait that returns at once."""

from __future__ import annotations

import asyncio
import threading

import pytest

from exporter.blocking import in_daemon_thread


def test_the_result_of_the_function_is_returned() -> None:
    assert asyncio.run(in_daemon_thread(lambda: 6 * 7, "answer")) == 42


def test_an_error_in_the_function_is_raised_to_the_caller() -> None:
    def broken() -> None:
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        asyncio.run(in_daemon_thread(broken, "broken"))


def test_a_cancelled_wait_returns_while_the_thread_is_still_stuck() -> None:
    release = threading.Event()
    started = threading.Event()

    def stuck() -> str:
        started.set()
        release.wait(30)
        return "late"

    async def cancel_it() -> threading.Thread:
        task = asyncio.create_task(in_daemon_thread(stuck, "stuck-read"))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        (thread,) = [t for t in threading.enumerate() if t.name == "stuck-read"]
        return thread

    thread = asyncio.run(cancel_it())
    # The loop is gone and the thread lives on; it is a daemon, so exit does not wait for it.
    assert thread.is_alive()
    assert thread.daemon
    release.set()
    thread.join(10)
    assert not thread.is_alive()
