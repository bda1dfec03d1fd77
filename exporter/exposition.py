"""The ``/metrics`` body, kept ready: re-rendered only where builds changed.

Build series change only when an API answer changes, so their exposition is kept between
scrapes, in chunks of consecutive builds. A store change re-renders only the chunks holding a
changed build, in each format asked for since; gzip is kept the same way, as independently
compressed deflate segments joined into one gzip member. Only the exporter's own small
families are rendered on every scrape. The bytes are exactly what prometheus_client writes
for the same families: each chunk is rendered by it, and joined in the same order.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client.core import Metric

from exporter.metrics import (
    OPENMETRICS_EOF,
    ExpositionFormat,
    per_build_families,
    render,
    summary_families,
)
from exporter.store import BuildRecord, Snapshot

# Builds per chunk: small enough that one change re-renders little, large enough that the
# pieces stay few and compress well.
CHUNK_SIZE = 64
GZIP_LEVEL = 6
# A gzip member header: deflate, no name, no time, unknown OS (RFC 1952).
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


@dataclass(frozen=True)
class Body:
    """A response body as pieces, to be written in order without joining them first."""

    pieces: tuple[bytes, ...]
    length: int

    def join(self) -> bytes:
        return b"".join(self.pieces)


@dataclass
class _Chunk:
    records: tuple[BuildRecord, ...]
    # One rendered piece per build family, without the family's HELP and TYPE lines.
    plain: tuple[bytes, ...]
    compressed: tuple[bytes, ...] | None = None


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
        tail = render(self._per_scrape(), format)
        if compressed is None:
            return Body((*rendered.plain_pieces, tail), rendered.plain_length + len(tail))
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15)
        last = compressor.compress(tail) + compressor.flush(zlib.Z_FINISH)
        trailer = struct.pack(
            "<II",
            zlib.crc32(tail, rendered.plain_crc),
            (rendered.plain_length + len(tail)) & 0xFFFFFFFF,
        )
        pieces = (_GZIP_HEADER, *compressed, last, trailer)
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
            if old is not None and _same_records(old.records, members):
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
            headers = [_deflate_segment(header) for header in rendered.headers]
            pieces = []
            for family, header in enumerate(headers):
                pieces.append(header)
                for chunk in rendered.chunks:
                    if chunk.compressed is None:
                        chunk.compressed = tuple(_deflate_segment(part) for part in chunk.plain)
                    pieces.append(chunk.compressed[family])
            pieces.append(_deflate_segment(rendered.summary))
            # Joined once per snapshot, not on every scrape: the server writes large parts,
            # and the compressed body is small enough to hold twice.
            rendered.compressed_pieces = (b"".join(pieces),)
        return rendered.compressed_pieces


def _same_records(old: Sequence[BuildRecord], new: Sequence[BuildRecord]) -> bool:
    # Records are immutable and replaced on every change, so identity is enough.
    return len(old) == len(new) and all(a is b for a, b in zip(old, new, strict=True))


def _deflate_segment(data: bytes) -> bytes:
    """Raw deflate of ``data``, byte-aligned and not final, so segments can be joined."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
