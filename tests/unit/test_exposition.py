"""The kept /metrics body is always byte-for-byte what prometheus_client writes."""

from __future__ import annotations

import json
import random
import zlib

import pytest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter.demo.simulator import random_plans
from exporter.exposition import (
    BUILD_FAMILY_COUNT,
    OPENMETRICS_EOF,
    ExpositionFormat,
    render,
    render_tally_lines,
)
from exporter.exposition_cache import CHUNK_SIZE, FEW_CHANGED_BUILDS, Body, ExpositionCache
from exporter.metrics import summary_families, tally_families
from exporter.models import Build, Outcome, parse_build
from exporter.store import (
    FINISHED_DURATION_BUCKETS,
    QUEUE_DURATION_BUCKETS,
    BuildStore,
    FinishedBuilds,
    Snapshot,
)
from exporter.telemetry import Exemplar, Histogram
from tests.helpers.support import EPOCH, build_families, parse_samples

FORMATS = [ExpositionFormat.TEXT, ExpositionFormat.OPENMETRICS]


def tail_families() -> list[Metric]:
    return [GaugeMetricFamily("primeintellect_exporter_test_tail", "Per-scrape part.", value=1.0)]


def expected(store: BuildStore, format: ExpositionFormat, max_artifacts: int = 64) -> bytes:
    """What prometheus_client writes for the same families in one go."""
    builds = render(build_families(store.snapshot(), max_artifacts), format)
    return builds.removesuffix(OPENMETRICS_EOF) + render(tail_families(), format)


class Scenario:
    """A store of simulated builds that changes at random, with a seed."""

    def __init__(self, count: int, seed: int) -> None:
        self.random = random.Random(seed)
        self.plans = {plan.build_id: plan for plan in random_plans(count, EPOCH, self.random)}
        self.store = BuildStore()
        self.store.track(self.plans)
        for build_id in self.plans:
            self.poll(build_id)

    def poll(self, build_id: str) -> None:
        moment = EPOCH + self.random.uniform(0, 3000)
        payload = json.dumps(self.plans[build_id].payload(moment)).encode()
        self.store.record_success(build_id, parse_build(payload), moment)

    def change_something(self) -> None:
        build_id = self.random.choice(sorted(self.plans))
        action = self.random.random()
        if action < 0.6:
            self.poll(build_id)
        elif action < 0.8:
            self.store.record_failure(build_id, self.random.choice(list(Outcome)[1:]))
        elif action < 0.9:
            self.store.sweep(EPOCH + 10**6, stale_after=1)
        else:
            kept = [other for other in self.plans if other != build_id or action < 0.95]
            new = f"zz-new-{self.random.randrange(10**6)}"
            self.store.track([*kept, new])


@pytest.mark.parametrize("format", FORMATS, ids=["text", "openmetrics"])
def test_kept_body_matches_prometheus_client_through_many_changes(
    format: ExpositionFormat,
) -> None:
    scenario = Scenario(count=CHUNK_SIZE * 2 + 17, seed=1)
    cache = ExpositionCache(scenario.store.snapshot, tail_families)
    for _ in range(40):
        assert cache.body(format, gzip=False).join() == expected(scenario.store, format)
        scenario.change_something()


@pytest.mark.parametrize("format", FORMATS, ids=["text", "openmetrics"])
def test_gzip_body_is_one_member_holding_the_same_bytes(format: ExpositionFormat) -> None:
    # Several chunks, so segments are made anew after a changed one, and kept.
    scenario = Scenario(count=CHUNK_SIZE * 4 + 5, seed=2)
    cache = ExpositionCache(scenario.store.snapshot, tail_families)
    for _ in range(40):
        body = cache.body(format, gzip=True)
        raw = body.join()
        assert len(raw) == body.length
        decompressor = zlib.decompressobj(wbits=31)
        assert decompressor.decompress(raw) == expected(scenario.store, format)
        assert decompressor.eof
        assert decompressor.unused_data == b""
        scenario.change_something()


def test_empty_store_renders_headers_only() -> None:
    store = BuildStore()
    cache = ExpositionCache(store.snapshot, tail_families)
    for format in FORMATS:
        assert cache.body(format, gzip=False).join() == expected(store, format)


