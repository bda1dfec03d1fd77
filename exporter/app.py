"""Wiring: one configuration turned into a running client, request budget, poller, store and
HTTP server."""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from exporter import __version__
from exporter.api import ApiClient
from exporter.blocking import in_daemon_thread
from exporter.budget import Clock, RequestBudget
from exporter.build_discovery import BuildDiscovery
from exporter.config.schema import Config
from exporter.discovery import ImageDiscovery
from exporter.exposition import ExpositionFormat
from exporter.exposition_cache import ExpositionCache
from exporter.metrics import build_list_families, exporter_families, inventory_families
from exporter.poller import ONCE_DEADLINE, Poller, PollSettings
from exporter.reload import Applier, Reloader, create_client
from exporter.state import (
    OpenedState,
    Restored,
    StateSync,
    StateUnavailableError,
    open_state,
    take_over,
)
from exporter.store import BuildStore, ImageInventory, Inventory
from exporter.telemetry import Component, StateStatus, Telemetry, TelemetrySnapshot
from exporter.web.connections import ServerLimits
from exporter.web.server import Endpoints, MetricsServer

log = logging.getLogger(__name__)

# The poller loop wakes at least every second; this much silence means it is stuck.
HEARTBEAT_TIMEOUT = 60.0
POLLER_RESTART_DELAY = 1.0


# How often what changed in the store is written to the state file.
STATE_SYNC_INTERVAL = 1.0
# The last write of the state file at shutdown gets this long; the chart gives the whole
# shutdown 30 s, and a state file on a hung volume must not take all of it.
STATE_CLOSE_DEADLINE = 3.0


def poll_settings(config: Config) -> PollSettings:
    """The poller's view of a configuration.

    The request budget belongs to the API key: each of ``shard.count`` replicas spends its
    share of it.
    """
    return PollSettings(
        interval=config.polling.interval,
        stale_after=config.polling.stale_after,
        requests_per_second=config.api.requests_per_second / config.shard.count,
        max_concurrency=config.api.max_concurrency,
        max_interval=config.polling.max_interval,
        finished_build_retention=config.metrics.finished_build_retention,
    )


class PerScrapeFamilies:
    """The families collected on every scrape: the exporter's own, the build listing's (with
    build discovery on), the image inventory's (with image discovery on) and the process's."""

    def __init__(
        self,
        telemetry: Telemetry,
        inventory: ImageInventory | None = None,
        discovery_enabled: Callable[[], bool] = lambda: False,
        build_discovery_enabled: Callable[[], bool] = lambda: False,
    ) -> None:
        self._telemetry = telemetry
        self._inventory = inventory or ImageInventory()
        self._discovery_enabled = discovery_enabled
        self._build_discovery_enabled = build_discovery_enabled
        self._inventory_from: Inventory | None = None
        self._inventory_families: list[Metric] = []
        # A private registry: the process, platform and garbage-collector metrics.
        self._runtime = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self._runtime)
        PlatformCollector(registry=self._runtime)
        GCCollector(registry=self._runtime)
        self._made_from: TelemetrySnapshot | None = None
        self._made_for_shard = (0, 1)
        self._made_with_listing = False
        self._own: list[Metric] = []

    def collect(self, shard_index: int = 0, shard_count: int = 1) -> list[Metric]:
        telemetry = self._telemetry.snapshot()
        shard = (shard_index, shard_count)
        # The same snapshot object means nothing changed: the families stay the same objects,
        # which the render cache recognises without comparing their samples.
        listing = self._build_discovery_enabled()
        if (
            telemetry is not self._made_from
            or shard != self._made_for_shard
            or listing != self._made_with_listing
        ):
            self._own = exporter_families(telemetry, shard_index, shard_count)
            if listing:
                self._own += build_list_families(telemetry)
            self._made_from, self._made_for_shard = telemetry, shard
            self._made_with_listing = listing
        if not self._discovery_enabled():
            return [*self._own, *self._runtime.collect()]
        inventory = self._inventory.snapshot()
        if inventory is not self._inventory_from:
            # Once per listing, not per scrape: the same objects until the next one.
            self._inventory_families = inventory_families(inventory)
            self._inventory_from = inventory
        return [*self._own, *self._inventory_families, *self._runtime.collect()]


