"""Exposition bytes: the two formats, which one a scraper asked for, and rendering.

prometheus_client renders the exporter's own families and is the reference for every byte;
the build families, most of the body, are written directly (``render_build_lines``) to the
same bytes at a fraction of the cost. ``exporter.exposition_cache`` keeps them between
scrapes.
"""

from __future__ import annotations

import bisect
import enum
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from typing import Any, Generic, NamedTuple, cast

from prometheus_client import exposition
from prometheus_client.core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from exporter.families import (
    ANSWER,
    ARTIFACT,
    BUILD_FAMILIES,
    POLL,
    POLL_FAMILIES_START,
    SHOWN,
    BuildFamily,
    Counts,
    Labelled,
    One,
    OneHot,
    S,
    Scope,
    ShownArtifacts,
    Value,
    shown_artifacts,
)
from exporter.models import Artifact, Build
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
# declarations (exporter.families), label order (sorted, as prometheus_client sorts them),
# escaping and value formatting; tests compare the two on random and hostile builds in both
# formats. Their sample lines read the same in both formats (gauges and infos only), so one
# rendering serves both; only the HELP and TYPE lines differ, and those come from
# prometheus_client.

BUILD_FAMILY_COUNT = len(BUILD_FAMILIES)
_ONE = " 1.0\n"
_ZERO = " 0.0\n"
# Counts are small whole numbers; their formatted values are made once.
_COUNTS = tuple(f" {floatToGoString(float(count))}\n" for count in range(256))  # type: ignore[no-untyped-call]


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
    if value == 1.0:
        return _ONE
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


# -- labels --
#
# A line's labels are its scope's (the build's, the artifact's) and its family's own, sorted by
# name. A subject's scope labels are escaped and written once, as one text; wherever one of the
# scope's families puts a label of its own among them, that text is also kept cut in two
# there, so that every line is still written by one f-string.


@dataclass(frozen=True)
class _ScopeText:
    """How a scope's label values become each subject's label text."""

    # The scope's labels, sorted by name.
    names: tuple[str, ...]
    # From the values in the scope's declared order to those in name order; None if the same.
    sort: Callable[[tuple[str, ...]], tuple[str, ...]] | None
    # Where the scope's families put labels of their own, inside its labels: positions in
    # ``names``, neither first nor last.
    inner_cuts: tuple[int, ...]
    # A %-template of the text over the sorted values, with a newline after the comma at each
    # inner cut (escaped values hold none), so that one format writes the text and its cuts.
    template: str

    @classmethod
    def of(cls, declared: tuple[str, ...]) -> _ScopeText:
        """The text of scopes named by ``declared`` labels (in their declared order)."""
        order = sorted(range(len(declared)), key=declared.__getitem__)
        names = tuple(declared[index] for index in order)
        inner_cuts = {
            cut
            for family in BUILD_FAMILIES
            if family.scope.all_labels == declared
            for label in family.extra_labels
            if 0 < (cut := bisect.bisect(names, label)) < len(names)
        }
        template = "".join(
            ("" if index == 0 else ",\n" if index in inner_cuts else ",") + f'{name}="%s"'
            for index, name in enumerate(names)
        )
        sort = None if order == sorted(order) else itemgetter(*order)
        return cls(names, sort, tuple(sorted(inner_cuts)), template)

    def text(self, values: tuple[str, ...]) -> str:
        """The label text, with its inner cuts, of a subject with these values (in the scope's
        declared order)."""
        # One scan of the joined values finds the common case: nothing to escape.
        joined = "".join(values)
        if "\\" in joined or "\n" in joined or '"' in joined:
            values = tuple(map(_escape, values))
        return self.template % (values if self.sort is None else self.sort(values))


# Scopes named by the same labels (a build's answer, the artifacts it shows) share one text.
_TEXTS_BY_LABELS = {
    scope.all_labels: _ScopeText.of(scope.all_labels) for scope in (ANSWER, SHOWN, ARTIFACT, POLL)
}
_TEXTS: dict[Scope[Any], _ScopeText] = {
    scope: _TEXTS_BY_LABELS[scope.all_labels] for scope in (ANSWER, SHOWN, ARTIFACT, POLL)
}


@dataclass(frozen=True)
class _Rows(Generic[S]):
    """A scope's subjects in a run of builds, each with its label text, or None where a build
    has none. With ``ends``, a build may have several: build ``i``'s end before ``ends[i]``."""

    subjects: list[S | None]
    # The label text with its inner cuts, and without (the same list where it has none).
    cut_texts: list[str]
    texts: list[str]
    ends: list[int] | None = None

    @classmethod
    def of(
        cls,
        scope: _ScopeText,
        subjects: list[S | None],
        cut_texts: list[str],
        ends: list[int] | None = None,
    ) -> _Rows[S]:
        if not scope.inner_cuts:
            return cls(subjects, cut_texts, cut_texts, ends)
        return cls(subjects, cut_texts, [text.replace("\n", "") for text in cut_texts], ends)