def test_changing_the_artifact_limit_renders_again() -> None:
    scenario = Scenario(count=10, seed=3)
    cache = ExpositionCache(scenario.store.snapshot, tail_families)
    before = cache.body(ExpositionFormat.TEXT, gzip=False).join()
    cache.set_max_artifacts_per_build(1)
    after = cache.body(ExpositionFormat.TEXT, gzip=False).join()
    assert after != before
    assert after == expected(scenario.store, ExpositionFormat.TEXT, max_artifacts=1)
    assert b"primeintellect_image_build_artifacts_omitted{" in after


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("gzip", [False, True])
def test_a_kept_body_is_brought_up_to_date_for_a_few_changed_builds_only(
    format: ExpositionFormat, gzip: bool
) -> None:
    scenario = Scenario(150, seed=7)
    cache = ExpositionCache(scenario.store.snapshot, tail_families)

    def plain(body: Body) -> bytes:
        return zlib.decompress(body.join(), wbits=31) if gzip else body.join()

    assert cache.kept_body(format, gzip=gzip) is None  # nothing rendered yet
    rendered = cache.body(format, gzip=gzip).join()
    kept = cache.kept_body(format, gzip=gzip)
    assert kept is not None
    assert kept.join() == rendered
    # A few changes: the kept body is brought up to date in place.
    for _ in range(3):
        scenario.change_something()
    kept = cache.kept_body(format, gzip=gzip)
    assert kept is not None
    assert plain(kept) == expected(scenario.store, format)
    # Many: left to a full body() call, off the event loop.
    for build_id in list(scenario.store.snapshot().records)[: FEW_CHANGED_BUILDS + 1]:
        scenario.store.record_failure(build_id, Outcome.TIMEOUT)
    assert cache.kept_body(format, gzip=gzip) is None
    assert plain(cache.body(format, gzip=gzip)) == expected(scenario.store, format)


def test_a_variant_never_asked_for_is_not_made_by_kept_body() -> None:
    scenario = Scenario(20, seed=8)
    cache = ExpositionCache(scenario.store.snapshot, tail_families)
    cache.body(ExpositionFormat.TEXT, gzip=False)
    assert cache.kept_body(ExpositionFormat.TEXT, gzip=True) is None
    assert cache.kept_body(ExpositionFormat.OPENMETRICS, gzip=False) is None


def test_a_variant_of_the_other_format_is_dropped_once_the_chunks_move_on() -> None:
    # Kept, it would hold the old chunks' bytes for as long as nobody asked for it again.
    scenario = Scenario(40, seed=9)
    cache = ExpositionCache(scenario.store.snapshot, tail_families)
    for format in FORMATS:
        cache.body(format, gzip=True)
    scenario.poll(sorted(scenario.plans)[0])
    assert cache.kept_body(ExpositionFormat.OPENMETRICS, gzip=True) is not None
    assert cache.kept_body(ExpositionFormat.TEXT, gzip=True) is None
    body = cache.body(ExpositionFormat.TEXT, gzip=True).join()
    assert zlib.decompress(body, wbits=31) == expected(scenario.store, ExpositionFormat.TEXT)


