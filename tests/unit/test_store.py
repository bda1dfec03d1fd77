"""The store: what is kept per build, what counts as finishing, and snapshots."""

from __future__ import annotations

import json
from typing import Any

from exporter.models import Build, Outcome, parse_build
from exporter.store import (
    QUEUE_DURATION_BUCKETS,
    BuildRecord,
    BuildState,
    BuildStore,
    FinishedBuilds,
    Tallies,
)
from exporter.telemetry import Exemplar, Histogram
from tests.helpers.support import EPOCH

FINISHED_PAYLOAD = {
    "id": "b1",
    "imageName": "trainer",
    "imageTag": "v1",
    "status": "COMPLETED",
    "createdAt": "2026-01-01T00:00:00Z",
    "startedAt": "2026-01-01T00:01:00Z",
    "completedAt": "2026-01-01T00:11:00Z",
    "artifacts": [{"id": "a", "status": "COMPLETED", "createdAt": "2026-01-01T00:00:00Z"}],
}


def build(**changes: Any) -> Build:
    return parse_build(json.dumps({**FINISHED_PAYLOAD, **changes}).encode())


RUNNING = {"status": "BUILDING", "completedAt": None}


def test_a_build_seen_running_then_finished_is_counted_once_with_its_duration() -> None:
    store = BuildStore()
    store.track(["b1"])
    store.record_success("b1", build(**RUNNING), EPOCH)
    store.record_success("b1", build(), EPOCH + 1)
    store.record_success("b1", build(), EPOCH + 2)
    finished = store.snapshot().finished[("trainer", "COMPLETED")]
    assert finished.count == 1
    assert finished.durations.total == 600.0
    assert finished.durations.counts[finished.durations.bounds.index(600.0)] == 1


def test_a_build_already_finished_at_its_first_poll_is_not_counted() -> None:
    store = BuildStore()
    store.track(["b1"])
    store.record_success("b1", build(), EPOCH)
    assert store.snapshot().finished == {}
    assert store.snapshot().records["b1"].state is BuildState.FINISHED


QUEUED = {"status": "PENDING", "startedAt": None, "completedAt": None}


def queue_times(store: BuildStore) -> dict[str, tuple[int, float]]:
    return {name: (h.count, h.total) for name, h in store.snapshot().queued.items()}


def test_a_build_seen_queued_then_started_observes_its_queue_time_once() -> None:
    store = BuildStore()
    store.track(["b1"])
    store.record_success("b1", build(**QUEUED), EPOCH)
    store.record_success("b1", build(**RUNNING), EPOCH + 1)
    store.record_success("b1", build(**RUNNING), EPOCH + 2)
    store.record_success("b1", build(), EPOCH + 3)
    queued = store.snapshot().queued["trainer"]
    assert (queued.count, queued.total) == (1, 60.0)
    assert queued.counts[queued.bounds.index(60.0)] == 1


def test_a_build_already_started_at_its_first_poll_is_not_observed() -> None:
    store = BuildStore()
    store.track(["b1", "b2"])
    store.record_success("b1", build(**RUNNING), EPOCH)
    store.record_success("b2", build(id="b2"), EPOCH)
    assert queue_times(store) == {}


def test_a_start_is_observed_even_after_the_queued_values_went_stale() -> None:
    store = BuildStore()
    store.track(["b1"])
    store.record_success("b1", build(**QUEUED), EPOCH)
    assert store.sweep(EPOCH + 100, stale_after=60).expired == ["b1"]
    store.record_success("b1", build(**RUNNING), EPOCH + 200)
    assert queue_times(store) == {"trainer": (1, 60.0)}


def test_a_restored_build_is_observed_only_if_it_was_saved_queued() -> None:
    queued = BuildRecord("b1", build(**QUEUED), polled=True, seen_unstarted=True, restored=True)
    running = BuildRecord("b2", build(id="b2", **RUNNING), polled=True, restored=True)
    store = BuildStore({"b1": queued, "b2": running})
    store.track(["b1", "b2"])
    store.record_success("b1", build(**RUNNING), EPOCH)
    store.record_success("b2", build(id="b2"), EPOCH)
    assert queue_times(store) == {"trainer": (1, 60.0)}


def test_a_start_before_the_creation_is_not_observed() -> None:
    store = BuildStore()
    store.track(["b1"])
    store.record_success("b1", build(**QUEUED), EPOCH)
    store.record_success("b1", build(**RUNNING, startedAt="2025-12-31T23:59:00Z"), EPOCH + 1)
    assert queue_times(store) == {}
    assert not store.snapshot().records["b1"].seen_unstarted