@dataclass(frozen=True)
class _Cut:
    """Where a family's own label goes among its scope's: position ``at`` in their sorted
    names, which number ``last``."""

    at: int
    last: int
    # The scope's inner cuts.
    inner: tuple[int, ...]

    def around(self, rows: _Rows[Any]) -> tuple[Iterable[str], Iterable[str]]:
        """Each subject's label text before the cut (ending in a comma, or empty) and after it
        (beginning with one, or empty)."""
        if self.at == 0:
            return repeat("", len(rows.texts)), map(",".__add__, rows.texts)
        if self.at == self.last:
            return map(str.__add__, rows.texts, repeat(",")), repeat("", len(rows.texts))
        if len(self.inner) == 1:
            parts = list(map(str.partition, rows.cut_texts, repeat("\n")))
            return map(itemgetter(0), parts), map(",".__add__, map(itemgetter(2), parts))
        count = self.inner.index(self.at) + 1
        pieces = [text.split("\n", count) for text in rows.cut_texts]
        return (
            ["".join(split[:count]) for split in pieces],
            [
                "," + split[count].replace("\n", "") if len(split) > count else ""
                for split in pieces
            ],
        )


@dataclass(frozen=True)
class _Subjects:
    """Every scope's subjects in a run of builds."""

    answers: _Rows[Build]
    shown: _Rows[ShownArtifacts]
    artifacts: _Rows[Artifact]
    polls: _Rows[BuildRecord]

    def of(self, scope: Scope[Any]) -> _Rows[Any]:
        if scope is POLL:
            return self.polls
        if scope is ANSWER:
            return self.answers
        if scope is SHOWN:
            return self.shown
        return self.artifacts

    @classmethod
    def of_builds(
        cls, records: Iterable[BuildRecord], max_artifacts_per_build: int, *, answers: bool
    ) -> _Subjects:
        """The subjects of these builds; without ``answers``, only their polls'."""
        answer_text, shown_text = _TEXTS[ANSWER], _TEXTS[SHOWN]
        artifact_text = _TEXTS[ARTIFACT]
        # The shown artifacts of a build are named by its labels alone: its text serves both.
        shown_alike = shown_text is answer_text
        polls = _poll_rows(records)
        builds: list[Build | None] = []
        build_texts = []
        shown_sets: list[ShownArtifacts | None] = []
        shown_texts = []
        artifacts: list[Artifact | None] = []
        artifact_texts = []
        artifact_ends = []
        for record in records:
            # As in exporter.metrics: a retired build has no series of its own.
            build = None if record.retired or not answers else record.build
            if build is None:
                builds.append(None)
                build_texts.append("")
                shown_sets.append(None)
                shown_texts.append("")
            else:
                values = ANSWER.values(build)
                builds.append(build)
                build_texts.append(answer_text.text(values))
                shown = shown_artifacts(build.artifacts, max_artifacts_per_build)
                shown_sets.append(shown)
                if not shown_alike:
                    shown_texts.append(shown_text.text((*values, *SHOWN.values(shown))))
                for artifact in shown.artifacts:
                    artifacts.append(artifact)
                    artifact_texts.append(artifact_text.text((*values, *ARTIFACT.values(artifact))))
            artifact_ends.append(len(artifacts))
        answer_rows = _Rows.of(answer_text, builds, build_texts)
        shown_rows = (
            _Rows(shown_sets, answer_rows.cut_texts, answer_rows.texts)
            if shown_alike
            else _Rows.of(shown_text, shown_sets, shown_texts)
        )
        return cls(
            answer_rows,
            shown_rows,
            _Rows.of(artifact_text, artifacts, artifact_texts, artifact_ends),
            polls,
        )

    def lines(self, family: int) -> list[str]:
        """The lines of family number ``family``, one string (maybe empty) per build."""
        rows = self.of(BUILD_FAMILIES[family].scope)
        lines = _WRITERS[family](rows)
        if rows.ends is None:
            return lines
        starts = [0, *rows.ends][:-1]
        return ["".join(lines[start:end]) for start, end in zip(starts, rows.ends, strict=True)]


def _poll_rows(records: Iterable[BuildRecord]) -> _Rows[BuildRecord]:
    """The builds' polls; none for a retired build, which has no series of its own."""
    text = _TEXTS[POLL].text
    values = POLL.values
    polls = [None if record.retired else record for record in records]
    return _Rows.of(
        _TEXTS[POLL], polls, ["" if record is None else text(values(record)) for record in polls]
    )


# -- families --

_Writer = Callable[[_Rows[S]], list[str]]


def _writer(family: BuildFamily[S]) -> _Writer[S]:
    """What writes the lines of ``family``: one string (maybe empty) per subject."""
    prefix = family.sample_name + "{"
    samples = family.samples
    if isinstance(samples, Value):
        return _value_lines(prefix, samples.of)
    if isinstance(samples, One):
        return lambda rows: [
            "" if subject is None else f"{prefix}{text}}}{_ONE}"
            for subject, text in zip(rows.subjects, rows.texts, strict=True)
        ]
    scope = _TEXTS[family.scope]
    names = scope.names
    # Where the family's first label of its own goes among the scope's.
    cut = _Cut(bisect.bisect(names, family.extra_labels[0]), len(names), scope.inner_cuts)
    if isinstance(samples, Labelled):
        return _labelled_lines(prefix, cut, samples)
    if isinstance(samples, OneHot):
        return _one_hot_lines(prefix, cut, samples)
    if max(family.extra_labels) != family.extra_labels[1] or max(names) > samples.labels[1]:
        raise ValueError(f"{family.name}: the second label of counts must sort last")
    return _count_lines(prefix, cut, samples)