class ChangingTail:
    """Per-scrape families whose values, labels and membership change between scrapes."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.values = {"steady": 1.0, "moving": 0.0}

    def change(self) -> None:
        self.values["moving"] += self.random.choice([0.0, 1.0, 0.5])
        # A family that comes and goes; NaN never equals itself, so it is always new.
        if self.random.random() < 0.3 and self.values.pop("sometimes", None) is None:
            self.values["sometimes"] = float("nan")

    def families(self) -> list[Metric]:
        families: list[Metric] = []
        for name, value in self.values.items():
            family = GaugeMetricFamily(
                f"primeintellect_exporter_test_{name}", f"{name} \\ \n part.", labels=("kind",)
            )
            family.add_metric(('quoted "' + name + '"',), value)
            families.append(family)
        return families


@pytest.mark.parametrize("format", FORMATS, ids=["text", "openmetrics"])
@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
def test_per_scrape_families_show_their_current_values_on_every_scrape(
    format: ExpositionFormat, gzip: bool
) -> None:
    scenario = Scenario(count=20, seed=11)
    tail = ChangingTail(seed=12)
    cache = ExpositionCache(scenario.store.snapshot, tail.families)
    builds = render(build_families(scenario.store.snapshot()), format).removesuffix(OPENMETRICS_EOF)
    for _ in range(30):
        kept = cache.kept_body(format, gzip=gzip)
        body = (kept or cache.body(format, gzip=gzip)).join()
        plain = zlib.decompress(body, wbits=31) if gzip else body
        assert plain == builds + render(tail.families(), format)
        tail.change()


def new_pieces(before: Body, after: Body) -> list[bytes]:
    """Pieces of ``after`` that are not objects of ``before``: what was rendered anew."""
    kept = {id(piece) for piece in before.pieces}
    return [piece for piece in after.pieces if id(piece) not in kept]


def build_pieces(pieces: list[bytes]) -> list[bytes]:
    # The summary families (builds by state) change with any change of the tracked set.
    return [piece for piece in pieces if b"primeintellect_exporter_builds{" not in piece]


def middle_id(store: BuildStore) -> str:
    ids = sorted(store.snapshot().records)
    return ids[len(ids) // 2] + "-inserted"


@pytest.mark.parametrize("change", ["add", "remove", "add and remove"])
def test_a_change_of_the_tracked_set_renders_only_the_chunks_of_the_builds_it_touches(
    change: str,
) -> None:
    scenario = Scenario(count=CHUNK_SIZE * 6, seed=21)
    cache = ExpositionCache(scenario.store.snapshot, list)
    before = cache.body(ExpositionFormat.TEXT, gzip=False)
    chunks_before = cache.placement()
    tracked = sorted(scenario.store.snapshot().records)
    touched = set()
    if "add" in change:
        touched.add(middle_id(scenario.store))
        tracked.append(middle_id(scenario.store))
    if "remove" in change:
        touched.add(tracked.pop(5))
    scenario.store.track(tracked)
    after = cache.body(ExpositionFormat.TEXT, gzip=False)
    assert after.join() == render(build_families(scenario.store.snapshot()), ExpositionFormat.TEXT)
    chunks_after = cache.placement()
    # Every chunk but the one each touched build falls in is still there, with the same
    # builds...
    changed = [chunk for chunk in chunks_before if chunk not in chunks_after]
    assert len(changed) == len(touched)
    assert len(chunks_after) == len(chunks_before)
    # ...and its bytes were not rendered again: new pieces come from one chunk per touched
    # build, at most one piece per family each.
    rendered_again = build_pieces(new_pieces(before, after))
    assert 0 < len(rendered_again) <= len(touched) * BUILD_FAMILY_COUNT


def test_placement_survives_a_reload_that_keeps_the_tracked_set() -> None:
    scenario = Scenario(count=CHUNK_SIZE * 4, seed=22)
    cache = ExpositionCache(scenario.store.snapshot, list)
    before = cache.body(ExpositionFormat.OPENMETRICS, gzip=True)
    chunks = cache.placement()
    scenario.store.track(sorted(scenario.store.snapshot().records, reverse=True))
    after = cache.body(ExpositionFormat.OPENMETRICS, gzip=True)
    assert cache.placement() == chunks
    assert after.pieces == before.pieces


def test_chunks_stay_bounded_as_builds_come_and_go() -> None:
    scenario = Scenario(count=CHUNK_SIZE, seed=23)
    cache = ExpositionCache(scenario.store.snapshot, list)
    rng = random.Random(24)
    tracked = sorted(scenario.store.snapshot().records)
    for round_number in range(30):
        # Grow in the middle and at the end, shrink at random.
        tracked += [f"{rng.choice(tracked)}-{round_number}-{n}" for n in range(20)]
        for _ in range(rng.randrange(15)):
            tracked.remove(rng.choice(tracked))
        scenario.store.track(tracked)
        body = cache.body(ExpositionFormat.TEXT, gzip=False).join()
        assert body == render(build_families(scenario.store.snapshot()), ExpositionFormat.TEXT)
    placement = cache.placement()
    assert [build_id for chunk in placement for build_id in chunk] == sorted(tracked)
    assert all(0 < len(chunk) <= 2 * CHUNK_SIZE for chunk in placement)


def test_a_reader_behind_a_restarted_change_log_renders_everything_again() -> None:
    scenario = Scenario(count=10, seed=25)
    cache = ExpositionCache(scenario.store.snapshot, tail_families)
    cache.body(ExpositionFormat.TEXT, gzip=True)
    # Far more changes than the log keeps for ten builds.
    for _ in range(3000):
        scenario.change_something()
    assert scenario.store.snapshot().changed_since(1) is None
    body = cache.body(ExpositionFormat.TEXT, gzip=True).join()
    assert zlib.decompress(body, wbits=31) == expected(scenario.store, ExpositionFormat.TEXT)


def test_an_exemplar_too_long_for_openmetrics_is_left_out_and_its_bucket_kept() -> None:
    long_id, short_id = "b" * 121, "b" * 120
    finished = {}
    for build_id in (long_id, short_id):
        histogram = Histogram.empty(FINISHED_DURATION_BUCKETS).observe(
            30.0, Exemplar(build_id, 30.0, EPOCH)
        )
        finished[(build_id, "COMPLETED")] = FinishedBuilds(1, histogram)
    snapshot = Snapshot(version=1, records={}, finished=finished)
    text = render(summary_families(snapshot), ExpositionFormat.OPENMETRICS).decode()
    assert f'# {{build_id="{short_id}"}} 30.0 {EPOCH}' in text
    assert f'build_id="{long_id}"' not in text
    assert f'{{image_name="{long_id}",le="60.0",status="COMPLETED"}} 1.0\n' in text
    plain = render(summary_families(snapshot), ExpositionFormat.TEXT).decode()
    assert "# {" not in plain


# -- the tally series of every known image -----------------------------------------------------

FINISHED_TOTAL = "primeintellect_image_builds_finished_total"
FINISHED_DURATIONS = "primeintellect_image_builds_finished_duration_seconds"
QUEUE_DURATIONS = "primeintellect_image_builds_queue_duration_seconds"
TALLY_STATUSES = ("COMPLETED", "FAILED", "CANCELLED")


def tally_samples(
    store: BuildStore, format: ExpositionFormat, image_name: str
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The image's samples of the tally families in the kept body, by name and other labels."""
    text = ExpositionCache(store.snapshot, list).body(format, gzip=False).join().decode()
    families = (
        openmetrics_families(text)  # type: ignore[no-untyped-call]
        if format is ExpositionFormat.OPENMETRICS
        else text_string_to_metric_families(text)
    )
    return {
        (sample.name, frozenset(sample.labels.items()) - {("image_name", image_name)}): (
            sample.value
        )
        for family in families
        if family.name
        in (FINISHED_TOTAL.removesuffix("_total"), FINISHED_DURATIONS, QUEUE_DURATIONS)
        for sample in family.samples
        if sample.labels.get("image_name") == image_name
    }


