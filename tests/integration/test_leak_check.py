"""The suite's own leak check (tests/conftest.py): a leak fails the test that leaked it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers.support import REPOSITORY

PROBE = """
import socket
import subprocess
import sys
import threading


class Holder:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the garbage collector frees it
        self.sock = socket.socket()


def test_leaks_a_socket_in_a_cycle() -> None:
    Holder()


def test_leaves_a_thread_running() -> None:
    stop = threading.Event()
    threading.Thread(target=stop.wait, args=(30,), name="left-behind", daemon=True).start()


def test_leaves_a_process_running() -> None:
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])


def test_clean_after_them() -> None:
    pass
"""


def test_each_kind_of_leak_fails_the_test_that_leaked_and_no_other(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:cloudcoil",
            "-q",
            "-o",
            "filterwarnings=error",
            "--rootdir",
            str(tmp_path),
            str(probe),
        ],
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        timeout=120,
        check=False,
        env={"LEAK_GRACE_SECONDS": "0.2", "PATH": "/usr/bin:/bin"},
    )
    output = result.stdout + result.stderr
    assert "ERROR at teardown of test_leaks_a_socket_in_a_cycle" in output, output
    assert "ResourceWarning: unclosed <socket.socket" in output
    assert "ERROR at teardown of test_leaves_a_thread_running" in output
    assert "threads left running: ['left-behind']" in output
    assert "ERROR at teardown of test_leaves_a_process_running" in output
    assert "child processes left running" in output
    # The leak is reported once, at the leaking test: the test after them passes clean.
    assert "test_clean_after_them" not in output.split("short test summary info")[-1]
