"""Every way the configuration changes, through one path.

SIGHUP, ``POST /-/reload`` and a changed build file each produce a new ``Config``; one lock
orders them, one function applies them, and a bad one keeps the running configuration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable

from exporter.blocking import in_daemon_thread
from exporter.config import Config, ConfigError, build_files_fingerprint, collect_build_ids
from exporter.telemetry import Component, Telemetry

log = logging.getLogger(__name__)

# How long build files must look the same before a change is read: a shell's `>` truncates
# a file before the new text is written, and a generating script may take a moment.
BUILD_FILES_SETTLE_SECONDS = 1.0


class Reloader:
    """Reads a new configuration when asked, or when the build files change, and applies it.

    ``apply`` takes a validated configuration and returns how many builds it added and
    removed; ``current`` is the configuration running now.
    """

    def __init__(
        self,
        current: Callable[[], Config],
        load_config: Callable[[], Config],
        apply: Callable[[Config], tuple[int, int]],
        telemetry: Telemetry,
        internal_error: Callable[[Component, BaseException], None],
    ) -> None:
        self._current = current
        self._load_config = load_config
        self._apply = apply
        self._telemetry = telemetry
        self._internal_error = internal_error
        self._lock = asyncio.Lock()

    async def reload(self) -> str | None:
        """Read the config file (and its build files) again; the error, or None."""
        return await self._reload("config", self._load_config)

    async def watch_build_files(self) -> None:
        """Reload the build files whenever they change; runs until cancelled.

        A change is read once the files have looked the same for BUILD_FILES_SETTLE_SECONDS,
        and a read during which they changed again is not used: a file truncated and
        rewritten in place never drops its builds for a moment.
        """
        loop = asyncio.get_running_loop()
        applied: tuple[object, ...] | None = None
        changing: tuple[object, ...] | None = None
        changed_at = 0.0
        while True:
            try:
                config = self._current()
                current = await in_daemon_thread(
                    functools.partial(_fingerprint, config), "build-files-check"
                )
                if applied is None:
                    applied = current
                elif current == applied:
                    changing = None
                elif current != changing:
                    changing, changed_at = current, loop.time()
                elif loop.time() - changed_at >= BUILD_FILES_SETTLE_SECONDS:
                    read = functools.partial(_read_build_files, config, current)
                    changing = None
                    await self._reload("build_files", read)
                    applied = current
            except _ChangedWhileReadError:
                pass  # read again once they settle
            except Exception as error:  # noqa: BLE001 (counted and logged by internal_error)
                self._internal_error(Component.RELOAD, error)
            await asyncio.sleep(self._current().polling.build_files_refresh_interval)

    async def _reload(self, source: str, load: Callable[[], Config]) -> str | None:
        async with self._lock:
            try:
                # A hung read must not hold up shutdown: the thread is left behind if need be.
                config = await in_daemon_thread(load, f"reload-{source}")
                added, removed = self._apply(config)
            except _ChangedWhileReadError:
                raise
            except ConfigError as error:
                self._telemetry.set_config_reload_successful(source, False)
                log.error(
                    "reload failed; the running configuration stays",
                    extra={"source": source, "error": str(error)},
                )
                return str(error)
            except Exception as error:  # noqa: BLE001 (counted and logged by internal_error)
                self._telemetry.set_config_reload_successful(source, False)
                self._internal_error(Component.RELOAD, error)
                return "unexpected error; see the exporter's log"
            self._telemetry.set_config_reload_successful(source, True)
            log.info(
                "configuration reloaded",
                extra={
                    "source": source,
                    "builds": len(config.owned_build_ids),
                    "added": added,
                    "removed": removed,
                },
            )
            return None


def _fingerprint(config: Config) -> tuple[object, ...]:
    return build_files_fingerprint(config.file.build_files, config.source.parent)


class _ChangedWhileReadError(Exception):
    """The build files changed while they were read: what was read may be half a file."""


def _read_build_files(config: Config, expected: tuple[object, ...]) -> Config:
    """``config`` with its build files read again, as they looked when ``expected`` was taken."""
    build_ids = collect_build_ids(config.file, config.source.parent)
    if _fingerprint(config) != expected:
        raise _ChangedWhileReadError
    return dataclasses.replace(config, build_ids=build_ids)
