"""Command line of the API simulator on its own: a fake Prime Intellect API to point an
exporter, a browser or curl at. Like exporter.cli for the exporter, the only module of the
simulator's program that prints or exits."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from exporter.demo.simulator import Simulator, demo_plans, random_plans


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the API simulator on its own (``primeintellect-build-simulator``)."""
    parser = argparse.ArgumentParser(
        prog="primeintellect-build-simulator",
        description="A fake Prime Intellect API for trying the exporter.",
    )
    parser.add_argument("--listen-address", default="127.0.0.1:8080", metavar="HOST:PORT")
    parser.add_argument(
        "--builds",
        type=int,
        default=0,
        metavar="N",
        help="simulate N random builds instead of the demo set",
    )
    parser.add_argument("--seed", type=int, default=1)
    arguments = parser.parse_args(argv)
    api_key = os.environ.get("PRIME_API_KEY") or secrets.token_urlsafe(24)
    now = time.time()
    plans = (
        random_plans(arguments.builds, now, random.Random(arguments.seed))  # noqa: S311
        if arguments.builds
        else demo_plans(now)
    )
    host, _, port = arguments.listen_address.rpartition(":")
    simulator = Simulator(api_key, plans)
    simulator.start(host or "127.0.0.1", int(port))
    print(f"Simulated API at {simulator.base_url}")
    if "PRIME_API_KEY" not in os.environ:
        print(f"API key (set PRIME_API_KEY to choose one): {api_key}")
    print("Builds:")
    for build_id in simulator.build_ids:
        print(f"  - {build_id}")
    sys.stdout.flush()

    async def wait_for_signal() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signal_number, stop.set)
        await stop.wait()

    try:
        asyncio.run(wait_for_signal())
    finally:
        simulator.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
