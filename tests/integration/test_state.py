"""Durable state: a restart requests no finished build again and is ready at once."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from exporter.demo.simulator import BuildPlan, Simulator, random_plans
from exporter.exposition import ExpositionFormat, render
from exporter.metrics import summary_families
from exporter.models import Build, Outcome, parse_build
from exporter.state import SCHEMA_VERSION, Restored, StateFile, StateSync, encode_build, open_state
from exporter.store import BuildRecord, BuildStore
from exporter.telemetry import StateStatus
from tests.helpers.support import (
    CANARY_API_KEY,
    EPOCH,
    Daemon,
    RunningExporter,
    environment,
    make_config,
    parse_samples,
    polls,
    wait_until,
)

FINISHED = 1_000
UNFINISHED = 100


def finished_plan(index: int) -> BuildPlan:
    return BuildPlan(f"done-{index:04d}", "app", f"v{index}", EPOCH, 10, 10, 10)


def unfinished_plan(index: int) -> BuildPlan:
    return BuildPlan(f"busy-{index:03d}", "trainer", "v1", EPOCH, 10, 10, float("inf"))


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    with Simulator(CANARY_API_KEY) as running:
        for index in range(FINISHED):
            running.add(finished_plan(index))
        for index in range(UNFINISHED):
            running.add(unfinished_plan(index))
        yield running


def exporter_with_state(
    simulator: Simulator, state_path: Path, build_ids: list[str] | None = None
) -> RunningExporter:
    config = make_config(
        simulator.base_url,
        simulator.build_ids if build_ids is None else build_ids,
        requests_per_second=2_000,
        max_concurrency=16,
        interval="2s",
        state_path=state_path,
    )
    return RunningExporter(config)


def requests_by_build(simulator: Simulator) -> dict[str, int]:
    counts: dict[str, int] = {}
    for request in simulator.requests():
        counts[request.build_id] = counts.get(request.build_id, 0) + 1
    return counts


def test_restart_requests_no_finished_build_again_and_is_ready_at_once(
    simulator: Simulator, tmp_path: Path
) -> None:
    state_path = tmp_path / "state.db"
    first = exporter_with_state(simulator, state_path).start()
    try:
        first.wait_until_all_polled(timeout=60)
    finally:
        first.stop()
    before = requests_by_build(simulator)
    assert len(before) == FINISHED + UNFINISHED

    started = time.monotonic()
    second = exporter_with_state(simulator, state_path).start()
    try:
        wait_until(
            lambda: httpx.get(second.url + "/-/ready").status_code == 200,
            message="ready",
        )
        ready_after = time.monotonic() - started
        samples = second.samples()
        # Every build is exposed from the state before this process polled anything.
        assert samples[("primeintellect_exporter_state_restored_builds", frozenset())] == 1_100
        assert samples[("primeintellect_exporter_builds", frozenset({("state", "finished")}))] == (
            FINISHED
        )
        assert samples[("primeintellect_exporter_builds", frozenset({("state", "unpolled")}))] == 0
        info = [key for key in samples if key[0] == "primeintellect_image_build_info"]
        assert len(info) == FINISHED + UNFINISHED
        # The unfinished builds are polled again, in time; the finished ones never.
        wait_until(
            lambda: all(
                requests_by_build(simulator).get(plan_id, 0) > before[plan_id]
                for plan_id in before
                if plan_id.startswith("busy-")
            ),
            timeout=30,
            message="unfinished builds polled again",
        )
    finally:
        second.stop()
    after = requests_by_build(simulator)
    assert {b for b in after if after[b] > before[b] and b.startswith("done-")} == set()
    # Readiness after a restart is real time: 0.2 s on a quiet machine (measured), ten times that.
    assert ready_after < 2


def test_builds_not_polled_yet_are_reported_and_do_not_hold_readiness(
    simulator: Simulator,
) -> None:
    config = make_config(simulator.base_url, simulator.build_ids, requests_per_second=1)
    exporter = RunningExporter(config).start()
    try:
        assert exporter.get("/-/ready").status_code == 200
        unpolled = exporter.value("primeintellect_exporter_builds", state="unpolled")
        assert unpolled is not None
        assert unpolled > FINISHED
    finally:
        exporter.stop()


def test_removed_builds_leave_the_state(simulator: Simulator, tmp_path: Path) -> None:
    state_path = tmp_path / "state.db"
    kept = [f"done-{index:04d}" for index in range(10)]
    gone = [f"done-{index:04d}" for index in range(10, 20)]
    first = exporter_with_state(simulator, state_path, kept + gone).start()
    first.wait_until_all_polled()
    first.stop()
    second = exporter_with_state(simulator, state_path, kept).start()
    second.stop()
    state, restored = opened(state_path)
    assert state is not None
    state.close()
    assert sorted(restored.records) == kept


def test_a_corrupt_state_file_is_moved_aside_and_the_exporter_starts_fresh(
    simulator: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_path = tmp_path / "state.db"
    state_path.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.INFO, logger="exporter.state"):
        exporter = exporter_with_state(simulator, state_path, ["done-0001"]).start()
        try:
            exporter.wait_until_all_polled()
            assert exporter.value("primeintellect_exporter_state_restored_builds") == 0
        finally:
            exporter.stop()
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert [record.getMessage() for record in errors] == [
        "state file unreadable: moved aside, starting with a fresh state"
    ]
    assert [path.name.split("-")[0] for path in tmp_path.glob("state.db.unreadable-*")] == [
        "state.db.unreadable"
    ]
    # The fresh file works: a third start restores the build.
    state, restored = opened(state_path)
    assert state is not None
    state.close()
    assert list(restored.records) == ["done-0001"]


def test_a_state_file_from_a_newer_exporter_is_set_aside(tmp_path: Path) -> None:
    state_path = tmp_path / "state.db"
    with sqlite3.connect(state_path) as connection:
        connection.execute("PRAGMA user_version=99")
    state, restored = opened(state_path)
    assert state is not None
    state.close()
    assert restored.records == {}
    assert len(list(tmp_path.glob("state.db.unreadable-*"))) == 1


# The table as schema 1 made it, before builds could be discovered.
SCHEMA_1 = """
CREATE TABLE builds (
    build_id TEXT PRIMARY KEY, answer TEXT, finished INTEGER NOT NULL,
    seen_unfinished INTEGER NOT NULL, polled INTEGER NOT NULL, last_poll_ok INTEGER NOT NULL,
    last_error TEXT, last_poll_time REAL, last_success_time REAL, last_change_time REAL,
    retired INTEGER NOT NULL
) WITHOUT ROWID
"""


def write_schema_1_file(state_path: Path, build: Build) -> None:
    """A state file as an exporter of schema 1 wrote it, holding ``build``, finished."""
    with sqlite3.connect(state_path) as connection:
        connection.execute(SCHEMA_1)
        connection.execute(
            "INSERT INTO builds VALUES (?, ?, 1, 1, 1, 1, NULL, ?, ?, ?, 0)",
            (build.id, encode_build(build), EPOCH, EPOCH, EPOCH),
        )
        connection.execute("PRAGMA user_version=1")
    connection.close()


def test_a_state_file_of_schema_1_is_taken_up_with_every_build_configured(tmp_path: Path) -> None:
    state_path = tmp_path / "state.db"
    done = finished_plan(1)
    build = record_of(done).build
    assert build is not None
    write_schema_1_file(state_path, build)
    state, restored = opened(state_path)
    assert state is not None
    try:
        record = restored.records[done.build_id]
        assert record.finished
        assert not record.discovered
        state.save([dataclasses.replace(record, discovered=True)])
    finally:
        state.close()
    reopened, again = opened(state_path)
    assert reopened is not None
    reopened.close()
    assert again.records[done.build_id].discovered
    with sqlite3.connect(state_path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_state_file_of_schema_1_held_by_another_process_is_still_restored(
    tmp_path: Path,
) -> None:
    state_path = tmp_path / "state.db"
    done = finished_plan(1)
    build = record_of(done).build
    assert build is not None
    write_schema_1_file(state_path, build)
    # Another process's lock: the file is read as it is, without migrating it.
    lock = os.open(state_path.with_name("state.db.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = open_state(state_path)
    finally:
        os.close(lock)
    assert (result.file, result.status) == (None, StateStatus.LOCKED)
    assert result.restored.unreadable == 0
    record = result.restored.records[done.build_id]
    assert record.finished
    assert not record.discovered


def test_a_state_file_held_by_another_process_is_read_but_never_written(
    simulator: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_path = tmp_path / "state.db"
    holder = StateFile.open(state_path)
    try:
        with caplog.at_level(logging.WARNING, logger="exporter.state"):
            exporter = exporter_with_state(simulator, state_path, ["done-0001"]).start()
            try:
                exporter.wait_until_all_polled()
            finally:
                exporter.stop()
        assert [record.getMessage() for record in caplog.records] == [
            "state file held by another process: restored from it, the state stays in memory"
            " until the other process lets it go"
        ]
        assert holder.load().records == {}
    finally:
        holder.close()


def test_unreadable_rows_are_skipped_and_the_rest_restored(tmp_path: Path) -> None:
    state_path = tmp_path / "state.db"
    writer = StateFile.open(state_path)
    good = record_of(finished_plan(1))
    writer.save([good, record_of(finished_plan(2))])
    writer.close()
    with sqlite3.connect(state_path) as connection:
        connection.execute("UPDATE builds SET answer = '{\"id\": 3' WHERE build_id = 'done-0002'")
    state, restored = opened(state_path)
    assert state is not None
    state.close()
    assert list(restored.records) == [good.build_id]
    assert restored.unreadable == 1
    assert restored.records[good.build_id].build == good.build


def opened(path: Path) -> tuple[StateFile | None, Restored]:
    """The file to write (None: memory only) and what it gave back."""
    result = open_state(path)
    return result.file, result.restored


def record_of(plan: BuildPlan, now: float = EPOCH + 3_000) -> BuildRecord:
    build = parse_build(json.dumps(plan.payload(now)).encode())
    return BuildRecord(
        plan.build_id,
        build,
        finished=build.finished,
        polled=True,
        last_poll_ok=True,
        last_success_time=now,
        last_poll_time=now,
        last_change_time=now - 5,
    )


@pytest.mark.parametrize("seed", range(5))
def test_a_saved_answer_reads_back_as_the_same_build(seed: int) -> None:
    generator = random.Random(seed)
    for plan in random_plans(50, EPOCH, generator):
        payload = plan.payload(EPOCH + generator.uniform(0, 5_000))
        # Hostile text and sub-second times survive the round trip unchanged.
        payload["imageName"] = "x\u2028\x1b[31m\"'<b>" + "é" * generator.randrange(300)
        payload["createdAt"] = "2026-01-01T00:00:00.123456+02:00"
        build = parse_build(json.dumps(payload).encode())
        assert parse_build(encode_build(build).encode()) == build


def test_every_field_of_a_record_survives_a_restart(tmp_path: Path) -> None:
    state_path = tmp_path / "state.db"
    failing = BuildRecord(
        "busy-007",
        None,
        polled=True,
        last_poll_ok=False,
        last_error=Outcome.SERVER_ERROR,
        last_poll_time=EPOCH + 1,
        seen_unfinished=True,
    )
    discovered = dataclasses.replace(record_of(finished_plan(3)), discovered=True)
    queued = dataclasses.replace(record_of(unfinished_plan(4), EPOCH + 5), seen_unstarted=True)
    records = [
        record_of(finished_plan(1)),
        record_of(unfinished_plan(2)),
        failing,
        discovered,
        queued,
    ]
    writer = StateFile.open(state_path)
    writer.save(records)
    writer.close()
    state, restored = opened(state_path)
    assert state is not None
    state.close()
    for record in records:
        assert restored.records[record.build_id] == dataclasses.replace(record, restored=True)


def test_retention_drops_exactly_the_builds_finished_longer_ago_also_after_a_restart(
    tmp_path: Path,
) -> None:
    now = EPOCH + 10_030
    # Build i completes at EPOCH + i * 1000 + 30; with 5000s of retention, 0 to 5 are past it.
    plans = [
        BuildPlan(f"aged-{i}", "app", f"v{i}", EPOCH + i * 1_000, 10, 10, 10) for i in range(10)
    ]
    plans.append(unfinished_plan(1))
    state_path = tmp_path / "state.db"

    def start(simulator: Simulator) -> RunningExporter:
        config = make_config(
            simulator.base_url,
            simulator.build_ids,
            finished_build_retention="5000s",
            state_path=state_path,
        )
        return RunningExporter(config, wall_clock=lambda: now).start()

    def exposed(exporter: RunningExporter) -> set[str]:
        return {
            dict(labels)["build_id"]
            for name, labels in exporter.samples()
            if name == "primeintellect_image_build_last_poll_success"
        }

    expected = {f"aged-{i}" for i in range(6, 10)} | {"busy-001"}
    with Simulator(CANARY_API_KEY, plans, clock=lambda: now) as simulator:
        first = start(simulator)
        try:
            wait_until(lambda: exposed(first) == expected, message="retention applied")
            finished = first.value("primeintellect_exporter_builds", state="finished")
        finally:
            first.stop()
        assert finished == 10
        polled = requests_by_build(simulator)
        second = start(simulator)
        try:
            assert exposed(second) == expected
        finally:
            second.stop()
        again = requests_by_build(simulator)
    assert {b for b in again if b.startswith("aged-") and again[b] > polled[b]} == set()


@pytest.mark.parametrize("problem", ["directory", "parent_is_a_file"])
def test_a_state_path_that_cannot_be_used_is_left_untouched_and_the_state_kept_in_memory(
    tmp_path: Path, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    state_path = tmp_path / "state" / "state.db"
    state_path.parent.mkdir()
    if problem == "directory":
        state_path.mkdir()
    else:
        state_path.parent.rmdir()
        state_path.parent.write_text("not a directory")
        state_path = state_path.parent / "state.db"
    existed = state_path.exists()
    with caplog.at_level(logging.ERROR, logger="exporter.state"):
        result = open_state(state_path)
    assert result.file is None
    assert result.status == StateStatus.UNUSABLE
    assert result.restored.records == {}
    assert [r.getMessage() for r in caplog.records] == [
        "state file unusable; the state stays in memory only"
    ]
    # Nothing moved aside: the file is not at fault.
    assert state_path.exists() == existed
    assert list(tmp_path.rglob("*unreadable*")) == []


def test_a_state_file_in_a_missing_directory_is_never_created_with_its_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_path = tmp_path / "typo" / "state.db"
    with caplog.at_level(logging.ERROR, logger="exporter.state"):
        opened = open_state(state_path)
    assert (opened.file, opened.restored.records) == (None, {})
    assert opened.status is StateStatus.UNUSABLE
    [record] = caplog.records
    assert record.getMessage() == "state file unusable; the state stays in memory only"
    assert record.__dict__["reason"] == f"its directory {tmp_path / 'typo'} does not exist"
    assert list(tmp_path.iterdir()) == []


def test_a_killed_exporter_leaves_a_state_file_the_next_one_takes_up(
    simulator: Simulator, tmp_path: Path
) -> None:
    state_path = tmp_path / "state.db"
    build_ids = [f"done-{index:04d}" for index in range(50)]
    builds = "\n".join(f"  - {build_id}" for build_id in build_ids)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"api:\n  base_url: {simulator.base_url}\n  requests_per_second: 500\n"
        f"builds:\n{builds}\nstate:\n  path: {state_path}\n"
        "web:\n  listen_address: 127.0.0.1:0\n"
    )
    env = environment(PRIME_API_KEY=CANARY_API_KEY)
    first = Daemon("--config.file", str(config), env=env)
    try:
        url = first.wait_for_url()

        def saved() -> int:
            probe = sqlite3.connect(f"file:{state_path}?mode=ro", uri=True)
            try:
                # A row is written for a build before its first answer: count answered ones.
                query = "SELECT count(*) FROM builds WHERE finished = 1"
                return int(probe.execute(query).fetchone()[0])
            except sqlite3.OperationalError:
                return 0
            finally:
                probe.close()

        wait_until(lambda: httpx.get(url + "/-/ready").status_code == 200, message="ready")
        wait_until(lambda: saved() == 50, message="every build written")
    finally:
        # No clean stop: the kernel releases the lock, SQLite recovers the journal.
        first.kill()
    requested = len(simulator.requests())
    second = Daemon("--config.file", str(config), env=env)
    try:
        url = second.wait_for_url()
        samples = parse_samples(httpx.get(url + "/metrics").text)
        restored = samples[("primeintellect_exporter_state_restored_builds", frozenset())]
        finished = samples[("primeintellect_exporter_builds", frozenset({("state", "finished")}))]
    finally:
        second.stop()
    assert (restored, finished) == (50, 50)
    assert len(simulator.requests()) == requested


# The table as schema 2 made it, before starts were observed and tallies kept.
SCHEMA_2 = SCHEMA_1.replace(
    "retired INTEGER NOT NULL", "retired INTEGER NOT NULL, discovered INTEGER NOT NULL DEFAULT 0"
)


def test_a_state_file_of_schema_2_observes_queued_builds_and_gets_health_from_finished_ones(
    tmp_path: Path,
) -> None:
    state_path = tmp_path / "state.db"
    queued_plan = BuildPlan("queued", "trainer", "v1", EPOCH, 600, 10, 10)
    running_plan = BuildPlan("running", "trainer", "v1", EPOCH, 10, 10, 600)
    queued, running = record_of(queued_plan, EPOCH + 5), record_of(running_plan, EPOCH + 100)
    failed = record_of(BuildPlan("failed", "trainer", "v0", EPOCH, 10, 10, 10, "FAILED"))
    with sqlite3.connect(state_path) as connection:
        connection.execute(SCHEMA_2)
        for record in (queued, running, failed):
            assert record.build is not None
            connection.execute(
                "INSERT INTO builds VALUES (?, ?, ?, 1, 1, 1, NULL, ?, ?, ?, 0, 1)",
                (
                    record.build_id,
                    encode_build(record.build),
                    int(record.finished),
                    EPOCH,
                    EPOCH,
                    EPOCH,
                ),
            )
        connection.execute("PRAGMA user_version=2")
    connection.close()
    state, restored = opened(state_path)
    assert state is not None
    state.close()
    assert restored.records["queued"].seen_unstarted
    assert not restored.records["running"].seen_unstarted
    assert restored.records["running"].discovered
    store = BuildStore(restored.records, restored.tallies, restored.health)
    # The file kept no health: it comes from the finished builds it holds.
    health = store.snapshot().health[("trainer", "v0")]
    assert (health.consecutive_failures, health.failing_since) == (1, EPOCH + 30)
    store.track(["queued", "running"])
    for plan in (queued_plan, running_plan):
        store.record_success(
            plan.build_id, parse_build(json.dumps(plan.payload(EPOCH + 700)).encode()), EPOCH + 700
        )
    assert {name: h.count for name, h in store.snapshot().queued.items()} == {"trainer": 1}
    with sqlite3.connect(state_path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    connection.close()


def test_the_tallies_are_written_with_the_builds_and_read_back(tmp_path: Path) -> None:
    state_path = tmp_path / "state.db"
    plan = BuildPlan("b1", "trainer", "v1", EPOCH, 30, 10, 60)
    state, restored = opened(state_path)
    assert state is not None
    store = BuildStore(restored.records, restored.tallies, restored.health)
    store.track(["b1"])
    for moment in (EPOCH + 5, EPOCH + 50, EPOCH + 200):
        answer = parse_build(json.dumps(plan.payload(moment)).encode())
        store.record_success("b1", answer, moment)
    sync = StateSync(state, restored)
    assert sync.sync(store.snapshot()) == 1
    sync.close()
    written = store.snapshot()
    state, again = opened(state_path)
    assert state is not None
    state.close()
    assert dict(again.tallies.finished) == dict(written.finished)
    assert dict(again.tallies.queued) == dict(written.queued)
    assert again.tallies.queued["trainer"].total == 30.0
    assert not again.records["b1"].seen_unstarted
    assert dict(again.health) == dict(written.health)
    assert again.health[("trainer", "v1")].last_success == EPOCH + 100


def test_a_restart_writes_no_restored_build_again(tmp_path: Path) -> None:
    state_path = tmp_path / "state.db"
    plans = [
        BuildPlan("configured", "app", "v1", EPOCH, 5, 5, 5),
        BuildPlan("discovered", "app", "v2", EPOCH, 5, 5, float("inf")),
    ]
    state, restored = opened(state_path)
    assert state is not None
    store = BuildStore(restored.records, restored.tallies, restored.health)
    store.track(["configured"], ["discovered"])
    for plan in plans:
        answer = parse_build(json.dumps(plan.payload(EPOCH + 100)).encode())
        store.record_success(plan.build_id, answer, EPOCH + 100)
    sync = StateSync(state, restored)
    assert sync.sync(store.snapshot()) == 2
    sync.close()
    state, again = opened(state_path)
    assert state is not None
    restarted = BuildStore(again.records, again.tallies, again.health)
    restarted.track(["configured"], ["discovered"])
    sync = StateSync(state, again)
    # Each restored record is unchanged: nothing to write (at 50,000 builds, rewriting them
    # all held the first scrape back for seconds).
    assert sync.sync(restarted.snapshot()) == 0
    # A build that discovery brought and the configuration now names is written again.
    restarted.track(["configured", "discovered"])
    assert sync.sync(restarted.snapshot()) == 1
    sync.close()


def test_a_restart_keeps_the_counts_and_the_zero_series_and_writes_no_zero_rows(
    tmp_path: Path,
) -> None:
    state_path = tmp_path / "state.db"
    running = BuildPlan("running", "app", "v1", EPOCH, 10, 10, float("inf"))
    fails = BuildPlan("fails", "trainer", "v1", EPOCH, 5, 5, 5, "FAILED")
    state, restored = opened(state_path)
    assert state is not None
    store = BuildStore(restored.records, restored.tallies, restored.health)
    store.track(["running", "fails"])
    for plan, moment in ((running, EPOCH + 100), (fails, EPOCH + 12), (fails, EPOCH + 100)):
        answer = parse_build(json.dumps(plan.payload(moment)).encode())
        store.record_success(plan.build_id, answer, moment)
    sync = StateSync(state, restored)
    sync.sync(store.snapshot())
    sync.close()
    state, again = opened(state_path)
    assert state is not None
    state.close()
    restarted = BuildStore(again.records, again.tallies, again.health)
    restarted.track(["running", "fails"])

    def tallies(store: BuildStore) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        text = render(summary_families(store.snapshot()), ExpositionFormat.TEXT).decode()
        return {
            key: value
            for key, value in parse_samples(text).items()
            if key[0].startswith("primeintellect_image_builds_")
        }

    before = tallies(store)
    assert tallies(restarted) == before
    finished = "primeintellect_image_builds_finished_total"
    assert before[(finished, frozenset({("image_name", "trainer"), ("status", "FAILED")}))] == 1.0
    for status in ("COMPLETED", "FAILED", "CANCELLED"):
        assert before[(finished, frozenset({("image_name", "app"), ("status", status)}))] == 0.0
    # The zero series come from the builds' images, not from rows of their own.
    assert set(again.tallies.finished) == {("trainer", "FAILED")}
    assert dict(again.tallies.queued) == {}


def test_the_histograms_and_image_health_are_kept_across_a_restart_of_the_exporter(
    tmp_path: Path,
) -> None:
    state_path = tmp_path / "state.db"
    plans = [
        BuildPlan("starts-first", "trainer", "v1", EPOCH, 40, 10, 100),
        BuildPlan("starts-later", "trainer", "v2", EPOCH, 700, 10, 100),
    ]
    fails = BuildPlan("fails", "trainer", "v1", EPOCH + 200, 5, 5, 5, "FAILED")
    with Simulator(CANARY_API_KEY) as simulator:
        for plan in plans:
            simulator.set_payload(plan.build_id, plan.payload(EPOCH + 5))
        simulator.set_payload(fails.build_id, fails.payload(EPOCH + 1000))
        config = tmp_path / "config.yaml"
        config.write_text(
            f"api:\n  base_url: {simulator.base_url}\n  requests_per_second: 64\n"
            "polling:\n  interval: 1s\n  max_interval: 1s\n"
            "builds:\n  - starts-first\n  - starts-later\n  - fails\n"
            f"state:\n  path: {state_path}\nweb:\n  listen_address: 127.0.0.1:0\n"
        )
        env = environment(PRIME_API_KEY=CANARY_API_KEY)

        def histograms(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
            samples = parse_samples(httpx.get(url + "/metrics").text)
            return {
                key: value
                for key, value in samples.items()
                if key[0].startswith("primeintellect_image_builds_")
            }

        queue_count = "primeintellect_image_builds_queue_duration_seconds_count"
        trainer = frozenset({("image_name", "trainer")})
        first = Daemon("--config.file", str(config), env=env)
        try:
            url = first.wait_for_url()
            wait_until(
                lambda: (
                    polls(simulator, "starts-first") > 0 and polls(simulator, "starts-later") > 0
                ),
                message="both builds seen queued",
            )
            simulator.set_payload(plans[0].build_id, plans[0].payload(EPOCH + 1000))
            wait_until(
                lambda: (
                    histograms(url).get((queue_count, trainer)) == 1.0
                    and histograms(url).get(
                        (
                            "primeintellect_image_builds_finished_total",
                            trainer | {("status", "COMPLETED")},
                        )
                    )
                    == 1.0
                ),
                message="the first build seen to start and finish",
            )
            before = histograms(url)
        finally:
            first.stop()
        second = Daemon("--config.file", str(config), env=env)
        try:
            url = second.wait_for_url()
            # Restored, not observed again: the counts go on from where they were.
            assert histograms(url) == before
            simulator.set_payload(plans[1].build_id, plans[1].payload(EPOCH + 800))
            wait_until(
                lambda: histograms(url).get((queue_count, trainer)) == 2.0,
                message="the second build seen to start after the restart",
            )
            after = histograms(url)
        finally:
            second.stop()
    sum_name = "primeintellect_image_builds_queue_duration_seconds_sum"
    assert (before[(sum_name, trainer)], after[(sum_name, trainer)]) == (40.0, 740.0)
    v1 = trainer | {("image_tag", "v1")}
    assert before[("primeintellect_image_builds_last_success_timestamp_seconds", v1)] == (
        EPOCH + 150
    )
    assert before[("primeintellect_image_builds_consecutive_failures", v1)] == 1
    assert before[("primeintellect_image_builds_failing_since_timestamp_seconds", v1)] == (
        EPOCH + 215
    )
