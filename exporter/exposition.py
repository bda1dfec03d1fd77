"""The ``/metrics`` body, kept ready: re-rendered only where builds changed.

Build series change only when an API answer changes, so their exposition is kept between
scrapes, in chunks of consecutive builds. A store change re-renders only the chunks holding a
changed build, in each format asked for since; gzip is kept the same way, as deflate segments
joined into one gzip member, each primed with the text before it (as pigz does), so the
body is as small as one compressed in one go and a change recompresses only the segments
that hold or follow it closely. The exporter's own small families are collected on every
scrape, and each is rendered again only when its samples differ from the last scrape's.
The bytes are exactly what prometheus_client writes for the same families: each chunk and
family is rendered by it, and joined in the same order.
"""

from __future__ import annotations

import bisect
import enum
import struct
import threading
import zlib
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from isal import isal_zlib
from isal.isal_zlib import crc32_combine
from prometheus_client import exposition
from prometheus_client.core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from exporter.metrics import (
    artifact_counts,
    per_build_families,
    shown_artifacts,
    summary_families,
)
from exporter.models import BUILD_STATUSES, UNKNOWN, Build
from exporter.store import BuildRecord, FinishedBuilds, Snapshot

OPENMETRICS_EOF = b"# EOF\n"
# Builds per chunk: small enough that one change re-renders little, large enough that the
# pieces stay few and compress well.
CHUNK_SIZE = 64
# ISA-L's deflate at its level 2: about 2 GB/s here against 180 MB/s for zlib at level 6,
# for a body about 18 % larger (2.0 MB against 1.7 MB at 10,000 builds). A cold render of
# 50,000 builds then fits well inside a scrape timeout, and a change costs little to
# recompress.
GZIP_LEVEL = 2
# A gzip member header: deflate, no name, no time, unknown OS (RFC 1952).
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
# A segment is primed with this much of the end of the piece before it: nearly all that
# priming gains (2.05 MB at 10,000 builds, against 2.04 MB with all 32 KiB a back-reference
# may reach and 2.41 MB unprimed), and a change recompresses only its own segment and the next.
DICTIONARY_BYTES = 8 * 1024
# An empty final deflate block: ends a run of byte-aligned segments.
_FINAL_DEFLATE_BLOCK = b"\x03\x00"


class ExpositionFormat(enum.Enum):
    """The two exposition formats a scraper may ask for."""

    TEXT = exposition.CONTENT_TYPE_PLAIN_0_0_4
    OPENMETRICS = openmetrics.CONTENT_TYPE_LATEST

    @property
    def content_type(self) -> str:
        return str(self.value)


def negotiate_format(accept: str) -> ExpositionFormat:
    """OpenMetrics when the Accept header prefers it over the Prometheus text format."""
    best_openmetrics = best_text = 0.0
    for media_range, params, quality in _parse_header_list(accept):
        major_version = params.get("version", "1").split(".")[0]
        if media_range == "application/openmetrics-text" and major_version == "1":
            best_openmetrics = max(best_openmetrics, quality)
        elif media_range in {"text/plain", "text/*", "*/*"}:
            best_text = max(best_text, quality)
    if best_openmetrics > 0 and best_openmetrics >= best_text:
        return ExpositionFormat.OPENMETRICS
    return ExpositionFormat.TEXT


def accepts_gzip(accept_encoding: str) -> bool:
    """True when ``Accept-Encoding`` allows gzip."""
    return any(
        coding in {"gzip", "*"} and quality > 0
        for coding, _, quality in _parse_header_list(accept_encoding)
    )


def _parse_header_list(value: str) -> list[tuple[str, dict[str, str], float]]:
    items = []
    for item in value.split(","):
        name, *raw_params = (part.strip() for part in item.split(";"))
        if not name:
            continue
        params = {}
        for raw in raw_params:
            key, _, param_value = raw.partition("=")
            params[key.strip().lower()] = param_value.strip().strip('"')
        try:
            quality = float(params.pop("q", "1"))
        except ValueError:
            quality = 0.0
        items.append((name.lower(), params, quality))
    return items


