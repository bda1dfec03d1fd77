"""The real console script: exit codes, --once, --config.check, signals, --demo, logs."""

from __future__ import annotations

import json
import math
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from exporter import __version__
from exporter.config.schema import ShardSettings
from exporter.demo.simulator import BuildPlan, Fault, Simulator
from tests.helpers.pki import Pki, bcrypt_hash, tls_section
from tests.helpers.support import (
    CANARY_API_KEY,
    SCRIPT,
    SIGNAL_EXIT_BOUND,
    SIMULATOR_SCRIPT,
    Daemon,
    environment,
    forever_building,
    run_script,
    wait_until,
)


def write_config(directory: Path, base_url: str, build_ids: list[str], extra: str = "") -> Path:
    path = directory / "config.yaml"
    builds = "\n".join(f"  - {build_id}" for build_id in build_ids)
    path.write_text(
        f"api:\n  base_url: {base_url}\n  requests_per_second: 50\n"
        f"polling:\n  interval: 1s\nbuilds:\n{builds}\n{extra}"
    )
    return path


def check_with_web_config(config: Path, web_config: Path) -> subprocess.CompletedProcess[str]:
    """``--config.check`` of a config file and a web config file."""
    return run_script(
        "--config.file",
        str(config),
        "--web.config.file",
        str(web_config),
        "--config.check",
        env=environment(PRIME_API_KEY="k"),
    )


def test_version_flag_prints_the_version() -> None:
    result = run_script("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"primeintellect-build-exporter {__version__}"


def test_python_dash_m_exporter_runs_the_same_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout.strip()) == (
        0,
        f"primeintellect-build-exporter {__version__}",
    )


def test_config_check_exits_zero_for_a_valid_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, "https://api.primeintellect.ai", ["b1", "b2"])
    result = run_script(
        "--config.file", str(config), "--config.check", env=environment(PRIME_API_KEY="k")
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{config}: OK, 2 builds\n", "")


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        ("", "OK, 1 build"),
        ("discovery:\n  builds:\n    enabled: true\n", "OK, 1 build, build discovery on"),
        ("shard:\n  count: 2\n  index: 1\n", "OK, 1 build ({owned} in shard 1 of 2)"),
    ],
    ids=["alone", "with_build_discovery", "sharded"],
)
def test_config_check_counts_one_build_in_the_singular(
    tmp_path: Path, extra: str, line: str
) -> None:
    config = write_config(tmp_path, "https://api.primeintellect.ai", ["b1"], extra)
    result = run_script(
        "--config.file", str(config), "--config.check", env=environment(PRIME_API_KEY="k")
    )
    owned = int(ShardSettings(count=2, index=1).owns("b1"))
    assert (result.returncode, result.stdout) == (0, f"{config}: {line.format(owned=owned)}\n")


def test_config_check_reports_the_web_config_it_checked(tmp_path: Path, pki: Pki) -> None:
    config = write_config(tmp_path, "https://api.primeintellect.ai", ["b1", "b2"])
    web_config = tmp_path / "web.yml"
    web_config.write_text(
        tls_section(pki, client_auth_type="RequireAndVerifyClientCert", client_ca_file=str(pki.ca))
        + f"basic_auth_users:\n  prometheus: '{bcrypt_hash()}'\n"
    )
    result = check_with_web_config(config, web_config)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        f"{config}: OK, 2 builds",
        f"web config {web_config}: OK, TLS on with client certificates "
        "(RequireAndVerifyClientCert), basic auth for 1 user",
    ]


def test_config_check_reports_a_web_config_without_tls_or_users(tmp_path: Path) -> None:
    config = write_config(tmp_path, "https://api.primeintellect.ai", ["b1"])
    web_config = tmp_path / "web.yml"
    web_config.write_text("http_server_config:\n  headers:\n    X-Frame-Options: deny\n")
    result = check_with_web_config(config, web_config)
    assert (result.returncode, result.stdout.splitlines()[-1]) == (
        0,
        f"web config {web_config}: OK, TLS off, basic auth off",
    )


