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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, repeat
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
from exporter.health import (
    FINISHED_STATUSES,
    HEALTH_FAMILIES,
    LAST_FINISHED_STATUS,
    HealthKey,
    ImageHealth,
)
from exporter.metrics import exemplar_shown, tally_images
from exporter.models import Artifact, Build
from exporter.store import (
    FINISHED_DURATION_BUCKETS,
    QUEUE_DURATION_BUCKETS,
    BuildRecord,
    FinishedBuilds,
    Snapshot,
)
from exporter.telemetry import Histogram

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
# name. A subject's scope labels are escaped and written once, as one text: an artifact's are
# its own, then its build's text. Wherever a family puts a label of its own among a scope's
# labels, that text is also kept cut in two there, so that every line is still one f-string.

# Marks a cut in a label text; escaped values hold no newline. str.partition at the newline
# leaves the text before the cut ending in a comma, and the text after it beginning with one.
_CUT = ",\n,"


def _family_cuts(scope: Scope[Any]) -> set[int]:
    """Where the families of ``scope`` put labels of their own among its labels: positions in
    their sorted names, neither first nor last."""
    names = sorted(scope.all_labels)
    return {
        cut
        for family in BUILD_FAMILIES
        if family.scope is scope
        for label in family.extra_labels
        if 0 < (cut := bisect.bisect(names, label)) < len(names)
    }


@dataclass(frozen=True)
class _ScopeText:
    """How a scope's label values become each subject's label text."""

    # All the scope's labels, sorted by name: its own, then its outer scope's.
    names: tuple[str, ...]
    # The cuts its texts carry: positions in ``names``.
    cuts: tuple[int, ...]
    # A %-template of the text of its own labels over their values sorted by name, and how to
    # sort them from their declared order (None: they are in it).
    template: str
    sort: Callable[[tuple[str, ...]], tuple[str, ...]] | None
    # What joins that text to the outer scope's, and whether cuts fall inside it.
    separator: str
    cut_inside: bool

    def text(self, values: tuple[str, ...]) -> str:
        """The text, with its cuts, of a subject's own labels, from their values in the
        scope's declared order."""
        # One scan of the joined values finds the common case: nothing to escape.
        joined = "".join(values)
        if "\\" in joined or "\n" in joined or '"' in joined:
            values = tuple(map(_escape, values))
        return self.template % (values if self.sort is None else self.sort(values))

    def within(
        self, values: tuple[str, ...], outer_cut_text: str, outer_text: str
    ) -> tuple[str, str]:
        """The text with its cuts, and without, of a subject of a scope within another, from
        its own labels' values and the outer subject's texts."""
        joined = "".join(values)
        if "\\" in joined or "\n" in joined or '"' in joined:
            values = tuple(map(_escape, values))
        own = self.template % (values if self.sort is None else self.sort(values))
        text = own.replace("\n,", "") if self.cut_inside else own
        return f"{own}{self.separator}{outer_cut_text}", f"{text},{outer_text}"


def _scope_texts(scopes: tuple[Scope[Any], ...]) -> dict[Scope[Any], _ScopeText]:
    """Each scope's text. The text of a scope within another carries the outer scope's text,
    so the outer one carries the cuts of both."""
    cuts = {scope: _family_cuts(scope) for scope in scopes}
    for scope in scopes:
        if scope.within is not None:
            if scope.labels and max(scope.labels) > min(scope.within.labels):
                raise ValueError(f"{scope.labels} must sort before the labels of their outer scope")
            own = len(scope.labels)
            cuts[scope.within] |= {cut - own for cut in cuts[scope] if cut > own}
    texts = {}
    for scope in scopes:
        declared = scope.labels
        order = sorted(range(len(declared)), key=declared.__getitem__)
        names = tuple(declared[index] for index in order)
        own_cuts = cuts[scope]
        separator = ""
        if scope.within is not None:
            outer = cuts[scope.within]
            own_cuts = {cut for cut in own_cuts if cut <= len(names)}
            separator = _CUT if len(names) in own_cuts else ","
            own_cuts |= {len(names) + cut for cut in outer}
            names += tuple(sorted(scope.within.labels))
        template = "".join(
            ("" if index == 0 else _CUT if index in own_cuts else ",") + f'{name}="%s"'
            for index, name in enumerate(names[: len(declared)])
        )
        texts[scope] = _ScopeText(
            names,
            tuple(sorted(own_cuts)),
            template,
            None if order == sorted(order) else itemgetter(*order),
            separator,
            any(0 < cut < len(declared) for cut in own_cuts),
        )
    return texts


_SCOPES = (ANSWER, SHOWN, ARTIFACT, POLL)
_TEXTS = _scope_texts(_SCOPES)