def answer(build_id: str, image_name: str, **changes: object) -> Build:
    payload = {
        "id": build_id,
        "imageName": image_name,
        "imageTag": "v1",
        "status": "BUILDING",
        "createdAt": "2026-01-01T00:00:00Z",
        "startedAt": "2026-01-01T00:00:30Z",
        "completedAt": None,
        **changes,
    }
    return parse_build(json.dumps(payload).encode())


FAILED_AFTER_TEN_MINUTES = {"status": "FAILED", "completedAt": "2026-01-01T00:10:30Z"}


@pytest.mark.parametrize("format", FORMATS)
def test_an_image_with_only_an_unfinished_build_has_each_finish_at_0_and_empty_histograms(
    format: ExpositionFormat,
) -> None:
    store = BuildStore()
    store.track(["b1"])
    store.record_success("b1", answer("b1", "app"), EPOCH)
    samples = tally_samples(store, format, "app")
    for status in TALLY_STATUSES:
        labels = frozenset({("status", status)})
        assert samples[(FINISHED_TOTAL, labels)] == 0.0
        assert samples[(f"{FINISHED_DURATIONS}_count", labels)] == 0.0
        assert samples[(f"{FINISHED_DURATIONS}_sum", labels)] == 0.0
        assert samples[(f"{FINISHED_DURATIONS}_bucket", labels | {("le", "+Inf")})] == 0.0
    assert samples[(f"{QUEUE_DURATIONS}_count", frozenset())] == 0.0
    assert samples[(f"{QUEUE_DURATIONS}_bucket", frozenset({("le", "1.0")}))] == 0.0
    # Every bucket of both histograms: FINISHED_DURATION_BUCKETS and +Inf for each status,
    # the queue's eleven and +Inf.
    buckets = [name for name, _ in samples if name.endswith("_bucket")]
    assert len(buckets) == 3 * (len(FINISHED_DURATION_BUCKETS) + 1) + 12