def test_a_bucket_shows_the_last_build_observed_in_it() -> None:
    store = BuildStore()
    store.track(["b1", "b2", "b3"])
    for build_id, started in (("b1", "00:01:00"), ("b2", "00:00:50"), ("b3", "00:10:00")):
        store.record_success(build_id, build(id=build_id, **QUEUED), EPOCH)
        store.record_success(
            build_id, build(id=build_id, **RUNNING, startedAt=f"2026-01-01T{started}Z"), EPOCH + 1
        )
    queued = store.snapshot().queued["trainer"]
    exemplars = dict(zip((*queued.bounds, float("inf")), queued.exemplars, strict=True))
    assert exemplars[60.0] == Exemplar("b2", 50.0, EPOCH + 1)
    assert exemplars[600.0] == Exemplar("b3", 600.0, EPOCH + 1)
    assert exemplars[30.0] is None


def test_restored_tallies_go_on_counting() -> None:
    store = BuildStore(
        tallies=Tallies(
            {("trainer", "COMPLETED"): FinishedBuilds(count=4)},
            {"trainer": Histogram.empty(QUEUE_DURATION_BUCKETS).observe(30.0)},
        )
    )
    # Shown before anything is tracked.
    assert queue_times(store) == {"trainer": (1, 30.0)}
    assert store.snapshot().finished[("trainer", "COMPLETED")].count == 4
    store.track(["b1"])
    store.record_success("b1", build(**QUEUED), EPOCH)
    store.record_success("b1", build(), EPOCH + 1)
    snapshot = store.snapshot()
    assert snapshot.finished[("trainer", "COMPLETED")].count == 5
    assert queue_times(store) == {"trainer": (2, 90.0)}


def test_a_finish_is_counted_even_after_the_running_values_went_stale() -> None:
    store = BuildStore()
    store.track(["b1"])
    store.record_success("b1", build(**RUNNING), EPOCH)
    assert store.sweep(EPOCH + 100, stale_after=60).expired == ["b1"]
    assert store.snapshot().records["b1"].build is None
    store.record_success("b1", build(status="FAILED"), EPOCH + 200)
    assert store.snapshot().finished[("trainer", "FAILED")].count == 1


def test_a_failed_poll_keeps_the_last_good_answer_until_it_is_stale() -> None:
    store = BuildStore()
    store.track(["b1"])
    store.record_success("b1", build(**RUNNING), EPOCH)
    store.record_failure("b1", Outcome.SERVER_ERROR)
    record = store.snapshot().records["b1"]
    assert record.build is not None
    assert (record.last_poll_ok, record.last_error, record.state) == (
        False,
        Outcome.SERVER_ERROR,
        BuildState.FAILING,
    )
    assert record.last_success_time == EPOCH


def test_finished_builds_never_go_stale() -> None:
    store = BuildStore()
    store.track(["b1"])
    store.record_success("b1", build(), EPOCH)
    assert store.sweep(EPOCH + 10**9, stale_after=60).expired == []
    assert store.snapshot().records["b1"].build is not None


def test_tracking_a_new_set_keeps_retained_builds_and_drops_removed_ones() -> None:
    store = BuildStore()
    store.track(["b1", "b2"])
    store.record_success("b1", build(), EPOCH)
    added, removed = store.track(["b1", "b3"])
    assert (added, removed) == (["b3"], ["b2"])
    records = store.snapshot().records
    assert list(records) == ["b1", "b3"]
    assert records["b1"].finished
    assert not records["b3"].polled


def test_results_for_untracked_builds_are_ignored() -> None:
    store = BuildStore()
    store.track(["b1"])
    assert store.record_success("gone", build(id="gone"), EPOCH) is None
    assert store.record_failure("gone", Outcome.TIMEOUT) is None
    assert list(store.snapshot().records) == ["b1"]


def test_snapshot_is_reused_until_something_changes() -> None:
    store = BuildStore()
    store.track(["b1"])
    first = store.snapshot()
    assert store.snapshot() is first
    store.record_failure("b1", Outcome.TIMEOUT)
    second = store.snapshot()
    assert second is not first
    assert second.version > first.version
    # The same failure again changes nothing, so the snapshot (and its render) is kept.
    store.record_failure("b1", Outcome.TIMEOUT)
    assert store.snapshot() is second


def test_a_snapshot_never_changes_after_it_is_taken() -> None:
    store = BuildStore()
    store.track(["b1", "b2"])
    store.record_success("b1", build(id="b1"), EPOCH)
    taken = store.snapshot()
    before = dict(taken.records)
    store.record_failure("b1", Outcome.TIMEOUT)
    store.record_success("b2", build(id="b2"), EPOCH)
    store.track(["b2", "b3"])
    assert dict(taken.records) == before
    assert list(store.snapshot().records) == ["b2", "b3"]
    assert store.snapshot().records["b2"].last_poll_ok


