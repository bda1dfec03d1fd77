"""Command line of the API simulator on its own: a fake Prime Intellect API to point an
exporter, a browser or curl at, playing a team and misbehaving on request. Like exporter.cli
for the exporter, the only module of the simulator's program that prints or exits."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import secrets
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from enum import StrEnum
from typing import NoReturn

from exporter.demo.simulator import (
    BuildListing,
    Fault,
    ImageListing,
    Simulator,
    demo_plans,
    random_plans,
)

FAULT_HELP = (
    "an HTTP status 400 to 599 (429 with --retry-after), 'invalid' (a 200 that is no JSON) "
    "or 'slow:SECONDS' (the right answer, that late)"
)


class Paging(StrEnum):
    """Faults of a listing's paging, rather than of its answers."""

    ENDLESS = "endless"
    SHORT_TOTAL = "short-total"


LISTING_FAULT_HELP = (
    f"{FAULT_HELP}; or 'endless' (every page is the first, whatever the offset, and no total "
    "count: a listing without end) or 'short-total' (a total count one fewer than the "
    "listing holds)"
)


def build_parser() -> argparse.ArgumentParser:
    """The simulator's options; the development guide lists each (tests/unit/test_docs.py)."""
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
    parser.add_argument(
        "--team-id",
        default="",
        metavar="TEAM",
        help="the builds and images are this team's: both listings answer them for "
        "teamId=TEAM only, as the API does; the image listing without teamId is empty",
    )
    parser.add_argument(
        "--status-fault",
        action="append",
        default=[],
        type=_build_fault,
        metavar="[BUILD_ID=]FAULT",
        help=f"answer the build status of BUILD_ID (else of every build) with FAULT: {FAULT_HELP}",
    )
    parser.add_argument(
        "--image-listing-fault",
        type=_listing_fault,
        metavar="FAULT",
        help=f"answer every page of the image listing with FAULT: {LISTING_FAULT_HELP}",
    )
    parser.add_argument(
        "--build-listing-fault",
        type=_listing_fault,
        metavar="FAULT",
        help=f"answer every page of the build listing with FAULT: {LISTING_FAULT_HELP}",
    )
    parser.add_argument(
        "--rate-limit-every",
        type=_positive,
        metavar="N",
        help="answer every N-th request, of any endpoint, with a 429",
    )
    parser.add_argument(
        "--retry-after",
        default="1",
        metavar="SECONDS",
        help="the Retry-After of each 429 ('' for none; default 1)",
    )
    return parser


# A fault is made once the Retry-After is known: each option's value is read first.
FaultMaker = Callable[[str | None], Fault]


def _fault(text: str) -> FaultMaker:
    if text == "invalid":
        return lambda retry_after: Fault.garbage()
    slow = re.fullmatch(r"slow:(\d+(?:\.\d+)?)", text)
    if slow:
        seconds = float(slow.group(1))
        return lambda retry_after: Fault.slow(seconds)
    if not (text.isascii() and text.isdigit() and 400 <= int(text) <= 599):
        raise argparse.ArgumentTypeError(f"{text!r} is no fault: {FAULT_HELP}")
    status = int(text)
    if status == 429:
        return lambda retry_after: Fault.rate_limited(retry_after)
    if status == 404:
        return lambda retry_after: Fault.not_found()
    body = f'{{"detail": "simulated HTTP {status}"}}'.encode()
    return lambda retry_after: Fault(status=status, body=body)


def _listing_fault(text: str) -> FaultMaker | Paging:
    if text in {paging.value for paging in Paging}:
        return Paging(text)
    try:
        return _fault(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is no fault: {LISTING_FAULT_HELP}") from None


def _image_paging(paging: Paging) -> ImageListing:
    if paging is Paging.ENDLESS:
        return ImageListing(offset="ignored", total_field="")
    return ImageListing(total_skew=-1)


def _build_paging(listing: BuildListing, paging: Paging) -> BuildListing:
    if paging is Paging.ENDLESS:
        return replace(listing, offset="ignored", total_field="")
    return replace(listing, total_skew=-1)


def _build_fault(text: str) -> tuple[str | None, FaultMaker]:
    build_id, _, fault = text.rpartition("=")
    return build_id or None, _fault(fault)


def _positive(text: str) -> int:
    if not (text.isascii() and text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the API simulator on its own (``primeintellect-build-simulator``)."""
    arguments = build_parser().parse_args(argv)
    api_key = os.environ.get("PRIME_API_KEY") or secrets.token_urlsafe(24)
    now = time.time()
    plans = (
        random_plans(arguments.builds, now, random.Random(arguments.seed))  # noqa: S311
        if arguments.builds
        else demo_plans(now)
    )
    host, _, port = arguments.listen_address.rpartition(":")
    team_id = arguments.team_id or None
    build_listing = BuildListing(team_id="honoured") if team_id else BuildListing()
    simulator = Simulator(api_key, plans, team_id=team_id, build_listing=build_listing)
    retry_after = arguments.retry_after or None
    faults = []
    for build_id, make in arguments.status_fault:
        simulator.set_fault(build_id, make(retry_after))
        faults.append(f"build status of {build_id or 'every build'}")
    image_fault = arguments.image_listing_fault
    if isinstance(image_fault, Paging):
        simulator.set_image_listing(_image_paging(image_fault))
        faults.append(f"image listing ({image_fault})")
    elif image_fault is not None:
        simulator.set_listing_fault(image_fault(retry_after))
        faults.append("image listing")
    build_fault = arguments.build_listing_fault
    if isinstance(build_fault, Paging):
        simulator.set_build_listing(_build_paging(build_listing, build_fault))
        faults.append(f"build listing ({build_fault})")
    elif build_fault is not None:
        simulator.set_build_listing_fault(build_fault(retry_after))
        faults.append("build listing")
    if arguments.rate_limit_every is not None:
        simulator.set_rate_limit(arguments.rate_limit_every, retry_after)
        faults.append(f"a 429 every {arguments.rate_limit_every} requests")
    simulator.start(host or "127.0.0.1", int(port))
    print(f"Simulated API at {simulator.base_url}")
    if "PRIME_API_KEY" not in os.environ:
        print(f"API key (set PRIME_API_KEY to choose one): {api_key}")
    if team_id:
        print(f"Team: {team_id} (the listings answer its builds and images for teamId={team_id})")
    if faults:
        print(f"Faults: {', '.join(faults)}")
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
