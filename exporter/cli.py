"""Command line: flags, wiring, signals and exit codes. The only module that exits."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import resource
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NoReturn

from pydantic import SecretStr

from exporter import __version__
from exporter.app import Exporter
from exporter.config.credentials import ApiKeySource
from exporter.config.loading import ConfigLoader, check_state_path
from exporter.config.schema import Config, ConfigFile
from exporter.config.wording import ConfigError, counted
from exporter.demo.simulator import Simulator, demo_plans
from exporter.logs import LEVELS, configure_logging
from exporter.web.server import MetricsServer
from exporter.web.webconfig import WebConfig, WebConfigError, load_web_config

PROGRAM = "primeintellect-build-exporter"
DEMO_MISSING_BUILD = "cmdemo0gone0009"
# The simulated team whose image listing the demo reads (discovery.images).
DEMO_TEAM = "demo-team"

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Prometheus exporter for Prime Intellect image builds.",
    )
    parser.add_argument(
        "--config.file",
        dest="config_file",
        default="config.yaml",
        metavar="PATH",
        help="YAML configuration file (default: %(default)s)",
    )
    parser.add_argument(
        "--config.check",
        dest="config_check",
        action="store_true",
        help="validate the configuration and exit: 0 if valid, else 1 with the error",
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen_address",
        metavar="ADDR",
        help="address to serve on, such as :9862 (overrides web.listen_address)",
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="PATH",
        help="TLS and basic auth settings, in the Prometheus exporter-toolkit format",
    )
    parser.add_argument(
        "--web.enable-lifecycle",
        dest="enable_lifecycle",
        action="store_true",
        help="enable POST /-/reload",
    )
    parser.add_argument(
        "--shard.count",
        dest="shard_count",
        type=int,
        metavar="N",
        help="split the builds across N replicas (overrides shard.count)",
    )
    parser.add_argument(
        "--shard.index",
        dest="shard_index",
        metavar="I",
        help="this replica's share, 0 to N-1, or a StatefulSet pod name such as exporter-2 "
        "(overrides shard.index)",
    )
    parser.add_argument(
        "--log.level",
        dest="log_level",
        choices=list(LEVELS),
        default="info",
        help="log level (default: %(default)s)",
    )
    parser.add_argument(
        "--log.format",
        dest="log_format",
        choices=["logfmt", "json"],
        default="logfmt",
        help="log format (default: %(default)s)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="poll every build once, print the exposition, exit 0 if every poll succeeded",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="start the built-in API simulator on loopback and watch its builds",
    )
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``primeintellect-build-exporter`` console script."""
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    configure_logging(arguments.log_level, arguments.log_format, sys.stderr)
    simulator: Simulator | None = None
    try:
        if arguments.demo:
            simulator = Simulator(
                secrets.token_urlsafe(24), demo_plans(time.time()), team_id=DEMO_TEAM
            )
            simulator.start()
        return _run_with(arguments, simulator)
    finally:
        if simulator is not None:
            simulator.stop()


def _run_with(arguments: argparse.Namespace, simulator: Simulator | None) -> int:
    load = ConfigLoader(
        Path(arguments.config_file) if simulator is None else demo_config(simulator),
        os.environ,
        listen_address=arguments.listen_address,
        shard_count=arguments.shard_count,
        shard_index=arguments.shard_index,
    )
    web_config_file = Path(arguments.web_config_file) if arguments.web_config_file else None
    try:
        config = load(starting=True)
        if not arguments.once:
            # --once never opens the state file.
            check_state_path(config)
        web_config = None if web_config_file is None else load_web_config(web_config_file)
    except (ConfigError, WebConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if arguments.config_check:
        _report_check(config, web_config)
        return 0
    exporter = Exporter(
        config,
        load_config=load,
        enable_lifecycle=arguments.enable_lifecycle,
        # One poll of everything, not a restart: the daemon may hold the state file.
        use_state=not arguments.once,
    )
    if arguments.once:
        return _poll_once(exporter)
    return _serve(exporter, web_config_file, demo=simulator is not None)


def _report_check(config: Config, web_config: WebConfig | None) -> None:
    """What --config.check found valid: one line per file, warnings on stderr."""
    shard = config.shard
    share = (
        f" ({len(config.owned_build_ids)} in shard {shard.index} of {shard.count})"
        if shard.count > 1
        else ""
    )
    discovery = config.file.discovery
    found = "".join(
        f", {name} discovery on"
        for name, section in (("build", discovery.builds), ("image", discovery.images))
        if section.enabled
    )
    print(f"{config.source}: OK, {counted(len(config.build_ids), 'build')}{share}{found}")
    if web_config is not None:
        for note in web_config.notes:
            print(f"warning: {web_config.source}: {note}", file=sys.stderr)
        print(f"web config {web_config.source}: OK, {web_config.summary}")


def demo_config(simulator: Simulator) -> Config:
    """A config that discovers every simulated build from the API's listing, names one build
    the API does not know, and lists the simulated team's images."""
    file = ConfigFile.model_validate(
        {
            "api": {"base_url": simulator.base_url, "requests_per_second": 5},
            "polling": {"interval": "3s", "stale_after": "1m"},
            "builds": [DEMO_MISSING_BUILD],
            "discovery": {
                "builds": {"enabled": True, "interval": "10s"},
                "images": {"enabled": True, "interval": "30s", "team_id": DEMO_TEAM},
            },
        }
    )
    return Config(
        source=Path("(demo)"),
        file=file,
        api_key=ApiKeySource(value=SecretStr(simulator.api_key), origin="the demo simulator"),
        build_ids=tuple(file.builds),
    )


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# From the first stop signal to the exit, these are ignored: a second SIGTERM or a SIGHUP
# after the event loop closed would otherwise kill the process by that signal (exit 143 or
# 129 instead of 0), or find the loop's wake-up pipe closed and print a traceback.
FOLLOW_UP_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)