def test_snapshots_are_ordered_by_build_id() -> None:
    store = BuildStore()
    store.track(["zeta", "alpha", "mid"])
    assert list(store.snapshot().records) == ["alpha", "mid", "zeta"]


def test_histogram_puts_each_value_in_the_first_bucket_that_holds_it() -> None:
    histogram = Histogram.empty((1.0, 10.0))
    for value in (0.5, 1.0, 5.0, 10.0, 11.0):
        histogram = histogram.observe(value)
    assert histogram.counts == (2, 2, 1)
    assert histogram.count == 5
    assert histogram.total == 27.5


def test_unknown_status_keeps_a_build_unfinished() -> None:
    store = BuildStore()
    store.track(["b1"])
    store.record_success("b1", build(status="ARCHIVED"), EPOCH)
    assert not store.snapshot().records["b1"].finished


def test_a_snapshot_names_the_builds_changed_since_an_earlier_version() -> None:
    store = BuildStore()
    store.track(["a", "b", "c"])
    start = store.snapshot().version
    store.record_success("a", build(id="a"), EPOCH)
    store.record_failure("b", Outcome.TIMEOUT, EPOCH)
    middle = store.snapshot().version
    store.track(["a", "b", "d"])
    store.sweep(EPOCH + 10**6, stale_after=1)
    snapshot = store.snapshot()
    assert snapshot.changed_since(start) == {"a", "b", "c", "d"}
    assert snapshot.changed_since(middle) == {"c", "d"}
    assert snapshot.changed_since(snapshot.version) == set()
    # A version later than the snapshot's own is not one it can answer for.
    assert snapshot.changed_since(snapshot.version + 1) is None


def test_a_reader_too_far_behind_is_told_that_anything_may_have_changed() -> None:
    store = BuildStore()
    store.track(["a"])
    first = store.snapshot().version
    for second in range(2000):
        store.record_success("a", build(id="a"), EPOCH + second)
    assert store.snapshot().changed_since(first) is None
    recent = store.snapshot().version
    store.record_failure("a", Outcome.TIMEOUT, EPOCH)
    assert store.snapshot().changed_since(recent) == {"a"}


def test_counts_by_state_follow_every_change() -> None:
    store = BuildStore()
    store.track(["a", "b", "c", "d"])
    store.record_success("a", build(id="a"), EPOCH)
    store.record_success("b", build(id="b", **RUNNING), EPOCH)
    store.record_failure("c", Outcome.SERVER_ERROR, EPOCH)
    store.mark_unpolled(Outcome.RATE_LIMITED)
    store.track(["a", "b", "c", "d", "e"])
    store.sweep(EPOCH + 10**6, stale_after=1)
    snapshot = store.snapshot()
    recounted = dict.fromkeys(BuildState, 0)
    for record in snapshot.records.values():
        recounted[record.state] += 1
    assert dict(snapshot.states) == recounted
    assert recounted[BuildState.UNPOLLED] == 1  # "e", added after the pause began


def test_builds_discovery_brought_come_back_from_the_state_marked_and_only_until_tracked() -> None:
    restored = {
        "configured": BuildRecord("configured", restored=True),
        "found": BuildRecord("found", restored=True, discovered=True),
    }
    store = BuildStore(restored)
    assert store.restored_discovered() == ["found"]
    store.track(["configured"], ["found"])
    records = store.snapshot().records
    assert (records["configured"].discovered, records["found"].discovered) == (False, True)
    assert records["found"].restored
    assert store.restored_discovered() == []


def test_a_retired_build_no_longer_keeps_its_image_known_and_a_stale_one_does() -> None:
    store = BuildStore()
    store.track(["finished", "running"])
    store.record_success("finished", build(id="finished", imageName="done"), EPOCH)
    store.record_success("running", build(id="running", imageName="app", **RUNNING), EPOCH)
    assert store.snapshot().images == {"done", "app"}
    store.sweep(EPOCH + 10**6, stale_after=60, retention=3600)
    snapshot = store.snapshot()
    assert snapshot.records["finished"].retired
    assert snapshot.records["running"].build is None
    assert snapshot.images == {"app"}


def test_the_images_are_the_same_object_until_an_image_comes_or_goes() -> None:
    store = BuildStore()
    store.track(["b1", "b2", "unnamed"])
    store.record_success("b1", build(id="b1", **RUNNING), EPOCH)
    first = store.snapshot().images
    store.record_success("b2", build(id="b2", **RUNNING), EPOCH)
    store.record_success("b1", build(id="b1"), EPOCH + 1)
    store.record_success("unnamed", build(id="unnamed", imageName=""), EPOCH)
    assert store.snapshot().images is first
    store.track(["b2", "unnamed"])
    assert store.snapshot().images is first
    store.track(["unnamed"])
    assert store.snapshot().images == set()