def test_config_check_fails_on_a_bad_web_config_naming_its_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, "https://api.primeintellect.ai", ["b1"])
    web_config = tmp_path / "web.yml"
    web_config.write_text("basic_auth_users:\n  prometheus: hunter2\n")
    result = check_with_web_config(config, web_config)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(f"error: {web_config}: basic_auth_users.prometheus: ")
    assert "hunter2" not in result.stderr


def test_config_check_warns_about_curves_it_cannot_restrict(tmp_path: Path, pki: Pki) -> None:
    config = write_config(tmp_path, "https://api.primeintellect.ai", ["b1"])
    web_config = tmp_path / "web.yml"
    web_config.write_text(tls_section(pki, curve_preferences="[X25519, CurveP256]"))
    result = check_with_web_config(config, web_config)
    assert result.returncode == 0, result.stderr
    assert f"warning: {web_config}: tls_server_config.curve_preferences: " in result.stderr


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("polling_interval: 5s\n", "polling_interval: unknown key"),
        ("web:\n  listen_address: nowhere\n", "web.listen_address"),
    ],
)
def test_config_check_exits_one_and_names_the_field(
    tmp_path: Path, extra: str, expected: str
) -> None:
    config = write_config(tmp_path, "https://api.primeintellect.ai", ["b1"], extra)
    result = run_script(
        "--config.file", str(config), "--config.check", env=environment(PRIME_API_KEY="k")
    )
    assert result.returncode == 1
    assert expected in result.stderr
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr


SECRET_IN_URL = "pk-live-4f1e9c2b7a6d5e8f0a1b"
# The odd configs a new user writes, as the console script answers them: exit code, a line it
# must print, and what it must never print.
ODD_CONFIGS = {
    "stale_after_not_above_interval": (
        "polling:\n  interval: 1m\n  stale_after: 30s\nbuilds: [a]\n",
        {},
        1,
        "polling: stale_after (30s) must be longer than interval (1m), or healthy builds blink"
        " out of /metrics between polls",
    ),
    "no_builds": (
        "builds: []\n",
        {},
        0,
        'msg="no builds to watch: list build IDs under builds or in the files build_files names"',
    ),
    "an_empty_file": (
        "",
        {},
        0,
        'msg="no builds to watch: list build IDs under builds or in the files build_files names"',
    ),
    "duplicate_ids": (
        "builds: [a, b, a]\n",
        {},
        0,
        'msg="duplicate build IDs ignored" count=1 build_ids=a',
    ),
    "a_key_in_the_base_url_query": (
        f"api:\n  base_url: https://api.example/?key={SECRET_IN_URL}\nbuilds: [a]\n",
        {},
        1,
        "api.base_url: 'https://api.example/' (with a query, not repeated) must not have a query"
        " or fragment",
    ),
    "a_non_ascii_key": (
        "builds: [a]\n",
        {"PRIME_API_KEY": "pk-ünïcode"},
        1,
        "error: PRIME_API_KEY: the key holds spaces or characters an API key cannot have",
    ),
    "a_key_pasted_with_bearer": (
        "builds: [a]\n",
        {"PRIME_API_KEY": "Bearer pk-abc"},
        0,
        "OK, 1 build\n",
    ),
}


@pytest.mark.parametrize(
    ("text", "env", "returncode", "expected"), ODD_CONFIGS.values(), ids=ODD_CONFIGS.keys()
)
def test_config_check_tells_the_truth_about_odd_configs(
    tmp_path: Path, text: str, env: dict[str, str], returncode: int, expected: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    result = run_script(
        "--config.file",
        str(config),
        "--config.check",
        env=environment(**{"PRIME_API_KEY": "k", **env}),
    )
    output = result.stdout + result.stderr
    assert result.returncode == returncode, output
    assert expected in output
    assert "Traceback" not in output
    for secret in (SECRET_IN_URL, "pk-ünïcode", "pk-abc"):
        assert secret not in output


def test_config_check_fails_without_an_api_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, "https://api.primeintellect.ai", ["b1"])
    result = run_script("--config.file", str(config), "--config.check")
    assert result.returncode == 1
    assert "PRIME_API_KEY" in result.stderr


