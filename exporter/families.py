"""The build families, each declared once: name, type, help, labels and what its samples carry.

``exporter.metrics`` makes prometheus_client's families of this table, the reference for every
byte of ``/metrics``; ``exporter.exposition`` writes the same lines directly from it. Adding a
build family is one entry in ``BUILD_FAMILIES`` and the code that computes its value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, NamedTuple, TypeGuard, TypeVar

from exporter.models import BUILD_STATUSES, Artifact, Build
from exporter.store import BuildRecord

S = TypeVar("S")
FamilyType = Literal["gauge", "info"]
GAUGE: FamilyType = "gauge"
INFO: FamilyType = "info"


class ShownArtifacts(NamedTuple):
    """The artifacts of a build that get series of their own, and how many are left out."""

    artifacts: tuple[Artifact, ...]
    omitted: int


@dataclass(frozen=True)
class Scope(Generic[S]):
    """What a family's samples are about (one subject each) and the labels naming a subject.

    A scope ``within`` another names its subjects by the outer scope's labels, then its own.
    """

    labels: tuple[str, ...]
    # The subject's values of ``labels``, in their order.
    values: Callable[[S], tuple[str, ...]]
    within: Scope[Build] | None = None

    @property
    def all_labels(self) -> tuple[str, ...]:
        return self.labels if self.within is None else (*self.within.labels, *self.labels)


# Each build with an answer.
ANSWER: Scope[Build] = Scope(
    ("build_id", "image_name", "image_tag"),
    lambda build: (build.id, build.image_name, build.image_tag),
)
# Each build with an answer, as the artifacts it shows (up to metrics.max_artifacts_per_build).
SHOWN: Scope[ShownArtifacts] = Scope((), lambda shown: (), within=ANSWER)
# Each artifact a build shows.
ARTIFACT: Scope[Artifact] = Scope(
    ("artifact_id", "artifact_type"),
    lambda artifact: (artifact.id, artifact.type_label),
    within=ANSWER,
)
# Each tracked build, answered or not: how its polls went.
POLL: Scope[BuildRecord] = Scope(("build_id",), lambda record: (record.build_id,))


@dataclass(frozen=True)
class Value(Generic[S]):
    """One sample per subject with its value; none while it has no value."""

    of: Callable[[S], float | None]


@dataclass(frozen=True)
class One(Generic[S]):
    """One sample of 1 per subject."""


@dataclass(frozen=True)
class Labelled(Generic[S]):
    """One sample of 1 per subject, with its value of one more label; none while it has none."""

    label: str
    of: Callable[[S], str | None]


@dataclass(frozen=True)
class OneHot(Generic[S]):
    """1 for the subject's current value of ``label``, 0 for each other of ``values``; a current
    value outside ``values`` adds a sample of its own."""

    label: str
    values: tuple[str, ...]
    of: Callable[[S], str]


@dataclass(frozen=True)
class Counts(Generic[S]):
    """A count per value of two more labels, in the order of the subject's mapping. The second
    label sorts after every other of the family (exporter.exposition writes them so)."""

    labels: tuple[str, str]
    of: Callable[[S], Mapping[str, Mapping[str, int]]]


Samples = Value[S] | One[S] | Labelled[S] | OneHot[S] | Counts[S]


@dataclass(frozen=True)
class BuildFamily(Generic[S]):
    """One build family: its name, type, help text, scope, and what its samples carry."""

    name: str
    type: FamilyType
    documentation: str
    scope: Scope[S]
    samples: Samples[S]

    def __post_init__(self) -> None:
        if self.type == INFO and not isinstance(self.samples, One | Labelled):
            raise ValueError(f"{self.name}: an info family's samples are all 1")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{self.name}: a label is named twice in {self.labels}")

    @property
    def extra_labels(self) -> tuple[str, ...]:
        """The labels after the scope's, in their declared order."""
        match self.samples:
            case Labelled() | OneHot():
                return (self.samples.label,)
            case Counts():
                return self.samples.labels
            case _:
                return ()

    @property
    def labels(self) -> tuple[str, ...]:
        """Every label, in the declared order prometheus_client is given."""
        return (*self.scope.all_labels, *self.extra_labels)

    @property
    def sample_name(self) -> str:
        """The name the family's sample lines begin with."""
        return f"{self.name}_info" if self.type == INFO else self.name


AnyBuildFamily = (
    BuildFamily[Build]
    | BuildFamily[ShownArtifacts]
    | BuildFamily[Artifact]
    | BuildFamily[BuildRecord]
)


def artifact_counts(artifacts: Sequence[Artifact]) -> dict[str, dict[str, int]]:
    """Counts for the artifacts family, by type (in name order) and status: every documented
    status of each type present, zeros included, then any other status seen."""
    counts: dict[str, dict[str, int]] = {}
    for artifact in artifacts:
        artifact_type = artifact.type_label
        by_status = counts.get(artifact_type)
        if by_status is None:
            by_status = counts[artifact_type] = _NO_ARTIFACTS.copy()
        status = artifact.status_label
        by_status[status] = by_status.get(status, 0) + 1
    if len(counts) < 2:
        return counts
    return {artifact_type: counts[artifact_type] for artifact_type in sorted(counts)}