class _Rows(NamedTuple, Generic[S]):
    """A scope's subjects in a run of builds, each with its label text, or None where a build
    has none. With ``ends``, a build may have several: build ``i``'s end before ``ends[i]``."""

    subjects: list[S | None]
    # The label text with its cuts, and without (the same list where it has none).
    cut_texts: list[str]
    texts: list[str]
    ends: list[int] | None = None


@dataclass(frozen=True)
class _Cut:
    """Where a family's own label goes among its scope's: position ``at`` in their sorted
    names, which number ``last``."""

    at: int
    last: int
    # The scope's inner cuts.
    inner: tuple[int, ...]

    def around(self, rows: _Rows[Any]) -> Iterable[tuple[str, str, str]]:
        """Each subject's label text before the cut (ending in a comma, or empty), anything,
        and after it (beginning with a comma, or empty)."""
        count = len(rows.texts)
        if self.at == 0:
            return zip(
                repeat("", count), repeat("", count), map(",".__add__, rows.texts), strict=True
            )
        if self.at == self.last:
            texts = rows.texts
            return zip(
                map(str.__add__, texts, repeat(",")),
                repeat("", count),
                repeat("", count),
                strict=True,
            )
        if len(self.inner) == 1:
            return map(str.partition, rows.cut_texts, repeat("\n"))
        # Each piece after the first begins with the comma that ends the one before.
        cuts = self.inner.index(self.at) + 1
        pieces = [text.split("\n") for text in rows.cut_texts]
        return [
            (
                "".join([split[0], *(piece[1:] for piece in split[1:cuts])]),
                "",
                "".join([split[cuts], *(piece[1:] for piece in split[cuts + 1 :])])
                if len(split) > cuts
                else "",
            )
            for split in pieces
        ]


class _Subjects(NamedTuple):
    """Every scope's subjects in a run of builds, in the order of ``_SCOPES``."""

    answers: _Rows[Build]
    shown: _Rows[ShownArtifacts]
    artifacts: _Rows[Artifact]
    polls: _Rows[BuildRecord]

    @classmethod
    def of_builds(
        cls, records: Sequence[BuildRecord], max_artifacts_per_build: int, *, answers: bool
    ) -> _Subjects:
        """The subjects of these builds; without ``answers``, only their polls'."""
        answer, artifact = _TEXTS[ANSWER], _TEXTS[ARTIFACT]
        # As in exporter.metrics: a retired build has no series of its own.
        builds = [None if record.retired or not answers else record.build for record in records]
        cut_texts = ["" if build is None else answer.text(ANSWER.values(build)) for build in builds]
        texts = [text.replace("\n,", "") for text in cut_texts] if answer.cuts else cut_texts
        shown = [
            None if build is None else shown_artifacts(build.artifacts, max_artifacts_per_build)
            for build in builds
        ]
        artifacts: list[Artifact | None] = [
            one
            for artifact_set in shown
            if artifact_set is not None
            for one in artifact_set.artifacts
        ]
        artifact_texts = [
            artifact.within(ARTIFACT.values(one), cut_text, text)
            for artifact_set, cut_text, text in zip(shown, cut_texts, texts, strict=True)
            if artifact_set is not None
            for one in artifact_set.artifacts
        ]
        return cls(
            _Rows(builds, cut_texts, texts),
            _within(_TEXTS[SHOWN], SHOWN, shown, cut_texts, texts),
            _Rows(
                artifacts,
                [cut_text for cut_text, _ in artifact_texts],
                [text for _, text in artifact_texts],
                list(accumulate(0 if one is None else len(one.artifacts) for one in shown)),
            ),
            _poll_rows(records),
        )


def _per_build(lines: list[str], ends: list[int]) -> list[str]:
    """Lines of subjects that a build may have several of, joined build by build."""
    if not any(lines):
        return [""] * len(ends)
    # Each build's lines start where the one before ends (the first at 0).
    return ["".join(lines[start:end]) for start, end in zip([0, *ends], ends, strict=False)]


def _within(
    text: _ScopeText,
    scope: Scope[S],
    subjects: list[S | None],
    outer_cut_texts: list[str],
    outer_texts: list[str],
) -> _Rows[S]:
    """The rows of a scope with one subject per outer subject."""
    if not scope.labels:
        # Named by the outer scope's labels alone, its subjects have the outer ones' texts.
        return _Rows(subjects, outer_cut_texts, outer_texts)
    texts = [
        ("", "") if subject is None else text.within(scope.values(subject), cut_text, outer)
        for subject, cut_text, outer in zip(subjects, outer_cut_texts, outer_texts, strict=True)
    ]
    return _Rows(subjects, [cut_text for cut_text, _ in texts], [text for _, text in texts])