def test_a_dashboard_url_pasted_as_a_build_id_gets_the_id_it_holds_suggested(
    tmp_path: Path,
) -> None:
    url = "https://app.primeintellect.ai/dashboard/sandboxes/images/builds/cmf3k2x0c0001"
    config = write_config(tmp_path, "https://api.primeintellect.ai", [f"'{url}'"])
    result = run_script(
        "--config.file", str(config), "--config.check", env=environment(PRIME_API_KEY="k")
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        1,
        "",
        f"error: {config}: builds[0]: build ID a URL (https://app.primeintellect.ai/…) is "
        "invalid: use 1 to 128 letters, digits, '-', '_' or '.', and not '.' or '..'; did you "
        "mean 'cmf3k2x0c0001'?\n",
    )


@pytest.mark.parametrize("check", [True, False], ids=["config_check", "start"])
def test_missing_config_file_names_the_flag_and_the_demo(tmp_path: Path, check: bool) -> None:
    result = run_script(
        "--config.file", str(tmp_path / "absent.yaml"), *(["--config.check"] if check else [])
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        1,
        "",
        f"error: {tmp_path / 'absent.yaml'}: the config file does not exist: point "
        "--config.file at yours, or try the exporter without one with --demo\n",
    )


def test_a_config_file_that_is_a_directory_says_so_without_errno_text(tmp_path: Path) -> None:
    result = run_script("--config.file", str(tmp_path), "--config.check")
    assert (result.returncode, result.stderr) == (
        1,
        f"error: {tmp_path}: cannot read the config file: it is a directory: name a file\n",
    )


MISSING_BUILD_FILES = {
    "a_named_file": (
        "build_files:\n  - teams.txt\n",
        "build_files[0]: {dir}/teams.txt does not exist: create it, or correct or remove the entry",
    ),
    "a_glob_in_a_missing_directory": (
        "build_files:\n  - builds.d/*.txt\n",
        "build_files[0]: builds.d/*.txt looks in {dir}/builds.d, which does not exist: create the "
        "directory (an empty one is fine), or correct the pattern",
    ),
}


@pytest.mark.parametrize("check", [True, False], ids=["config_check", "start"])
@pytest.mark.parametrize(
    ("extra", "problem"), MISSING_BUILD_FILES.values(), ids=MISSING_BUILD_FILES.keys()
)
def test_a_missing_build_file_or_glob_directory_fails_the_check_and_the_start(
    tmp_path: Path, check: bool, extra: str, problem: str
) -> None:
    config = write_config(tmp_path, "https://api.primeintellect.ai", ["b1"], extra)
    result = run_script(
        "--config.file",
        str(config),
        *(["--config.check"] if check else []),
        env=environment(PRIME_API_KEY="k"),
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        1,
        "",
        f"error: {config}: {problem.format(dir=tmp_path)}\n",
    )


def test_config_check_accepts_a_glob_that_matches_nothing_in_an_existing_directory(
    tmp_path: Path,
) -> None:
    (tmp_path / "builds.d").mkdir()
    config = write_config(
        tmp_path, "https://api.primeintellect.ai", ["b1"], "build_files:\n  - builds.d/*.txt\n"
    )
    result = run_script(
        "--config.file", str(config), "--config.check", env=environment(PRIME_API_KEY="k")
    )
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize("check", [True, False], ids=["config_check", "start"])
def test_a_state_path_in_a_missing_directory_is_refused_and_never_created(
    tmp_path: Path, check: bool
) -> None:
    state = tmp_path / "typo" / "state.db"
    config = write_config(
        tmp_path, "https://api.primeintellect.ai", ["b1"], f"state:\n  path: {state}\n"
    )
    result = run_script(
        "--config.file",
        str(config),
        *(["--config.check"] if check else []),
        env=environment(PRIME_API_KEY="k"),
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        1,
        "",
        f"error: {config}: state.path: the directory {tmp_path / 'typo'} does not exist: create "
        "it, or correct the path (the exporter does not create it, so that a typo cannot start "
        "an empty state)\n",
    )
    assert not state.parent.exists()


