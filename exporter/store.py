"""What the exporter knows of each build: its latest answer and poll health.

The poller writes from the event loop; renderers and the state writer read immutable
snapshots from other threads.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from exporter.api import Outcome
from exporter.models import Build
from exporter.telemetry import Histogram

FINISHED_DURATION_BUCKETS = (60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)


class BuildState(enum.StrEnum):
    """The ``state`` label of ``primeintellect_exporter_builds``."""

    ACTIVE = "active"
    FINISHED = "finished"
    FAILING = "failing"
    UNPOLLED = "unpolled"


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
    # Wall-clock times of the last poll, and of the last answer that differed from the one
    # before (the adaptive cadence polls an unchanged build less often).
    last_poll_time: float | None = None
    last_change_time: float | None = None
    # Loaded from the state file at start rather than polled by this process.
    restored: bool = False
    # Finished longer than metrics.finished_build_retention ago: its answer is dropped.
    retired: bool = False

    @property
    def state(self) -> BuildState:
        if self.finished:
            return BuildState.FINISHED
        if not self.polled:
            return BuildState.UNPOLLED
        if not self.last_poll_ok:
            return BuildState.FAILING
        return BuildState.ACTIVE


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
    # A good answer that differs from the previous good one (not the first answer).
    answer_changed: bool = False


@dataclass(frozen=True, slots=True)
class Swept:
    """The builds a sweep dropped answers of: stale unfinished ones, and retired ones."""

    expired: list[str]
    retired: list[str]


class BuildStore:
    """Latest state of each tracked build; snapshots are built lazily, once per change.

    ``restored`` records (from the state file) are taken up when their builds are tracked.
    """

    def __init__(self, restored: Mapping[str, BuildRecord] | None = None) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, BuildRecord] = {}
        self._restored = dict(restored or {})
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
                records = {
                    **self._records,
                    **{b: self._restored.get(b) or BuildRecord(b) for b in added},
                }
                self._records = dict(sorted(records.items()))
            # Only what the first tracked set holds comes back; later additions are new builds.
            self._restored.clear()
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
            changed = before.build != build
            after = replace(
                before,
                build=build,
                finished=finished,
                polled=True,
                last_poll_ok=True,
                last_error=None,
                last_success_time=now,
                seen_unfinished=before.seen_unfinished or not finished,
                last_poll_time=now,
                last_change_time=now
                if changed or before.last_change_time is None
                else before.last_change_time,
            )
            if finished and before.seen_unfinished and not before.finished:
                self._count_finished(build)
            self._records[build_id] = after
            self._version += 1
        return Transition(before, after, answer_changed=changed and before.build is not None)

    def record_failure(
        self, build_id: str, outcome: Outcome, now: float | None = None
    ) -> Transition | None:
        """Store a failed poll; the last good answer stays until it goes stale."""
        with self._lock:
            before = self._records.get(build_id)
            if before is None:
                return None
            if before.polled and not before.last_poll_ok and before.last_error is outcome:
                return Transition(before, before)
            after = self._records[build_id] = _failed(before, outcome, now)
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

    def sweep(self, now: float, stale_after: float, retention: float = 0.0) -> Swept:
        """Drop answers that are too old, in one pass over the builds.

        An unfinished build without a good poll for ``stale_after`` seconds loses its values;
        with a ``retention``, a build finished (``completedAt``) that long ago loses its
        answer and is retired: still tracked and finished, so never requested again.
        """
        expired = []
        retired = []
        with self._lock:
            for build_id, record in self._records.items():
                build = record.build
                if build is None:
                    continue
                if not record.finished:
                    if (
                        record.last_success_time is not None
                        and now - record.last_success_time >= stale_after
                    ):
                        expired.append(build_id)
                elif (
                    retention > 0
                    and build.completed_at is not None
                    and now - build.completed_at >= retention
                ):
                    retired.append(build_id)
            for build_id in expired:
                self._records[build_id] = replace(self._records[build_id], build=None)
            for build_id in retired:
                self._records[build_id] = replace(self._records[build_id], build=None, retired=True)
            if expired or retired:
                self._version += 1
        return Swept(expired, retired)

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


def _failed(record: BuildRecord, outcome: Outcome, now: float | None = None) -> BuildRecord:
    return replace(
        record,
        polled=True,
        last_poll_ok=False,
        last_error=outcome,
        last_poll_time=record.last_poll_time if now is None else now,
    )
