"""What the exporter knows of each build (its latest answer and poll health) and of the
scope's images (the last complete listing).

The poller writes from the event loop; renderers and the state writer read immutable
snapshots from other threads.
"""

from __future__ import annotations

import bisect
import enum
import threading
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from exporter import health as image_health
from exporter.health import HealthKey, ImageHealth
from exporter.listing import ListingCut
from exporter.models import Build, ImageRow, Outcome
from exporter.telemetry import Exemplar, Histogram

# A change log this short is never restarted, however few builds are tracked.
_MIN_CHANGE_LOG = 1024
FINISHED_DURATION_BUCKETS = (60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
# A queue is seconds when the API has room, up to an hour when it has none.
QUEUE_DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)


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
    # The last answer had no startedAt: its start, once seen, is observed in the queue time.
    seen_unstarted: bool = False
    # Wall-clock times of the last poll, and of the last answer that differed from the one
    # before (the adaptive cadence polls an unchanged build less often).
    last_poll_time: float | None = None
    last_change_time: float | None = None
    # Loaded from the state file at start rather than polled by this process.
    restored: bool = False
    # Finished longer than metrics.finished_build_retention ago: its answer is dropped.
    retired: bool = False
    # Tracked because build discovery listed it, not because the configuration names it.
    discovered: bool = False

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
class Tallies:
    """What builds were seen to do, kept across restarts in the state file: finishes per
    ``(image_name, status)``, and queue times of builds seen to start per ``image_name``."""

    finished: Mapping[tuple[str, str], FinishedBuilds] = field(
        default_factory=lambda: MappingProxyType({})
    )
    queued: Mapping[str, Histogram] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class ChangeLog:
    """Which builds changed at which version, from ``since`` on, in version order. Only ever
    appended to; the store starts a new one when it grows too long."""

    since: int
    versions: array[int] = field(default_factory=lambda: array("q"))
    build_ids: list[str] = field(default_factory=list)

    def append(self, version: int, build_id: str) -> None:
        self.build_ids.append(build_id)
        self.versions.append(version)

    def __len__(self) -> int:
        return len(self.versions)


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of every tracked build, ordered by build ID."""

    version: int
    records: Mapping[str, BuildRecord]
    finished: Mapping[tuple[str, str], FinishedBuilds]
    states: Mapping[BuildState, int] = field(
        default_factory=lambda: MappingProxyType(dict.fromkeys(BuildState, 0))
    )
    changes: ChangeLog = field(default_factory=lambda: ChangeLog(0))
    # Per image_name: queue times of the builds seen to start. The same object until one starts.
    queued: Mapping[str, Histogram] = field(default_factory=lambda: MappingProxyType({}))
    # Per image name and tag (exporter.health). The same object until a build changes one.
    health: Mapping[HealthKey, ImageHealth] = field(default_factory=lambda: MappingProxyType({}))
    # The image names of tracked builds whose answer named one, kept while the answer is stale
    # and dropped when it retires: the images the tallies' series exist for, at 0 until they
    # count. The same object until an image comes or goes.
    images: frozenset[str] = frozenset()

    @property
    def tallies(self) -> Tallies:
        return Tallies(self.finished, self.queued)

    @property
    def all_polled(self) -> bool:
        return self.states[BuildState.UNPOLLED] == 0

    def changed_since(self, version: int) -> set[str] | None:
        """Builds added, removed or updated after ``version`` up to this snapshot's, or None if
        that is no longer known (then every build may have changed)."""
        changes = self.changes
        if version < changes.since or version > self.version:
            return None
        # Read up to the length seen now: the store may append meanwhile, IDs before versions.
        versions = changes.versions
        first = bisect.bisect_right(versions, version)
        last = bisect.bisect_right(versions, self.version)
        return set(changes.build_ids[first:last])


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

    ``restored`` records (from the state file) are taken up when their builds are tracked;
    ``tallies`` and ``health`` (from it too) go on counting.
    """

    def __init__(
        self,
        restored: Mapping[str, BuildRecord] | None = None,
        tallies: Tallies | None = None,
        health: Mapping[HealthKey, ImageHealth] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, BuildRecord] = {}
        # Whether the latest snapshot holds ``_records`` itself: it is copied before the next
        # write, so a scrape never pays for the copy and a snapshot never changes.
        self._records_shared = False
        self._restored = dict(restored or {})
        tallies = tallies or Tallies()
        self._finished: dict[tuple[str, str], FinishedBuilds] = dict(tallies.finished)
        # The same object until a build finishes, so readers can tell it did not change.
        self._finished_view: Mapping[tuple[str, str], FinishedBuilds] = MappingProxyType(
            self._finished
        )
        self._queued: Mapping[str, Histogram] = MappingProxyType(dict(tallies.queued))
        self._health = dict(health or {})
        # Folding a restored build in again changes nothing; a file written before health was
        # kept gets it from its finished builds.
        for record in self._restored.values():
            if record.finished and record.build is not None:
                change = image_health.fold(self._health, record.build_id, record.build)
                if change is not None:
                    image_health.put(self._health, *change)
        # As for the records: copied before a write once a snapshot holds it; the view is None
        # until the next snapshot after a change.
        self._health_shared = False
        self._health_view: Mapping[HealthKey, ImageHealth] | None = None
        # The image name of each tracked build whose answer named one, and how many builds
        # name each image; the frozen view is None until the next snapshot after an image
        # came or went.
        self._image_of: dict[str, str] = {}
        self._image_builds: dict[str, int] = {}
        self._images_view: frozenset[str] | None = frozenset()
        self._snapshot = Snapshot(
            0,
            MappingProxyType({}),
            self._finished_view,
            queued=self._queued,
            health=self._health_snapshot(),
            images=self._images_snapshot(),
        )
        self._states = dict.fromkeys(BuildState, 0)
        self._version = 0
        self._changes = ChangeLog(0)

    def track(
        self, build_ids: Iterable[str], discovered: Iterable[str] = ()
    ) -> tuple[list[str], list[str]]:
        """Track exactly these builds, the configured ones and those only discovery brought,
        keeping what is known of retained ones.

        Returns the added and the removed build IDs.
        """
        wanted = dict.fromkeys(build_ids, False)
        for build_id in discovered:
            wanted.setdefault(build_id, True)
        with self._lock:
            removed = [build_id for build_id in self._records if build_id not in wanted]
            added = [build_id for build_id in wanted if build_id not in self._records]
            moved = [
                build_id
                for build_id, record in self._records.items()
                if build_id in wanted and record.discovered != wanted[build_id]
            ]
            if added or removed or moved:
                self._version += 1
            for build_id in removed:
                self._count_state(self._writable_records().pop(build_id), -1)
                self._note_image(build_id, "")
                self._log_change(build_id)
            for build_id in moved:
                record = self._records[build_id]
                self._put(replace(record, discovered=wanted[build_id]))
            if added:
                new = {b: self._arrived(b, wanted[b]) for b in added}
                for build_id, record in new.items():
                    self._count_state(record, 1)
                    if record.build is not None:
                        self._note_image(build_id, record.build.image_name)
                    self._log_change(build_id)
                # Kept in build ID order, so a snapshot is a copy and never a sort.
                self._records = dict(sorted({**self._records, **new}.items()))
                self._records_shared = False
            # Only what the first tracked set holds comes back; later additions are new builds.
            self._restored.clear()
        return added, removed

    def _arrived(self, build_id: str, discovered: bool) -> BuildRecord:
        """The record of a build that starts being tracked: the restored one when the state
        file had it, the same object while its mark holds, so the state sync (which tells
        changes by identity) does not write every restored build again at start."""
        record = self._restored.get(build_id) or BuildRecord(build_id)
        return record if record.discovered == discovered else replace(record, discovered=discovered)

    def restored_discovered(self) -> list[str]:
        """Builds the state file brought back that discovery had brought, before the first
        ``track``: they are tracked again at start while discovery is on."""
        with self._lock:
            return [build_id for build_id, record in self._restored.items() if record.discovered]

    def record_success(self, build_id: str, build: Build, now: float) -> Transition | None:
        """Store a good answer; counts the build as finished if this process saw it unfinished."""
        with self._lock:
            before = self._records.get(build_id)
            if before is None:
                return None
            finished = build.finished
            changed = before.build != build
            if not changed and before.build is not None:
                # The answer as before: keep the object, so readers see it is the same.
                build = before.build
            after = replace(
                before,
                build=build,
                finished=finished,
                polled=True,
                last_poll_ok=True,
                last_error=None,
                last_success_time=now,
                seen_unfinished=before.seen_unfinished or not finished,
                seen_unstarted=build.started_at is None,
                last_poll_time=now,
                last_change_time=now
                if changed or before.last_change_time is None
                else before.last_change_time,
            )
            if finished and before.seen_unfinished and not before.finished:
                self._count_finished(build, now)
            if before.seen_unstarted and build.started_at is not None:
                self._count_started(build, now)
            if finished and changed:
                self._fold_health(build_id, build)
            self._version += 1
            self._put(after)
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
            after = _failed(before, outcome, now)
            self._version += 1
            self._put(after)
        return Transition(before, after)

    def mark_unpolled(self, outcome: Outcome) -> int:
        """Give builds not polled yet a failed poll: they wait on a pause of the whole API.

        Readiness must not wait for the API to come back.
        """
        with self._lock:
            waiting = [record for record in self._records.values() if not record.polled]
            if waiting:
                self._version += 1
            for record in waiting:
                self._put(_failed(record, outcome))
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
            if expired or retired:
                self._version += 1
            for build_id in expired:
                self._put(replace(self._records[build_id], build=None))
            for build_id in retired:
                self._put(replace(self._records[build_id], build=None, retired=True))
        return Swept(expired, retired)

    def snapshot(self) -> Snapshot:
        """The current state; the same object until something changes."""
        with self._lock:
            if self._snapshot.version != self._version:
                self._snapshot = Snapshot(
                    self._version,
                    MappingProxyType(self._records),
                    self._finished_view,
                    MappingProxyType(dict(self._states)),
                    self._changes,
                    self._queued,
                    self._health_snapshot(),
                    self._images_snapshot(),
                )
                self._records_shared = True
            return self._snapshot

    def _put(self, record: BuildRecord) -> None:
        records = self._writable_records()
        before = records[record.build_id]
        records[record.build_id] = record
        self._count_state(before, -1)
        self._count_state(record, 1)
        if record.build is not None:
            self._note_image(record.build_id, record.build.image_name)
        elif record.retired:
            self._note_image(record.build_id, "")
        self._log_change(record.build_id)

    def _note_image(self, build_id: str, image_name: str) -> None:
        """The build names ``image_name`` now; an empty name: none, or the build is gone."""
        before = self._image_of.get(build_id, "")
        if before == image_name:
            return
        if before:
            left = self._image_builds[before] - 1
            if left:
                self._image_builds[before] = left
            else:
                del self._image_builds[before]
                self._images_view = None
        if image_name:
            self._image_of[build_id] = image_name
            if image_name not in self._image_builds:
                self._image_builds[image_name] = 0
                self._images_view = None
            self._image_builds[image_name] += 1
        else:
            del self._image_of[build_id]

    def _images_snapshot(self) -> frozenset[str]:
        if self._images_view is None:
            self._images_view = frozenset(self._image_builds)
        return self._images_view

    def _writable_records(self) -> dict[str, BuildRecord]:
        if self._records_shared:
            self._records = dict(self._records)
            self._records_shared = False
        return self._records

    def _count_state(self, record: BuildRecord, step: int) -> None:
        self._states[record.state] += step

    def _log_change(self, build_id: str) -> None:
        # Past a few entries per build, a reader this far behind re-renders everything anyway;
        # a new log keeps memory bounded, and snapshots holding the old one keep it intact.
        if len(self._changes) >= max(_MIN_CHANGE_LOG, 2 * len(self._records)):
            self._changes = ChangeLog(self._version)
        self._changes.append(self._version, build_id)

    def _count_finished(self, build: Build, now: float) -> None:
        key = (build.image_name, build.status_label)
        previous = self._finished.get(key, FinishedBuilds())
        duration = build.duration_seconds
        counted = FinishedBuilds(
            count=previous.count + 1,
            durations=(
                previous.durations.observe(duration, Exemplar(build.id, duration, now))
                if duration is not None and duration >= 0
                else previous.durations
            ),
        )
        # A new mapping: snapshots already taken keep theirs unchanged.
        self._finished = {**self._finished, key: counted}
        self._finished_view = MappingProxyType(self._finished)

    def _fold_health(self, build_id: str, build: Build) -> None:
        change = image_health.fold(self._health, build_id, build)
        if change is None:
            return
        if self._health_shared:
            self._health = dict(self._health)
            self._health_shared = False
        image_health.put(self._health, *change)
        self._health_view = None

    def _health_snapshot(self) -> Mapping[HealthKey, ImageHealth]:
        if self._health_view is None:
            self._health_view = MappingProxyType(self._health)
            self._health_shared = True
        return self._health_view

    def _count_started(self, build: Build, now: float) -> None:
        queued = build.queued_seconds
        # Clock skew on the API's side (a start before the creation): nothing to observe.
        if queued is None:
            return
        previous = self._queued.get(build.image_name) or Histogram.empty(QUEUE_DURATION_BUCKETS)
        # A new mapping: snapshots already taken keep theirs unchanged.
        self._queued = MappingProxyType(
            {
                **self._queued,
                build.image_name: previous.observe(queued, Exemplar(build.id, queued, now)),
            }
        )


