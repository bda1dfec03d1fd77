"""Wiring: one configuration turned into a running client, poller, store and HTTP server."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client.core import Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from exporter import __version__
from exporter.api import BuildStatusClient
from exporter.config import Config
from exporter.metrics import ExpositionCache, ExpositionFormat, exporter_families
from exporter.poller import Poller, PollSettings
from exporter.server import Endpoints, MetricsServer
from exporter.store import BuildStore, Telemetry

log = logging.getLogger(__name__)

# The poller loop wakes at least every second; this much silence means it is stuck.
HEARTBEAT_TIMEOUT = 60.0
POLLER_RESTART_DELAY = 1.0


class Exporter:
    """The exporter for one configuration: build it, then ``serve`` or ``poll_once``."""

    def __init__(self, config: Config, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = BuildStore()
        self.telemetry = Telemetry()
        # A private registry: the process, platform and garbage-collector metrics of this process.
        self._runtime = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self._runtime)
        PlatformCollector(registry=self._runtime)
        GCCollector(registry=self._runtime)
        self.client = BuildStatusClient(
            config.api.base_url,
            config.api_key,
            timeout=config.api.timeout,
            max_connections=config.api.max_concurrency,
        )
        self.poller = Poller(
            self.client,
            self.store,
            self.telemetry,
            PollSettings(
                interval=config.polling.interval,
                stale_after=config.polling.stale_after,
                requests_per_second=config.api.requests_per_second,
                max_concurrency=config.api.max_concurrency,
            ),
            wall_clock=wall_clock,
        )
        self.poller.set_builds(config.build_ids)
        self.cache = ExpositionCache(self.store.snapshot, self._per_scrape_families)
        self._poller_task: asyncio.Task[None] | None = None

    def _per_scrape_families(self) -> Iterable[Metric]:
        yield from exporter_families(self.telemetry.snapshot())
        yield from self._runtime.collect()

    def unhealthy_reason(self) -> str | None:
        """Why the exporter is unhealthy, or None: the poller must be running and awake."""
        if self._poller_task is None or self._poller_task.done():
            return "Unhealthy: the poller is not running"
        silence = time.monotonic() - self.poller.heartbeat
        if silence > HEARTBEAT_TIMEOUT:
            return f"Unhealthy: the poller has not made progress for {silence:.0f}s"
        return None

    def unready_reason(self) -> str | None:
        """Why the exporter is not ready, or None: every build must have been polled once."""
        records = self.store.snapshot().records
        waiting = sum(not record.polled for record in records.values())
        if waiting:
            return f"Not ready: {waiting} of {len(records)} builds not polled yet"
        return None

    def internal_error(self, component: str, error: BaseException) -> None:
        """Count an unexpected exception; log its traceback once per class and component."""
        if self.telemetry.record_internal_error(component, error):
            log.error(
                "unexpected error; counted, and later ones of this kind logged at debug",
                exc_info=error,
                extra={"component": component},
            )
        else:
            log.debug("unexpected error", exc_info=error, extra={"component": component})

    def create_server(self, web_config_file: Path | None = None) -> MetricsServer:
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
                reload=None,
                internal_error=self.internal_error,
            ),
            web_config_file=web_config_file,
        )

    async def serve(
        self,
        stop: asyncio.Event,
        server: MetricsServer,
        on_listening: Callable[[str], None] | None = None,
    ) -> None:
        """Start the bound ``server`` and poll until ``stop`` is set."""
        server.start()
        log.info(
            "listening",
            extra={
                "url": server.url,
                "builds": len(self.config.build_ids),
                "version": __version__,
            },
        )
        if on_listening is not None:
            on_listening(server.url)
        self._poller_task = asyncio.create_task(self._supervise_poller(), name="poller")
        try:
            await stop.wait()
        finally:
            self._poller_task.cancel()
            await asyncio.gather(self._poller_task, return_exceptions=True)
            await self.client.aclose()
            await asyncio.to_thread(server.stop)
            log.info("stopped")

    async def poll_once(self) -> tuple[bool, bytes]:
        """Poll every build once; whether all succeeded, and the text exposition."""
        try:
            succeeded = await self.poller.poll_once()
        finally:
            await self.client.aclose()
        return succeeded, self.cache.body(ExpositionFormat.TEXT, gzip=False)

    async def _supervise_poller(self) -> None:
        while True:
            try:
                await self.poller.run()
            except Exception:
                # Never stop updating silently: log, and start the loop again.
                log.exception("poller crashed; restarting it")
                await asyncio.sleep(POLLER_RESTART_DELAY)
