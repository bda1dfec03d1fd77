"""The state file's faults leave a trace: each is told by the metrics and one log line, and
whatever the file still holds is restored, over real exporter processes and real files.

A read-only state is made two ways that hold for root too, since the tests run as root on CI
where file permissions stop nothing: a read-only bind mount in a mount namespace of the
exporter's own (``unshare --mount``: a read-only volume, EROFS), and the immutable attribute
(``chattr +i``: a file no one may write, EPERM). Each needs root and a kernel and file system
that allow it; the test fails under CI=true without them and skips elsewhere.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from exporter.demo.simulator import BuildPlan, Simulator
from exporter.state import StateFile, open_state
from exporter.telemetry import StateStatus
from tests.helpers.clock import DrivenClock
from tests.helpers.support import (
    CANARY_API_KEY,
    EPOCH,
    Daemon,
    RunningExporter,
    environment,
    make_config,
    parse_samples,
    wait_until,
)

FINISHED = 60
BUSY = "busy-001"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def finished_plan(index: int) -> BuildPlan:
    return BuildPlan(f"done-{index:04d}", "app", f"v{index}", EPOCH, 10, 10, 10)


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    with Simulator(CANARY_API_KEY) as running:
        for index in range(FINISHED):
            running.add(finished_plan(index))
        running.add(BuildPlan(BUSY, "trainer", "v1", EPOCH, 10, 10, float("inf")))
        yield running


@pytest.fixture
def state_path(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir()
    return directory / "state.db"


@pytest.fixture
def config_file(simulator: Simulator, state_path: Path, tmp_path: Path) -> Path:
    builds = "\n".join(f"  - {build_id}" for build_id in simulator.build_ids)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"api:\n  base_url: {simulator.base_url}\n  requests_per_second: 500\n"
        f"polling:\n  interval: 1s\nbuilds:\n{builds}\nstate:\n  path: {state_path}\n"
        "web:\n  listen_address: 127.0.0.1:0\n"
    )
    return config


def start(config_file: Path, wrapper: tuple[str, ...] = ()) -> Daemon:
    daemon = Daemon(
        "--config.file",
        str(config_file),
        env=environment(PRIME_API_KEY=CANARY_API_KEY),
        wrapper=wrapper,
    )
    try:
        daemon.wait_for_url()
    except BaseException:
        daemon.kill()
        raise
    return daemon


def samples_of(daemon: Daemon) -> Samples:
    return parse_samples(httpx.get(daemon.url + "/metrics", timeout=10).text)


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def state_status(samples: Samples) -> list[str]:
    """The status labels at 1; exactly one, if the gauge is one-hot."""
    return [
        dict(labels)["status"]
        for (name, labels), sample in samples.items()
        if name == "primeintellect_exporter_state_status" and sample == 1
    ]


def finished_on_file(state_path: Path) -> int:
    """Finished builds in the file, read as another program would, without taking it."""
    try:
        probe = sqlite3.connect(f"file:{state_path}?mode=ro", uri=True)
    except sqlite3.OperationalError:
        return 0
    try:
        return int(probe.execute("SELECT count(*) FROM builds WHERE finished = 1").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        probe.close()


def write_state(config_file: Path, state_path: Path, *, kill: bool = False) -> None:
    """A real exporter's state of every build; ``kill`` ends it with SIGKILL, mid-work."""
    daemon = start(config_file)
    try:
        wait_until(lambda: finished_on_file(state_path) == FINISHED, message="builds written")
    finally:
        if kill:
            daemon.kill()
        else:
            daemon.stop()


def requests_of_finished(simulator: Simulator) -> int:
    return sum(1 for request in simulator.requests() if request.build_id.startswith("done-"))


def log_lines(stderr: str, level: str) -> list[str]:
    return [line for line in stderr.splitlines() if f"level={level} " in line]