def test_a_state_path_naming_a_directory_is_refused_with_a_file_to_name(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, "https://api.primeintellect.ai", ["b1"], f"state:\n  path: {tmp_path}\n"
    )
    result = run_script(
        "--config.file", str(config), "--config.check", env=environment(PRIME_API_KEY="k")
    )
    assert (result.returncode, result.stderr) == (
        1,
        f"error: {config}: state.path: {tmp_path} is a directory: name a file in it, such as "
        f"{tmp_path / 'state.db'}\n",
    )


def test_once_ignores_a_state_path_it_never_opens(tmp_path: Path, simulator: Simulator) -> None:
    simulator.add(forever_building("b1"))
    state = tmp_path / "not-here" / "state.db"
    config = write_config(tmp_path, simulator.base_url, ["b1"], f"state:\n  path: {state}\n")
    result = run_script(
        "--config.file", str(config), "--once", env=environment(PRIME_API_KEY=CANARY_API_KEY)
    )
    assert result.returncode == 0, result.stderr
    assert not state.parent.exists()


def test_once_prints_the_exposition_and_exits_zero_when_every_poll_succeeds(
    tmp_path: Path, simulator: Simulator
) -> None:
    simulator.add(forever_building("b1"))
    simulator.add(forever_building("b2"))
    config = write_config(tmp_path, simulator.base_url, ["b1", "b2"])
    result = run_script(
        "--config.file", str(config), "--once", env=environment(PRIME_API_KEY=CANARY_API_KEY)
    )
    assert result.returncode == 0, result.stderr
    assert (
        'primeintellect_image_build_info{build_id="b2",image_name="app",image_tag="v1"} 1.0'
        in result.stdout
    )
    assert len(simulator.requests()) == 2
    assert CANARY_API_KEY not in result.stdout + result.stderr


def test_once_exits_one_when_a_poll_fails_but_still_prints_everything(
    tmp_path: Path, simulator: Simulator
) -> None:
    simulator.add(forever_building("b1"))
    config = write_config(tmp_path, simulator.base_url, ["b1", "missing"])
    result = run_script(
        "--config.file", str(config), "--once", env=environment(PRIME_API_KEY=CANARY_API_KEY)
    )
    assert result.returncode == 1
    assert (
        'primeintellect_image_build_last_poll_error{build_id="missing",reason="not_found"} 1.0'
        in result.stdout
    )
    assert 'primeintellect_image_build_last_poll_success{build_id="b1"} 1.0' in result.stdout


def test_once_does_not_sit_out_a_long_rate_limit_pause(
    tmp_path: Path, simulator: Simulator
) -> None:
    simulator.add(forever_building("b1"))
    simulator.set_fault("b1", Fault.rate_limited(retry_after="600"))
    config = write_config(tmp_path, simulator.base_url, ["b1"])
    started = time.monotonic()
    result = run_script(
        "--config.file", str(config), "--once", env=environment(PRIME_API_KEY=CANARY_API_KEY)
    )
    # A pause past the 60 s deadline ends the run at once; real time is the point: the whole
    # run takes about 1 s on a quiet machine, and ten times that bounds it on a busy one.
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    assert (
        'primeintellect_image_build_last_poll_error{build_id="b1",reason="rate_limited"} 1.0'
        in result.stdout
    )


def test_once_with_a_rejected_key_ends_at_once_with_every_build_unauthorized(
    tmp_path: Path, simulator: Simulator
) -> None:
    for build_id in ("b1", "b2"):
        simulator.add(forever_building(build_id))
    config = write_config(tmp_path, simulator.base_url, ["b1", "b2"])
    # One request at a time: the first answer (a 401) comes before any other request.
    one_at_a_time = "  requests_per_second: 50\n  max_concurrency: 1\n"
    config.write_text(config.read_text().replace("  requests_per_second: 50\n", one_at_a_time))
    started = time.monotonic()
    result = run_script(
        "--config.file", str(config), "--once", env=environment(PRIME_API_KEY="pk-wrong-key")
    )
    # The 30 s key pause is not sat out; real time is the point: about 1 s on a quiet
    # machine, ten times that on a busy one.
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    assert len(simulator.requests()) == 1
    for build_id in ("b1", "b2"):
        error = f'last_poll_error{{build_id="{build_id}",reason="unauthorized"}} 1.0'
        assert f"primeintellect_image_build_{error}" in result.stdout
    assert result.stderr.count("API key rejected") == 1


