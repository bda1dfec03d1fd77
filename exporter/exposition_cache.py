"""The ``/metrics`` body, kept ready: re-rendered only where builds changed.

Build series change only when an API answer changes, so their lines are kept between
scrapes, in chunks of builds placed by ID range: adding, removing or answering anew a build
touches only its chunk, and within it only the build's own lines (spliced in by each build's
length) and only the families whose bytes changed. Gzip is kept per family, as deflate
segments joined into one gzip member, each primed with the end of the piece before it (as
pigz does); a change recompresses only its own segments and the next ones. Each family's
CRC is ISA-L's over its pieces, the body's combined from the families'. Each variant
(format, plain or gzip) is built on the first request after a change. The exporter's own
small families are collected on every scrape, and each is rendered again only when its
samples differ from the last scrape's.
"""

from __future__ import annotations

import bisect
import struct
import threading
import zlib
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import NamedTuple

from isal import isal_zlib

# ISA-L's CRC-32: the same values as zlib's, many times faster.
from isal.isal_zlib import crc32, crc32_combine
from prometheus_client.core import Metric

from exporter.exposition import (
    BUILD_FAMILY_COUNT,
    OPENMETRICS_EOF,
    ExpositionFormat,
    render,
    render_build_lines,
    render_health_lines,
    render_poll_lines,
    render_tally_lines,
)
from exporter.families import POLL_FAMILIES_START
from exporter.health import HealthKey, ImageHealth
from exporter.metrics import health_families, per_build_families, tally_families, tracked_family
from exporter.store import BuildRecord, FinishedBuilds, Snapshot
from exporter.telemetry import Histogram

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
# Up to this many builds changed since a variant was kept, it is brought up to date on the
# event loop (a millisecond or two); more go to a render thread.
FEW_CHANGED_BUILDS = 64
# A segment is primed with this much of the end of the piece before it: nearly all that
# priming gains (2.08 MB at 10,000 builds, against 2.04 MB with all 32 KiB a back-reference
# may reach and 2.41 MB unprimed), and a change recompresses its own segment and the next
# only if it falls in the next one's dictionary.
DICTIONARY_BYTES = 2 * 1024
# An empty final deflate block: ends a run of byte-aligned segments.
_FINAL_DEFLATE_BLOCK = b"\x03\x00"


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
    # Each build's position in the chunk, once asked for; the same while its builds are.
    known_positions: dict[str, int] | None = None

    def positions(self) -> dict[str, int]:
        if self.known_positions is None:
            self.known_positions = {build_id: index for index, build_id in enumerate(self.records)}
        return self.known_positions


@dataclass(frozen=True)
class _Builds:
    """The build part of the body as of one snapshot, chunk by chunk."""

    version: int
    chunks: list[_Chunk]
    starts: list[str]
    # Per family, the chunks' non-empty pieces in order, and their length in bytes: the same
    # objects as in the snapshot before for every family no change touched.
    families: tuple[tuple[bytes, ...], ...]
    family_lengths: tuple[int, ...]


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
    """One build family deflated: its header, then every chunk's piece in order."""

    # The chunks' pieces it holds (the header aside): the run is valid for exactly these.
    pieces: tuple[bytes, ...]
    # The header's deflate segment, then each piece's.
    parts: tuple[bytes, ...]
    crc: int
    length: int


