"""Each image's health: folded from its finished builds by completedAt, each counted once."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

from exporter import health
from exporter.exposition import ExpositionFormat, render, render_health_lines
from exporter.health import MAX_KEPT_FAILURES, HealthKey, ImageHealth, fold, put
from exporter.metrics import health_families
from exporter.models import Build, parse_build
from exporter.store import BuildStore
from tests.helpers.support import EPOCH

IMAGE = ("trainer", "v1")


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat()


def finished(build_id: str, status: str, completed_at: float | None, **changes: Any) -> Build:
    return parse_build(
        json.dumps(
            {
                "id": build_id,
                "imageName": "trainer",
                "imageTag": "v1",
                "status": status,
                "createdAt": iso(EPOCH),
                "startedAt": iso(EPOCH),
                "completedAt": None if completed_at is None else iso(completed_at),
                "artifacts": [],
                **changes,
            }
        ).encode()
    )


def folded_all(builds: list[Build]) -> ImageHealth:
    kept: dict[HealthKey, ImageHealth] = {}
    for build in builds:
        change = fold(kept, build.id, build)
        if change is not None:
            put(kept, *change)
    return kept[IMAGE]


HISTORY = [
    finished("b1", "FAILED", EPOCH + 10),
    finished("b2", "COMPLETED", EPOCH + 20),
    finished("b3", "FAILED", EPOCH + 30),
    finished("b4", "CANCELLED", EPOCH + 40),
    finished("b5", "FAILED", EPOCH + 50),
]


def test_failures_since_the_last_success_count_by_completion_whatever_order_they_are_seen_in() -> (
    None
):
    for seed in range(20):
        builds = HISTORY.copy()
        random.Random(seed).shuffle(builds)
        image = folded_all(builds)
        assert image.last_success == EPOCH + 20
        assert image.consecutive_failures == 2
        assert image.failing_since == EPOCH + 30
        assert (image.last_finished_at, image.last_finished_status) == (EPOCH + 50, "FAILED")


def test_a_cancelled_build_neither_counts_nor_ends_a_run_of_failures_but_is_the_last_status() -> (
    None
):
    image = folded_all([*HISTORY, finished("b6", "CANCELLED", EPOCH + 60)])
    assert image.consecutive_failures == 2
    assert image.last_finished_status == "CANCELLED"


def test_seeing_a_build_again_changes_nothing() -> None:
    once = folded_all(HISTORY)
    assert folded_all([*HISTORY, *reversed(HISTORY)]) == once
    assert fold({IMAGE: once}, "b3", HISTORY[2]) is None


def test_a_success_ends_the_run_and_failing_since_is_absent() -> None:
    image = folded_all([*HISTORY, finished("b7", "COMPLETED", EPOCH + 70)])
    assert (image.consecutive_failures, image.failing_since) == (0, None)
    assert (image.last_success, image.last_finished_status) == (EPOCH + 70, "COMPLETED")


def test_failures_beyond_those_kept_by_build_are_still_counted() -> None:
    count = MAX_KEPT_FAILURES + 10
    image = folded_all([finished(f"f{i:03d}", "FAILED", EPOCH + i) for i in range(count)])
    assert image.consecutive_failures == count
    assert image.failing_since == EPOCH
    assert len(image.failures) == MAX_KEPT_FAILURES
    # An old failure seen again (maybe one only counted) changes nothing.
    assert fold({IMAGE: image}, "f000", finished("f000", "FAILED", EPOCH)) is None


def test_a_build_without_completed_at_or_unfinished_gives_no_health() -> None:
    kept: dict[HealthKey, ImageHealth] = {}
    assert fold(kept, "b1", finished("b1", "FAILED", None)) is None
    assert fold(kept, "b2", finished("b2", "BUILDING", EPOCH)) is None


def test_past_the_limit_the_image_whose_last_build_finished_longest_ago_is_forgotten() -> None:
    kept: dict[HealthKey, ImageHealth] = {
        (f"image-{i}", "v1"): ImageHealth(EPOCH + i, "COMPLETED") for i in range(health.MAX_IMAGES)
    }
    put(kept, ("newest", "v1"), ImageHealth(EPOCH + health.MAX_IMAGES, "FAILED"))
    assert len(kept) == health.MAX_IMAGES
    assert ("image-0", "v1") not in kept
    assert ("newest", "v1") in kept


def test_health_outlives_the_builds_it_came_from() -> None:
    store = BuildStore()
    store.track(["b1", "b2"])
    store.record_success("b1", finished("b1", "FAILED", EPOCH + 10), EPOCH + 11)
    store.record_success("b2", finished("b2", "FAILED", EPOCH + 20), EPOCH + 21)
    store.sweep(EPOCH + 10_000, stale_after=60, retention=3_600)
    store.track([])
    image = store.snapshot().health[IMAGE]
    assert (image.consecutive_failures, image.failing_since) == (2, EPOCH + 10)


def test_a_snapshot_keeps_its_health_while_the_store_moves_on() -> None:
    store = BuildStore()
    store.track(["b1", "b2"])
    store.record_success("b1", finished("b1", "FAILED", EPOCH + 10), EPOCH + 11)
    before = store.snapshot()
    assert store.snapshot().health is before.health
    store.record_success("b2", finished("b2", "COMPLETED", EPOCH + 20), EPOCH + 21)
    assert before.health[IMAGE].consecutive_failures == 1
    assert store.snapshot().health[IMAGE].consecutive_failures == 0


def test_health_lines_are_what_prometheus_client_writes() -> None:
    rng = random.Random(3)
    kept: dict[HealthKey, ImageHealth] = {}
    for index in range(300):
        name = rng.choice(["a", 'q"uote', "back\\slash", "é"])
        status = rng.choice(["COMPLETED", "FAILED", "FAILED", "CANCELLED"])
        tag = rng.choice(["v1", "v2", ""])
        build = finished(
            f"b{index}", status, EPOCH + rng.randrange(10**6) / 8, imageName=name, imageTag=tag
        )
        change = fold(kept, build.id, build)
        if change is not None:
            put(kept, *change)
    for format in ExpositionFormat:
        reference = render(health_families(kept), format).decode()
        written = b"".join(render_health_lines(kept)).decode()
        samples = "".join(line + "\n" for line in reference.splitlines() if line[0] != "#")
        assert written == samples
