"""Changing the tracked builds without a restart: SIGHUP, POST /-/reload, a changed config file,
build files, key files."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from exporter.config.loading import load_config
from exporter.config.schema import Config
from exporter.demo.simulator import BuildPlan, Simulator
from tests.conftest import StartExporter
from tests.helpers.clock import DrivenClock
from tests.helpers.kubelet import KubeletVolume
from tests.helpers.support import (
    CANARY_API_KEY,
    EPOCH,
    Daemon,
    RunningExporter,
    environment,
    forever_building,
    polls,
    wait_until,
)

FINISHED = BuildPlan("finished", "app", "v0", EPOCH, 1, 1, 1)
# A request budget whose slot (0.25 s) is exact in binary, as are the driven times it makes:
# a wait that ends a rounding error after a deadline would never be woken by the driven clock.
SLOTS_PER_SECOND = 4
SLOT = 1 / SLOTS_PER_SECOND

RELOADED = "primeintellect_exporter_config_last_reload_successful"


def write_config(
    path: Path,
    base_url: str,
    builds: list[str],
    extra: str = "",
    api_extra: str = "",
    requests_per_second: float = 100,
) -> Path:
    items = "".join(f"\n  - {build_id}" for build_id in builds) if builds else " []"
    path.write_text(
        f"api:\n  base_url: {base_url}\n  requests_per_second: {requests_per_second}\n{api_extra}"
        f"polling:\n  interval: 1s\n  build_files_refresh_interval: 100ms\n"
        f"builds:{items}\nweb:\n  listen_address: 127.0.0.1:0\n{extra}"
    )
    return path


def loader(path: Path, **environ: str) -> Callable[[], Config]:
    return lambda: load_config(path, {"PRIME_API_KEY": CANARY_API_KEY, **environ})


def tracked(running: RunningExporter) -> list[str]:
    return list(running.exporter.store.snapshot().records)


def reload_over_http(running: RunningExporter) -> httpx.Response:
    return httpx.post(running.url + "/-/reload", timeout=30)


@pytest.fixture
def simulator_with_builds(simulator: Simulator) -> Simulator:
    for build_id in ("a", "b", "c"):
        simulator.add(forever_building(build_id))
    simulator.add(FINISHED)
    return simulator


def test_reload_over_http_adds_and_removes_builds_and_keeps_unchanged_state(
    tmp_path: Path, simulator_with_builds: Simulator, start_exporter: StartExporter
) -> None:
    simulator = simulator_with_builds
    path = write_config(tmp_path / "config.yaml", simulator.base_url, ["a", "finished"])
    running = start_exporter(loader(path)(), load_config=loader(path), enable_lifecycle=True)
    running.wait_until_all_polled()
    assert polls(simulator, "finished") == 1

    write_config(path, simulator.base_url, ["finished", "b"])
    response = reload_over_http(running)

    assert (response.status_code, response.text) == (200, "Configuration reloaded\n")
    assert tracked(running) == ["b", "finished"]
    wait_until(lambda: polls(simulator, "b") >= 1, message="the added build to be polled")
    assert running.value("primeintellect_image_build_last_poll_success", build_id="a") is None
    # The finished build kept its state: it is still exposed and was not requested again.
    assert running.exporter.store.snapshot().records["finished"].finished
    assert polls(simulator, "finished") == 1
    assert running.value(RELOADED, source="config") == 1


def test_an_invalid_reload_keeps_the_running_config_and_reports_it(
    tmp_path: Path, simulator_with_builds: Simulator, start_exporter: StartExporter
) -> None:
    simulator = simulator_with_builds
    clock = DrivenClock()
    path = write_config(tmp_path / "config.yaml", simulator.base_url, ["a"])
    running = start_exporter(
        loader(path)(),
        load_config=loader(path),
        enable_lifecycle=True,
        clock=clock,
    )
    running.wait_until_all_polled()

    write_config(path, simulator.base_url, ["a", "b"], extra="polling_interval: 5s\n")
    response = reload_over_http(running)

    assert response.status_code == 500
    assert "polling_interval: unknown key" in response.text
    assert running.value(RELOADED, source="config") == 0
    assert tracked(running) == ["a"]
    assert polls(simulator, "a") == 1
    next_poll(clock, running, answered=2)
    assert polls(simulator, "a") == 2

    write_config(path, simulator.base_url, ["a", "b"])
    assert reload_over_http(running).status_code == 200
    assert running.value(RELOADED, source="config") == 1
    assert tracked(running) == ["a", "b"]


def test_reload_can_point_the_exporter_at_another_api(
    tmp_path: Path, simulator_with_builds: Simulator, start_exporter: StartExporter
) -> None:
    clock = DrivenClock()
    path = write_config(tmp_path / "config.yaml", simulator_with_builds.base_url, ["a"])
    running = start_exporter(
        loader(path)(),
        load_config=loader(path),
        enable_lifecycle=True,
        clock=clock,
    )
    running.wait_until_all_polled()
    with Simulator(CANARY_API_KEY, [forever_building("a")]) as other:
        write_config(path, other.base_url, ["a"])
        assert reload_over_http(running).status_code == 200
        # The build keeps its schedule: every second, now at the new API.
        for answered in (2, 3):
            next_poll(clock, running, answered)
        assert (polls(simulator_with_builds, "a"), polls(other, "a")) == (1, 2)


def next_poll(clock: DrivenClock, running: RunningExporter, answered: int) -> None:
    """Let the 1 s polling interval pass on the driven clock, until the exporter has had
    ``answered`` answers in all."""
    clock.wait_for_sleep(1.0, message="the wait for the next poll")
    clock.advance(1.0)
    # Read once the answer's time is taken: the next wait counts from there.
    wait_until(
        lambda: sum(running.exporter.telemetry.snapshot().requests.values()) == answered,
        message=f"answer {answered}",
    )


BUILD_FILES = "build_files: [builds.txt]\n"


def config_with_a_build_file(tmp_path: Path, base_url: str, content: str) -> tuple[Path, Path]:
    """A build file holding ``content``, and a config that reads it; both paths."""
    builds_file = tmp_path / "builds.txt"
    builds_file.write_text(content)
    return builds_file, write_config(tmp_path / "config.yaml", base_url, [], extra=BUILD_FILES)


def test_build_file_changes_apply_without_a_reload(
    tmp_path: Path, simulator_with_builds: Simulator, start_exporter: StartExporter
) -> None:
    simulator = simulator_with_builds
    builds_file, path = config_with_a_build_file(tmp_path, simulator.base_url, "a\nb\n")
    running = start_exporter(loader(path)())
    running.wait_until_all_polled()
    assert tracked(running) == ["a", "b"]

    builds_file.write_text("# b is done with\na\nc\n")
    wait_until(lambda: tracked(running) == ["a", "c"], message="the build file change")
    wait_until(lambda: polls(simulator, "c") >= 1, message="the added build to be polled")

    # An invalid file keeps the builds tracked so far.
    builds_file.write_text("a\nnot/valid\n")
    wait_until(
        lambda: running.value(RELOADED, source="build_files") == 0,
        message="the failed build file reload",
    )
    assert running.value(RELOADED, source="config") == 1
    assert tracked(running) == ["a", "c"]


def test_a_build_file_truncated_and_rewritten_in_place_keeps_every_build(
    tmp_path: Path,
    simulator_with_builds: Simulator,
    start_exporter: StartExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    simulator = simulator_with_builds
    content = "a\nb\nfinished\n"
    builds_file, path = config_with_a_build_file(tmp_path, simulator.base_url, content)
    running = start_exporter(loader(path)())
    running.wait_until_all_polled()
    assert polls(simulator, "finished") == 1

    observed: set[tuple[str, ...]] = set()
    with builds_file.open("r+") as rewritten:  # the same file, as `>` in a shell opens it
        rewritten.truncate(0)
        rewritten.flush()
        # A writer that takes a moment, as a script regenerating the file does: three refresh
        # intervals pass with the file empty.
        slow_writer_done = time.monotonic() + 0.3
        while time.monotonic() < slow_writer_done:
            observed.add(tuple(tracked(running)))
        rewritten.write(content)
    wait_until(
        lambda: reloads(caplog, "build_files"), message="the rewritten build file to be read"
    )
    observed.add(tuple(tracked(running)))
    assert observed == {("a", "b", "finished")}
    assert [(r.added, r.removed) for r in reloads(caplog, "build_files")] == [(0, 0)]  # type: ignore[attr-defined]
    # The finished build was never forgotten, so never requested again.
    assert polls(simulator, "finished") == 1


def reloads(caplog: pytest.LogCaptureFixture, source: str) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.getMessage() == "configuration reloaded"
        and getattr(record, "source", "") == source
    ]


def test_a_good_build_file_read_never_hides_a_broken_config_file(
    tmp_path: Path, simulator_with_builds: Simulator, start_exporter: StartExporter
) -> None:
    simulator = simulator_with_builds
    builds_file, path = config_with_a_build_file(tmp_path, simulator.base_url, "a\n")
    running = start_exporter(loader(path)(), load_config=loader(path), enable_lifecycle=True)
    running.wait_until_all_polled()

    write_config(path, simulator.base_url, [], extra=BUILD_FILES + "polling_interval: 5s\n")
    assert reload_over_http(running).status_code == 500
    builds_file.write_text("a\nb\n")
    wait_until(lambda: tracked(running) == ["a", "b"], message="the build file change")

    assert running.value(RELOADED, source="build_files") == 1
    assert running.value(RELOADED, source="config") == 0


def test_a_changed_config_file_applies_without_a_reload(
    tmp_path: Path, simulator_with_builds: Simulator, start_exporter: StartExporter
) -> None:
    simulator = simulator_with_builds
    path = write_config(tmp_path / "config.yaml", simulator.base_url, ["a", "finished"])
    running = start_exporter(loader(path)(), load_config=loader(path))
    running.wait_until_all_polled()

    write_config(path, simulator.base_url, ["a", "finished", "b"], requests_per_second=50)

    wait_until(
        lambda: sorted(tracked(running)) == ["a", "b", "finished"],
        message="the config change",
    )
    wait_until(lambda: polls(simulator, "b") >= 1, message="the added build to be polled")
    assert running.exporter.config.api.requests_per_second == 50
    assert running.value(RELOADED, source="config") == 1
    assert polls(simulator, "finished") == 1


def test_a_bad_config_file_keeps_the_running_config_is_logged_once_and_blocks_no_build_file(
    tmp_path: Path,
    simulator_with_builds: Simulator,
    start_exporter: StartExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    simulator = simulator_with_builds
    builds_file, path = config_with_a_build_file(tmp_path, simulator.base_url, "a\n")
    running = start_exporter(loader(path)(), load_config=loader(path))
    running.wait_until_all_polled()

    write_config(path, simulator.base_url, ["b"], extra=BUILD_FILES + "polling_interval: 5s\n")
    wait_until(
        lambda: running.value(RELOADED, source="config") == 0, message="the failed config read"
    )
    # The build file's change is read with the running config, a settle time after the
    # watcher has seen it: by then the broken config file has been checked again and again.
    builds_file.write_text("a\nc\n")
    wait_until(lambda: tracked(running) == ["a", "c"], message="the build file change")

    failures = [
        record
        for record in caplog.records
        if record.getMessage() == "reload failed; the running configuration stays"
    ]
    assert [getattr(record, "source", "") for record in failures] == ["config"]
    assert "polling_interval" in getattr(failures[0], "error", "")
    assert running.value(RELOADED, source="build_files") == 1

    write_config(path, simulator.base_url, ["b"], extra=BUILD_FILES)
    wait_until(lambda: sorted(tracked(running)) == ["a", "b", "c"], message="the fixed config")
    assert running.value(RELOADED, source="config") == 1


def test_a_reload_over_http_is_not_read_again_by_the_file_watch(
    tmp_path: Path,
    simulator_with_builds: Simulator,
    start_exporter: StartExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    simulator = simulator_with_builds
    builds_file, path = config_with_a_build_file(tmp_path, simulator.base_url, "a\n")
    running = start_exporter(loader(path)(), load_config=loader(path), enable_lifecycle=True)
    running.wait_until_all_polled()

    write_config(path, simulator.base_url, ["b"], extra=BUILD_FILES)
    assert reload_over_http(running).status_code == 200
    # A later change, read by the watch: by then it has compared the config file many times.
    builds_file.write_text("a\nc\n")
    wait_until(lambda: reloads(caplog, "build_files"), message="the build file change")

    assert len(reloads(caplog, "config")) == 1
    assert sorted(tracked(running)) == ["a", "b", "c"]


def test_kubelet_volume_updates_of_the_config_and_build_files_apply_without_a_restart(
    tmp_path: Path, simulator_with_builds: Simulator, start_exporter: StartExporter
) -> None:
    simulator = simulator_with_builds
    builds = KubeletVolume(tmp_path / "builds", {"builds.txt": "a\nfinished\n"})
    extra = f"build_files: [{builds.path('builds.txt')}]\n"
    text = write_config(tmp_path / "config.txt", simulator.base_url, [], extra=extra).read_text()
    volume = KubeletVolume(tmp_path / "config", {"config.yaml": text})
    path = volume.path("config.yaml")
    running = start_exporter(loader(path)(), load_config=loader(path))
    running.wait_until_all_polled()
    assert polls(simulator, "finished") == 1

    builds.update({"builds.txt": "a\nfinished\nb\n"})
    wait_until(
        lambda: sorted(tracked(running)) == ["a", "b", "finished"],
        message="the new build list",
    )
    assert running.value(RELOADED, source="build_files") == 1

    volume.update(
        {"config.yaml": text.replace("requests_per_second: 100", "requests_per_second: 50")}
    )
    wait_until(
        lambda: running.exporter.config.api.requests_per_second == 50,
        message="the new config file",
    )
    assert running.value(RELOADED, source="config") == 1
    wait_until(lambda: polls(simulator, "b") >= 1, message="the added build to be polled")
    assert polls(simulator, "finished") == 1


def test_sighup_reloads_the_config_file(
    tmp_path: Path, simulator_with_builds: Simulator, daemons: list[Daemon]
) -> None:
    simulator = simulator_with_builds
    path = write_config(tmp_path / "config.yaml", simulator.base_url, ["a"])
    daemon = Daemon("--config.file", str(path), env=environment(PRIME_API_KEY=CANARY_API_KEY))
    daemons.append(daemon)
    url = daemon.wait_for_url()
    wait_until(lambda: httpx.get(url + "/-/ready").status_code == 200, message="readiness")

    write_config(path, simulator.base_url, ["a", "c"])
    daemon.process.send_signal(signal.SIGHUP)

    wait_until(
        lambda: 'last_poll_success{build_id="c"} 1.0' in httpx.get(url + "/metrics").text,
        message="the build added by SIGHUP",
    )
    returncode, _, stderr = daemon.stop()
    assert returncode == 0
    assert 'msg="configuration reloaded"' in stderr


def test_a_rejected_key_pauses_polling_and_a_fixed_key_file_recovers_without_restart(
    tmp_path: Path, start_exporter: StartExporter, caplog: pytest.LogCaptureFixture
) -> None:
    clock = DrivenClock()
    plans = [forever_building(build_id) for build_id in ("a", "b", "c")]
    with Simulator(CANARY_API_KEY, plans, clock=clock.wall, monotonic=clock.monotonic) as simulator:
        key_file = tmp_path / "api-key"
        key_file.write_text("pk-revoked\n")
        path = write_config(
            tmp_path / "config.yaml",
            simulator.base_url,
            ["a", "b", "c"],
            api_extra=f"  api_key_file: {key_file}\n",
            requests_per_second=SLOTS_PER_SECOND,
        )
        running = start_exporter(load_config(path, {}), clock=clock)
        # The first poll's 401 pauses the whole API before the next slot: the other builds
        # wait with it, reported with its reason.
        running.wait_until_all_polled()
        # Rejected, but not yet for a minute: api_up is unknown, the key-rejected reason is shown.
        assert running.value("primeintellect_exporter_api_up") is None
        assert (
            running.value(
                "primeintellect_image_build_last_poll_error", build_id="a", reason="unauthorized"
            )
            == 1
        )
        # The whole API is paused, not hammered: no request in 20 s of the 30 s pause.
        for second in range(21):
            # A shorter wait would be for the next request's slot: polling during the pause.
            clock.wait_for_sleep(1.0, message=f"the poller's 1 s tick {second} s into the pause")
            assert [request.build_id for request in simulator.requests()] == ["a"], (
                f"requests {second} s into the pause"
            )
            if second == 20:
                # The next tick sees the new key, long before the pause would end: the builds
                # not yet polled go first, one slot apart.
                key_file.write_text(f"{CANARY_API_KEY}\n")
            clock.advance(1.0)
        wait_until(
            lambda: len(simulator.requests()) == 2, message="the first poll with the new key"
        )
        clock.wait_for_sleep(SLOT, message="the wait for the second slot with the new key")
        clock.advance(SLOT)
        wait_until(
            lambda: (
                running.value("primeintellect_image_build_last_poll_success", build_id="c") == 1
            ),
            message="recovery with the new key",
        )
        started = simulator.requests()[0].at
        assert [(r.build_id, r.status, r.at - started) for r in simulator.requests()] == [
            ("a", 401, 0.0),
            ("b", 200, 21.0),
            ("c", 200, 21.0 + SLOT),
        ]
        assert running.value("primeintellect_exporter_api_up") == 1
    messages = [record.getMessage() for record in caplog.records]
    assert (
        messages.count(
            "API key rejected: pausing all polls until the key changes or the pause ends"
        )
        == 1
    )
    assert "pk-revoked" not in caplog.text


def test_a_failed_reload_never_repeats_a_secret_over_http_or_in_the_log(
    simulator: Simulator, start_exporter: StartExporter, tmp_path: Path
) -> None:
    path = write_config(tmp_path / "config.yaml", simulator.base_url, [])
    running = start_exporter(loader(path)(), load_config=loader(path), enable_lifecycle=True)
    # The key pasted into the base URL's query; the log is checked for it by conftest.
    write_config(path, f"{simulator.base_url}/?api_key={CANARY_API_KEY}", [])
    answer = reload_over_http(running)
    assert answer.status_code == 500
    assert "api.base_url" in answer.text
    assert "query" in answer.text
    assert CANARY_API_KEY not in answer.text
