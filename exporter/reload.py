"""Every way the configuration changes, through one path.

SIGHUP, ``POST /-/reload``, a changed config file and a changed build file each produce a
new ``Config``; one lock orders them, one ``Applier`` puts them into effect on the running
parts, and a bad one keeps the running configuration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from exporter.api import ApiClient
from exporter.blocking import in_daemon_thread
from exporter.build_discovery import BuildDiscovery
from exporter.config.loading import build_files_fingerprint, collect_build_ids, file_identity
from exporter.config.schema import Config
from exporter.config.wording import ConfigError
from exporter.discovery import ImageDiscovery
from exporter.exposition_cache import ExpositionCache
from exporter.poller import Poller, PollSettings
from exporter.telemetry import Component, Telemetry

log = logging.getLogger(__name__)

# How long the config and build files must look the same before a change is read: a shell's
# `>` truncates a file before the new text is written, and a generating script may take a
# moment.
FILES_SETTLE_SECONDS = 1.0


def create_client(config: Config) -> ApiClient:
    """An API client for a configuration."""
    return ApiClient(
        config.api.base_url,
        config.api_key,
        timeout=config.api.timeout,
        max_connections=config.api.max_concurrency,
        max_response_bytes=config.api.max_response_size,
    )


class Applier:
    """Puts a validated configuration into effect on the running parts: the API client, the
    poller, image and build discovery, the exposition cache and the builds polled.

    ``config`` and ``client`` are those in use now. ``poll_settings`` is the poller's view of
    a configuration; ``in_background`` runs a coroutine as a task the exporter cancels at
    shutdown; ``on_applied`` is called once a new configuration is in place.
    """

    def __init__(
        self,
        config: Config,
        client: ApiClient,
        poller: Poller,
        discovery: ImageDiscovery,
        build_discovery: BuildDiscovery,
        cache: ExpositionCache,
        *,
        poll_settings: Callable[[Config], PollSettings],
        in_background: Callable[[Coroutine[Any, Any, Any]], None],
        on_applied: Callable[[], None],
    ) -> None:
        self.config = config
        self.client = client
        self._poller = poller
        self._discovery = discovery
        self._build_discovery = build_discovery
        self._cache = cache
        self._poll_settings = poll_settings
        self._in_background = in_background
        self._on_applied = on_applied
        self._retired_clients: list[ApiClient] = []

    def apply(self, config: Config) -> tuple[int, int]:
        """Run on ``config`` from now on; how many builds it added and removed.

        Must be called on the event loop.
        """
        old = self.config
        api_key_unchanged = config.api_key is not None and config.api_key.same_source(old.api_key)
        if config.api != old.api or not api_key_unchanged:
            old_client, self.client = self.client, create_client(config)
            # Requests in flight finish on the old client before it closes.
            self._retired_clients.append(old_client)
            self._in_background(self._close_later(old_client, old.api.timeout + 1))
        self._poller.update(self._poll_settings(config), self.client)
        self._discovery.update(config.file.discovery.images)
        self._build_discovery.update(config.file.discovery.builds)
        self._cache.set_max_artifacts_per_build(config.metrics.max_artifacts_per_build)
        added, removed = self._poller.set_builds(config.owned_build_ids)
        if config.web != old.web:
            log.warning(
                "web.listen_address changed: it applies after a restart",
                extra={"listen_address": old.web.listen_address},
            )
        if config.state_path != old.state_path:
            log.warning(
                "state.path changed: it applies after a restart",
                extra={"path": str(old.state_path or "")},
            )
        self.config = config
        self._on_applied()
        return len(added), len(removed)

    async def aclose(self) -> None:
        """Close the client in use and those a reload retired whose requests may still run."""
        for client in (self.client, *self._retired_clients):
            await client.aclose()

    async def _close_later(self, client: ApiClient, delay: float) -> None:
        await asyncio.sleep(delay)
        self._retired_clients.remove(client)
        await client.aclose()


class Reloader:
    """Reads a new configuration when asked, or when the config file or the build files
    change, and has the ``applier`` put it into effect.

    ``load_config`` makes the configuration again, such as a ``ConfigLoader``.
    """

    def __init__(
        self,
        load_config: Callable[[], Config],
        applier: Applier,
        telemetry: Telemetry,
        internal_error: Callable[[Component, BaseException], None],
    ) -> None:
        self._load_config = load_config
        self._applier = applier
        self._telemetry = telemetry
        self._internal_error = internal_error
        self._lock = asyncio.Lock()
        # The files as last read, whatever came of it: a change is read once, so a bad file
        # is reported once, not at every check.
        self._read = _look(applier.config)

    async def reload(self) -> str | None:
        """Read the config file (and its build files) again; the error, or None."""
        async with self._lock:
            return await self._reload_config()

    async def watch_files(self) -> None:
        """Reload the config file or the build files whenever they change; runs until
        cancelled.

        Files are compared by inode, modification time and size, following symlinks, so a
        file replaced by a rename, or a Kubernetes volume whose ``..data`` link moves to a
        new directory, counts as changed. A change is read once the files have looked the
        same for FILES_SETTLE_SECONDS, and a build file read during which they changed again
        is not used: a file truncated and rewritten in place never drops its builds for a
        moment. A changed config file is read whole (source ``config``); changed build files
        alone, with the running config (source ``build_files``).
        """
        loop = asyncio.get_running_loop()
        changing: _Files | None = None
        changed_at = 0.0
        while True:
            try:
                config = self._applier.config
                current = await in_daemon_thread(
                    functools.partial(_look, config), "config-files-check"
                )
                if current == self._read:
                    changing = None
                elif current != changing:
                    changing, changed_at = current, loop.time()
                elif loop.time() - changed_at >= FILES_SETTLE_SECONDS:
                    changing = None
                    async with self._lock:
                        await self._read_changed(current)
            except _ChangedWhileReadError:
                pass  # read again once they settle
            except Exception as error:  # noqa: BLE001 (counted and logged by internal_error)
                self._internal_error(Component.RELOAD, error)
            await asyncio.sleep(self._applier.config.polling.build_files_refresh_interval)

    async def _read_changed(self, current: _Files) -> None:
        if current.config_file != self._read.config_file:
            await self._reload_config()
        elif current.build_files != self._read.build_files:
            config = self._applier.config
            read = functools.partial(_read_build_files, config, current.build_files)
            await self._reload("build_files", read)
            self._read = dataclasses.replace(self._read, build_files=current.build_files)

    async def _reload_config(self) -> str | None:
        # Taken before the read, so that a change made during it is seen at the next check.
        # The build files are compared with the old config's globs: if the new one names
        # others, they look changed and are read once more, which changes nothing.
        before = await in_daemon_thread(
            functools.partial(_look, self._applier.config), "config-files-check"
        )
        error = await self._reload("config", self._load_config)
        # A bad config file leaves the build files to be read with the running config.
        self._read = (
            before
            if error is None
            else dataclasses.replace(self._read, config_file=before.config_file)
        )
        return error

    async def _reload(self, source: str, load: Callable[[], Config]) -> str | None:
        try:
            # A hung read must not hold up shutdown: the thread is left behind if need be.
            config = await in_daemon_thread(load, f"reload-{source}")
            added, removed = self._applier.apply(config)
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


@dataclasses.dataclass(frozen=True)
class _Files:
    """What the config file and the build files look like at one moment."""

    config_file: object
    build_files: tuple[object, ...]


def _look(config: Config) -> _Files:
    return _Files(file_identity(config.source), _fingerprint(config))


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