@pytest.mark.parametrize(
    "signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"]
)
def test_a_signal_during_once_ends_it_with_one_line_and_no_traceback(
    tmp_path: Path, simulator: Simulator, signal_number: int
) -> None:
    simulator.add(forever_building("b1"))
    simulator.set_fault("b1", Fault.slow(delay=30))
    config = write_config(tmp_path, simulator.base_url, ["b1"])
    process = subprocess.Popen(
        [SCRIPT, "--config.file", str(config), "--once"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(PRIME_API_KEY=CANARY_API_KEY),
    )
    try:
        wait_until(lambda: simulator.requests("b1"), message="the slow request")
        signalled = time.monotonic()
        process.send_signal(signal_number)
        # The request it cuts short would take 30 s: a hang, not slowness, fails the wait.
        _, stderr = process.communicate(timeout=25)
        took = time.monotonic() - signalled
    finally:
        process.kill()
        process.wait()
    assert took < SIGNAL_EXIT_BOUND, f"exited {took:.2f}s after the signal"
    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "interrupted: --once stopped before every build was polled"
    )


@pytest.mark.parametrize(
    "signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"]
)
def test_signals_stop_the_daemon_cleanly_and_promptly(
    tmp_path: Path, simulator: Simulator, daemons: list[Daemon], signal_number: int
) -> None:
    simulator.add(forever_building("b1"))
    config = write_config(
        tmp_path, simulator.base_url, ["b1"], "web:\n  listen_address: 127.0.0.1:0\n"
    )
    daemon = Daemon("--config.file", str(config), env=environment(PRIME_API_KEY=CANARY_API_KEY))
    daemons.append(daemon)
    url = daemon.wait_for_url()
    wait_until(lambda: httpx.get(url + "/-/ready").status_code == 200, message="readiness")
    returncode, seconds, stderr = daemon.stop(signal_number)
    assert returncode == 0, stderr
    assert seconds < SIGNAL_EXIT_BOUND, f"exited {seconds:.2f}s after the signal"
    assert "msg=stopped" in stderr
    assert CANARY_API_KEY not in stderr


def open_for_writing_once_read(fifo: Path) -> int:
    """A writer's descriptor on ``fifo`` once the exporter has opened it to read; the
    exporter's read then waits, as on a hung file system, until the writer closes."""

    def writer() -> int | None:
        try:
            # Without a reader, a non-blocking open for writing fails with ENXIO.
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return None

    descriptor: int = wait_until(writer, message=f"the exporter to open {fifo.name}")
    return descriptor


def ready_daemon(config: Path, daemons: list[Daemon]) -> Daemon:
    daemon = Daemon("--config.file", str(config), env=environment(PRIME_API_KEY=CANARY_API_KEY))
    daemons.append(daemon)
    url = daemon.wait_for_url()
    wait_until(lambda: httpx.get(url + "/-/ready").status_code == 200, message="readiness")
    return daemon


def assert_sigterm_stops_it_promptly_while_reading(daemon: Daemon, fifo: Path) -> None:
    writer = open_for_writing_once_read(fifo)
    try:
        returncode, seconds, stderr = daemon.stop(signal.SIGTERM)
    finally:
        os.close(writer)
    assert returncode == 0, stderr
    assert seconds < SIGNAL_EXIT_BOUND, f"exited {seconds:.2f}s after the signal"
    assert "msg=stopped" in stderr


def test_sigterm_during_a_hung_build_file_read_exits_promptly(
    tmp_path: Path, simulator: Simulator, daemons: list[Daemon]
) -> None:
    simulator.add(forever_building("b1"))
    builds = tmp_path / "builds.d"
    builds.mkdir()
    (builds / "team.txt").write_text("b1\n")
    config = write_config(
        tmp_path,
        simulator.base_url,
        [],
        f"build_files:\n  - {builds}/*.txt\nweb:\n  listen_address: 127.0.0.1:0\n",
    )
    config.write_text(
        config.read_text().replace(
            "polling:\n", "polling:\n  build_files_refresh_interval: 100ms\n"
        )
    )
    daemon = ready_daemon(config, daemons)
    os.mkfifo(builds / "stuck.txt")
    assert_sigterm_stops_it_promptly_while_reading(daemon, builds / "stuck.txt")