def render(families: Iterable[Metric], format: ExpositionFormat) -> bytes:
    """Exposition bytes of families, as prometheus_client writes them.

    OpenMetrics output ends with ``# EOF``.
    """
    collector = _StaticCollector(list(families))
    if format is ExpositionFormat.OPENMETRICS:
        return cast(bytes, openmetrics.generate_latest(collector))  # type: ignore[no-untyped-call]
    return exposition.generate_latest(collector)


class _StaticCollector(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


# -- build lines, written directly -----------------------------------------------------------
#
# prometheus_client spends most of a full render validating label names and formatting
# samples one by one. The build families' lines are written here instead, from the same
# names, label order (sorted, as prometheus_client sorts them), escaping and value
# formatting; tests compare the two on random and hostile builds in both formats. Their
# sample lines read the same in both formats (gauges and infos only), so one rendering
# serves both; only the HELP and TYPE lines differ, and those come from prometheus_client.


def _sample_names() -> tuple[str, ...]:
    return tuple(
        family.name + "_info" if family.type == "info" else family.name
        for family in per_build_families(())
    )


(
    _INFO,
    _STATUS,
    _CREATED,
    _STARTED,
    _COMPLETED,
    _QUEUED,
    _DURATION,
    _ARTIFACTS,
    _ARTIFACT_INFO,
    _ARTIFACT_DURATION,
    _ARTIFACT_ERROR,
    _ARTIFACTS_OMITTED,
    _LAST_POLL_SUCCESS,
    _LAST_POLL_SUCCESS_TIMESTAMP,
    _LAST_POLL_ERROR,
) = (name + "{" for name in _sample_names())
BUILD_FAMILY_COUNT = 15
# The families before these three are about a build's answer; these are about its polls.
_LAST_POLL_FAMILIES = 12
_ONE = " 1.0\n"
_ZERO = " 0.0\n"
# Counts are small whole numbers; their formatted values are made once.
_COUNTS = tuple(f" {floatToGoString(float(count))}\n" for count in range(256))  # type: ignore[no-untyped-call]


# The end of each status line after 'status="', by the build's current status.
_STATUS_ENDINGS = {
    current: [
        f'{status}"}}{_ONE if status == current else _ZERO}'
        for status in (*BUILD_STATUSES, *((UNKNOWN,) if current == UNKNOWN else ()))
    ]
    for current in (*BUILD_STATUSES, UNKNOWN)
}
# The end of an artifact count line after 'status="', for the documented statuses.
_COUNT_ENDINGS = {
    (status, count): f'{status}"}}{ending}'
    for status in (*BUILD_STATUSES, UNKNOWN)
    for count, ending in enumerate(_COUNTS[:64])
}


def _escape(value: str) -> str:
    # Most values need nothing; three scans in C are cheaper than three replacements.
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


# The exponent suffix of a Go-style float ("e+09"), by the position of the dot in its repr.
_EXPONENTS = tuple(f"e+{dot - 1:02d}\n" for dot in range(400))


def _value(value: float) -> str:
    # floatToGoString's result by the same steps, with fewer of them for the common case: a
    # repr with a dot. Infinities and NaN have none; floatToGoString formats those.
    if value.__class__ is not float:
        value = float(value)
    text = repr(value)
    dot = text.find(".")
    if dot > 6 and value > 0:
        # Go writes large numbers with an exponent: 1767225600.5 is 1.7672256005e+09.
        digits = text.replace(".", "", 1).rstrip("0")
        if len(digits) > 1:
            return f" {digits[0]}.{digits[1:]}{_EXPONENTS[dot]}"
        return f" {digits}{_EXPONENTS[dot]}"
    if dot == -1:
        formatted: str = floatToGoString(value)  # type: ignore[no-untyped-call]
        return f" {formatted}\n"
    return f" {text}\n"


def _count(count: int) -> str:
    return _COUNTS[count] if 0 <= count < len(_COUNTS) else _value(count)


class _BuildLines:
    """The sample lines of every build family for a run of builds, family by family: each
    build adds exactly one string (maybe empty) to each family, so string ``i`` of every
    family is build ``i``'s."""

    def __init__(self, max_artifacts_per_build: int) -> None:
        self._max_artifacts_per_build = max_artifacts_per_build
        self.lines: list[list[str]] = [[] for _ in range(BUILD_FAMILY_COUNT)]

    def add(self, record: BuildRecord) -> None:
        lines = self.lines
        # As in exporter.metrics: a retired build has no series of its own.
        if record.retired:
            for family in lines:
                family.append("")
            return
        if record.build is None:
            for family in lines[:_LAST_POLL_FAMILIES]:
                family.append("")
        else:
            self._add_build(record.build)
        build_id = _escape(record.build_id)
        ok = _ONE if record.last_poll_ok else _ZERO
        lines[12].append(f'{_LAST_POLL_SUCCESS}build_id="{build_id}"}}{ok}')
        success = record.last_success_time
        lines[13].append(
            ""
            if success is None
            else f'{_LAST_POLL_SUCCESS_TIMESTAMP}build_id="{build_id}"}}{_value(success)}'
        )
        error = record.last_error
        lines[14].append(
            ""
            if error is None
            else f'{_LAST_POLL_ERROR}build_id="{build_id}",reason="{_escape(error.value)}"}}{_ONE}'
        )

    def _add_build(self, build: Build) -> None:
        lines = self.lines
        build_id = f'build_id="{_escape(build.id)}"'
        image = f'image_name="{_escape(build.image_name)}",image_tag="{_escape(build.image_tag)}"'
        labels = f"{build_id},{image}"
        lines[0].append(f"{_INFO}{labels}}}{_ONE}")
        status_prefix = f'{_STATUS}{labels},status="'
        # All of a build's status lines at once: the prefix joins precomputed endings.
        lines[1].append(status_prefix + status_prefix.join(_STATUS_ENDINGS[build.status_label]))
        lines[2].append(f"{_CREATED}{labels}}}{_value(build.created_at)}")
        for index, prefix, value in (
            (3, _STARTED, build.started_at),
            (4, _COMPLETED, build.completed_at),
            (5, _QUEUED, build.queued_seconds),
            (6, _DURATION, build.duration_seconds),
        ):
            lines[index].append("" if value is None else f"{prefix}{labels}}}{_value(value)}")
        counts = []
        for artifact_type, by_status in artifact_counts(build.artifacts).items():
            # Type and status labels are documented names or UNKNOWN: nothing to escape.
            prefix = f'{_ARTIFACTS}artifact_type="{artifact_type}",{labels},status="'
            endings = [
                _COUNT_ENDINGS.get(status_count) or f'{status_count[0]}"}}{_count(status_count[1])}'
                for status_count in by_status.items()
            ]
            counts.append(prefix + prefix.join(endings))
        lines[7].append("".join(counts))
        shown, omitted = shown_artifacts(build.artifacts, self._max_artifacts_per_build)
        infos = []
        durations = []
        errors = []
        for artifact in shown:
            artifact_labels = (
                f'artifact_id="{_escape(artifact.id)}",'
                f'artifact_type="{_escape(artifact.type_label)}",{build_id}'
            )
            path = _escape(artifact.full_image_path or "")
            infos.append(
                f'{_ARTIFACT_INFO}{artifact_labels},full_image_path="{path}",{image}}}{_ONE}'
            )
            duration = artifact.duration_seconds
            if duration is not None:
                durations.append(
                    f"{_ARTIFACT_DURATION}{artifact_labels},{image}}}{_value(duration)}"
                )
            if artifact.error_message:
                message = _escape(artifact.error_message)
                errors.append(
                    f'{_ARTIFACT_ERROR}{artifact_labels},error_message="{message}",{image}}}{_ONE}'
                )
        lines[8].append("".join(infos))
        lines[9].append("".join(durations))
        lines[10].append("".join(errors))
        lines[11].append(f"{_ARTIFACTS_OMITTED}{labels}}}{_count(omitted)}" if omitted else "")

    def pieces(self) -> tuple[tuple[bytes, ...], tuple[array[int], ...]]:
        """Each family's bytes, and the length in bytes of each build's lines in it."""
        pieces = []
        lengths = []
        for strings in self.lines:
            text = "".join(strings)
            data = text.encode()
            pieces.append(data)
            if len(data) == len(text):
                lengths.append(array("I", map(len, strings)))
            else:
                lengths.append(array("I", [len(string.encode()) for string in strings]))
        return tuple(pieces), tuple(lengths)


def render_build_lines(
    records: Iterable[BuildRecord], max_artifacts_per_build: int = 64
) -> tuple[bytes, ...]:
    """Each build family's sample lines for these builds, without HELP and TYPE lines.

    Byte for byte what prometheus_client writes for the same families, in either format:
    ``primeintellect_image_build_info{build_id="b1",image_name="app",image_tag="v1"} 1.0``
    """
    return _render_run(records, max_artifacts_per_build)[0]


def _render_run(
    records: Iterable[BuildRecord], max_artifacts_per_build: int
) -> tuple[tuple[bytes, ...], tuple[array[int], ...]]:
    lines = _BuildLines(max_artifacts_per_build)
    for record in records:
        lines.add(record)
    return lines.pieces()


# -- the body -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """A response body as pieces, to be written in order without joining them first."""

    pieces: tuple[bytes, ...]
    length: int

    def join(self) -> bytes:
        return b"".join(self.pieces)


@dataclass(frozen=True)
class _Segment:
    """One piece deflated with the end of the piece before it as the dictionary."""

    data: bytes
    # The piece it holds, and the piece whose end was the dictionary: the segment is valid
    # for that piece only, right after one that ends the same way.
    piece: bytes
    primed_with: bytes


@dataclass
class _Chunk:
    """Builds whose IDs sort from ``start`` up to the next chunk's start.

    Placement by ID range, not by position: adding or removing a build changes only the
    chunk its ID falls in, whatever else is tracked.
    """

    start: str
    records: dict[str, BuildRecord]
    # One piece per build family, the same in both formats, and the length of each build's
    # lines in it: a change re-renders only the builds it touches.
    pieces: tuple[bytes, ...]
    lengths: tuple[array[int], ...]
    # The gzip segment of each piece, shared by both formats (a family's first segment is
    # primed with its header, so it holds only for the format it was made for).
    compressed: list[_Segment | None] = field(default_factory=lambda: [None] * BUILD_FAMILY_COUNT)
    # The CRC-32 of each piece, for gzip trailers; computed when first needed.
    _crcs: list[int | None] | None = None

    def crc(self, family: int) -> int:
        if self._crcs is None:
            self._crcs = [None] * len(self.pieces)
        crc = self._crcs[family]
        if crc is None:
            crc = self._crcs[family] = zlib.crc32(self.pieces[family])
        return crc

    def known_crc(self, family: int) -> int | None:
        return None if self._crcs is None else self._crcs[family]


@dataclass(frozen=True)
class _Builds:
    """The build part of the body as of one snapshot, chunk by chunk."""

    version: int
    chunks: list[_Chunk]
    starts: list[str]


@dataclass
class _RenderedFamily:
    """One per-scrape family as last rendered: its samples, bytes and, once a gzip answer
    needed it, its deflate segment."""

    metric: Metric
    plain: bytes
    _compressed: bytes | None = None

    def compressed(self) -> bytes:
        # Two threads may both compute it; both get the same bytes.
        if self._compressed is None:
            self._compressed = _deflate_segment(self.plain)
        return self._compressed


class _PerScrapeRenders:
    """Renders the per-scrape families, each again only when it differs from the last scrape.

    Between two scrapes most of them do not change (the platform, most counters), and
    prometheus_client spends microseconds per sample on names and escaping.
    """

    def __init__(self) -> None:
        # Called from the event loop and from render threads; held only to swap the dicts.
        self._lock = threading.Lock()
        self._last: dict[ExpositionFormat, dict[str, _RenderedFamily]] = {}

    def render(self, families: Iterable[Metric], format: ExpositionFormat) -> list[_RenderedFamily]:
        with self._lock:
            last = self._last.get(format, {})
        current: dict[str, _RenderedFamily] = {}
        in_order = []
        for family in families:
            rendered = last.get(family.name)
            if rendered is None or not _same_family(rendered.metric, family):
                plain = render([family], format).removesuffix(OPENMETRICS_EOF)
                rendered = _RenderedFamily(family, plain)
            current[family.name] = rendered
            in_order.append(rendered)
        with self._lock:
            self._last[format] = current
        return in_order


@dataclass(frozen=True)
class _FamilyRun:
    """One build family deflated: its header and every chunk's piece, in order."""

    pieces: tuple[bytes, ...]
    data: bytes
    crc: int
    length: int


@dataclass
class _Rendered:
    """One format's body up to the per-scrape families, as of one snapshot."""

    version: int
    builds: _Builds
    plain_pieces: tuple[bytes, ...]
    plain_length: int
    # Each family's pieces, header first.
    family_pieces: tuple[tuple[bytes, ...], ...] = ()
    # The gzip member up to the per-scrape families: its header and the deflated build part,
    # and the CRC-32 of the text they hold.
    compressed_pieces: tuple[bytes, ...] | None = None
    plain_crc: int = 0


class ExpositionCache:
    """Serves ``/metrics`` bodies; build series are rendered again only where they changed.

    Each variant (text or OpenMetrics, plain or gzip) is made on the first request after a
    change, then kept until the next.
    """

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        per_scrape: Callable[[], Iterable[Metric]],
        *,
        max_artifacts_per_build: int = 64,
    ) -> None:
        self._snapshot = snapshot
        self._per_scrape = per_scrape
        self._max_artifacts_per_build = max_artifacts_per_build
        self._lock = threading.Lock()
        self._builds: _Builds | None = None
        self._rendered: dict[ExpositionFormat, _Rendered] = {}
        self._headers = {format: self._render_headers(format) for format in ExpositionFormat}
        self._header_segments: dict[ExpositionFormat, list[bytes]] = {}
        self._family_runs: dict[ExpositionFormat, list[_FamilyRun | None]] = {}
        self._summary: tuple[
            tuple[Mapping[tuple[str, str], FinishedBuilds], tuple[int, ...]] | None,
            dict[ExpositionFormat, bytes],
        ] = (None, {})
        self._per_scrape_renders = _PerScrapeRenders()

    def set_max_artifacts_per_build(self, limit: int) -> None:
        with self._lock:
            if limit != self._max_artifacts_per_build:
                self._max_artifacts_per_build = limit
                self._builds = None
                self._rendered.clear()
                self._family_runs.clear()

    def body(self, format: ExpositionFormat, *, gzip: bool) -> Body:
        """The full exposition; with ``gzip`` a single gzip member."""
        with self._lock:
            rendered = self._refresh(format)
            compressed = self._compressed(format, rendered) if gzip else None
        return self._with_tail(format, rendered, compressed)

    def kept_body(self, format: ExpositionFormat, *, gzip: bool) -> Body | None:
        """The full exposition if the builds' part is kept for the current snapshot, else None.

        Renders only the exporter's own small families, and never waits for a render in
        progress elsewhere, so it is cheap enough to call on the event loop.
        """
        if not self._lock.acquire(blocking=False):
            return None
        try:
            rendered = self._rendered.get(format)
            if rendered is None or rendered.version != self._snapshot().version:
                return None
            compressed = rendered.compressed_pieces if gzip else None
            if gzip and compressed is None:
                return None
        finally:
            self._lock.release()
        return self._with_tail(format, rendered, compressed)

    def placement(self) -> list[tuple[str, ...]]:
        """The build IDs of each chunk as last rendered, in body order."""
        with self._lock:
            builds = self._builds
            return [] if builds is None else [tuple(chunk.records) for chunk in builds.chunks]

    def _with_tail(
        self, format: ExpositionFormat, rendered: _Rendered, compressed: tuple[bytes, ...] | None
    ) -> Body:
        families = self._per_scrape_renders.render(self._per_scrape(), format)
        end = OPENMETRICS_EOF if format is ExpositionFormat.OPENMETRICS else b""
        tail = b"".join([*(family.plain for family in families), end])
        if compressed is None:
            return Body((*rendered.plain_pieces, tail), rendered.plain_length + len(tail))
        trailer = struct.pack(
            "<II",
            zlib.crc32(tail, rendered.plain_crc),
            (rendered.plain_length + len(tail)) & 0xFFFFFFFF,
        )
        last = b"".join(
            [
                *(family.compressed() for family in families),
                _DEFLATED_OPENMETRICS_EOF if end else b"",
                _FINAL_DEFLATE_BLOCK,
                trailer,
            ]
        )
        pieces = (*compressed, last)
        return Body(pieces, sum(len(piece) for piece in pieces))

    def _refresh(self, format: ExpositionFormat) -> _Rendered:
        snapshot = self._snapshot()
        previous = self._rendered.get(format)
        if previous is not None and previous.version == snapshot.version:
            return previous
        builds = self._refresh_builds(snapshot)
        family_pieces = tuple(
            (header, *(chunk.pieces[family] for chunk in builds.chunks if chunk.pieces[family]))
            for family, (header, _) in enumerate(self._headers[format])
        )
        pieces = [piece for family in family_pieces for piece in family]
        pieces.append(self._summary_of(snapshot, format))
        rendered = _Rendered(
            version=snapshot.version,
            builds=builds,
            plain_pieces=tuple(pieces),
            plain_length=sum(len(piece) for piece in pieces),
            family_pieces=family_pieces,
        )
        self._rendered[format] = rendered
        return rendered

    def _refresh_builds(self, snapshot: Snapshot) -> _Builds:
        previous = self._builds
        if previous is not None and previous.version == snapshot.version:
            return previous
        changed = None if previous is None else snapshot.changed_since(previous.version)
        if previous is None or changed is None:
            chunks = self._chunks_of(list(snapshot.records.values()), "")
        else:
            chunks = list(previous.chunks)
            dirty: dict[int, list[str]] = {}
            for build_id in changed:
                index = max(0, bisect.bisect_right(previous.starts, build_id) - 1)
                dirty.setdefault(index, []).append(build_id)
            # From the last chunk back, so replacing one chunk by several or none leaves the
            # indices still to visit where they were.
            for index in sorted(dirty, reverse=True):
                chunk = chunks[index] if chunks else None
                records = dict(chunk.records) if chunk else {}
                members_changed = False
                for build_id in dirty[index]:
                    record = snapshot.records.get(build_id)
                    if record is None:
                        members_changed |= records.pop(build_id, None) is not None
                    else:
                        members_changed |= build_id not in records
                        records[build_id] = record
                if members_changed:
                    records = dict(sorted(records.items()))
                if chunk is None or len(records) > 2 * CHUNK_SIZE:
                    start = chunk.start if chunk else ""
                    replacement = self._chunks_of(list(records.values()), start)
                elif not records:
                    replacement = []
                elif members_changed:
                    replacement = [self._rebuilt(chunk, records)]
                else:
                    replacement = [self._answered_anew(chunk, records, sorted(dirty[index]))]
                chunks[index : index + 1] = replacement
        builds = _Builds(snapshot.version, chunks, [chunk.start for chunk in chunks])
        self._builds = builds
        return builds

    def _chunks_of(self, records: Sequence[BuildRecord], start: str) -> list[_Chunk]:
        """Builds in ID order as chunks; one chunk unless there are more than two chunks' worth."""
        if not records:
            return []
        size = len(records) if len(records) <= 2 * CHUNK_SIZE else CHUNK_SIZE
        chunks = []
        for offset in range(0, len(records), size):
            members = records[offset : offset + size]
            pieces, lengths = _render_run(members, self._max_artifacts_per_build)
            chunks.append(
                _Chunk(
                    start if offset == 0 else members[0].build_id,
                    {record.build_id: record for record in members},
                    pieces,
                    lengths,
                )
            )
        return chunks

    def _answered_anew(
        self, chunk: _Chunk, records: dict[str, BuildRecord], changed: list[str]
    ) -> _Chunk:
        """The chunk with the same builds, some of them answered anew (``changed``, in ID
        order): only those are rendered, and only pieces whose bytes changed are replaced."""
        old = chunk.records
        fresh_ids = [build_id for build_id in changed if old[build_id] is not records[build_id]]
        fresh_pieces, fresh_lengths = _render_run(
            [records[build_id] for build_id in fresh_ids], self._max_artifacts_per_build
        )
        order = list(old)
        positions = [order.index(build_id) for build_id in fresh_ids]
        pieces = []
        lengths = []
        crcs: list[int | None] = []
        for family in range(BUILD_FAMILY_COUNT):
            piece, piece_lengths = chunk.pieces[family], chunk.lengths[family]
            fresh_piece, fresh_family_lengths = fresh_pieces[family], fresh_lengths[family]
            if _reads_as_before(piece, piece_lengths, positions, fresh_piece, fresh_family_lengths):
                # The same object, so its CRC and gzip segment are reused too.
                pieces.append(piece)
                lengths.append(piece_lengths)
                crcs.append(chunk.known_crc(family))
            else:
                new_piece, new_lengths = _replaced(
                    piece, piece_lengths, positions, fresh_piece, fresh_family_lengths
                )
                pieces.append(new_piece)
                lengths.append(new_lengths)
                crcs.append(None)
        return _Chunk(chunk.start, records, tuple(pieces), tuple(lengths), chunk.compressed, crcs)

    def _rebuilt(self, chunk: _Chunk, records: dict[str, BuildRecord]) -> _Chunk:
        """The chunk holding ``records`` after builds came or went: new and changed builds
        rendered, the others' lines copied from the old pieces."""
        old = chunk.records
        positions = {build_id: index for index, build_id in enumerate(old)}
        fresh = [record for record in records.values() if old.get(record.build_id) is not record]
        fresh_pieces, fresh_lengths = _render_run(fresh, self._max_artifacts_per_build)
        # Runs of consecutive builds from one source: (from the old pieces?, first, end).
        runs: list[list[int]] = []
        fresh_index = 0
        for record in records.values():
            if old.get(record.build_id) is record:
                source, index = 1, positions[record.build_id]
            else:
                source, index = 0, fresh_index
                fresh_index += 1
            if runs and runs[-1][0] == source and runs[-1][2] == index:
                runs[-1][2] = index + 1
            else:
                runs.append([source, index, index + 1])
        pieces = []
        lengths = []
        for family in range(BUILD_FAMILY_COUNT):
            sources = (
                (fresh_pieces[family], fresh_lengths[family]),
                (chunk.pieces[family], chunk.lengths[family]),
            )
            parts = []
            family_lengths = array("I")
            for source, first, end in runs:
                piece, piece_lengths = sources[source]
                base = sum(piece_lengths[:first])
                run_lengths = piece_lengths[first:end]
                parts.append(piece[base : base + sum(run_lengths)])
                family_lengths.extend(run_lengths)
            pieces.append(b"".join(parts))
            lengths.append(family_lengths)
        return _Chunk(chunk.start, records, tuple(pieces), tuple(lengths))

    def _summary_of(self, snapshot: Snapshot, format: ExpositionFormat) -> bytes:
        # Rendered again only when a build finished or a count by state moved: with many
        # images, the finished-duration histograms are most of the families' samples.
        key, by_format = self._summary
        current = (snapshot.finished, tuple(snapshot.states.values()))
        if key is None or key[0] is not current[0] or key[1] != current[1]:
            by_format = {}
            self._summary = (current, by_format)
        if format not in by_format:
            by_format[format] = render(summary_families(snapshot), format).removesuffix(
                OPENMETRICS_EOF
            )
        return by_format[format]

    @staticmethod
    def _render_headers(format: ExpositionFormat) -> tuple[tuple[bytes, int], ...]:
        headers = []
        for family in per_build_families(()):
            header = render([family], format).removesuffix(OPENMETRICS_EOF)
            headers.append((header, zlib.crc32(header)))
        return tuple(headers)

    def _compressed(self, format: ExpositionFormat, rendered: _Rendered) -> tuple[bytes, ...]:
        if rendered.compressed_pieces is None:
            runs = self._family_runs.setdefault(format, [None] * BUILD_FAMILY_COUNT)
            for family, pieces in enumerate(rendered.family_pieces):
                run = runs[family]
                if run is None or not _same_objects(run.pieces, pieces):
                    runs[family] = self._family_run(format, family, rendered.builds, pieces)
            summary = rendered.plain_pieces[-1]
            crc = 0
            parts = [_GZIP_HEADER]
            for run in runs:
                assert run is not None  # made just above
                crc = crc32_combine(crc, run.crc, run.length)
                parts.append(run.data)
            parts.append(_deflate_segment(summary))
            rendered.plain_crc = zlib.crc32(summary, crc)
            rendered.compressed_pieces = tuple(parts)
        return rendered.compressed_pieces

    def _family_run(
        self, format: ExpositionFormat, family: int, builds: _Builds, pieces: tuple[bytes, ...]
    ) -> _FamilyRun:
        header, header_crc = self._headers[format][family]
        if format not in self._header_segments:
            # Deflated on their own, so each family's run depends on its pieces only.
            self._header_segments[format] = [
                _deflate_segment(header) for header, _ in self._headers[format]
            ]
        parts = [self._header_segments[format][family]]
        crc = header_crc
        previous = header
        for chunk in builds.chunks:
            piece = chunk.pieces[family]
            if not piece:
                continue
            kept = chunk.compressed[family]
            if (
                kept is None
                or kept.piece is not piece
                or not _primed_alike(kept.primed_with, previous)
            ):
                data = _deflate_segment(piece, previous[-DICTIONARY_BYTES:])
                kept = chunk.compressed[family] = _Segment(data, piece, previous)
            elif kept.primed_with is not previous:
                # The piece before changed, but not where this segment refers back to.
                kept = chunk.compressed[family] = _Segment(kept.data, piece, previous)
            crc = crc32_combine(crc, chunk.crc(family), len(piece))
            parts.append(kept.data)
            previous = piece
        return _FamilyRun(pieces, b"".join(parts), crc, sum(len(piece) for piece in pieces))