def _poll_rows(records: Iterable[BuildRecord]) -> _Rows[BuildRecord]:
    """The builds' polls; none for a retired build, which has no series of its own."""
    scope = _TEXTS[POLL]
    polls = [None if record.retired else record for record in records]
    cut_texts = ["" if record is None else scope.text(POLL.values(record)) for record in polls]
    texts = [text.replace("\n,", "") for text in cut_texts] if scope.cuts else cut_texts
    return _Rows(polls, cut_texts, texts)


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
    cut = _Cut(bisect.bisect(names, family.extra_labels[0]), len(names), scope.cuts)
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

    def lines(rows: _Rows[S]) -> list[str]:
        labels = [None if subject is None else of(subject) for subject in rows.subjects]
        # Many such families (errors) have no line at all: their texts need no cutting.
        if labels.count(None) == len(labels):
            return [""] * len(labels)
        return [
            "" if label is None else f'{prefix}{head}{opening}{_escape(label)}"{tail}}}{_ONE}'
            for label, (head, _, tail) in zip(labels, cut.around(rows), strict=True)
        ]

    return lines


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
        for subject, (head, _, tail) in zip(rows.subjects, cut.around(rows), strict=True):
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
        # What follows each 'label="' of the second label in the lines of one first label, by
        # its counts: the same for every subject, as that label sorts last, and few differ.
        kept: dict[tuple[tuple[str, int], ...], list[str]] = {}
        written = []
        for subject, (head, _, tail) in zip(rows.subjects, cut.around(rows), strict=True):
            if subject is None:
                written.append("")
                continue
            counts = []
            for outer, by_inner in of(subject).items():
                start = f'{prefix}{head}{outer_opening}{_escape(outer)}"{tail}{inner_opening}'
                items = tuple(by_inner.items())
                ends = kept.get(items)
                if ends is None:
                    ends = kept[items] = [
                        f'{_escape(inner)}"}}{_count(count)}' for inner, count in items
                    ]
                counts.append(start + start.join(ends))
            written.append("".join(counts))
        return written

    return lines


# What writes each family's lines, and where its scope's rows stand in _Subjects.
_PLAN: tuple[tuple[_Writer[Any], int], ...] = tuple(
    (_writer(family), next(index for index, scope in enumerate(_SCOPES) if scope is family.scope))
    for family in BUILD_FAMILIES
)
_POLL_WRITERS = tuple(write for write, _ in _PLAN[POLL_FAMILIES_START:])


def _pieces(columns: list[list[str]], builds: int) -> BuildLines:
    """Each family's bytes, and the length in bytes of each build's lines in it."""
    pieces = []
    lengths = []
    # Never changed in place: families without lines share it.
    zeros = array("I", [0]) * builds
    for strings in columns:
        if not any(strings):
            pieces.append(b"")
            lengths.append(zeros)
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
    return [[line.encode() for line in write(polls)] for write in _POLL_WRITERS]


def render_build_lines(
    records: Iterable[BuildRecord], max_artifacts_per_build: int = 64, *, polls_only: bool = False
) -> BuildLines:
    """Each build family's sample lines for these builds, without HELP and TYPE lines; with
    ``polls_only``, the families before POLL_FAMILIES_START are left empty.

    Byte for byte what prometheus_client writes for the same families, in either format:
    ``primeintellect_image_build_info{build_id="b1",image_name="app",image_tag="v1"} 1.0``
    """
    subjects = _Subjects.of_builds(list(records), max_artifacts_per_build, answers=not polls_only)
    columns = [
        write(rows)
        if (rows := subjects[scope]).ends is None
        else _per_build(write(rows), rows.ends)
        for write, scope in _PLAN
    ]
    return _pieces(columns, len(subjects.polls.subjects))


def render_health_lines(health: Mapping[HealthKey, ImageHealth]) -> list[bytes]:
    """Each health family's sample lines (``exporter.health``), without HELP and TYPE lines,
    byte for byte what prometheus_client writes for ``exporter.metrics.health_families`` in
    either format: ``primeintellect_image_builds_consecutive_failures{image_name="app",``
    ``image_tag="v1"} 2.0``"""
    images = sorted(health)
    texts = [f'image_name="{_escape(name)}",image_tag="{_escape(tag)}"' for name, tag in images]
    pieces = []
    for family in HEALTH_FAMILIES:
        prefix = family.name + "{"
        if family is LAST_FINISHED_STATUS:
            lines = [
                f'{prefix}{text},status="{status}"}}'
                f"{_ONE if status == health[key].last_finished_status else _ZERO}"
                for key, text in zip(images, texts, strict=True)
                for status in FINISHED_STATUSES
            ]
        else:
            lines = [
                f"{prefix}{text}}}{_value(value)}"
                for key, text in zip(images, texts, strict=True)
                if (value := family.value(health[key])) is not None
            ]
        pieces.append("".join(lines).encode())
    return pieces


