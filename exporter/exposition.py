"""Exposition bytes: the two formats, which one a scraper asked for, and rendering.

prometheus_client renders the exporter's own families and is the reference for every byte;
the build families, most of the body, are written directly (``render_build_lines``) to the
same bytes at a fraction of the cost. ``exporter.exposition_cache`` keeps them between
scrapes.
"""

from __future__ import annotations

import enum
from array import array
from collections.abc import Iterable
from typing import NamedTuple, cast

from prometheus_client import exposition
from prometheus_client.core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from exporter.metrics import (
    artifact_counts,
    per_build_families,
    shown_artifacts,
)
from exporter.models import BUILD_STATUSES, UNKNOWN, Build
from exporter.store import BuildRecord

OPENMETRICS_EOF = b"# EOF\n"


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


# What each build family's sample lines begin with, in family order.
_PREFIXES = tuple(
    (family.name + "_info" if family.type == "info" else family.name) + "{"
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
    _BUILD_ERROR,
    _LAST_POLL_SUCCESS,
    _LAST_POLL_SUCCESS_TIMESTAMP,
    _LAST_POLL_ERROR,
) = _PREFIXES
BUILD_FAMILY_COUNT = len(_PREFIXES)
# The families before this index are about a build's answer; the rest about its polls.
POLL_FAMILIES_START = _PREFIXES.index(_LAST_POLL_SUCCESS)
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


class BuildLines(NamedTuple):
    """Each build family's lines for a run of builds, and each build's share of them."""

    # One piece per build family, in family order, without HELP and TYPE lines.
    pieces: tuple[bytes, ...]
    # Per family, the length in bytes of each build's lines, in the builds' order.
    lengths: tuple[array[int], ...]


class _BuildLines:
    """The sample lines of every build family for a run of builds, family by family: each
    build adds exactly one string (maybe empty) to each family, so string ``i`` of every
    family is build ``i``'s."""

    def __init__(self, max_artifacts_per_build: int) -> None:
        self._max_artifacts_per_build = max_artifacts_per_build
        self.lines: list[list[str]] = [[] for _ in range(BUILD_FAMILY_COUNT)]

    def add(self, record: BuildRecord, *, polls_only: bool = False) -> None:
        """Add one build's lines; with ``polls_only``, those of its answer are left empty."""
        lines = self.lines
        # As in exporter.metrics: a retired build has no series of its own.
        if record.retired:
            for family in lines:
                family.append("")
            return
        if record.build is None or polls_only:
            for family in lines[:POLL_FAMILIES_START]:
                family.append("")
        else:
            self._add_build(record.build)
        for family, line in zip(lines[POLL_FAMILIES_START:], _poll_lines(record), strict=True):
            family.append(line)

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
        started, completed = build.started_at, build.completed_at
        queued, duration = build.queued_seconds, build.duration_seconds
        closed = f"{labels}}}"
        lines[3].append("" if started is None else f"{_STARTED}{closed}{_value(started)}")
        lines[4].append("" if completed is None else f"{_COMPLETED}{closed}{_value(completed)}")
        lines[5].append("" if queued is None else f"{_QUEUED}{closed}{_value(queued)}")
        lines[6].append("" if duration is None else f"{_DURATION}{closed}{_value(duration)}")
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
        build_error = build.error_message
        lines[12].append(
            f'{_BUILD_ERROR}{build_id},error_message="{_escape(build_error)}",{image}}}{_ONE}'
            if build_error
            else ""
        )

    def pieces(self) -> BuildLines:
        """Each family's bytes, and the length in bytes of each build's lines in it."""
        pieces = []
        lengths = []
        builds = len(self.lines[0])
        for strings in self.lines:
            if not any(strings):
                pieces.append(b"")
                lengths.append(array("I", [0]) * builds)
                continue
            text = "".join(strings)
            data = text.encode()
            pieces.append(data)
            if len(data) == len(text):
                lengths.append(array("I", map(len, strings)))
            else:
                lengths.append(array("I", [len(string.encode()) for string in strings]))
        return BuildLines(tuple(pieces), tuple(lengths))


def _poll_lines(record: BuildRecord) -> tuple[str, str, str]:
    # The poll families' lines of a build that is not retired, in family order.
    build_id = _escape(record.build_id)
    ok = _ONE if record.last_poll_ok else _ZERO
    success = record.last_success_time
    error = record.last_error
    return (
        f'{_LAST_POLL_SUCCESS}build_id="{build_id}"}}{ok}',
        ""
        if success is None
        else f'{_LAST_POLL_SUCCESS_TIMESTAMP}build_id="{build_id}"}}{_value(success)}',
        ""
        if error is None
        else f'{_LAST_POLL_ERROR}build_id="{build_id}",reason="{_escape(error.value)}"}}{_ONE}',
    )


def render_poll_lines(record: BuildRecord) -> tuple[bytes, ...]:
    """One build's lines in each poll family (from POLL_FAMILIES_START on), as
    ``render_build_lines`` writes them."""
    if record.retired:
        return (b"",) * (BUILD_FAMILY_COUNT - POLL_FAMILIES_START)
    return tuple(line.encode() for line in _poll_lines(record))


def render_build_lines(
    records: Iterable[BuildRecord], max_artifacts_per_build: int = 64, *, polls_only: bool = False
) -> BuildLines:
    """Each build family's sample lines for these builds, without HELP and TYPE lines; with
    ``polls_only``, the families before POLL_FAMILIES_START are left empty.

    Byte for byte what prometheus_client writes for the same families, in either format:
    ``primeintellect_image_build_info{build_id="b1",image_name="app",image_tag="v1"} 1.0``
    """
    lines = _BuildLines(max_artifacts_per_build)
    for record in records:
        lines.add(record, polls_only=polls_only)
    return lines.pieces()
