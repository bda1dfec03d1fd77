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

import enum
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from prometheus_client import exposition
from prometheus_client.core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector

from exporter.metrics import per_build_families, summary_families
from exporter.store import BuildRecord, Snapshot

OPENMETRICS_EOF = b"# EOF\n"
# Builds per chunk: small enough that one change re-renders little, large enough that the
# pieces stay few and compress well.
CHUNK_SIZE = 64
GZIP_LEVEL = 6
# A gzip member header: deflate, no name, no time, unknown OS (RFC 1952).
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
# The farthest a deflate back-reference reaches: a segment may refer to this much of the
# text before it.
WINDOW_BYTES = 32 * 1024
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


@dataclass(frozen=True)
class Body:
    """A response body as pieces, to be written in order without joining them first."""

    pieces: tuple[bytes, ...]
    length: int

    def join(self) -> bytes:
        return b"".join(self.pieces)


@dataclass(frozen=True)
class _Segment:
    """One piece deflated with the end of the text before it as the dictionary."""

    data: bytes
    # The pieces whose end was the dictionary: the segment is valid only after exactly these.
    primed_with: tuple[bytes, ...]


@dataclass
class _Chunk:
    records: tuple[BuildRecord, ...]
    # One rendered piece per build family, without the family's HELP and TYPE lines.
    plain: tuple[bytes, ...]
    compressed: list[_Segment | None] | None = None


class _Window:
    """The last WINDOW_BYTES of the text so far, as the fewest pieces that hold them."""

    def __init__(self) -> None:
        self._pieces: deque[bytes] = deque()
        self._length = 0

    def pieces(self) -> tuple[bytes, ...]:
        return tuple(self._pieces)

    def dictionary(self) -> bytes:
        needed = WINDOW_BYTES
        parts = []
        for piece in reversed(self._pieces):
            if len(piece) >= needed:
                parts.append(piece[-needed:])
                break
            parts.append(piece)
            needed -= len(piece)
        return b"".join(reversed(parts))

    def add(self, piece: bytes) -> None:
        if not piece:
            return
        self._pieces.append(piece)
        self._length += len(piece)
        while self._length - len(self._pieces[0]) >= WINDOW_BYTES:
            self._length -= len(self._pieces.popleft())


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


@dataclass
class _Rendered:
    """One format's build part, as of one snapshot."""

    version: int
    build_ids: tuple[str, ...]
    headers: tuple[bytes, ...]
    chunks: list[_Chunk]
    summary: bytes
    plain_pieces: tuple[bytes, ...] = ()
    plain_length: int = 0
    plain_crc: int = 0
    # The gzip member up to the per-scrape families: its header and the deflated build part.
    compressed_pieces: tuple[bytes, ...] | None = None


class ExpositionCache:
    """Serves ``/metrics`` bodies; build series are rendered again only where they changed."""

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
        self._rendered: dict[ExpositionFormat, _Rendered] = {}
        self._per_scrape_renders = _PerScrapeRenders()

    def set_max_artifacts_per_build(self, limit: int) -> None:
        with self._lock:
            if limit != self._max_artifacts_per_build:
                self._max_artifacts_per_build = limit
                self._rendered.clear()

    def body(self, format: ExpositionFormat, *, gzip: bool) -> Body:
        """The full exposition; with ``gzip`` a single gzip member."""
        with self._lock:
            rendered = self._refresh(format)
            compressed = self._compressed(rendered) if gzip else None
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
        records = tuple(snapshot.records.values())
        build_ids = tuple(snapshot.records)
        old_chunks = previous.chunks if previous and previous.build_ids == build_ids else []
        chunks = []
        for index, start in enumerate(range(0, len(records), CHUNK_SIZE)):
            members = records[start : start + CHUNK_SIZE]
            old = old_chunks[index] if index < len(old_chunks) else None
            if old is not None and _same_objects(old.records, members):
                chunks.append(old)
            else:
                chunks.append(_Chunk(members, self._render_chunk(members, format)))
        headers = previous.headers if previous else self._render_chunk((), format)
        rendered = _Rendered(
            version=snapshot.version,
            build_ids=build_ids,
            headers=headers,
            chunks=chunks,
            summary=render(summary_families(snapshot), format).removesuffix(OPENMETRICS_EOF),
        )
        pieces = []
        for family, header in enumerate(headers):
            pieces.append(header)
            pieces.extend(chunk.plain[family] for chunk in chunks)
        pieces.append(rendered.summary)
        rendered.plain_pieces = tuple(pieces)
        rendered.plain_length = sum(len(piece) for piece in pieces)
        crc = 0
        for piece in pieces:
            crc = zlib.crc32(piece, crc)
        rendered.plain_crc = crc
        self._rendered[format] = rendered
        return rendered

    def _render_chunk(
        self, records: Sequence[BuildRecord], format: ExpositionFormat
    ) -> tuple[bytes, ...]:
        """Each build family of these builds; with no builds, each family's header lines."""
        families = per_build_families(records, self._max_artifacts_per_build)
        pieces = []
        for family in families:
            text = render([family], format).removesuffix(OPENMETRICS_EOF)
            if records:
                # Drop the HELP and TYPE lines: they stand once, before the first chunk.
                text = text.split(b"\n", 2)[2]
            pieces.append(text)
        return tuple(pieces)

    def _compressed(self, rendered: _Rendered) -> tuple[bytes, ...]:
        if rendered.compressed_pieces is None:
            window = _Window()
            parts = [_GZIP_HEADER]

            def deflated(piece: bytes, kept: _Segment | None) -> _Segment:
                before = window.pieces()
                if kept is None or not _same_objects(kept.primed_with, before):
                    kept = _Segment(_deflate_segment(piece, window.dictionary()), before)
                window.add(piece)
                parts.append(kept.data)
                return kept

            for family, header in enumerate(rendered.headers):
                deflated(header, None)
                for chunk in rendered.chunks:
                    if chunk.compressed is None:
                        chunk.compressed = [None] * len(chunk.plain)
                    chunk.compressed[family] = deflated(
                        chunk.plain[family], chunk.compressed[family]
                    )
            deflated(rendered.summary, None)
            # Joined once per snapshot, not on every scrape: the server writes large parts,
            # and the compressed body is small enough to hold twice.
            rendered.compressed_pieces = (b"".join(parts),)
        return rendered.compressed_pieces


def _same_objects(old: Sequence[object], new: Sequence[object]) -> bool:
    # Records and rendered pieces are never changed in place, only replaced.
    return len(old) == len(new) and all(a is b for a, b in zip(old, new, strict=True))


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
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15, zdict=dictionary)
    else:
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


_DEFLATED_OPENMETRICS_EOF = _deflate_segment(OPENMETRICS_EOF)