def test_sigterm_during_a_hung_config_read_exits_promptly(
    tmp_path: Path, simulator: Simulator, daemons: list[Daemon]
) -> None:
    simulator.add(forever_building("b1"))
    config = write_config(
        tmp_path, simulator.base_url, ["b1"], "web:\n  listen_address: 127.0.0.1:0\n"
    )
    daemon = ready_daemon(config, daemons)
    # The config file becomes one whose read never ends, then SIGHUP asks for it.
    fifo = tmp_path / "hung.yaml"
    os.mkfifo(fifo)
    fifo.replace(config)
    daemon.process.send_signal(signal.SIGHUP)
    assert_sigterm_stops_it_promptly_while_reading(daemon, config)


def test_json_logs_are_one_object_per_line_without_the_key(
    tmp_path: Path, simulator: Simulator, daemons: list[Daemon]
) -> None:
    config = write_config(
        tmp_path, simulator.base_url, ["gone"], "web:\n  listen_address: 127.0.0.1:0\n"
    )
    daemon = Daemon(
        "--config.file",
        str(config),
        "--log.format",
        "json",
        "--log.level",
        "debug",
        env=environment(PRIME_API_KEY=CANARY_API_KEY),
    )
    daemons.append(daemon)
    url = daemon.wait_for_url()
    # Ready no longer waits for a first poll, so wait for the failed poll itself.
    wait_until(
        lambda: (
            'last_poll_error{build_id="gone",reason="not_found"} 1.0'
            in httpx.get(url + "/metrics").text
        ),
        message="the failed poll of 'gone'",
    )
    _, _, stderr = daemon.stop()
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    failures = [r for r in records if r["msg"] == "poll failed"]
    assert failures
    assert failures[0]["reason"] == "not_found"
    assert failures[0]["build_id"] == "gone"
    assert {"ts", "level", "msg"} <= set(records[0])
    # The start-up line says which API and where the key came from, never the key.
    (started,) = [r for r in records if r["msg"] == "listening"]
    assert started["api_base_url"] == simulator.base_url
    assert started["api_key_source"] == "PRIME_API_KEY"
    assert CANARY_API_KEY not in stderr


def test_a_person_who_ran_prime_login_needs_no_other_key(
    tmp_path: Path, simulator: Simulator, daemons: list[Daemon]
) -> None:
    simulator.add(forever_building("mine"))
    login_file = tmp_path / "home" / ".prime" / "config.json"
    login_file.parent.mkdir(parents=True)
    login_file.write_text(json.dumps({"api_key": CANARY_API_KEY, "team_id": None}))
    config = write_config(
        tmp_path, simulator.base_url, ["mine"], "web:\n  listen_address: 127.0.0.1:0\n"
    )
    env = {**environment(), "HOME": str(tmp_path / "home")}
    daemon = Daemon("--config.file", str(config), "--log.format", "json", env=env)
    daemons.append(daemon)
    url = daemon.wait_for_url()
    wait_until(
        lambda: 'last_poll_success{build_id="mine"} 1.0' in httpx.get(url + "/metrics").text,
        message="a poll with the prime login key",
    )
    _, _, stderr = daemon.stop()
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    (started,) = [r for r in records if r["msg"] == "listening"]
    assert started["api_key_source"] == f"{login_file} (prime login)"
    assert CANARY_API_KEY not in stderr