@dataclass
class _Rendered:
    """One format's body up to the per-scrape families, as of one snapshot."""

    version: int
    builds: _Builds
    headers: tuple[bytes, ...]
    summary: bytes
    plain_length: int
    # The gzip member up to the per-scrape families: its header and the deflated build part,
    # and the CRC-32 of the text they hold.
    compressed_pieces: tuple[bytes, ...] | None = None
    plain_crc: int = 0
    # The plain body's pieces, once a plain answer needed them.
    known_plain_pieces: tuple[bytes, ...] | None = None

    def plain_pieces(self) -> tuple[bytes, ...]:
        if self.known_plain_pieces is None:
            in_order = chain.from_iterable(
                ((header,), family)
                for header, family in zip(self.headers, self.builds.families, strict=True)
            )
            self.known_plain_pieces = (*chain.from_iterable(in_order), self.summary)
        return self.known_plain_pieces


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
        self._header_length = {
            format: sum(len(header) for header, _ in headers)
            for format, headers in self._headers.items()
        }
        self._header_segments: dict[ExpositionFormat, list[bytes]] = {}
        self._family_runs: dict[ExpositionFormat, list[_FamilyRun | None]] = {}
        self._answer_blocks: dict[ExpositionFormat, tuple[tuple[_FamilyRun, ...], bytes]] = {}
        self._summary_segment: tuple[bytes | None, bytes] = (None, b"")
        self._summary: tuple[
            tuple[_TallySource, Mapping[HealthKey, ImageHealth], tuple[int, ...]] | None,
            dict[ExpositionFormat, bytes],
        ] = (None, {})
        # The tally families' bytes, for the tallies and images they were rendered from: with
        # many images they are most of the summary's samples, and change less often than the
        # counts by state.
        self._tallies: tuple[_TallySource | None, dict[ExpositionFormat, bytes]] = (None, {})
        # The health families' sample lines, for the health mapping they were written from.
        self._health_lines: tuple[Mapping[HealthKey, ImageHealth] | None, list[bytes]] = (
            None,
            [],
        )
        self._health_headers = {
            format: [
                render([family], format).removesuffix(OPENMETRICS_EOF)
                for family in health_families({})
            ]
            for format in ExpositionFormat
        }
        self._tally_headers = {
            format: [
                render([family], format).removesuffix(OPENMETRICS_EOF)
                for family in tally_families(Snapshot(0, {}, {}))
            ]
            for format in ExpositionFormat
        }
        self._per_scrape_renders = _PerScrapeRenders()

    def set_max_artifacts_per_build(self, limit: int) -> None:
        with self._lock:
            if limit != self._max_artifacts_per_build:
                self._max_artifacts_per_build = limit
                self._builds = None
                self._rendered.clear()
                self._family_runs.clear()
                self._answer_blocks.clear()

    def body(self, format: ExpositionFormat, *, gzip: bool) -> Body:
        """The full exposition; with ``gzip`` a single gzip member."""
        with self._lock:
            rendered = self._refresh(format, self._snapshot())
            compressed = self._compressed(format, rendered) if gzip else None
        return self._with_tail(format, rendered, compressed)

    def kept_body(self, format: ExpositionFormat, *, gzip: bool) -> Body | None:
        """The full exposition if this variant is kept and at most a few builds changed since,
        else None.

        Renders only the exporter's own small families and those few builds, and never waits
        for a render in progress elsewhere, so it is cheap enough to call on the event loop.
        """
        if not self._lock.acquire(blocking=False):
            return None
        try:
            rendered = self._rendered.get(format)
            if rendered is None:
                return None
            had_gzip = rendered.compressed_pieces is not None
            snapshot = self._snapshot()
            if rendered.version != snapshot.version:
                changed = snapshot.changed_since(rendered.version)
                if changed is None or len(changed) > FEW_CHANGED_BUILDS:
                    return None
                # Brought up to date here: faster than the hop to a render thread.
                rendered = self._refresh(format, snapshot)
            compressed = None
            if gzip:
                if rendered.compressed_pieces is None and not had_gzip:
                    return None
                compressed = self._compressed(format, rendered)
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
            return Body((*rendered.plain_pieces(), tail), rendered.plain_length + len(tail))
        trailer = struct.pack(
            "<II",
            crc32(tail, rendered.plain_crc),
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

    def _refresh(self, format: ExpositionFormat, snapshot: Snapshot) -> _Rendered:
        previous = self._rendered.get(format)
        if previous is not None and previous.version == snapshot.version:
            return previous
        builds = self._refresh_builds(snapshot)
        summary = self._summary_of(snapshot, format)
        rendered = _Rendered(
            version=snapshot.version,
            builds=builds,
            headers=tuple(header for header, _ in self._headers[format]),
            summary=summary,
            plain_length=self._header_length[format] + sum(builds.family_lengths) + len(summary),
        )
        self._rendered[format] = rendered
        # A variant of the other format made from older chunks would hold their bytes until
        # asked for again: it is dropped, and made from the current chunks when it is.
        for stale in [other for other, kept in self._rendered.items() if kept.builds is not builds]:
            del self._rendered[stale]
            self._family_runs.pop(stale, None)
            self._answer_blocks.pop(stale, None)
        return rendered

    def _refresh_builds(self, snapshot: Snapshot) -> _Builds:
        previous = self._builds
        if previous is not None and previous.version == snapshot.version:
            return previous
        changed = None if previous is None else snapshot.changed_since(previous.version)
        # Families whose pieces some change replaced; None when chunks came or went.
        touched: set[int] | None = set()
        if previous is None or changed is None:
            chunks = self._chunks_of(list(snapshot.records.values()), "")
            touched = None
        else:
            chunks = list(previous.chunks)
            dirty: dict[int, list[str]] = {}
            for build_id in changed:
                index = max(0, bisect.bisect_right(previous.starts, build_id) - 1)
                dirty.setdefault(index, []).append(build_id)
            replacements = self._replacements(chunks, dirty, snapshot)
            # From the last chunk back, so replacing one chunk by several or none leaves the
            # indices still to visit where they were.
            for index in sorted(dirty, reverse=True):
                chunk = chunks[index] if chunks else None
                replacement = replacements[index]
                if chunk is None or len(replacement) != 1:
                    touched = None
                elif touched is not None:
                    touched.update(
                        family
                        for family, (new, old) in enumerate(
                            zip(replacement[0].pieces, chunk.pieces, strict=True)
                        )
                        if new is not old
                    )
                chunks[index : index + 1] = replacement
        families = []
        family_lengths = []
        for family in range(BUILD_FAMILY_COUNT):
            if previous is not None and touched is not None and family not in touched:
                families.append(previous.families[family])
                family_lengths.append(previous.family_lengths[family])
            else:
                pieces = tuple(chunk.pieces[family] for chunk in chunks if chunk.pieces[family])
                families.append(pieces)
                family_lengths.append(sum(map(len, pieces)))
        builds = _Builds(
            snapshot.version,
            chunks,
            [chunk.start for chunk in chunks],
            tuple(families),
            tuple(family_lengths),
        )
        self._builds = builds
        return builds

    def _replacements(
        self, chunks: list[_Chunk], dirty: dict[int, list[str]], snapshot: Snapshot
    ) -> dict[int, list[_Chunk]]:
        """What replaces each chunk (by index) once these of its builds changed: itself
        updated, split in two past two chunks' worth, or nothing once empty.

        The usual changes, builds polled or answered anew, are rendered in one go for every
        chunk: a render of one build costs nearly as much as one of a few.
        """
        replacements: dict[int, list[_Chunk]] = {}
        polled: list[_Update] = []
        answered: list[_Update] = []
        for index, build_ids in dirty.items():
            chunk = chunks[index] if chunks else None
            if chunk is not None:
                fresh = _polled_again(chunk, build_ids, snapshot.records)
                if fresh is not None:
                    if fresh:
                        records = dict(chunk.records)
                        records.update((record.build_id, record) for record in fresh)
                        polled.append(_Update(index, chunk, records, fresh))
                    else:
                        replacements[index] = [chunk]
                    continue
            records = dict(chunk.records) if chunk else {}
            members_changed = False
            for build_id in build_ids:
                record = snapshot.records.get(build_id)
                if record is None:
                    members_changed |= records.pop(build_id, None) is not None
                else:
                    members_changed |= build_id not in records
                    records[build_id] = record
            if members_changed:
                records = dict(sorted(records.items()))
            if chunk is None or len(records) > 2 * CHUNK_SIZE:
                replacements[index] = self._chunks_of(
                    list(records.values()), chunk.start if chunk else ""
                )
            elif not records:
                replacements[index] = []
            elif members_changed:
                replacements[index] = [self._rebuilt(chunk, records)]
            else:
                old = chunk.records
                fresh = [
                    records[build_id]
                    for build_id in sorted(build_ids)
                    if old[build_id] is not records[build_id]
                ]
                answered.append(_Update(index, chunk, records, fresh))
        if polled:
            # Only the poll families can read differently; the others are kept whole.
            poll_lines = render_poll_lines([record for update in polled for record in update.fresh])
            self._apply(polled, poll_lines, POLL_FAMILIES_START, replacements)
        if answered:
            lines = render_build_lines(
                [record for update in answered for record in update.fresh],
                self._max_artifacts_per_build,
            )
            per_build = [_split(piece, lengths) for piece, lengths in zip(*lines, strict=True)]
            self._apply(answered, per_build, 0, replacements)
        return replacements

    def _apply(
        self,
        updates: list[_Update],
        lines: Sequence[Sequence[bytes]],
        first: int,
        replacements: dict[int, list[_Chunk]],
    ) -> None:
        """Each update's chunk with its builds' new ``lines`` (per family from ``first`` on,
        each build's, the updates' builds one after another)."""
        start = 0
        for update in updates:
            end = start + len(update.fresh)
            positions = update.chunk.positions()
            replacements[update.chunk_index] = [
                self._with_lines(
                    update.chunk,
                    update.records,
                    [positions[record.build_id] for record in update.fresh],
                    [family[start:end] for family in lines],
                    first,
                )
            ]
            start = end

    def _chunks_of(self, records: Sequence[BuildRecord], start: str) -> list[_Chunk]:
        """Builds in ID order as chunks; one chunk unless there are more than two chunks' worth."""
        if not records:
            return []
        size = len(records) if len(records) <= 2 * CHUNK_SIZE else CHUNK_SIZE
        chunks = []
        for offset in range(0, len(records), size):
            members = records[offset : offset + size]
            pieces, lengths = render_build_lines(members, self._max_artifacts_per_build)
            chunks.append(
                _Chunk(
                    start if offset == 0 else members[0].build_id,
                    {record.build_id: record for record in members},
                    pieces,
                    lengths,
                )
            )
        return chunks

    @staticmethod
    def _with_lines(
        chunk: _Chunk,
        records: dict[str, BuildRecord],
        positions: list[int],
        fresh: Sequence[Sequence[bytes]],
        first: int,
    ) -> _Chunk:
        """The chunk with the same builds, those at ``positions`` (ascending) rendered anew as
        ``fresh`` (per family from ``first`` on, each build's lines): a piece whose bytes did
        not change stays the same object, with its gzip segment."""
        pieces = list(chunk.pieces[:first])
        lengths = list(chunk.lengths[:first])
        for family in range(first, BUILD_FAMILY_COUNT):
            piece, piece_lengths = chunk.pieces[family], chunk.lengths[family]
            fresh_lines = fresh[family - first]
            if _reads_as_before(piece, piece_lengths, positions, fresh_lines):
                pieces.append(piece)
                lengths.append(piece_lengths)
            else:
                new_piece, new_lengths = _replaced(piece, piece_lengths, positions, fresh_lines)
                pieces.append(new_piece)
                lengths.append(new_lengths)
        return _Chunk(
            chunk.start,
            records,
            tuple(pieces),
            tuple(lengths),
            chunk.compressed,
            chunk.known_positions,
        )

    def _rebuilt(self, chunk: _Chunk, records: dict[str, BuildRecord]) -> _Chunk:
        """The chunk holding ``records`` after builds came or went: new and changed builds
        rendered, the others' lines copied from the old pieces."""
        old = chunk.records
        positions = {build_id: index for index, build_id in enumerate(old)}
        fresh = [record for record in records.values() if old.get(record.build_id) is not record]
        fresh_pieces, fresh_lengths = render_build_lines(fresh, self._max_artifacts_per_build)
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
        # Rendered again only when a build finished or started, an image came or went, or a
        # count by state moved.
        key, by_format = self._summary
        tallies = _TallySource(snapshot.finished, snapshot.queued, snapshot.images)
        states = tuple(snapshot.states.values())
        if (
            key is None
            or not key[0].same_as(tallies)
            or key[1] is not snapshot.health
            or key[2] != states
        ):
            by_format = {}
            self._summary = ((tallies, snapshot.health, states), by_format)
        if format not in by_format:
            # Thousands of images make the health families too many samples for
            # prometheus_client on each change: their lines are written directly.
            kept_health, lines = self._health_lines
            if kept_health is not snapshot.health:
                lines = render_health_lines(snapshot.health)
                self._health_lines = (snapshot.health, lines)
            health = chain.from_iterable(zip(self._health_headers[format], lines, strict=True))
            by_format[format] = b"".join(
                [
                    self._tallies_of(tallies, snapshot, format),
                    render([tracked_family(snapshot)], format).removesuffix(OPENMETRICS_EOF),
                    *health,
                ]
            )
        return by_format[format]

    def _tallies_of(
        self, tallies: _TallySource, snapshot: Snapshot, format: ExpositionFormat
    ) -> bytes:
        key, by_format = self._tallies
        if key is None or not key.same_as(tallies):
            by_format = {}
            self._tallies = (tallies, by_format)
        if format not in by_format:
            # Thousands of images make the tally families hundreds of thousands of samples,
            # too many for prometheus_client on each finish: their lines are written directly.
            lines = render_tally_lines(snapshot, format)
            by_format[format] = b"".join(
                chain.from_iterable(zip(self._tally_headers[format], lines, strict=True))
            )
        return by_format[format]

    @staticmethod
    def _render_headers(format: ExpositionFormat) -> tuple[tuple[bytes, int], ...]:
        headers = []
        for family in per_build_families(()):
            header = render([family], format).removesuffix(OPENMETRICS_EOF)
            headers.append((header, crc32(header)))
        return tuple(headers)

    def _compressed(self, format: ExpositionFormat, rendered: _Rendered) -> tuple[bytes, ...]:
        if rendered.compressed_pieces is None:
            runs = self._family_runs.setdefault(format, [None] * BUILD_FAMILY_COUNT)
            for family, pieces in enumerate(rendered.builds.families):
                run = runs[family]
                if run is None or (
                    run.pieces is not pieces and not _same_objects(run.pieces, pieces)
                ):
                    runs[family] = self._family_run(format, family, rendered.builds, pieces, run)
            made = [run for run in runs if run is not None]
            crc = 0
            for run in made:
                crc = crc32_combine(crc, run.crc, run.length)
            summary = rendered.summary
            rendered.plain_crc = crc32(summary, crc)
            # Two blocks, each joined once per snapshot that changed it, so a scrape writes
            # large pieces, sliced: the answer families, which change only with answers, and
            # the poll families, which change with nearly every poll.
            answers = tuple(made[:POLL_FAMILIES_START])
            kept = self._answer_blocks.get(format)
            if kept is None or not _same_objects(kept[0], answers):
                block = b"".join([_GZIP_HEADER, *chain.from_iterable(run.parts for run in answers)])
                kept = self._answer_blocks[format] = (answers, block)
            polls = chain.from_iterable(run.parts for run in made[POLL_FAMILIES_START:])
            rendered.compressed_pieces = (kept[1], b"".join([*polls, self._deflated(summary)]))
        return rendered.compressed_pieces

    def _deflated(self, summary: bytes) -> bytes:
        # The summary families' bytes are the same object until they change.
        kept_summary, deflated = self._summary_segment
        if kept_summary is not summary:
            deflated = _deflate_segment(summary)
            self._summary_segment = (summary, deflated)
        return deflated

    def _family_run(
        self,
        format: ExpositionFormat,
        family: int,
        builds: _Builds,
        pieces: tuple[bytes, ...],
        before: _FamilyRun | None,
    ) -> _FamilyRun:
        header, header_crc = self._headers[format][family]
        if format not in self._header_segments:
            # Deflated on their own, so each family's run depends on its pieces only.
            self._header_segments[format] = [
                _deflate_segment(header) for header, _ in self._headers[format]
            ]
        chunks = [chunk for chunk in builds.chunks if chunk.pieces[family]]
        if before is not None and len(before.pieces) == len(pieces):
            segments = self._updated_segments(family, header, chunks, before, pieces)
        else:
            segments = self._chunk_segments(family, header, chunks)
        crc = header_crc
        for piece in pieces:
            crc = crc32(piece, crc)
        return _FamilyRun(
            pieces,
            (self._header_segments[format][family], *segments),
            crc,
            len(header) + sum(map(len, pieces)),
        )

    @staticmethod
    def _updated_segments(
        family: int,
        header: bytes,
        chunks: list[_Chunk],
        before: _FamilyRun,
        pieces: tuple[bytes, ...],
    ) -> tuple[bytes, ...]:
        """The segments of ``before`` with those of changed pieces made anew, when no chunk
        came or went: a change then costs its own segments, not a pass over every chunk."""
        segments = list(before.parts[1:])
        last = len(pieces) - 1
        for index, (old, piece) in enumerate(zip(before.pieces, pieces, strict=True)):
            if old is piece:
                continue
            previous = pieces[index - 1] if index else header
            segments[index] = _segment_of(chunks[index], family, piece, previous).data
            following = index + 1
            if (
                following <= last
                and pieces[following] is before.pieces[following]
                and not _primed_alike(old, piece)
            ):
                segment = _segment_of(chunks[following], family, pieces[following], piece)
                segments[following] = segment.data
        return tuple(segments)

    @staticmethod
    def _chunk_segments(family: int, header: bytes, chunks: list[_Chunk]) -> tuple[bytes, ...]:
        """Every chunk's segment, taken from the chunk where it still holds."""
        segments = []
        previous = header
        for chunk in chunks:
            piece = chunk.pieces[family]
            kept = chunk.compressed[family]
            if kept is None or kept.piece is not piece:
                kept = _segment_of(chunk, family, piece, previous)
            elif kept.primed_with is not previous:
                if _primed_alike(kept.primed_with, previous):
                    # The piece before changed, but not where this segment refers back to.
                    kept = chunk.compressed[family] = _Segment(kept.data, piece, previous)
                else:
                    kept = _segment_of(chunk, family, piece, previous)
            segments.append(kept.data)
            previous = piece
        return tuple(segments)


class _TallySource(NamedTuple):
    """What the tally families are rendered from; each the same object until it changes."""

    finished: Mapping[tuple[str, str], FinishedBuilds]
    queued: Mapping[str, Histogram]
    images: frozenset[str]

    def same_as(self, other: _TallySource) -> bool:
        return (
            self.finished is other.finished
            and self.queued is other.queued
            and self.images is other.images
        )


class _Update(NamedTuple):
    """A chunk whose builds are the same, some of them (``fresh``, in ID order) changed."""

    chunk_index: int
    chunk: _Chunk
    records: dict[str, BuildRecord]
    fresh: list[BuildRecord]


def _polled_again(
    chunk: _Chunk, build_ids: list[str], current: Mapping[str, BuildRecord]
) -> list[BuildRecord] | None:
    """The records, in ID order, of these builds of ``chunk`` polled again, if each brought the
    same answer (the same object, as the store keeps it); else None.

    The usual change, so kept lean: only the poll families can read differently.
    """
    old = chunk.records
    fresh = []
    for build_id in sorted(build_ids):
        record = current.get(build_id)
        before = old.get(build_id)
        if (
            record is None
            or before is None
            or record.build is not before.build
            or record.retired != before.retired
        ):
            return None
        if record is not before:
            fresh.append(record)
    return fresh


def _segment_of(chunk: _Chunk, family: int, piece: bytes, previous: bytes) -> _Segment:
    """``piece`` of ``chunk`` deflated after ``previous``, and kept in the chunk."""
    segment = _Segment(_deflate_segment(piece, previous[-DICTIONARY_BYTES:]), piece, previous)
    chunk.compressed[family] = segment
    return segment


def _split(piece: bytes, lengths: array[int]) -> list[bytes]:
    """Each build's lines of ``piece``."""
    parts = []
    start = 0
    for length in lengths:
        parts.append(piece[start : start + length])
        start += length
    return parts


def _reads_as_before(
    piece: bytes, lengths: array[int], positions: list[int], fresh: Sequence[bytes]
) -> bool:
    """Whether the builds at ``positions`` of ``piece`` read exactly as ``fresh``, their lines
    rendered anew."""
    for position, lines in zip(positions, fresh, strict=True):
        if lengths[position] != len(lines) or not piece.startswith(lines, sum(lengths[:position])):
            return False
    return True


def _replaced(
    piece: bytes, lengths: array[int], positions: list[int], fresh: Sequence[bytes]
) -> tuple[bytes, array[int]]:
    """``piece`` with the lines of the builds at ``positions`` (ascending) replaced by
    ``fresh``, and its per-build lengths."""
    parts = []
    new_lengths = array("I", lengths)
    cursor = 0
    for position, lines in zip(positions, fresh, strict=True):
        start = sum(lengths[:position])
        parts.append(piece[cursor:start])
        parts.append(lines)
        cursor = start + lengths[position]
        new_lengths[position] = len(lines)
    parts.append(piece[cursor:])
    return b"".join(parts), new_lengths


def _same_objects(old: Sequence[object], new: Sequence[object]) -> bool:
    # Pieces are never changed in place, only replaced.
    return len(old) == len(new) and all(a is b for a, b in zip(old, new, strict=True))


def _primed_alike(old: bytes, new: bytes) -> bool:
    return old[-DICTIONARY_BYTES:] == new[-DICTIONARY_BYTES:]


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