# -- a corrupt file ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random_bytes", "cut_short"])
def test_a_corrupt_state_file_is_moved_aside_and_the_loss_is_told_by_the_metrics(
    config_file: Path, state_path: Path, kind: str
) -> None:
    corrupt(config_file, state_path, kind)
    daemon = start(config_file)
    try:
        samples = samples_of(daemon)
    finally:
        _, _, stderr = daemon.stop()
    assert state_status(samples) == ["in_use"]
    assert value(samples, "primeintellect_exporter_state_lost_at_start") == 1
    assert value(samples, "primeintellect_exporter_state_restored_builds") == 0
    assert value(samples, "primeintellect_exporter_state_last_write_success_timestamp_seconds")
    [error] = log_lines(stderr, "error")
    assert 'msg="state file unreadable: moved aside, starting with a fresh state"' in error
    assert len(list(state_path.parent.glob("state.db.unreadable-*"))) == 1


def corrupt(config_file: Path, state_path: Path, kind: str) -> None:
    """Random bytes, or a real exporter's state of every build cut to half its length."""
    if kind == "random_bytes":
        state_path.write_bytes(random.Random(26).randbytes(64 * 1024))
        return
    write_state(config_file, state_path)
    whole = state_path.stat().st_size
    with state_path.open("r+b") as file:
        file.truncate(whole // 2)


@pytest.mark.parametrize("kind", ["random_bytes", "cut_short"])
def test_a_corrupt_state_file_on_a_read_only_volume_is_told_as_lost_and_read_only(
    config_file: Path, state_path: Path, kind: str
) -> None:
    corrupt(config_file, state_path, kind)
    wrapper = read_only_mount(state_path.parent)
    daemon = start(config_file, wrapper)
    try:
        samples = samples_of(daemon)
    finally:
        _, _, stderr = daemon.stop()
    assert state_status(samples) == ["read_only"]
    assert value(samples, "primeintellect_exporter_state_lost_at_start") == 1
    assert value(samples, "primeintellect_exporter_state_restored_builds") == 0
    [error] = log_lines(stderr, "error")
    assert (
        'msg="state file unreadable and cannot be moved aside; the state stays in memory only"'
        in error
    )
    assert log_lines(stderr, "warn") == []
    assert list(state_path.parent.glob("state.db.unreadable-*")) == []


def test_a_clean_start_and_a_restart_lose_nothing(config_file: Path, state_path: Path) -> None:
    for restart in (False, True):
        daemon = start(config_file)
        try:
            samples = samples_of(daemon)
            wait_until(lambda: finished_on_file(state_path) == FINISHED, message="written")
        finally:
            daemon.stop()
        assert state_status(samples) == ["in_use"]
        assert value(samples, "primeintellect_exporter_state_lost_at_start") == 0
        assert value(samples, "primeintellect_exporter_state_unreadable_rows") == 0
        restored = value(samples, "primeintellect_exporter_state_restored_builds")
        assert restored == (FINISHED + 1 if restart else 0)


# -- a read-only state ---------------------------------------------------------------------------


def read_only_mount(directory: Path) -> tuple[str, ...]:
    """A wrapper running the exporter with ``directory`` mounted read-only in its own mount
    namespace; nothing outside that process sees the mount, and it ends with the process."""
    unshare = shutil.which("unshare")
    command = (
        unshare or "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        'mount --bind -o ro "$0" "$0" && exec "$@"',
        str(directory),
    )
    probe = subprocess.run(
        [*command, "sh", "-c", '! touch "$0/probe" 2>/dev/null', str(directory)],
        capture_output=True,
        check=False,
    )
    if unshare is None:
        missing("unshare")
    if probe.returncode != 0:
        unavailable("a read-only bind mount in a new mount namespace (unshare --mount, as root)")
    return command


def missing(binary: str) -> None:
    """A tool .ci/run installs: missing under CI is a broken set-up, elsewhere a skip."""
    reason = f"{binary} is not installed (Debian: util-linux, e2fsprogs)"
    if _under_ci():
        pytest.fail(reason)
    pytest.skip(reason)


def unavailable(what: str) -> None:
    # The tool is there but the kernel or file system refuses (not root, a container without
    # CAP_SYS_ADMIN, a file system without the immutable attribute): nothing to install, so
    # a skip with the reason, under CI too.
    pytest.skip(f"this machine cannot make {what}")


def _under_ci() -> bool:
    return os.environ.get("CI") == "true"


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Paths given the immutable attribute, which even root cannot write; cleared after."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)


def make_immutable(path: Path, made: list[Path]) -> None:
    chattr = shutil.which("chattr")
    result = subprocess.run([chattr or "chattr", "+i", str(path)], capture_output=True, check=False)
    if chattr is None:
        missing("chattr")
    if result.returncode != 0:
        unavailable("an immutable file (chattr +i needs root and ext4 or a like file system)")
    made.append(path)


@pytest.mark.parametrize("how", ["read_only_mount", "read_only_mount_after_kill", "immutable"])
def test_a_read_only_state_is_restored_then_kept_in_memory_and_no_finished_build_requested(
    config_file: Path,
    state_path: Path,
    simulator: Simulator,
    immutable: list[Path],
    how: str,
) -> None:
    write_state(config_file, state_path, kill=how == "read_only_mount_after_kill")
    wrapper: tuple[str, ...] = ()
    if how == "immutable":
        make_immutable(state_path, immutable)
    else:
        wrapper = read_only_mount(state_path.parent)
    before = requests_of_finished(simulator)
    busy_before = len(simulator.requests(BUSY))
    daemon = start(config_file, wrapper)
    try:
        samples = samples_of(daemon)
        # Polling goes on (the unfinished build is asked again), and no finished build is.
        wait_until(lambda: len(simulator.requests(BUSY)) > busy_before + 1, message="polled")
        after = requests_of_finished(simulator)
        latest = samples_of(daemon)
    finally:
        _, _, stderr = daemon.stop()
    assert after == before
    assert state_status(samples) == ["read_only"]
    assert value(samples, "primeintellect_exporter_state_restored_builds") == FINISHED + 1
    assert value(samples, "primeintellect_exporter_builds", state="finished") == FINISHED
    assert value(samples, "primeintellect_exporter_state_lost_at_start") == 0
    last_write = "primeintellect_exporter_state_last_write_success_timestamp_seconds"
    assert value(latest, last_write) is None
    assert state_status(latest) == ["read_only"]
    [warning] = log_lines(stderr, "warn")
    assert 'msg="state file read-only: restored from it, the state stays in memory only"' in (
        warning
    )
    assert "restored_builds=61" in warning
    assert log_lines(stderr, "error") == []


# -- held by another process ---------------------------------------------------------------------


def test_a_state_file_held_by_another_exporter_is_read_and_taken_over_once_let_go(
    config_file: Path, state_path: Path, simulator: Simulator
) -> None:
    holder = start(config_file)
    try:
        wait_until(lambda: finished_on_file(state_path) == FINISHED, message="builds written")
        before = requests_of_finished(simulator)
        second = start(config_file)
    except BaseException:
        holder.kill()
        raise
    try:
        samples = samples_of(second)
        # The second exporter polls the unfinished build, and no finished one.
        ok = 'primeintellect_exporter_api_requests_total{endpoint="build_status",outcome="ok"}'
        wait_until(
            lambda: (
                ok in (text := httpx.get(second.url + "/metrics").text) and f"{ok} 0.0" not in text
            ),
            message="the second exporter polled",
        )
        assert requests_of_finished(simulator) == before
        holder.stop()
        wait_until(lambda: state_status(samples_of(second)) == ["in_use"], message="taken over")
        taken = samples_of(second)
    finally:
        holder.kill()
        _, _, stderr = second.stop()
    assert state_status(samples) == ["locked"]
    assert value(samples, "primeintellect_exporter_state_restored_builds") == FINISHED + 1
    last_write = "primeintellect_exporter_state_last_write_success_timestamp_seconds"
    assert value(samples, last_write) is None
    assert value(taken, last_write)
    warnings = log_lines(stderr, "warn")
    assert [line.split('msg="')[1].split('"')[0] for line in warnings] == [
        "state file held by another process: restored from it, the state stays in memory until"
        " the other process lets it go",
        "state file let go by the other process: in use, written from now on",
    ]
    # The second exporter wrote the file it took: a third start restores every build.
    opened = open_state(state_path)
    assert opened.file is not None
    opened.file.close()
    assert len(opened.restored.records) == FINISHED + 1


# -- writes failing ------------------------------------------------------------------------------


def test_failing_writes_hold_the_last_write_time_and_count_as_state_errors(
    simulator: Simulator, state_path: Path, immutable: list[Path]
) -> None:
    clock = DrivenClock(start=EPOCH + 5_000)
    config = make_config(simulator.base_url, [BUSY], state_path=state_path, interval="1s")
    exporter = RunningExporter(config, clock=clock).start()
    last_write = "primeintellect_exporter_state_last_write_success_timestamp_seconds"
    errors = ("primeintellect_exporter_internal_errors_total", {"component": "state"})
    try:
        assert exporter.value(last_write) == EPOCH + 5_000
        # Every write goes to the WAL first: once no one may write it, every write fails.
        wait_until(lambda: Path(f"{state_path}-wal").exists(), message="the WAL")
        make_immutable(Path(f"{state_path}-wal"), immutable)
        clock.advance(60)
        wait_until(lambda: exporter.value(errors[0], **errors[1]), message="a failed write")
        assert exporter.value(last_write) == EPOCH + 5_000
        subprocess.run(["chattr", "-i", f"{state_path}-wal"], check=True)
        clock.advance(60)
        wait_until(lambda: exporter.value(last_write) == EPOCH + 5_120, message="written again")
    finally:
        exporter.stop()


# -- neither writable nor readable ---------------------------------------------------------------


@pytest.mark.parametrize("problem", ["directory", "parent_is_a_file"])
def test_a_state_path_that_cannot_be_used_is_told_as_unusable(
    simulator: Simulator, state_path: Path, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    if problem == "directory":
        state_path.mkdir()
    else:
        state_path.parent.rmdir()
        state_path.parent.write_text("not a directory")
    config = make_config(simulator.base_url, [BUSY], state_path=state_path)
    with caplog.at_level(logging.WARNING, logger="exporter.state"):
        exporter = RunningExporter(config).start()
        try:
            samples = exporter.samples()
        finally:
            exporter.stop()
    assert state_status(samples) == ["unusable"]
    assert value(samples, "primeintellect_exporter_state_lost_at_start") == 0
    assert [record.getMessage() for record in caplog.records] == [
        "state file unusable; the state stays in memory only"
    ]


def test_no_state_path_is_told_as_disabled(simulator: Simulator) -> None:
    exporter = RunningExporter(make_config(simulator.base_url, [BUSY])).start()
    try:
        samples = exporter.samples()
    finally:
        exporter.stop()
    assert state_status(samples) == ["disabled"]
    assert {dict(labels)["status"] for name, labels in samples if "state_status" in name} == {
        status.value for status in StateStatus
    }


def test_a_file_held_by_an_sqlite_program_is_read_and_told_as_locked(
    state_path: Path, simulator: Simulator
) -> None:
    plan = finished_plan(1)
    config = make_config(simulator.base_url, [plan.build_id], state_path=state_path)
    first = RunningExporter(config).start()
    try:
        first.wait_until_all_polled()
    finally:
        first.stop()
    # Another program (an sqlite3 shell, a backup) holding SQLite's own write lock.
    holder = sqlite3.connect(state_path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        opened = open_state(state_path)
    finally:
        holder.close()
    assert opened.file is None
    assert opened.status == StateStatus.LOCKED
    assert list(opened.restored.records) == [plan.build_id]


def test_a_daemon_waiting_to_take_a_held_file_stops_cleanly_on_sigterm(
    config_file: Path, state_path: Path
) -> None:
    holder = StateFile.open(state_path)
    try:
        daemon = start(config_file)
        code, _, stderr = daemon.stop(signal.SIGTERM)
    finally:
        holder.close()
    assert code == 0, stderr
