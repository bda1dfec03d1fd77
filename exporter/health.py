"""Each image's health (image name and tag): its last success, and its failures since.

Folded from every finished build the exporter sees, in the order of their ``completedAt``
whatever order they are seen in, and kept in the state file apart from the builds, so that
retention, untracking and restarts leave it as it was. Seeing a build again changes nothing.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

from exporter.models import Build

COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
# The values of last_finished_status's `status` label, in the order they are written.
FINISHED_STATUSES = (COMPLETED, FAILED, CANCELLED)
# Images kept; past it, the one whose last build finished longest ago is forgotten.
MAX_IMAGES = 10_000
# Failures since the last success kept by build ID, so that seeing one again changes nothing;
# older ones are only counted.
MAX_KEPT_FAILURES = 64

# (image_name, image_tag)
HealthKey = tuple[str, str]


class Failure(NamedTuple):
    completed_at: float
    build_id: str


@dataclass(frozen=True, slots=True)
class ImageHealth:
    """One image's health; replaced whole on every change."""

    # The latest finished build, by completedAt, and its status.
    last_finished_at: float
    last_finished_status: str
    # completedAt of the latest COMPLETED build.
    last_success: float | None = None
    # The latest failures after last_success, oldest first, at most MAX_KEPT_FAILURES.
    failures: tuple[Failure, ...] = ()
    # Failures after last_success before the kept ones: how many, the first's and the last's
    # completedAt.
    dropped: int = 0
    dropped_since: float | None = None
    dropped_until: float | None = None

    @property
    def consecutive_failures(self) -> int:
        return self.dropped + len(self.failures)

    @property
    def failing_since(self) -> float | None:
        if self.dropped:
            return self.dropped_since
        return self.failures[0].completed_at if self.failures else None


def finish_of(build: Build) -> tuple[HealthKey, str, float] | None:
    """What a build gives its image's health: its image, status and completedAt; None unless
    it finished COMPLETED, FAILED or CANCELLED with a completedAt."""
    status = build.status_label
    if not build.finished or status not in FINISHED_STATUSES or build.completed_at is None:
        return None
    return (build.image_name, build.image_tag), status, build.completed_at


def folded(
    health: ImageHealth | None, build_id: str, status: str, completed_at: float
) -> ImageHealth:
    """``health`` with one more finished build; the same object if it changes nothing."""
    if health is None:
        health = ImageHealth(completed_at, status)
    elif completed_at > health.last_finished_at:
        health = replace(health, last_finished_at=completed_at, last_finished_status=status)
    if status == COMPLETED:
        return _succeeded(health, completed_at)
    if status == FAILED:
        return _failed(health, Failure(completed_at, build_id))
    # CANCELLED neither ends a run of failures nor adds to it.
    return health


def _succeeded(health: ImageHealth, completed_at: float) -> ImageHealth:
    if health.last_success is not None and completed_at <= health.last_success:
        return health
    # The failures only counted are all gone too: even were this success seen after more than
    # MAX_KEPT_FAILURES later failures, which of them came after it is unknown, and the count
    # stays a lower bound.
    return replace(
        health,
        last_success=completed_at,
        failures=tuple(f for f in health.failures if f.completed_at > completed_at),
        dropped=0,
        dropped_since=None,
        dropped_until=None,
    )


def _failed(health: ImageHealth, failure: Failure) -> ImageHealth:
    if health.last_success is not None and failure.completed_at <= health.last_success:
        return health
    if failure in health.failures:
        return health
    if health.dropped_until is not None and failure.completed_at <= health.dropped_until:
        # As old as the failures only counted: it may be one of them, seen again.
        return health
    failures = list(health.failures)
    bisect.insort(failures, failure)
    dropped, since, until = health.dropped, health.dropped_since, health.dropped_until
    if len(failures) > MAX_KEPT_FAILURES:
        oldest = failures.pop(0)
        dropped += 1
        since = oldest.completed_at if since is None else since
        until = oldest.completed_at
    return replace(
        health, failures=tuple(failures), dropped=dropped, dropped_since=since, dropped_until=until
    )


def fold(
    health: Mapping[HealthKey, ImageHealth], build_id: str, build: Build
) -> tuple[HealthKey, ImageHealth] | None:
    """The image's health with this build folded in; None if it changes nothing."""
    finish = finish_of(build)
    if finish is None:
        return None
    key, status, completed_at = finish
    before = health.get(key)
    after = folded(before, build_id, status, completed_at)
    return None if after is before else (key, after)


def put(health: dict[HealthKey, ImageHealth], key: HealthKey, value: ImageHealth) -> None:
    """Set an image's health, forgetting the image whose last build finished longest ago once
    more than MAX_IMAGES are kept."""
    new = key not in health
    health[key] = value
    if new and len(health) > MAX_IMAGES:
        del health[min(health, key=lambda image: health[image].last_finished_at)]


class HealthFamily(NamedTuple):
    """One per-image health family: a gauge by image_name and image_tag."""

    name: str
    documentation: str
    # The value of an image's sample; None: no sample. Unused by the one-hot family.
    value: Callable[[ImageHealth], float | None]


LAST_SUCCESS = HealthFamily(
    "primeintellect_image_builds_last_success_timestamp_seconds",
    "completedAt of the image's latest COMPLETED build.",
    lambda health: health.last_success,
)
CONSECUTIVE_FAILURES = HealthFamily(
    "primeintellect_image_builds_consecutive_failures",
    "FAILED builds of the image since its latest COMPLETED one, by completedAt; CANCELLED"
    " ones neither count nor end the run.",
    lambda health: float(health.consecutive_failures),
)
FAILING_SINCE = HealthFamily(
    "primeintellect_image_builds_failing_since_timestamp_seconds",
    "completedAt of the first of the image's consecutive failures; absent while it has none.",
    lambda health: health.failing_since,
)
LAST_FINISHED_STATUS = HealthFamily(
    "primeintellect_image_builds_last_finished_status",
    "1 for the status of the image's latest finished build, by completedAt, 0 for the others.",
    lambda health: None,
)
# In the order /metrics shows them; the last is one-hot by `status` over FINISHED_STATUSES.
HEALTH_FAMILIES = (LAST_SUCCESS, CONSECUTIVE_FAILURES, FAILING_SINCE, LAST_FINISHED_STATUS)
HEALTH_LABELS = ("image_name", "image_tag")