def _failed(record: BuildRecord, outcome: Outcome, now: float | None = None) -> BuildRecord:
    return replace(
        record,
        polled=True,
        last_poll_ok=False,
        last_error=outcome,
        last_poll_time=record.last_poll_time if now is None else now,
    )


# -- the image inventory (discovery.images) ------------------------------------------------------

# (image_name, image_tag, artifact_type label): one series set each.
ImageKey = tuple[str, str, str]


@dataclass(frozen=True)
class Inventory:
    """The last complete listing and how the latest attempt went; immutable."""

    version: int = 0
    images: Mapping[ImageKey, ImageRow] = field(default_factory=lambda: MappingProxyType({}))
    # End of the last complete listing (wall clock), None before the first.
    listed_at: float | None = None
    # Why the latest listing failed, or was cut short; None once one succeeds.
    last_error: Outcome | ListingCut | None = None


class ImageInventory:
    """Holds the current Inventory; replaced whole by each listing, read by any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current = Inventory()

    def snapshot(self) -> Inventory:
        return self._current

    def replace(self, images: Mapping[ImageKey, ImageRow], now: float) -> Inventory:
        with self._lock:
            self._current = Inventory(
                self._current.version + 1, MappingProxyType(dict(images)), now, None
            )
            return self._current

    def failed(self, outcome: Outcome | ListingCut) -> Inventory:
        with self._lock:
            current = self._current
            if current.last_error is not outcome:
                self._current = Inventory(
                    current.version + 1, current.images, current.listed_at, outcome
                )
            return self._current


def latest_rows(rows: Iterable[ImageRow]) -> dict[ImageKey, ImageRow]:
    """The most recently updated row of each image name, tag and artifact type."""
    latest: dict[ImageKey, ImageRow] = {}
    for row in rows:
        key = (row.image_name, row.image_tag, row.type_label)
        kept = latest.get(key)
        # Ties go to the row listed first, as the API orders them.
        if kept is None or row.updated_at > kept.updated_at:
            latest[key] = row
    return latest