def _value_lines(prefix: str, of: Callable[[S], float | None]) -> _Writer[S]:
    return lambda rows: [
        ""
        if subject is None or (value := of(subject)) is None
        else f"{prefix}{text}}}{_value(value)}"
        for subject, text in zip(rows.subjects, rows.texts, strict=True)
    ]


def _labelled_lines(prefix: str, cut: _Cut, samples: Labelled[S]) -> _Writer[S]:
    of = samples.of
    opening = f'{samples.label}="'
    return lambda rows: [
        ""
        if subject is None or (label := of(subject)) is None
        else f'{prefix}{head}{opening}{_escape(label)}"{tail}}}{_ONE}'
        for subject, head, tail in zip(rows.subjects, *cut.around(rows), strict=True)
    ]


def _one_hot_lines(prefix: str, cut: _Cut, samples: OneHot[S]) -> _Writer[S]:
    of = samples.of
    opening = f'{samples.label}="'
    known = tuple(_escape(value) for value in samples.values)

    def endings(current: str, closing: str) -> list[str]:
        # What follows 'label="' in each line: every value's, then the current one's if it is
        # not among them.
        ends = [
            f"{text}{closing}{_ONE if value == current else _ZERO}"
            for value, text in zip(samples.values, known, strict=True)
        ]
        if current not in samples.values:
            ends.append(f"{_escape(current)}{closing}{_ONE}")
        return ends

    # Where nothing follows the label but the brace, its lines end alike for every subject.
    kept = {current: endings(current, '"}') for current in samples.values}

    def lines(rows: _Rows[S]) -> list[str]:
        written = []
        for subject, head, tail in zip(rows.subjects, *cut.around(rows), strict=True):
            if subject is None:
                written.append("")
                continue
            current = of(subject)
            ends = endings(current, f'"{tail}}}') if tail else kept.get(current)
            if ends is None:
                ends = endings(current, '"}')
            start = f"{prefix}{head}{opening}"
            written.append(start + start.join(ends))
        return written

    return lines


def _count_lines(prefix: str, cut: _Cut, samples: Counts[S]) -> _Writer[S]:
    of = samples.of
    outer_opening = f'{samples.labels[0]}="'
    inner_opening = f',{samples.labels[1]}="'

    def lines(rows: _Rows[S]) -> list[str]:
        # What follows 'label="' of the second label, by its value and the count: the same in
        # every line, as that label sorts last.
        ends: dict[tuple[str, int], str] = {}
        written = []
        for subject, head, tail in zip(rows.subjects, *cut.around(rows), strict=True):
            if subject is None:
                written.append("")
                continue
            counts = []
            for outer, by_inner in of(subject).items():
                start = f'{prefix}{head}{outer_opening}{_escape(outer)}"{tail}{inner_opening}'
                line_ends = []
                for item in by_inner.items():
                    end = ends.get(item)
                    if end is None:
                        end = ends[item] = f'{_escape(item[0])}"}}{_count(item[1])}'
                    line_ends.append(end)
                counts.append(start + start.join(line_ends))
            written.append("".join(counts))
        return written

    return lines


_WRITERS: tuple[_Writer[Any], ...] = tuple(_writer(family) for family in BUILD_FAMILIES)


def _pieces(columns: list[list[str]], builds: int) -> BuildLines:
    """Each family's bytes, and the length in bytes of each build's lines in it."""
    pieces = []
    lengths = []
    for strings in columns:
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


def render_poll_lines(records: Sequence[BuildRecord]) -> list[list[bytes]]:
    """Per poll family (from POLL_FAMILIES_START on), each build's lines in it, as
    ``render_build_lines`` writes them."""
    polls = _poll_rows(records)
    return [
        [line.encode() for line in _WRITERS[family](polls)]
        for family in range(POLL_FAMILIES_START, BUILD_FAMILY_COUNT)
    ]


def render_build_lines(
    records: Iterable[BuildRecord], max_artifacts_per_build: int = 64, *, polls_only: bool = False
) -> BuildLines:
    """Each build family's sample lines for these builds, without HELP and TYPE lines; with
    ``polls_only``, the families before POLL_FAMILIES_START are left empty.

    Byte for byte what prometheus_client writes for the same families, in either format:
    ``primeintellect_image_build_info{build_id="b1",image_name="app",image_tag="v1"} 1.0``
    """
    subjects = _Subjects.of_builds(records, max_artifacts_per_build, answers=not polls_only)
    columns = [subjects.lines(family) for family in range(BUILD_FAMILY_COUNT)]
    return _pieces(columns, len(subjects.polls.subjects))