def test_the_open_file_soft_limit_is_raised_to_the_hard_limit(daemons: list[Daemon]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard open-file limit is too low to lower the soft one under it")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        # The child inherits the low soft limit, as from a shell's default of 1024.
        daemon = Daemon("--demo", "--web.listen-address", "127.0.0.1:0", env=environment())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    daemons.append(daemon)
    daemon.wait_for_url()
    limits = Path(f"/proc/{daemon.process.pid}/limits").read_text()
    open_files = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    expected = "1048576" if hard == resource.RLIM_INFINITY else str(hard)
    assert open_files.split()[3] == expected, open_files


def test_demo_serves_simulated_builds_without_an_api_key(daemons: list[Daemon]) -> None:
    daemon = Daemon("--demo", "--web.listen-address", "127.0.0.1:0", env=environment())
    daemons.append(daemon)
    url = daemon.wait_for_url()
    assert httpx.get(url + "/-/ready").status_code == 200
    missing = 'primeintellect_image_build_last_poll_error{build_id="cmdemo0gone0009"'
    listed = "\nprimeintellect_exporter_build_list_last_success_timestamp_seconds "
    metrics = wait_until(
        lambda: (
            (text := httpx.get(url + "/metrics").text)
            and missing in text
            and listed in text
            and text
        ),
        message="the demo's builds discovered and its unknown one polled",
    )
    assert re.search(
        r'^primeintellect_image_build_info\{[^}]*image_name="inference-server"', metrics, re.M
    ), metrics[:2000]
    assert f'{missing},reason="not_found"}} 1.0' in metrics
    returncode, _, _ = daemon.stop()
    assert returncode == 0


def test_address_in_use_names_the_flag_and_the_config_key_to_pick_another(
    simulator: Simulator, tmp_path: Path
) -> None:
    with socket.socket() as occupied:
        occupied.bind(("127.0.0.1", 0))
        occupied.listen()
        port = occupied.getsockname()[1]
        config = write_config(
            tmp_path, simulator.base_url, ["b1"], f"web:\n  listen_address: 127.0.0.1:{port}\n"
        )
        result = run_script(
            "--config.file", str(config), env=environment(PRIME_API_KEY=CANARY_API_KEY)
        )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port}: the address is already in use by another "
        "program; pick another address with --web.listen-address or the config key "
        "web.listen_address"
    )
    assert "Traceback" not in result.stderr


def test_address_in_use_with_demo_names_the_flag_alone() -> None:
    with socket.socket() as occupied:
        occupied.bind(("127.0.0.1", 0))
        occupied.listen()
        port = occupied.getsockname()[1]
        result = run_script("--demo", "--web.listen-address", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port}: the address is already in use by another "
        "program; pick another address with --web.listen-address"
    )


def test_simulator_runs_on_its_own() -> None:
    with subprocess.Popen(
        [SIMULATOR_SCRIPT, "--listen-address", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
        env=environment(PRIME_API_KEY=CANARY_API_KEY),
    ) as process:
        try:
            assert process.stdout is not None
            first_line = process.stdout.readline()
            match = re.search(r"(http://127\.0\.0\.1:\d+)", first_line)
            assert match, first_line
            response = httpx.get(
                match.group(1) + "/api/v1/images/build/cmdemo0web0001",
                headers={"Authorization": f"Bearer {CANARY_API_KEY}"},
            )
            assert response.status_code == 200
            assert response.json()["imageName"] == "web-frontend"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()


def test_once_with_build_discovery_lists_first_then_polls_only_what_the_listing_left(
    tmp_path: Path, simulator: Simulator
) -> None:
    now = time.time()
    for build_id in ("b1", "b2"):
        simulator.add(BuildPlan(build_id, "app", "v1", now - 60, 5, 5, math.inf))
    # Configured, but created before the window: the listing leaves it to a poll of its own.
    old = now - 2 * 86400
    simulator.add(BuildPlan("old", "app", "v0", old, 10, 10, 10))
    config = write_config(
        tmp_path,
        simulator.base_url,
        ["b1", "old"],
        "discovery:\n  builds:\n    enabled: true\n    window: 1d\n",
    )
    result = run_script(
        "--config.file", str(config), "--once", env=environment(PRIME_API_KEY=CANARY_API_KEY)
    )
    assert result.returncode == 0, result.stderr
    for build_id in ("b1", "b2", "old"):
        assert f'primeintellect_image_build_last_poll_success{{build_id="{build_id}"}} 1.0' in (
            result.stdout
        )
    assert [(r.path, r.build_id) for r in simulator.requests()] == [
        ("/api/v1/images/builds", ""),
        ("/api/v1/images/build/old", "old"),
    ]
