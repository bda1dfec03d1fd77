"""Run a command (the test suite) while busy processes hold every core, several times in a row.

    python -m tests.helpers.under_load --runs 3 -- .venv/bin/pytest -n 4

Each busy process spins at full speed in a loop of its own, so the command competes for every
core as on a CI machine that builds something else meanwhile. Exits with the first failing
run's code, or 0 when every run passed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

SPIN = "while True: pass"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs in a row (default 3)")
    parser.add_argument(
        "--busy", type=int, default=os.cpu_count() or 2, help="busy processes (default: cores)"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    arguments = parser.parse_args()
    command = [part for part in arguments.command if part != "--"] or ["pytest"]
    busy = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(arguments.busy)]
    try:
        for run in range(1, arguments.runs + 1):
            started = time.monotonic()
            print(f"under load ({len(busy)} busy processes): run {run} of {arguments.runs}")
            sys.stdout.flush()
            code = subprocess.call(command)
            print(f"run {run}: exit {code} after {time.monotonic() - started:.0f} s")
            if code != 0:
                return code
    finally:
        for process in busy:
            process.kill()
            process.wait()
    print(f"{arguments.runs} runs in a row passed under load")
    return 0


if __name__ == "__main__":
    sys.exit(main())