# -- the tally families, written directly ------------------------------------------------------
#
# With many images, the tally families are most of the summary's samples: every image has
# about sixty at 0 before it counts anything. Their lines are written here, byte for byte what
# prometheus_client writes for ``exporter.metrics.tally_families``; tests compare the two.

_FINISHED_TOTAL = "primeintellect_image_builds_finished_total"
_FINISHED_DURATIONS = "primeintellect_image_builds_finished_duration_seconds"
_QUEUE_DURATIONS = "primeintellect_image_builds_queue_duration_seconds"
# Stands for the escaped image name in a zero block, split on to make its template.
_NAME = "\x00"


def _zero_template(lines: str) -> list[str]:
    """A block of lines made for the image name ``_NAME``, as parts to join with a real one."""
    return lines.split(_NAME)


def _histogram_lines(
    prefix: str,
    labels: tuple[str, str],
    histogram: Histogram,
    openmetrics: bool,
) -> str:
    """A histogram's lines; ``labels`` are its label text before and after ``le``, each with
    the comma next to it."""
    before, after = labels
    lines = []
    running = 0
    exemplars = histogram.exemplars or (None,) * len(histogram.counts)
    bounds = (*map(floatToGoString, histogram.bounds), "+Inf")
    for bound, count, exemplar in zip(bounds, histogram.counts, exemplars, strict=True):
        running += count
        value = _value(float(running))
        if openmetrics and exemplar_shown(exemplar):
            value = (
                f'{value[:-1]} # {{build_id="{_escape(exemplar.build_id)}"}}'
                f" {floatToGoString(exemplar.value)} {exemplar.timestamp}\n"  # type: ignore[no-untyped-call]
            )
        lines.append(f'{prefix}_bucket{{{before}le="{bound}"{after}}}{value}')
    own = f"{before[:-1]}{after}"
    lines.append(f"{prefix}_count{{{own}}}{_value(float(running))}")
    lines.append(f"{prefix}_sum{{{own}}}{_value(histogram.total)}")
    return "".join(lines)


def _zero_templates() -> tuple[list[str], list[str], list[str]]:
    name = f'image_name="{_NAME}",'
    totals = "".join(f'{_FINISHED_TOTAL}{{{name}status="{s}"}} 0.0\n' for s in _STATUSES)
    durations = "".join(
        _histogram_lines(
            _FINISHED_DURATIONS,
            (name, f',status="{status}"'),
            Histogram.empty(FINISHED_DURATION_BUCKETS),
            openmetrics=False,
        )
        for status in _STATUSES
    )
    queued = _histogram_lines(
        _QUEUE_DURATIONS, (name, ""), Histogram.empty(QUEUE_DURATION_BUCKETS), openmetrics=False
    )
    return _zero_template(totals), _zero_template(durations), _zero_template(queued)


# In the order of their series (sorted, as exporter.metrics orders them).
_STATUSES = sorted(FINISHED_STATUSES)
_ZERO_TOTALS, _ZERO_DURATIONS, _ZERO_QUEUED = _zero_templates()


def render_tally_lines(snapshot: Snapshot, format: ExpositionFormat) -> list[bytes]:
    """Each tally family's sample lines (finishes, their durations, queue times), without HELP
    and TYPE lines, as prometheus_client writes ``exporter.metrics.tally_families``: exemplars
    only in OpenMetrics."""
    openmetrics = format is ExpositionFormat.OPENMETRICS
    counted: dict[str, set[str]] = {}
    for image_name, status in snapshot.finished:
        counted.setdefault(image_name, set()).add(status)
    totals = []
    durations = []
    queued = []
    for image_name in tally_images(snapshot):
        name = _escape(image_name)
        statuses = counted.get(image_name)
        if statuses is None:
            totals.append(name.join(_ZERO_TOTALS))
            durations.append(name.join(_ZERO_DURATIONS))
        else:
            for status in sorted(statuses.union(_STATUSES)):
                value = snapshot.finished.get((image_name, status)) or FinishedBuilds()
                labels = (f'image_name="{name}",', f',status="{status}"')
                totals.append(
                    f"{_FINISHED_TOTAL}{{{labels[0]}{labels[1][1:]}}}{_count(value.count)}"
                )
                durations.append(
                    _histogram_lines(_FINISHED_DURATIONS, labels, value.durations, openmetrics)
                )
        histogram = snapshot.queued.get(image_name)
        if histogram is None:
            queued.append(name.join(_ZERO_QUEUED))
        else:
            labels = (f'image_name="{name}",', "")
            queued.append(_histogram_lines(_QUEUE_DURATIONS, labels, histogram, openmetrics))
    return ["".join(totals).encode(), "".join(durations).encode(), "".join(queued).encode()]