def test_the_empty_histograms_carry_no_exemplars() -> None:
    store = BuildStore()
    store.track(["b1"])
    store.record_success("b1", answer("b1", "app"), EPOCH)
    body = ExpositionCache(store.snapshot, list).body(ExpositionFormat.OPENMETRICS, gzip=False)
    tally_lines = [
        line
        for line in body.join().decode().splitlines()
        if line.startswith((FINISHED_DURATIONS, QUEUE_DURATIONS))
    ]
    assert tally_lines
    assert not [line for line in tally_lines if " # " in line]


def test_an_images_first_failure_takes_its_failed_count_from_0_to_1_others_staying_0() -> None:
    store = BuildStore()
    store.track(["b1"])
    store.record_success("b1", answer("b1", "app"), EPOCH)
    cache = ExpositionCache(store.snapshot, list)

    def finishes() -> dict[str, float]:
        text = cache.body(ExpositionFormat.TEXT, gzip=False).join().decode()
        samples = parse_samples(text)
        return {
            status: samples[
                (FINISHED_TOTAL, frozenset({("image_name", "app"), ("status", status)}))
            ]
            for status in TALLY_STATUSES
        }

    before = finishes()
    store.record_success("b1", answer("b1", "app", **FAILED_AFTER_TEN_MINUTES), EPOCH + 700)
    after = finishes()
    assert before == {"COMPLETED": 0.0, "FAILED": 0.0, "CANCELLED": 0.0}
    # Both scrapes have the series: increase() over a window spanning them is 1.
    assert after == {"COMPLETED": 0.0, "FAILED": 1.0, "CANCELLED": 0.0}


def test_an_image_with_no_builds_left_and_no_counts_is_gone_and_a_counted_one_stays() -> None:
    store = BuildStore()
    store.track(["counted", "uncounted"])
    store.record_success("counted", answer("counted", "trainer"), EPOCH)
    store.record_success("counted", answer("counted", "trainer", **FAILED_AFTER_TEN_MINUTES), EPOCH)
    store.record_success("uncounted", answer("uncounted", "app"), EPOCH)
    assert tally_samples(store, ExpositionFormat.TEXT, "app")
    store.track([])
    assert tally_samples(store, ExpositionFormat.TEXT, "app") == {}
    trainer = tally_samples(store, ExpositionFormat.TEXT, "trainer")
    assert trainer[(FINISHED_TOTAL, frozenset({("status", "FAILED")}))] == 1.0
    assert trainer[(FINISHED_TOTAL, frozenset({("status", "COMPLETED")}))] == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_tally_lines_are_what_prometheus_client_writes(seed: int) -> None:
    rng = random.Random(seed)
    names = ["app", 'q"uote', "back\\slash", "new\nline", "é", "", "b" * 125]
    finished = {}
    queued = {}
    for name in rng.sample(names, 4):
        for status in rng.sample(["COMPLETED", "FAILED", "CANCELLED", "UNKNOWN"], 2):
            durations = Histogram.empty(FINISHED_DURATION_BUCKETS)
            for _ in range(rng.randrange(3)):
                value = rng.choice([30.0, 599.5, 10**5 + 0.25])
                exemplar = Exemplar(rng.choice(["b1", name or "x"]), value, EPOCH + rng.random())
                durations = durations.observe(value, exemplar if rng.random() < 0.8 else None)
            finished[(name, status)] = FinishedBuilds(rng.randrange(1, 300), durations)
    for name in rng.sample(names, 3):
        # A histogram as an older exporter's state file may hold it, of other bounds.
        histogram = Histogram.empty(rng.choice([QUEUE_DURATION_BUCKETS, (0.5, 1e10)]))
        queued[name] = histogram.observe(rng.random() * 100, Exemplar("b2", 1.5, EPOCH))
    images = frozenset(rng.sample([*names, "only-tracked"], 4))
    snapshot = Snapshot(1, {}, finished, queued=queued, images=images)
    for format in ExpositionFormat:
        reference = render(tally_families(snapshot), format).decode()
        samples = "".join(line + "\n" for line in reference.splitlines() if line[0] != "#")
        written = b"".join(render_tally_lines(snapshot, format)).decode()
        assert written == samples
