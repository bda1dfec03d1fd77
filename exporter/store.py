"""What the exporter knows: each build's latest answer and poll health, and its own counters.

The poller writes from the event loop; HTTP handler threads read immutable snapshots.
"""

from __future__ import annotations

import bisect
import enum
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from exporter.api import API_DOWN_OUTCOMES, Outcome
from exporter.models import Build

FINISHED_DURATION_BUCKETS = (60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
REQUEST_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Parts of the exporter whose unexpected exceptions are counted rather than fatal.
INTERNAL_ERROR_COMPONENTS = ("poller", "renderer", "reload")


class BuildState(enum.StrEnum):
    """The ``state`` label of ``primeintellect_exporter_builds``."""

    ACTIVE = "active"
    FINISHED = "finished"
    FAILING = "failing"


@dataclass(frozen=True, slots=True)
class BuildRecord:
    """One tracked build: the latest good answer and how the last poll went."""

    build_id: str
    build: Build | None = None
    finished: bool = False
    polled: bool = False
    last_poll_ok: bool = False
    last_error: Outcome | None = None
    last_success_time: float | None = None
    seen_unfinished: bool = False

    @property
    def state(self) -> BuildState:
        if self.finished:
            return BuildState.FINISHED
        if self.polled and not self.last_poll_ok:
            return BuildState.FAILING
        return BuildState.ACTIVE


@dataclass(frozen=True, slots=True)
class Histogram:
    """An immutable histogram: per-bucket counts (not cumulative), plus sum and count."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float = 0.0

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> Histogram:
        return cls(bounds, (0,) * (len(bounds) + 1))

    def observe(self, value: float) -> Histogram:
        index = bisect.bisect_left(self.bounds, value)
        counts = list(self.counts)
        counts[index] += 1
        return Histogram(self.bounds, tuple(counts), self.total + value)

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True, slots=True)
class FinishedBuilds:
    """Builds seen to finish, per ``(image_name, status)``."""

    count: int = 0
    durations: Histogram = field(default_factory=lambda: Histogram.empty(FINISHED_DURATION_BUCKETS))


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of every tracked build, ordered by build ID."""

    version: int
    records: Mapping[str, BuildRecord]
    finished: Mapping[tuple[str, str], FinishedBuilds]

    @property
    def all_polled(self) -> bool:
        return all(record.polled for record in self.records.values())


@dataclass(frozen=True, slots=True)
class Transition:
    """A record before and after an update, for logging what changed."""

    before: BuildRecord
    after: BuildRecord


class BuildStore:
    """Latest state of each tracked build; snapshots are built lazily, once per change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, BuildRecord] = {}
        self._finished: dict[tuple[str, str], FinishedBuilds] = {}
        self._version = 0
        self._snapshot = Snapshot(0, MappingProxyType({}), MappingProxyType({}))

    def track(self, build_ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Track exactly these builds, keeping what is known of retained ones.

        Returns the added and the removed build IDs.
        """
        wanted = dict.fromkeys(build_ids)
        with self._lock:
            removed = [build_id for build_id in self._records if build_id not in wanted]
            added = [build_id for build_id in wanted if build_id not in self._records]
            for build_id in removed:
                del self._records[build_id]
            if added:
                # Kept in build ID order, so a snapshot is a copy and never a sort.
                records = {**self._records, **{b: BuildRecord(b) for b in added}}
                self._records = dict(sorted(records.items()))
            if added or removed:
                self._version += 1
        return added, removed

    def record_success(self, build_id: str, build: Build, now: float) -> Transition | None:
        """Store a good answer; counts the build as finished if this process saw it unfinished."""
        with self._lock:
            before = self._records.get(build_id)
            if before is None:
                return None
            finished = build.finished
            after = replace(
                before,
                build=build,
                finished=finished,
                polled=True,
                last_poll_ok=True,
                last_error=None,
                last_success_time=now,
                seen_unfinished=before.seen_unfinished or not finished,
            )
            if finished and before.seen_unfinished and not before.finished:
                self._count_finished(build)
            self._records[build_id] = after
            self._version += 1
        return Transition(before, after)

    def record_failure(self, build_id: str, outcome: Outcome) -> Transition | None:
        """Store a failed poll; the last good answer stays until it goes stale."""
        with self._lock:
            before = self._records.get(build_id)
            if before is None:
                return None
            if before.polled and not before.last_poll_ok and before.last_error is outcome:
                return Transition(before, before)
            after = self._records[build_id] = _failed(before, outcome)
            self._version += 1
        return Transition(before, after)

    def mark_unpolled(self, outcome: Outcome) -> int:
        """Give builds not polled yet a failed poll: they wait on a pause of the whole API.

        Readiness must not wait for the API to come back.
        """
        with self._lock:
            waiting = [record for record in self._records.values() if not record.polled]
            for record in waiting:
                self._records[record.build_id] = _failed(record, outcome)
            if waiting:
                self._version += 1
        return len(waiting)

    def expire_stale(self, now: float, stale_after: float) -> list[str]:
        """Drop the values of unfinished builds without a good poll for ``stale_after`` seconds."""
        expired = []
        with self._lock:
            for build_id, record in self._records.items():
                if (
                    record.build is not None
                    and not record.finished
                    and record.last_success_time is not None
                    and now - record.last_success_time >= stale_after
                ):
                    expired.append(build_id)
            for build_id in expired:
                self._records[build_id] = replace(self._records[build_id], build=None)
            if expired:
                self._version += 1
        return expired

    def snapshot(self) -> Snapshot:
        """The current state; the same object until something changes."""
        with self._lock:
            if self._snapshot.version != self._version:
                self._snapshot = Snapshot(
                    self._version,
                    MappingProxyType(dict(self._records)),
                    MappingProxyType(dict(self._finished)),
                )
            return self._snapshot

    def _count_finished(self, build: Build) -> None:
        key = (build.image_name, build.status_label)
        previous = self._finished.get(key, FinishedBuilds())
        duration = build.duration_seconds
        self._finished[key] = FinishedBuilds(
            count=previous.count + 1,
            durations=(
                previous.durations.observe(duration)
                if duration is not None and duration >= 0
                else previous.durations
            ),
        )


def _failed(record: BuildRecord, outcome: Outcome) -> BuildRecord:
    return replace(record, polled=True, last_poll_ok=False, last_error=outcome)


@dataclass(frozen=True)
class TelemetrySnapshot:
    """The exporter's own health, read once per scrape."""

    requests: Mapping[Outcome, int]
    request_durations: Histogram
    api_up: bool | None
    rate_limited_until: float
    config_reload_successful: bool
    internal_errors: Mapping[str, int]


class Telemetry:
    """Counters about the exporter itself, updated on every request.

    ``snapshot()`` returns the same object until something changes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests = dict.fromkeys(Outcome, 0)
        self._durations = Histogram.empty(REQUEST_DURATION_BUCKETS)
        self._api_up: bool | None = None
        self._rate_limited_until = 0.0
        self._config_reload_successful = True
        self._internal_errors = dict.fromkeys(INTERNAL_ERROR_COMPONENTS, 0)
        self._error_classes_seen: set[tuple[str, str]] = set()
        self._snapshot: TelemetrySnapshot | None = None

    def observe_request(self, outcome: Outcome, duration: float) -> None:
        with self._lock:
            self._requests[outcome] += 1
            self._durations = self._durations.observe(duration)
            self._api_up = outcome not in API_DOWN_OUTCOMES
            self._snapshot = None

    def set_rate_limited_until(self, timestamp: float) -> None:
        with self._lock:
            self._rate_limited_until = timestamp
            self._snapshot = None

    def set_config_reload_successful(self, successful: bool) -> None:
        with self._lock:
            self._config_reload_successful = successful
            self._snapshot = None

    def record_internal_error(self, component: str, error: BaseException) -> bool:
        """Count an unexpected exception; True the first time its class is seen here."""
        with self._lock:
            self._internal_errors[component] = self._internal_errors.get(component, 0) + 1
            error_class = (component, type(error).__qualname__)
            first = error_class not in self._error_classes_seen
            self._error_classes_seen.add(error_class)
            self._snapshot = None
            return first

    def snapshot(self) -> TelemetrySnapshot:
        with self._lock:
            if self._snapshot is None:
                self._snapshot = TelemetrySnapshot(
                    requests=MappingProxyType(dict(self._requests)),
                    request_durations=self._durations,
                    api_up=self._api_up,
                    rate_limited_until=self._rate_limited_until,
                    config_reload_successful=self._config_reload_successful,
                    internal_errors=MappingProxyType(dict(self._internal_errors)),
                )
            return self._snapshot
