"""Blocking file work off the event loop, in threads that never hold up shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def in_daemon_thread(function: Callable[[], T], name: str) -> T:
    """Run ``function`` in a daemon thread of its own and return its result.

    Unlike ``asyncio.to_thread``, nothing waits for the thread at exit: when the awaiting
    task is cancelled (at shutdown), a read stuck on a hung file system or a FIFO no one
    writes is left behind, and the process still exits at once.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled while the thread ran
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = function()
        except BaseException as caught:  # noqa: BLE001 (handed to the awaiting task)
            error = caught
        # The loop may be closed by the time a hung read ends: then there is no one to tell.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future