_NO_ARTIFACTS = dict.fromkeys(BUILD_STATUSES, 0)


def shown_artifacts(artifacts: tuple[Artifact, ...], limit: int) -> ShownArtifacts:
    """The artifacts that get series of their own, and how many are left out past ``limit``.

    Artifacts with an error message matter most; they are kept first.
    """
    if len(artifacts) <= limit:
        return ShownArtifacts(artifacts, 0)
    shown = tuple(sorted(artifacts, key=lambda artifact: artifact.error_message is None))[:limit]
    return ShownArtifacts(shown, len(artifacts) - len(shown))


# Every build family, in the order /metrics shows them. The poll families come last: a poll
# changes only them, and the body keeps the others as one block (exporter.exposition_cache).
BUILD_FAMILIES: tuple[AnyBuildFamily, ...] = (
    BuildFamily(
        "primeintellect_image_build",
        INFO,
        "A tracked image build; always 1.",
        ANSWER,
        One(),
    ),
    BuildFamily(
        "primeintellect_image_build_status",
        GAUGE,
        "1 for the build's current status, 0 for the others; UNKNOWN for an undocumented one.",
        ANSWER,
        OneHot("status", BUILD_STATUSES, lambda build: build.status_label),
    ),
    BuildFamily(
        "primeintellect_image_build_created_timestamp_seconds",
        GAUGE,
        "When the build was created.",
        ANSWER,
        Value(lambda build: build.created_at),
    ),
    BuildFamily(
        "primeintellect_image_build_started_timestamp_seconds",
        GAUGE,
        "When the build started.",
        ANSWER,
        Value(lambda build: build.started_at),
    ),
    BuildFamily(
        "primeintellect_image_build_completed_timestamp_seconds",
        GAUGE,
        "When the build completed.",
        ANSWER,
        Value(lambda build: build.completed_at),
    ),
    BuildFamily(
        "primeintellect_image_build_queued_seconds",
        GAUGE,
        "Time from creation to start.",
        ANSWER,
        Value(lambda build: build.queued_seconds),
    ),
    BuildFamily(
        "primeintellect_image_build_duration_seconds",
        GAUGE,
        "Time from start to completion, for finished builds.",
        ANSWER,
        Value(lambda build: build.duration_seconds),
    ),
    BuildFamily(
        "primeintellect_image_build_artifacts",
        GAUGE,
        "Artifacts of the build by type and status.",
        ANSWER,
        Counts(("artifact_type", "status"), lambda build: artifact_counts(build.artifacts)),
    ),
    BuildFamily(
        "primeintellect_image_build_artifact",
        INFO,
        "An artifact of a build and its output reference; always 1.",
        ARTIFACT,
        Labelled("full_image_path", lambda artifact: artifact.full_image_path or ""),
    ),
    BuildFamily(
        "primeintellect_image_build_artifact_duration_seconds",
        GAUGE,
        "Time from the artifact's start to its completion.",
        ARTIFACT,
        Value(lambda artifact: artifact.duration_seconds),
    ),
    BuildFamily(
        "primeintellect_image_build_artifact_error",
        INFO,
        "The error message of an artifact, while it has one; always 1.",
        ARTIFACT,
        Labelled("error_message", lambda artifact: artifact.error_message or None),
    ),
    BuildFamily(
        "primeintellect_image_build_artifacts_omitted",
        GAUGE,
        "Artifacts without per-artifact series, beyond metrics.max_artifacts_per_build.",
        SHOWN,
        Value(lambda shown: shown.omitted or None),
    ),
    BuildFamily(
        "primeintellect_image_build_error",
        INFO,
        "The error message of the build itself, while it has one; always 1.",
        ANSWER,
        Labelled("error_message", lambda build: build.error_message or None),
    ),
    BuildFamily(
        "primeintellect_image_build_last_poll_success",
        GAUGE,
        "1 if the last poll of this build succeeded.",
        POLL,
        Value(lambda record: 1.0 if record.last_poll_ok else 0.0),
    ),
    BuildFamily(
        "primeintellect_image_build_last_poll_success_timestamp_seconds",
        GAUGE,
        "When this build was last polled successfully.",
        POLL,
        Value(lambda record: record.last_success_time),
    ),
    BuildFamily(
        "primeintellect_image_build_last_poll_error",
        GAUGE,
        "1 while the last poll of this build failed, with the reason.",
        POLL,
        Labelled(
            "reason", lambda record: None if record.last_error is None else record.last_error.value
        ),
    ),
)


def in_scope(family: AnyBuildFamily, scope: Scope[S]) -> TypeGuard[BuildFamily[S]]:
    """Whether ``family`` is about ``scope``'s subjects."""
    return family.scope is scope


def _poll_families_start() -> int:
    polls = [family.scope is POLL for family in BUILD_FAMILIES]
    start = polls.index(True)
    if not all(polls[start:]):
        raise ValueError("the poll families come after every other build family")
    return start


# The families before this index are about a build's answer; the rest about its polls.
POLL_FAMILIES_START = _poll_families_start()
