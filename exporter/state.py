"""The durable state: every tracked build's last good answer and poll health, in SQLite.

A restart loads it, so finished builds are exposed at once and never requested again, and
unfinished ones resume their schedule. The file belongs to one process at a time (an
exclusive lock on a file beside it). Anything wrong with the file costs at most its contents,
never the start: a corrupt or newer-schema file is moved aside and a fresh one begun; a file
that cannot be written (read-only, or held by another process) is read without writing it,
and the exporter keeps its state in memory only, saying so in one log line.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from exporter.health import FINISHED_STATUSES, Failure, HealthKey, ImageHealth
from exporter.models import BUILD, Build, InvalidBuildError, Outcome, parse_build
from exporter.store import (
    FINISHED_DURATION_BUCKETS,
    QUEUE_DURATION_BUCKETS,
    BuildRecord,
    FinishedBuilds,
    Snapshot,
    Tallies,
)
from exporter.telemetry import Histogram, StateStatus

log = logging.getLogger(__name__)

# 2 added `discovered`; a file of schema 1 gains the column, every build configured.
# 3 added `seen_unstarted` and the tallies; a file of schema 1 or 2 marks its builds whose
# answer has no startedAt, so their start is observed, and its tallies begin at zero.
# 4 added image_health; an older file's is folded from its finished builds at start.
SCHEMA_VERSION = 4
_SCHEMA = """
CREATE TABLE IF NOT EXISTS builds (
    build_id TEXT PRIMARY KEY,
    answer TEXT,
    finished INTEGER NOT NULL,
    seen_unfinished INTEGER NOT NULL,
    polled INTEGER NOT NULL,
    last_poll_ok INTEGER NOT NULL,
    last_error TEXT,
    last_poll_time REAL,
    last_success_time REAL,
    last_change_time REAL,
    retired INTEGER NOT NULL,
    discovered INTEGER NOT NULL DEFAULT 0,
    seen_unstarted INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID
"""
# The store's tallies, one row per series: `family` is `finished` (by image_name and status)
# or `queued` (by image_name; status empty); `buckets` are the counts of `bounds` and +Inf,
# not cumulative, as JSON.
_TALLIES = """
CREATE TABLE IF NOT EXISTS tallies (
    family TEXT NOT NULL,
    image_name TEXT NOT NULL,
    status TEXT NOT NULL,
    count INTEGER NOT NULL,
    bounds TEXT NOT NULL,
    buckets TEXT NOT NULL,
    total REAL NOT NULL,
    PRIMARY KEY (family, image_name, status)
) WITHOUT ROWID
"""
# Each image's health (exporter.health); `failures` are the kept ones, as JSON pairs of
# completedAt and build ID.
_IMAGE_HEALTH = """
CREATE TABLE IF NOT EXISTS image_health (
    image_name TEXT NOT NULL,
    image_tag TEXT NOT NULL,
    last_finished_at REAL NOT NULL,
    last_finished_status TEXT NOT NULL,
    last_success REAL,
    failures TEXT NOT NULL,
    dropped INTEGER NOT NULL,
    dropped_since REAL,
    dropped_until REAL,
    PRIMARY KEY (image_name, image_tag)
) WITHOUT ROWID
"""
_FINISHED = "finished"
_QUEUED = "queued"
_MIGRATIONS = {
    1: ("ALTER TABLE builds ADD COLUMN discovered INTEGER NOT NULL DEFAULT 0",),
    2: (
        "ALTER TABLE builds ADD COLUMN seen_unstarted INTEGER NOT NULL DEFAULT 0",
        # Saved unstarted, so never counted: its start is still to be observed.
        "UPDATE builds SET seen_unstarted = 1 WHERE answer IS NOT NULL"
        " AND json_extract(answer, '$.startedAt') IS NULL",
    ),
    3: (),
}
_UPSERT = """
INSERT OR REPLACE INTO builds (
    build_id, answer, finished, seen_unfinished, polled, last_poll_ok, last_error,
    last_poll_time, last_success_time, last_change_time, retired, discovered, seen_unstarted
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# In the order of _UPSERT, whatever order migrations gave the columns.
_SELECT_BUILDS = """
SELECT build_id, answer, finished, seen_unfinished, polled, last_poll_ok, last_error,
    last_poll_time, last_success_time, last_change_time, retired, discovered, seen_unstarted
FROM builds
"""
_TIMESTAMP_FIELDS = ("createdAt", "startedAt", "completedAt")
# What a file or directory that may be read but not written answers a write.
_READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


class StateUnavailableError(Exception):
    """The state file cannot be used; the message says why, for one log line."""

    def __init__(self, reason: str, status: StateStatus = StateStatus.UNUSABLE) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Restored:
    """What a state file gave back at start."""

    records: Mapping[str, BuildRecord]
    # How many rows could not be read: their builds are polled as if new (a tally's: it
    # starts at zero).
    unreadable: int = 0
    tallies: Tallies = field(default_factory=Tallies)
    health: Mapping[HealthKey, ImageHealth] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthChanges:
    """Images whose health changed, and images forgotten."""

    changed: list[tuple[HealthKey, ImageHealth]]
    removed: list[HealthKey]


class StateFile:
    """One open state file, locked for this process; every method may be called from a thread."""

    def __init__(self, path: Path, connection: sqlite3.Connection, lock_file: int) -> None:
        self.path = path
        self._connection = connection
        self._lock_file = lock_file
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> StateFile:
        """Open (or create) and lock the state file; raises StateUnavailableError."""
        if path.exists() and not path.is_file():
            raise StateUnavailableError("it is not a regular file")
        try:
            # Its directory is never created: a typo in the path must not start a fresh state.
            lock_file = os.open(_lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise StateUnavailableError(f"its directory {path.parent} does not exist") from None
        except OSError as error:
            raise StateUnavailableError(
                f"cannot create it: {error.strerror}", _status_of_os_error(error)
            ) from None
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_file)
            raise StateUnavailableError(
                "another exporter process holds it; two processes must not share one state file",
                StateStatus.LOCKED,
            ) from None
        try:
            return cls(path, _connect(path), lock_file)
        except sqlite3.OperationalError as error:
            # Not the file's fault (read-only, no space, an I/O error): leave it as it is.
            os.close(lock_file)
            raise StateUnavailableError(str(error), _status_of_sqlite_error(error)) from None
        except BaseException:
            os.close(lock_file)
            raise

    def load(self) -> Restored:
        """Every saved build and the tallies; a row that cannot be read is skipped (and later
        overwritten)."""
        with self._lock:
            return _load(self._connection)

    def save(
        self,
        records: Iterable[BuildRecord],
        removed: Iterable[str] = (),
        tallies: Tallies | None = None,
        health: HealthChanges | None = None,
    ) -> None:
        """Write changed records, delete removed builds and replace the tallies (unless None),
        in one transaction: a build's start or finish and its count are saved together."""
        rows = [_row_from_record(record) for record in records]
        gone = [(build_id,) for build_id in removed]
        if not rows and not gone and tallies is None and health is None:
            return
        with self._lock, self._connection:
            self._connection.executemany(_UPSERT, rows)
            self._connection.executemany("DELETE FROM builds WHERE build_id = ?", gone)
            if tallies is not None:
                self._connection.execute("DELETE FROM tallies")
                self._connection.executemany(
                    "INSERT INTO tallies VALUES (?, ?, ?, ?, ?, ?, ?)", _tally_rows(tallies)
                )
            if health is not None:
                self._connection.executemany(
                    "INSERT OR REPLACE INTO image_health VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [_health_row(key, value) for key, value in health.changed],
                )
                self._connection.executemany(
                    "DELETE FROM image_health WHERE image_name = ? AND image_tag = ?",
                    health.removed,
                )

    def close(self) -> None:
        with self._lock:
            self._connection.close()
            os.close(self._lock_file)


@dataclass(frozen=True)
class OpenedState:
    """What became of the state file at start: the file to write (None: memory only), what it
    gave back, what is done with it, and whether its content was lost."""

    file: StateFile | None
    restored: Restored
    status: StateStatus
    lost: bool = False


def open_state(path: Path) -> OpenedState:
    """Open and load the state file; on any problem one log line, and never a failed start.

    A file that cannot be written (read-only, or held by another process) is still read: its
    builds are restored and the state then stays in memory. One that cannot be read as a whole
    is moved aside and a fresh one begun.
    """
    started = time.monotonic()
    try:
        state = StateFile.open(path)
    except StateUnavailableError as error:
        return _in_memory(path, error.status, str(error))
    except (sqlite3.DatabaseError, _NewerSchemaError) as error:
        return _start_fresh(path, str(error))
    try:
        restored = state.load()
    except sqlite3.OperationalError as error:
        state.close()
        return _in_memory(path, _status_of_sqlite_error(error), str(error))
    except sqlite3.DatabaseError as error:
        state.close()
        return _start_fresh(path, str(error))
    log.info(
        "state loaded",
        extra={
            "path": str(path),
            "builds": len(restored.records),
            "finished": sum(record.finished for record in restored.records.values()),
            "unreadable_rows": restored.unreadable,
            "seconds": round(time.monotonic() - started, 3),
        },
    )
    return OpenedState(state, restored, StateStatus.IN_USE)


def take_over(path: Path) -> tuple[StateFile, Restored] | None:
    """The file another process held at start, once it is free, with what it holds now (the
    base of the next write); None while it is still held. Raises StateUnavailableError and
    sqlite3.DatabaseError for any other problem."""
    try:
        state = StateFile.open(path)
    except StateUnavailableError as error:
        if error.status == StateStatus.LOCKED:
            return None
        raise
    except _NewerSchemaError as error:
        raise StateUnavailableError(str(error)) from None
    try:
        return state, state.load()
    except BaseException:
        state.close()
        raise


class _NewerSchemaError(Exception):
    pass


_UNREADABLE_IN_PLACE = (
    "state file unreadable and cannot be moved aside; the state stays in memory only"
)
_IN_MEMORY_MESSAGES = {
    StateStatus.READ_ONLY: "state file read-only: restored from it, the state stays in memory only",
    StateStatus.LOCKED: (
        "state file held by another process: restored from it, the state stays in memory"
        " until the other process lets it go"
    ),
    StateStatus.UNUSABLE: "state file unusable; the state stays in memory only",
}


def _in_memory(path: Path, status: StateStatus, reason: str) -> OpenedState:
    """Restore what the file holds without writing it; the state then stays in memory."""
    restored = Restored({})
    lost = False
    extra: dict[str, object] = {"path": str(path), "status": status.value, "reason": reason}
    try:
        restored = _read_only(path, may_be_immutable=status != StateStatus.LOCKED)
    except FileNotFoundError:
        pass
    except (sqlite3.DatabaseError, _NewerSchemaError, OSError) as error:
        extra["read_error"] = str(error)
        # Readable bytes that are no state: it cannot be moved aside, and is lost all the same.
        lost = not isinstance(error, sqlite3.OperationalError | OSError)
    extra["restored_builds"] = len(restored.records)
    extra["unreadable_rows"] = restored.unreadable
    if lost:
        log.error(_UNREADABLE_IN_PLACE, extra=extra)
    elif status == StateStatus.UNUSABLE:
        log.error(_IN_MEMORY_MESSAGES[status], extra=extra)
    else:
        log.warning(_IN_MEMORY_MESSAGES[status], extra=extra)
    return OpenedState(None, restored, status, lost)


def _read_only(path: Path, *, may_be_immutable: bool) -> Restored:
    """Every build of a file this process may not write, read without changing it.

    SQLite reads a WAL file through its shared-memory file beside it; where that cannot be
    made (a read-only directory) the file is read as immutable, without the WAL's last
    commits, which is safe only when no other process writes it.
    """
    if not path.is_file():
        raise FileNotFoundError(path)
    uri = path.absolute().as_uri() + "?mode=ro"
    try:
        return _load_read_only(uri)
    except sqlite3.OperationalError as error:
        if not may_be_immutable or error.sqlite_errorcode & 0xFF != sqlite3.SQLITE_CANTOPEN:
            raise
    return _load_read_only(uri + "&immutable=1")


def _load_read_only(uri: str) -> Restored:
    connection = sqlite3.connect(uri, uri=True, timeout=1)
    try:
        if _check_schema(connection) < SCHEMA_VERSION:
            # Not migrated, as it may not be written: its tallies begin at zero.
            return _records_of(connection.execute("SELECT * FROM builds").fetchall())
        return _load(connection)
    finally:
        connection.close()


def _start_fresh(path: Path, reason: str) -> OpenedState:
    """Move a file that cannot be read aside, keeping it for a look, and begin a new one."""
    aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
    try:
        path.replace(aside)
        for suffix in ("-wal", "-shm"):
            companion = path.with_name(path.name + suffix)
            if companion.exists():
                companion.replace(aside.with_name(aside.name + suffix))
    except OSError as error:
        log.error(
            _UNREADABLE_IN_PLACE,
            extra={"path": str(path), "reason": reason, "error": error.strerror},
        )
        return OpenedState(None, Restored({}), _status_of_os_error(error), lost=True)
    log.error(
        "state file unreadable: moved aside, starting with a fresh state",
        extra={"path": str(path), "reason": reason, "moved_to": str(aside)},
    )
    try:
        return OpenedState(StateFile.open(path), Restored({}), StateStatus.IN_USE, lost=True)
    except (StateUnavailableError, sqlite3.DatabaseError, _NewerSchemaError) as error:
        log.error(
            "fresh state file unusable; the state stays in memory only",
            extra={"path": str(path), "reason": str(error)},
        )
        status = error.status if isinstance(error, StateUnavailableError) else StateStatus.UNUSABLE
        return OpenedState(None, Restored({}), status, lost=True)


def _status_of_os_error(error: OSError) -> StateStatus:
    if error.errno in _READ_ONLY_ERRNOS:
        return StateStatus.READ_ONLY
    return StateStatus.UNUSABLE


def _status_of_sqlite_error(error: sqlite3.Error) -> StateStatus:
    code = error.sqlite_errorcode & 0xFF
    if code == sqlite3.SQLITE_READONLY:
        return StateStatus.READ_ONLY
    # Another program (an sqlite3 shell, a backup) holding SQLite's own lock.
    if code in {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}:
        return StateStatus.LOCKED
    return StateStatus.UNUSABLE


def _records_of(rows: Iterable[tuple[Any, ...]]) -> Restored:
    records = {}
    unreadable = 0
    for row in rows:
        try:
            record = _record_from_row(row)
        except (InvalidBuildError, ValueError, TypeError, KeyError):
            unreadable += 1
            continue
        records[record.build_id] = record
    return Restored(records, unreadable)


def _load(connection: sqlite3.Connection) -> Restored:
    restored = _records_of(connection.execute(_SELECT_BUILDS).fetchall())
    finished: dict[tuple[str, str], FinishedBuilds] = {}
    queued: dict[str, Histogram] = {}
    unreadable = restored.unreadable
    for row in connection.execute("SELECT * FROM tallies ORDER BY family, image_name, status"):
        try:
            _tally_from_row(row, finished, queued)
        except (ValueError, TypeError):
            unreadable += 1
    health = {}
    for row in connection.execute("SELECT * FROM image_health"):
        try:
            key, value = _health_from_row(row)
        except (ValueError, TypeError):
            unreadable += 1
            continue
        health[key] = value
    return Restored(restored.records, unreadable, Tallies(finished, queued), health)


def _health_row(key: HealthKey, health: ImageHealth) -> tuple[object, ...]:
    return (
        *key,
        health.last_finished_at,
        health.last_finished_status,
        health.last_success,
        json.dumps([[failure.completed_at, failure.build_id] for failure in health.failures]),
        health.dropped,
        health.dropped_since,
        health.dropped_until,
    )


def _health_from_row(row: tuple[Any, ...]) -> tuple[HealthKey, ImageHealth]:
    name, tag, finished_at, status, success, failures, dropped, since, until = row
    if not isinstance(name, str) or not isinstance(tag, str) or status not in FINISHED_STATUSES:
        raise TypeError("not an image's health")
    if not isinstance(dropped, int) or dropped < 0:
        raise ValueError("not a count")
    kept = tuple(
        Failure(float(_optional_float(at) or 0.0), str(build_id))
        for at, build_id in json.loads(failures)
    )
    return (name, tag), ImageHealth(
        float(_optional_float(finished_at) or 0.0),
        status,
        _optional_float(success),
        tuple(sorted(kept)),
        dropped,
        _optional_float(since),
        _optional_float(until),
    )


def _tally_rows(tallies: Tallies) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = [
        (_FINISHED, image_name, status, value.count, *_histogram_columns(value.durations))
        for (image_name, status), value in tallies.finished.items()
    ]
    rows.extend(
        (_QUEUED, image_name, "", histogram.count, *_histogram_columns(histogram))
        for image_name, histogram in tallies.queued.items()
    )
    return rows


def _histogram_columns(histogram: Histogram) -> tuple[str, str, float]:
    return json.dumps(histogram.bounds), json.dumps(histogram.counts), histogram.total


def _tally_from_row(
    row: tuple[Any, ...],
    finished: dict[tuple[str, str], FinishedBuilds],
    queued: dict[str, Histogram],
) -> None:
    family, image_name, status, count, bounds, buckets, total = row
    if not isinstance(image_name, str) or not isinstance(status, str):
        raise TypeError("not a label value")
    if not isinstance(count, int) or count < 0:
        raise ValueError("not a count")
    expected = FINISHED_DURATION_BUCKETS if family == _FINISHED else QUEUE_DURATION_BUCKETS
    histogram = Histogram.empty(expected)
    counts = tuple(json.loads(buckets))
    # Saved with other bounds (an older exporter's): the histogram begins at zero, which
    # Prometheus reads as a counter reset.
    if tuple(json.loads(bounds)) == expected:
        if len(counts) != len(expected) + 1 or not all(
            isinstance(value, int) and value >= 0 for value in counts
        ):
            raise ValueError("not the counts of its buckets")
        histogram = Histogram(expected, counts, float(_optional_float(total) or 0.0))
    if family == _FINISHED:
        finished[(image_name, status)] = FinishedBuilds(count, histogram)
    elif family == _QUEUED:
        if histogram.count:
            queued[image_name] = histogram
    else:
        raise ValueError(f"unknown family {family!r}")


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=1)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        # WAL with synchronous=NORMAL: a power cut may lose the last moments, never the file.
        connection.execute("PRAGMA synchronous=NORMAL")
        version = _check_schema(connection)
        with connection:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(_SCHEMA)
            connection.execute(_TALLIES)
            connection.execute(_IMAGE_HEALTH)
            if version > 0:
                for step in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[step]:
                        connection.execute(statement)
            connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        connection.execute("SELECT count(*) FROM builds").fetchone()
        connection.isolation_level = "DEFERRED"
    except BaseException:
        connection.close()
        raise
    return connection


def _check_schema(connection: sqlite3.Connection) -> int:
    """The file's schema version (0 for a new file); raises for a newer one."""
    version: int = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise _NewerSchemaError(
            f"written by a newer exporter (schema {version}; this one reads {SCHEMA_VERSION})"
        )
    return version


def encode_build(build: Build) -> str:
    """A build as the JSON of an API answer, which ``parse_build`` reads back unchanged."""
    document: dict[str, Any] = BUILD.dump_python(build, mode="json", by_alias=True)
    _timestamps_as_text(document)
    for artifact in document.get("artifacts", ()):
        _timestamps_as_text(artifact)
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


def _timestamps_as_text(document: dict[str, Any]) -> None:
    for name in _TIMESTAMP_FIELDS:
        value = document.get(name)
        if isinstance(value, float | int):
            document[name] = datetime.fromtimestamp(value, UTC).isoformat()


def _row_from_record(record: BuildRecord) -> tuple[object, ...]:
    return (
        record.build_id,
        None if record.build is None else encode_build(record.build),
        int(record.finished),
        int(record.seen_unfinished),
        int(record.polled),
        int(record.last_poll_ok),
        None if record.last_error is None else record.last_error.value,
        record.last_poll_time,
        record.last_success_time,
        record.last_change_time,
        int(record.retired),
        int(record.discovered),
        int(record.seen_unstarted),
    )


def _record_from_row(row: tuple[Any, ...]) -> BuildRecord:
    (
        build_id,
        answer,
        finished,
        seen_unfinished,
        polled,
        last_poll_ok,
        last_error,
        last_poll_time,
        last_success_time,
        last_change_time,
        retired,
        *newer,
    ) = row
    # A file of an older schema, read without migrating it (it may not be written): schema 1
    # has no discovered column, schema 2 no seen_unstarted.
    discovered = newer[0] if newer else 0
    seen_unstarted = newer[1] if len(newer) > 1 else answer is not None
    if not isinstance(build_id, str):
        raise TypeError("build_id")
    build = None if answer is None else parse_build(str(answer).encode())
    if build is not None and build.id != build_id:
        raise ValueError("the saved answer belongs to another build")
    retired = bool(retired) and build is None
    # A finished build is never requested again: the answer must prove it (or be retired).
    finished = bool(finished) and (retired or (build is not None and build.finished))
    return BuildRecord(
        build_id=build_id,
        build=build,
        finished=finished,
        polled=bool(polled),
        last_poll_ok=bool(last_poll_ok),
        last_error=None if last_error is None else Outcome(last_error),
        last_success_time=_optional_float(last_success_time),
        seen_unfinished=bool(seen_unfinished),
        last_poll_time=_optional_float(last_poll_time),
        last_change_time=_optional_float(last_change_time),
        restored=True,
        retired=retired,
        discovered=bool(discovered),
        seen_unstarted=bool(seen_unstarted) and (build is None or build.started_at is None),
    )


def _optional_float(value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, float | int):
        raise TypeError("not a number")
    return float(value)


class StateSync:
    """Writes to the state file what changed in the store since the last write."""

    def __init__(self, state: StateFile, restored: Restored) -> None:
        self._state = state
        self._written: Mapping[str, BuildRecord] = dict(restored.records)
        self._version: int | None = None
        # The tallies last written: the store's objects, replaced whenever they change.
        self._written_tallies: Tallies | None = None
        # The health last written; its values are replaced whenever they change.
        self._written_health: Mapping[HealthKey, ImageHealth] = dict(restored.health)

    def sync(self, snapshot: Snapshot) -> int:
        """Write the records that differ from the last write; returns how many."""
        if snapshot.version == self._version:
            return 0
        written = self._written
        candidates = None if self._version is None else snapshot.changed_since(self._version)
        if candidates is None:
            # The first write, or too far behind the store's change log: compare everything.
            candidates = set(snapshot.records) | set(written)
        # Records are replaced, never changed in place: identity tells what changed.
        changed = [
            record
            for build_id in candidates
            if (record := snapshot.records.get(build_id)) is not None
            and written.get(build_id) is not record
        ]
        removed = [
            build_id
            for build_id in candidates
            if build_id in written and build_id not in snapshot.records
        ]
        written_tallies = self._written_tallies
        tallies = None
        if (
            written_tallies is None
            or written_tallies.finished is not snapshot.finished
            or written_tallies.queued is not snapshot.queued
        ):
            tallies = snapshot.tallies
        health = None
        if snapshot.health is not self._written_health:
            written_health = self._written_health
            health = HealthChanges(
                [
                    (key, value)
                    for key, value in snapshot.health.items()
                    if written_health.get(key) is not value
                ],
                [key for key in written_health if key not in snapshot.health],
            )
        self._state.save(changed, removed, tallies, health)
        self._written = snapshot.records
        self._version = snapshot.version
        self._written_health = snapshot.health
        if tallies is not None:
            self._written_tallies = tallies
        return len(changed)

    def close(self) -> None:
        """Let the file go, for the next process to take."""
        self._state.close()
