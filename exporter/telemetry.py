"""The exporter's own health: request counters, pauses, capacity and errors."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import NamedTuple

from exporter.models import API_DOWN_OUTCOMES, Outcome

# What a reload reads: each has its own config_last_reload_successful series.
RELOAD_SOURCES = ("config", "build_files")
REQUEST_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The API's endpoints, the `endpoint` label of the request metrics: a build's status, the
# image listing (discovery.images) and the build listing (discovery.builds).
BUILD_STATUS_ENDPOINT = "build_status"
IMAGE_LIST_ENDPOINT = "image_list"
BUILD_LIST_ENDPOINT = "build_list"
# A reason of build_list_last_error beyond the outcomes and the cuts (exporter.listing): an API
# without the build listing (404 or 405).
BUILD_LIST_UNAVAILABLE = "unavailable"
# How long unusable answers (401, 5xx, transport failures) must keep coming, with no usable
# one among them, before api_up reads 0: one failing build among good ones never flips it.
API_DOWN_AFTER_SECONDS = 60.0


class Component(StrEnum):
    """The parts of the exporter whose unexpected exceptions are counted and logged rather than
    fatal: the ``component`` label of ``primeintellect_exporter_internal_errors_total``."""

    # One build's poll (costing only that poll), or the poll loop itself (started again).
    POLLER = "poller"
    # Rendering /metrics: that scrape is answered 500.
    RENDERER = "renderer"
    # Reloading the config file or the build files: the running configuration stays.
    RELOAD = "reload"
    # Writing the state file, periodically or at shutdown: the next write tries again.
    STATE = "state"
    # A discovery loop (discovery.images, discovery.builds): started again after a pause.
    DISCOVERY = "discovery"
    # The HTTP server: a request answered 500, or a check of the --web.config.file.
    SERVER = "server"


class StateStatus(StrEnum):
    """What the exporter does with ``state.path``: the ``status`` label of
    ``primeintellect_exporter_state_status``. Every status but ``in_use`` and ``disabled``
    keeps the state in memory only, after restoring what the file could give."""

    # Open and locked by this process, written each second with what changed.
    IN_USE = "in_use"
    # Not writable (a read-only volume or file): read at start, never written.
    READ_ONLY = "read_only"
    # Held by another process: read at start, and taken over once that process lets it go.
    LOCKED = "locked"
    # Neither writable nor usable for another reason (not a regular file, an I/O error, no
    # space, or unreadable and impossible to move aside).
    UNUSABLE = "unusable"
    # No state.path (or --once, which never opens it).
    DISABLED = "disabled"


class Exemplar(NamedTuple):
    """An observation a histogram's bucket shows beside its count in OpenMetrics: which build,
    its value, and when (wall clock) it was observed."""

    build_id: str
    value: float
    timestamp: float


@dataclass(frozen=True, slots=True)
class Histogram:
    """An immutable histogram: per-bucket counts (not cumulative), plus sum and count; with
    exemplars, each bucket's last observation (None where it has none yet). Exemplars are not
    part of its value: two histograms of the same counts are equal."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float = 0.0
    exemplars: tuple[Exemplar | None, ...] = field(default=(), compare=False)

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> Histogram:
        return cls(bounds, (0,) * (len(bounds) + 1))

    def observe(self, value: float, exemplar: Exemplar | None = None) -> Histogram:
        index = bisect.bisect_left(self.bounds, value)
        counts = list(self.counts)
        counts[index] += 1
        exemplars = self.exemplars
        if exemplar is not None:
            kept = list(exemplars or (None,) * len(counts))
            kept[index] = exemplar
            exemplars = tuple(kept)
        return Histogram(self.bounds, tuple(counts), self.total + value, exemplars)

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True)
class TelemetrySnapshot:
    """The exporter's own health, read once per scrape."""

    api_up: bool | None
    rate_limited_until: float
    # By source: "config" (the file, read when it changes, on SIGHUP or /-/reload) and
    # "build_files".
    config_reload_successful: Mapping[str, bool]
    internal_errors: Mapping[Component, int]
    poll_lag_seconds: float = 0.0
    poll_demand_ratio: float = 0.0
    state_restored_builds: int = 0
    # By endpoint (build_status always; image_list once it was asked).
    requests_by_endpoint: Mapping[str, Mapping[Outcome, int]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    request_durations_by_endpoint: Mapping[str, Histogram] = field(
        default_factory=lambda: MappingProxyType({})
    )
    # discovery.builds: when the last complete listing pass ended and how many pages it read
    # (None and 0 before the first), why the last pass failed or was cut short (None after a
    # complete one), and the tracked builds only discovery brought.
    build_list_last_success: float | None = None
    build_list_pages: int = 0
    build_list_last_error: str | None = None
    builds_discovered: int = 0
    # state.path: what is done with it; whether its content was lost at this start (unreadable
    # as a whole, so every build started afresh); the rows that could not be read; and when the
    # file last held everything the exporter knew (None while it is not in use).
    state_status: StateStatus = StateStatus.DISABLED
    state_lost_at_start: bool = False
    state_unreadable_rows: int = 0
    state_last_write_success: float | None = None

    @property
    def requests(self) -> dict[Outcome, int]:
        """Every endpoint's requests together, by outcome."""
        return {
            outcome: sum(counts[outcome] for counts in self.requests_by_endpoint.values())
            for outcome in Outcome
        }


class Telemetry:
    """Counters about the exporter itself, updated on every request.

    ``snapshot()`` returns the same object until something changes. ``clock`` is monotonic.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._requests_by_endpoint = {BUILD_STATUS_ENDPOINT: dict.fromkeys(Outcome, 0)}
        self._durations_by_endpoint = {
            BUILD_STATUS_ENDPOINT: Histogram.empty(REQUEST_DURATION_BUCKETS)
        }
        # None until the API has been usable, or unusable for API_DOWN_AFTER_SECONDS.
        self._api_up: bool | None = None
        # When the current run of unusable answers began; None after a usable answer.
        self._unusable_since: float | None = None
        self._rate_limited_until = 0.0
        self._config_reload_successful = dict.fromkeys(RELOAD_SOURCES, True)
        self._internal_errors = dict.fromkeys(Component, 0)
        self._error_classes_seen: set[tuple[Component, str]] = set()
        self._poll_lag_seconds = 0.0
        self._poll_demand_ratio = 0.0
        self._state_restored_builds = 0
        self._build_list_last_success: float | None = None
        self._build_list_pages = 0
        self._build_list_last_error: str | None = None
        self._builds_discovered = 0
        self._state_status = StateStatus.DISABLED
        self._state_lost_at_start = False
        self._state_unreadable_rows = 0
        self._state_last_write_success: float | None = None
        self._snapshot: TelemetrySnapshot | None = None

    def observe_request(
        self, outcome: Outcome, duration: float, endpoint: str = BUILD_STATUS_ENDPOINT
    ) -> None:
        with self._lock:
            by_outcome = self._requests_by_endpoint.setdefault(endpoint, dict.fromkeys(Outcome, 0))
            by_outcome[outcome] += 1
            histogram = self._durations_by_endpoint.get(endpoint) or Histogram.empty(
                REQUEST_DURATION_BUCKETS
            )
            self._durations_by_endpoint[endpoint] = histogram.observe(duration)
            self._snapshot = None
            if outcome not in API_DOWN_OUTCOMES:
                self._unusable_since = None
                self._api_up = True
                return
            now = self._clock()
            if self._unusable_since is None:
                self._unusable_since = now
            if now - self._unusable_since >= API_DOWN_AFTER_SECONDS:
                self._api_up = False

    def set_rate_limited_until(self, timestamp: float) -> None:
        with self._lock:
            self._rate_limited_until = timestamp
            self._snapshot = None

    def set_capacity(self, poll_lag_seconds: float, poll_demand_ratio: float) -> None:
        """How far behind the poll schedule is, and how much of the budget it needs."""
        with self._lock:
            if (poll_lag_seconds, poll_demand_ratio) != (
                self._poll_lag_seconds,
                self._poll_demand_ratio,
            ):
                self._poll_lag_seconds = poll_lag_seconds
                self._poll_demand_ratio = poll_demand_ratio
                self._snapshot = None

    def set_state_restored_builds(self, count: int) -> None:
        with self._lock:
            self._state_restored_builds = count
            self._snapshot = None

    def set_state_opened(self, status: StateStatus, lost: bool, unreadable_rows: int) -> None:
        """What came of opening state.path at start."""
        with self._lock:
            self._state_status = status
            self._state_lost_at_start = lost
            self._state_unreadable_rows = unreadable_rows
            self._snapshot = None

    def set_state_status(self, status: StateStatus) -> None:
        """The state file's use changed after start (a locked file taken over, or let go)."""
        with self._lock:
            if status != self._state_status:
                self._state_status = status
                self._snapshot = None

    def state_written(self, at: float) -> None:
        """The state file holds everything the exporter knew at wall-clock ``at``."""
        with self._lock:
            if at != self._state_last_write_success:
                self._state_last_write_success = at
                self._snapshot = None

    def build_list_succeeded(self, finished_at: float, pages: int) -> None:
        """A complete build listing pass ended at wall-clock ``finished_at``: its error goes."""
        with self._lock:
            self._build_list_last_success = finished_at
            self._build_list_pages = pages
            self._build_list_last_error = None
            self._snapshot = None

    def build_list_failed(self, reason: str) -> None:
        """The last build listing pass failed, or was cut short: an Outcome's value,
        BUILD_LIST_UNAVAILABLE or a ListingCut's value."""
        with self._lock:
            if reason != self._build_list_last_error:
                self._build_list_last_error = reason
                self._snapshot = None

    def set_builds_discovered(self, count: int) -> None:
        """Tracked builds that only discovery.builds brought (not configured)."""
        with self._lock:
            if count != self._builds_discovered:
                self._builds_discovered = count
                self._snapshot = None

    def set_config_reload_successful(self, source: str, successful: bool) -> None:
        with self._lock:
            self._config_reload_successful[source] = successful
            self._snapshot = None

    def record_internal_error(self, component: Component, error: BaseException) -> bool:
        """Count an unexpected exception; True the first time its class is seen here."""
        with self._lock:
            self._internal_errors[component] += 1
            error_class = (component, type(error).__qualname__)
            first = error_class not in self._error_classes_seen
            self._error_classes_seen.add(error_class)
            self._snapshot = None
            return first

    def snapshot(self) -> TelemetrySnapshot:
        with self._lock:
            if self._snapshot is None:
                self._snapshot = TelemetrySnapshot(
                    api_up=self._api_up,
                    rate_limited_until=self._rate_limited_until,
                    config_reload_successful=MappingProxyType(dict(self._config_reload_successful)),
                    internal_errors=MappingProxyType(dict(self._internal_errors)),
                    poll_lag_seconds=self._poll_lag_seconds,
                    poll_demand_ratio=self._poll_demand_ratio,
                    state_restored_builds=self._state_restored_builds,
                    requests_by_endpoint=MappingProxyType(
                        {
                            endpoint: MappingProxyType(dict(counts))
                            for endpoint, counts in self._requests_by_endpoint.items()
                        }
                    ),
                    request_durations_by_endpoint=MappingProxyType(
                        dict(self._durations_by_endpoint)
                    ),
                    build_list_last_success=self._build_list_last_success,
                    build_list_pages=self._build_list_pages,
                    build_list_last_error=self._build_list_last_error,
                    builds_discovered=self._builds_discovered,
                    state_status=self._state_status,
                    state_lost_at_start=self._state_lost_at_start,
                    state_unreadable_rows=self._state_unreadable_rows,
                    state_last_write_success=self._state_last_write_success,
                )
            return self._snapshot