class Exporter:
    """The exporter for one configuration: build it, then ``serve`` or ``poll_once``.

    ``load_config`` reads the configuration again on reload (SIGHUP, ``POST /-/reload``, a
    changed config file); without it a reload re-applies the current one. With ``use_state``
    and ``state.path`` the state file is opened and loaded here, before anything is served.
    """

    def __init__(
        self,
        config: Config,
        *,
        load_config: Callable[[], Config] | None = None,
        enable_lifecycle: bool = False,
        wall_clock: Callable[[], float] = time.time,
        clock: Clock | None = None,
        use_state: bool = True,
    ) -> None:
        self._load_config = load_config or (lambda: self.config)
        self._enable_lifecycle = enable_lifecycle
        self._wall_clock = wall_clock
        opened = OpenedState(None, Restored({}), StateStatus.DISABLED)
        self._state_path = config.state_path if use_state else None
        if self._state_path is not None:
            opened = open_state(self._state_path)
        self._state_sync = None if opened.file is None else StateSync(opened.file, opened.restored)
        # A file held by another process is taken over once it is free; the saver tries each
        # time it wakes, and shutdown must not race a take-over in flight.
        self._state_handoff = threading.Lock()
        self._state_closed = False
        restored = opened.restored
        self.store = BuildStore(restored.records, restored.tallies, restored.health)
        self.telemetry = Telemetry(clock.monotonic if clock is not None else time.monotonic)
        self.telemetry.set_state_opened(opened.status, opened.lost, restored.unreadable)
        if opened.file is not None:
            self.telemetry.state_written(wall_clock())
        self.inventory = ImageInventory()
        self._per_scrape = PerScrapeFamilies(
            self.telemetry,
            self.inventory,
            lambda: self.discovers_images,
            lambda: self.discovers_builds,
        )
        client = create_client(config)
        settings = poll_settings(config)
        # The key's one budget: build polls and the image listing's pages spend it alike.
        self.budget = RequestBudget(
            client, self.telemetry, settings.budget, wall_clock=wall_clock, clock=clock
        )
        self.poller = Poller(
            client,
            self.store,
            self.telemetry,
            settings,
            wall_clock=wall_clock,
            clock=clock,
            on_internal_error=self.internal_error,
            budget=self.budget,
        )
        if config.file.discovery.builds.enabled:
            self.poller.restore_discovered(
                build_id
                for build_id in self.store.restored_discovered()
                if config.shard.owns(build_id)
            )
        self.poller.set_builds(config.owned_build_ids)
        self.telemetry.set_state_restored_builds(
            sum(
                record.restored and record.build is not None
                for record in self.store.snapshot().records.values()
            )
        )
        self.cache = ExpositionCache(
            self.store.snapshot,
            self._per_scrape_families,
            max_artifacts_per_build=config.metrics.max_artifacts_per_build,
        )
        self._poller_task: asyncio.Task[None] | None = None
        self.discovery = ImageDiscovery(
            lambda: self.client,
            self.budget.listing("image listing"),
            self.inventory,
            self.telemetry,
            config.file.discovery.images,
            wall_clock=wall_clock,
            clock=clock,
        )
        self._discovery_task: asyncio.Task[None] | None = None
        self.build_discovery = BuildDiscovery(
            lambda: self.client,
            self.budget.listing("build listing"),
            self.poller,
            self.telemetry,
            config.file.discovery.builds,
            owns=lambda build_id: self.config.shard.owns(build_id),
            wall_clock=wall_clock,
            clock=clock,
        )
        self._build_discovery_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.applier = Applier(
            config,
            client,
            self.poller,
            self.discovery,
            self.build_discovery,
            self.cache,
            poll_settings=poll_settings,
            in_background=self._in_background,
            on_applied=self._on_config_applied,
        )
        self.reloader = Reloader(
            self._load_config, self.applier, self.telemetry, self.internal_error
        )

    @property
    def config(self) -> Config:
        """The configuration running now; a reload replaces it."""
        return self.applier.config

    @property
    def client(self) -> ApiClient:
        """The API client in use now; a reload of the api section replaces it."""
        return self.applier.client

    def _per_scrape_families(self) -> list[Metric]:
        shard = self.config.shard
        return self._per_scrape.collect(shard.index, shard.count)

    def unhealthy_reason(self) -> str | None:
        """Why the exporter is unhealthy, or None: the poller must be running and awake."""
        if self._poller_task is None or self._poller_task.done():
            return "Unhealthy: the poller is not running"
        silence = time.monotonic() - self.poller.heartbeat
        if silence > HEARTBEAT_TIMEOUT:
            return f"Unhealthy: the poller has not made progress for {silence:.0f}s"
        return None

    def unready_reason(self) -> str | None:
        """Why the exporter is not ready, or None.

        Config and state are loaded before anything is served, so a server that answers is
        ready; it never waits for polls (``primeintellect_exporter_builds{state="unpolled"}``).
        """
        return None

    def internal_error(self, component: Component, error: BaseException) -> None:
        """Count an unexpected exception; log its traceback once per class and component."""
        if self.telemetry.record_internal_error(component, error):
            log.error(
                "unexpected error; counted, and later ones of this kind logged at debug",
                exc_info=error,
                extra={"component": component},
            )
        else:
            log.debug("unexpected error", exc_info=error, extra={"component": component})

    def create_server(
        self, web_config_file: Path | None = None, limits: ServerLimits | None = None
    ) -> MetricsServer:
        """Bind the HTTP server to ``web.listen_address``; raises OSError if it cannot.

        ``web_config_file`` adds TLS and basic auth (exporter-toolkit format).
        """
        return MetricsServer(
            self.config.web.listen_address,
            Endpoints(
                metrics=self.cache,
                snapshot=self.store.snapshot,
                unhealthy_reason=self.unhealthy_reason,
                unready_reason=self.unready_reason,
                reload=self.reload if self._enable_lifecycle else None,
                internal_error=self.internal_error,
                request_budget=lambda: poll_settings(self.config).requests_per_second,
                telemetry=self.telemetry.snapshot,
                inventory=lambda: self.inventory.snapshot() if self.discovers_images else None,
                now=self._wall_clock,
            ),
            web_config_file=web_config_file,
            limits=limits,
        )

    async def serve(
        self,
        stop: asyncio.Event,
        server: MetricsServer,
        on_listening: Callable[[str], None] | None = None,
    ) -> None:
        """Start the bound ``server`` and poll until ``stop`` is set."""
        await server.start()
        settings = poll_settings(self.config)
        log.info(
            "listening",
            extra={
                "url": server.url,
                "api_base_url": self.config.api.base_url,
                "api_key_source": self.config.api_key.origin if self.config.api_key else "none",
                "builds": len(self.config.owned_build_ids),
                "restored_builds": self.telemetry.snapshot().state_restored_builds,
                "requests_per_second": round(settings.requests_per_second, 6),
                "version": __version__,
            },
        )
        if on_listening is not None:
            on_listening(server.url)
        self._poller_task = asyncio.create_task(self._supervise_poller(), name="poller")
        watcher = asyncio.create_task(self.reloader.watch_files(), name="config-files")
        saver = asyncio.create_task(self._save_state(), name="state")
        self._start_or_stop_discovery()
        try:
            await stop.wait()
        finally:
            discovery = [
                task for task in (self._discovery_task, self._build_discovery_task) if task
            ]
            for task in (self._poller_task, watcher, saver, *discovery, *self._background):
                task.cancel()
            await asyncio.gather(
                self._poller_task,
                watcher,
                saver,
                *discovery,
                *self._background,
                return_exceptions=True,
            )
            await self.applier.aclose()
            await server.stop()
            await self._close_state_within_deadline()
            log.info("stopped")

    async def poll_once(self) -> tuple[bool, bytes]:
        """One listing pass with build discovery on, then a poll of every build it did not
        answer; whether every build has a good answer, and the text exposition."""
        try:
            if self.discovers_builds:
                await self._list_builds_once()
            succeeded = await self.poller.poll_once()
        finally:
            await self.client.aclose()
        return succeeded, self.cache.body(ExpositionFormat.TEXT, gzip=False).join()

    async def _list_builds_once(self) -> None:
        # The pass comes first, so that no build it answers is polled; one that the budget
        # holds up past the deadline is given up.
        dispatcher = asyncio.create_task(self.poller.grant_listings(), name="listings")
        try:
            async with asyncio.timeout(ONCE_DEADLINE):
                await self.build_discovery.list_once()
        except TimeoutError:
            log.warning(
                "the build listing took too long for --once; polling the builds known so far",
                extra={"deadline_seconds": ONCE_DEADLINE},
            )
        finally:
            dispatcher.cancel()
            await asyncio.gather(dispatcher, return_exceptions=True)

    # -- reload ---------------------------------------------------------------------------------

    def request_reload(self) -> None:
        """Reload in the background (for SIGHUP); must be called on the event loop."""
        self._in_background(self.reloader.reload())

    async def reload(self) -> str | None:
        """Read the configuration again and apply it; on error keep the running one."""
        return await self.reloader.reload()

    def _on_config_applied(self) -> None:
        if self._poller_task is not None:
            self._start_or_stop_discovery()

    @property
    def discovers_images(self) -> bool:
        """Whether this replica lists the scope's images: with shards, the first one only, so
        each image is exposed once."""
        return self.config.file.discovery.images.enabled and self.config.shard.index == 0

    @property
    def discovers_builds(self) -> bool:
        """Whether this replica lists the key's builds (every replica does, for its share)."""
        return self.config.file.discovery.builds.enabled

    def _start_or_stop_discovery(self) -> None:
        self._discovery_task = _started_or_stopped(
            self._discovery_task,
            self.discovers_images,
            lambda: self._supervise_discovery(self.discovery.run),
            "discovery",
        )
        running = self._build_discovery_task is not None
        self._build_discovery_task = _started_or_stopped(
            self._build_discovery_task,
            self.discovers_builds,
            lambda: self._supervise_discovery(self.build_discovery.run),
            "build-discovery",
        )
        if running and self._build_discovery_task is None:
            self.poller.forget_discovered()

    # -- background work ------------------------------------------------------------------------

    def _in_background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _save_state(self) -> None:
        waiting = self.telemetry.snapshot().state_status == StateStatus.LOCKED
        if self._state_sync is None and not waiting:
            return
        while True:
            await asyncio.sleep(STATE_SYNC_INTERVAL)
            try:
                written = await self._write_state()
            except Exception as error:  # noqa: BLE001 (counted and logged by internal_error)
                self.internal_error(Component.STATE, error)
                continue
            if written:
                self.telemetry.state_written(self._wall_clock())

    async def _write_state(self) -> bool:
        """Write what changed, taking a file let go by another process first; whether the
        file now holds everything (False while it is not in use)."""
        sync = self._state_sync or await self._take_over_state()
        if sync is None:
            return False
        await in_daemon_thread(functools.partial(sync.sync, self.store.snapshot()), "state-sync")
        return True

    async def _take_over_state(self) -> StateSync | None:
        """Try to take the state file another process held; its writer, once it is in use."""
        path = self._state_path
        if path is None or self.telemetry.snapshot().state_status != StateStatus.LOCKED:
            return None
        try:
            taken = await in_daemon_thread(
                functools.partial(self._take_over_in_thread, path), "state-take-over"
            )
        except (StateUnavailableError, sqlite3.DatabaseError) as error:
            status = (
                error.status if isinstance(error, StateUnavailableError) else StateStatus.UNUSABLE
            )
            log.error(
                "state file unusable; the state stays in memory only",
                extra={"path": str(path), "status": status.value, "reason": str(error)},
            )
            self.telemetry.set_state_status(status)
            return None
        if taken is not None:
            self.telemetry.set_state_status(StateStatus.IN_USE)
            log.warning(
                "state file let go by the other process: in use, written from now on",
                extra={"path": str(path)},
            )
        return taken

    def _take_over_in_thread(self, path: Path) -> StateSync | None:
        taken = take_over(path)
        if taken is None:
            return None
        state, on_file = taken
        with self._state_handoff:
            if self._state_closed:
                state.close()
                return None
            self._state_sync = StateSync(state, on_file)
            return self._state_sync

    async def _close_state_within_deadline(self) -> None:
        try:
            async with asyncio.timeout(STATE_CLOSE_DEADLINE):
                await in_daemon_thread(self._close_state, "state-close")
        except TimeoutError:
            # SQLite's journal keeps the file whole; the next start resumes from the last write.
            log.warning(
                "the state file took too long to write at shutdown; stopping without it",
                extra={
                    "path": str(self.config.state_path or ""),
                    "deadline_seconds": STATE_CLOSE_DEADLINE,
                },
            )

    def _close_state(self) -> None:
        """Write the last changes and let the file go, for the next process to take."""
        with self._state_handoff:
            self._state_closed = True
        if self._state_sync is None:
            return
        try:
            self._state_sync.sync(self.store.snapshot())
        except Exception as error:  # noqa: BLE001 (counted and logged by internal_error)
            self.internal_error(Component.STATE, error)
        self._state_sync.close()
        self._state_sync = None

    async def _supervise_discovery(self, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        while True:
            try:
                await run()
            except Exception as error:  # noqa: BLE001 (counted and logged by internal_error)
                self.internal_error(Component.DISCOVERY, error)
                await asyncio.sleep(POLLER_RESTART_DELAY)

    async def _supervise_poller(self) -> None:
        while True:
            try:
                await self.poller.run()
            except Exception as error:  # noqa: BLE001 (counted and logged by internal_error)
                # Never stop updating silently: count, log, and start the loop again.
                self.internal_error(Component.POLLER, error)
                await asyncio.sleep(POLLER_RESTART_DELAY)


def _started_or_stopped(
    task: asyncio.Task[None] | None,
    enabled: bool,
    start: Callable[[], Coroutine[Any, Any, None]],
    name: str,
) -> asyncio.Task[None] | None:
    """A background loop running exactly while ``enabled``: the task to keep, or None."""
    running = task is not None and not task.done()
    if enabled and not running:
        return asyncio.create_task(start(), name=name)
    if not enabled and task is not None:
        task.cancel()
        return None
    return task