def _ignore_further_signals() -> None:
    for signal_number in FOLLOW_UP_SIGNALS:
        signal.signal(signal_number, signal.SIG_IGN)


def _on_signals(
    loop: asyncio.AbstractEventLoop, signals: Iterable[int], callback: Callable[[int], None]
) -> None:
    """Run ``callback(signal_number)`` on the loop when one of ``signals`` arrives.

    Installed with signal.signal rather than loop.add_signal_handler: removing a loop's
    handler, and closing the loop, put the default action back for an instant before it can
    be set to ignore, and a follow-up SIGTERM in that instant killed the process.
    """

    def handler(signal_number: int, frame: object) -> None:
        # A closed loop: the process is ending on its own.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(callback, signal_number)

    for signal_number in signals:
        signal.signal(signal_number, handler)


def _poll_once(exporter: Exporter) -> int:
    def interrupt(signal_number: int, frame: object) -> None:
        _ignore_further_signals()
        raise KeyboardInterrupt

    # SIGTERM and Ctrl-C end a one-shot run alike: one line, no traceback. Outside the event
    # loop they interrupt at once; inside it, the loop itself cancels the run (below), never
    # halfway through a request's code.
    for signal_number in STOP_SIGNALS:
        signal.signal(signal_number, interrupt)
    # A one-shot run has no configuration to reload.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        result = asyncio.run(_poll_once_until_signalled(exporter))
    except KeyboardInterrupt:
        result = None
    if result is None:
        print("interrupted: --once stopped before every build was polled", file=sys.stderr)
        return 130
    succeeded, exposition = result
    sys.stdout.buffer.write(exposition)
    sys.stdout.flush()
    return 0 if succeeded else 1


async def _poll_once_until_signalled(exporter: Exporter) -> tuple[bool, bytes] | None:
    """The one-shot poll, or None if a stop signal cancelled it."""
    loop = asyncio.get_running_loop()
    run = asyncio.current_task()
    assert run is not None
    signalled: list[int] = []

    def stop(signal_number: int) -> None:
        if signalled:
            return
        _ignore_further_signals()
        signalled.append(signal_number)
        run.cancel()

    _on_signals(loop, STOP_SIGNALS, stop)
    try:
        return await exporter.poll_once()
    except asyncio.CancelledError:
        if signalled:
            return None
        raise


def _serve(exporter: Exporter, web_config_file: Path | None, *, demo: bool) -> int:
    def announce(url: str) -> None:
        if demo:
            print(f"Demo exporter running: open {url}/ or {url}/metrics (Ctrl-C to stop)")
            sys.stdout.flush()

    _raise_open_file_limit()
    try:
        server = exporter.create_server(web_config_file)
    except OSError as error:
        address = exporter.config.web.listen_address
        print(f"error: {listen_error(address, error, demo=demo)}", file=sys.stderr)
        return 1
    except WebConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    asyncio.run(_serve_until_signalled(exporter, server, announce))
    return 0


def listen_error(address: str, error: OSError, *, demo: bool) -> str:
    """Why the listen address could not be bound, and how to pick another."""
    reason = {
        errno.EADDRINUSE: "the address is already in use by another program",
        errno.EACCES: "permission denied (ports below 1024 need privileges)",
        errno.EADDRNOTAVAIL: "no network interface of this machine has that address",
    }.get(error.errno or 0, error.strerror or str(error))
    # The demo reads no config file: the flag is its only way.
    where = (
        "--web.listen-address"
        if demo
        else ("--web.listen-address or the config key web.listen_address")
    )
    return f"cannot listen on {address}: {reason}; pick another address with {where}"


def _raise_open_file_limit() -> None:
    # As Go programs do at start: each HTTP connection holds a file descriptor, and the usual
    # soft limit of 1024 would cap connections long before memory does.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit still stops at the kernel's nr_open, 1048576 by default.
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def _serve_until_signalled(
    exporter: Exporter, server: MetricsServer, announce: Callable[[str], None]
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stop_once(signal_number: int) -> None:
        if stop.is_set():
            return  # a second signal that reached the loop before the first was handled
        _ignore_further_signals()
        log.info(
            "stopping; further signals are ignored until exit",
            extra={"signal": signal.Signals(signal_number).name},
        )
        stop.set()

    _on_signals(loop, STOP_SIGNALS, stop_once)
    _on_signals(loop, (signal.SIGHUP,), lambda _: exporter.request_reload())
    await exporter.serve(stop, server, announce)
