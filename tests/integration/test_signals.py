"""Signals after the first stop signal: an impatient operator, or a supervisor's follow-up.

From the first SIGTERM or SIGINT to the process's exit, more SIGTERM, SIGINT and SIGHUP
neither kill the process by that signal nor print a traceback: it exits 0, as after one.
"""

from __future__ import annotations

import functools
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from exporter.demo.simulator import Fault, Simulator
from tests.helpers.support import (
    CANARY_API_KEY,
    SCRIPT,
    Daemon,
    environment,
    forever_building,
    wait_until,
)

FOLLOW_UPS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]

# Each run fires follow-ups from the first signal until the process has exited, so one run
# lands them in every phase of shutdown that it passes through; several runs vary the timing.
RUNS = 4


def started_daemon(tmp_path: Path, simulator: Simulator, daemons: list[Daemon]) -> Daemon:
    tmp_path.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"api:\n  base_url: {simulator.base_url}\n  requests_per_second: 64\n"
        "polling:\n  interval: 1s\nbuilds:\n  - b1\n"
        f"state:\n  path: {tmp_path / 'state.db'}\n"
        "web:\n  listen_address: 127.0.0.1:0\n"
    )
    daemon = Daemon("--config.file", str(config), env=environment(PRIME_API_KEY=CANARY_API_KEY))
    daemons.append(daemon)
    url = daemon.wait_for_url()
    wait_until(lambda: httpx.get(url + "/-/ready").status_code == 200, message="readiness")
    return daemon


def asked_more(simulator: Simulator, before: int) -> bool:
    return len(simulator.requests("b1")) > before


def fire_until_exit(process: subprocess.Popen[str], follow_up: int) -> None:
    """SIGTERM, then ``follow_up`` again and again until the process is gone."""
    process.send_signal(signal.SIGTERM)
    while process.poll() is None:
        try:
            process.send_signal(follow_up)
        except ProcessLookupError:
            break
        time.sleep(0.002)


@pytest.mark.parametrize("follow_up", FOLLOW_UPS, ids=lambda number: signal.Signals(number).name)
def test_signals_during_shutdown_never_change_the_exit(
    tmp_path: Path, simulator: Simulator, daemons: list[Daemon], follow_up: int
) -> None:
    simulator.add(forever_building("b1"))
    for run in range(RUNS):
        daemon = started_daemon(tmp_path / str(run), simulator, daemons)
        fire_until_exit(daemon.process, follow_up)
        _, rest = daemon.process.communicate(timeout=30)
        stderr = "".join(daemon.stderr_lines) + rest
        assert daemon.process.returncode == 0, (run, daemon.process.returncode, stderr)
        assert "Traceback" not in stderr, stderr
        assert "Exception ignored" not in stderr, stderr
        assert "msg=stopped" in stderr
        assert stderr.count("further signals are ignored") == 1, stderr


@pytest.mark.parametrize("follow_up", FOLLOW_UPS, ids=lambda number: signal.Signals(number).name)
def test_signals_during_an_interrupted_once_keep_its_exit(
    tmp_path: Path, simulator: Simulator, follow_up: int
) -> None:
    simulator.add(forever_building("b1"))
    simulator.set_fault("b1", Fault.slow(delay=30))
    config = tmp_path / "config.yaml"
    config.write_text(
        f"api:\n  base_url: {simulator.base_url}\n  requests_per_second: 64\nbuilds:\n  - b1\n"
    )
    for run in range(RUNS):
        asked = len(simulator.requests("b1"))
        process = subprocess.Popen(
            [SCRIPT, "--config.file", str(config), "--once"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(PRIME_API_KEY=CANARY_API_KEY),
        )
        try:
            wait_until(functools.partial(asked_more, simulator, asked), message="the request")
            fire_until_exit(process, follow_up)
            _, stderr = process.communicate(timeout=30)
        finally:
            process.kill()
            process.wait()
        assert process.returncode == 130, (run, process.returncode, stderr)
        assert "Traceback" not in stderr, stderr
        assert "Exception ignored" not in stderr, stderr
        assert stderr.strip().splitlines()[-1] == (
            "interrupted: --once stopped before every build was polled"
        )