def _reads_as_before(
    piece: bytes,
    lengths: array[int],
    positions: list[int],
    fresh_piece: bytes,
    fresh_lengths: array[int],
) -> bool:
    """Whether the builds at ``positions`` of ``piece``, rendered anew as ``fresh_piece``,
    read exactly as before."""
    if len(positions) == 1:
        # The usual case: one build of the chunk, so the fresh piece is all its lines.
        position = positions[0]
        return lengths[position] == len(fresh_piece) and piece.startswith(
            fresh_piece, sum(lengths[:position])
        )
    fresh_start = 0
    for position, fresh_length in zip(positions, fresh_lengths, strict=True):
        if lengths[position] != fresh_length:
            return False
        fresh_end = fresh_start + fresh_length
        if not piece.startswith(fresh_piece[fresh_start:fresh_end], sum(lengths[:position])):
            return False
        fresh_start = fresh_end
    return True


def _replaced(
    piece: bytes,
    lengths: array[int],
    positions: list[int],
    fresh_piece: bytes,
    fresh_lengths: array[int],
) -> tuple[bytes, array[int]]:
    """``piece`` with the lines of the builds at ``positions`` (ascending) replaced by theirs
    in ``fresh_piece``, and its per-build lengths."""
    parts = []
    new_lengths = array("I", lengths)
    cursor = 0
    fresh_start = 0
    for position, fresh_length in zip(positions, fresh_lengths, strict=True):
        start = sum(lengths[:position])
        parts.append(piece[cursor:start])
        parts.append(fresh_piece[fresh_start : fresh_start + fresh_length])
        cursor = start + lengths[position]
        fresh_start += fresh_length
        new_lengths[position] = fresh_length
    parts.append(piece[cursor:])
    return b"".join(parts), new_lengths


def _same_objects(old: Sequence[object], new: Sequence[object]) -> bool:
    # Pieces are never changed in place, only replaced.
    return len(old) == len(new) and all(a is b for a, b in zip(old, new, strict=True))


def _primed_alike(old: bytes, new: bytes) -> bool:
    return old is new or old[-DICTIONARY_BYTES:] == new[-DICTIONARY_BYTES:]


def _same_family(old: Metric, new: Metric) -> bool:
    return old is new or (
        old.type == new.type
        and old.documentation == new.documentation
        and old.unit == new.unit
        and old.samples == new.samples
    )


def _deflate_segment(data: bytes, dictionary: bytes = b"") -> bytes:
    """Raw deflate of ``data``, byte-aligned and not final, so segments can be joined.

    With a ``dictionary`` (the text just before ``data`` in the body) it may refer back into
    it, as a decoder holds those bytes in its window.
    """
    if dictionary:
        compressor = isal_zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15, zdict=dictionary)
    else:
        compressor = isal_zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


_DEFLATED_OPENMETRICS_EOF = _deflate_segment(OPENMETRICS_EOF)
