"""Soak: run the real exporter for minutes against a faulty simulated API, and check the end.

Hundreds of simulated builds live through their lifecycles while random faults hit random
builds (404, 429, 5xx, HTML, garbage, slow answers). The exporter runs as its own process,
the way a user runs it. Every sample prints its resident memory, request outcomes and
internal errors; at the end every build must show the status the simulator holds, and the
exit code says whether it did.

    .venv/bin/python benchmarks/soak.py --builds 300 --duration 180
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from exporter.demo.simulator import ArtifactPlan, BuildPlan, Fault, Outcome, Simulator

API_KEY = "pk-soak-test-key"
SCRIPT = Path(sys.executable).parent / "primeintellect-build-exporter"
OUTCOMES: tuple[Outcome, ...] = ("COMPLETED", "FAILED", "CANCELLED")
LISTEN = "127.0.0.1:19899"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def plans(count: int, now: float, longest: float, rng: random.Random) -> list[BuildPlan]:
    """Builds that all finish within ``longest`` seconds from ``now``."""
    result = []
    for index in range(count):
        outcome = rng.choices(OUTCOMES, weights=(8, 1, 1))[0]
        error = "exit code 1" if outcome == "FAILED" else None
        result.append(
            BuildPlan(
                f"soak{index:05d}",
                rng.choice(("trainer", "eval", "sandbox", "gateway")),
                f"v{index % 7}",
                now,
                pending=rng.uniform(0, longest * 0.2),
                uploading=rng.uniform(0, longest * 0.2),
                building=rng.uniform(1, longest * 0.6),
                outcome=outcome,
                artifacts=(ArtifactPlan("CONTAINER_IMAGE", error), ArtifactPlan("VM_SANDBOX")),
            )
        )
    return result


def random_fault(rng: random.Random) -> Fault:
    """One of the ways the API misbehaves; most clear after a few answers."""
    # A 429 pauses every request, so it is rarer here than the faults of single builds.
    kind = rng.choices(
        ("404", "429", "500", "503", "502-html", "garbage", "slow"),
        weights=(3, 1, 3, 3, 3, 3, 3),
    )[0]
    if kind == "404":
        return Fault(status=404, body=b'{"detail": "Not Found"}', times=2)
    if kind == "429":
        return Fault.rate_limited(retry_after=str(rng.choice((0, 1, 2))), times=1)
    if kind in {"500", "503"}:
        return Fault.server_error(int(kind), times=rng.randint(1, 4))
    fault = {
        "502-html": Fault.html_error(502),
        "garbage": Fault.garbage(),
        "slow": Fault.slow(delay=2.5),
    }[kind]
    fault.times = rng.randint(1, 2)
    return fault


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def scrape(client: httpx.Client) -> Samples:
    text = client.get(f"http://{LISTEN}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def exported_status(metrics: Samples) -> dict[str, str]:
    return {
        dict(labels)["build_id"]: dict(labels)["status"]
        for (name, labels), value in metrics.items()
        if name == "primeintellect_image_build_status" and value == 1.0
    }


def internal_errors(metrics: Samples) -> float:
    return sum(
        value
        for (name, _), value in metrics.items()
        if name == "primeintellect_exporter_internal_errors_total"
    )


def print_sample(elapsed: float, pid: int, metrics: Samples) -> None:
    outcomes: dict[str, float] = {}
    for (name, labels), value in metrics.items():
        if name == "primeintellect_exporter_api_requests_total":
            outcome = dict(labels)["outcome"]
            outcomes[outcome] = outcomes.get(outcome, 0) + value
    total = sum(outcomes.values())
    ok = outcomes.get("ok", 0)
    finished = metrics.get(("primeintellect_exporter_builds", (("state", "finished"),)), 0)
    print(
        f"{elapsed:6.0f} {rss_mib(pid):8.1f} {total:9.0f} {ok:7.0f} {total - ok:7.0f} "
        f"{internal_errors(metrics):8.0f} {finished:8.0f}",
        flush=True,
    )


def wait_until_healthy(client: httpx.Client, process: subprocess.Popen[str]) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if client.get(f"http://{LISTEN}/-/healthy").status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def soak(
    arguments: argparse.Namespace,
    rng: random.Random,
    simulator: Simulator,
    process: subprocess.Popen[str],
    client: httpx.Client,
) -> int:
    if not wait_until_healthy(client, process):
        print("FAIL: the exporter did not start")
        return 1
    started = time.monotonic()
    baseline_rss = rss_mib(process.pid)
    build_ids = simulator.build_ids
    faults = 0
    print(f"{'t (s)':>6} {'RSS MiB':>8} {'requests':>9} {'ok':>7} {'failed':>7} ", end="")
    print(f"{'internal':>8} {'finished':>8}")
    next_sample = started
    while time.monotonic() - started < arguments.duration:
        for _ in range(rng.randint(0, 3)):
            simulator.set_fault(rng.choice(build_ids), random_fault(rng))
            faults += 1
        if time.monotonic() >= next_sample:
            next_sample += 10
            print_sample(time.monotonic() - started, process.pid, scrape(client))
        time.sleep(0.5)

    # The faults stop; every build must settle on the simulator's final state.
    for build_id in build_ids:
        simulator.set_fault(build_id, None)
    expected = {
        build_id: str((simulator.payload(build_id) or {})["status"]) for build_id in build_ids
    }
    settle_deadline = time.monotonic() + 120
    while True:
        metrics = scrape(client)
        exported = exported_status(metrics)
        wrong = {b: (exported.get(b), s) for b, s in expected.items() if exported.get(b) != s}
        if not wrong or time.monotonic() > settle_deadline:
            break
        time.sleep(1)
    settled = time.monotonic() - started - arguments.duration
    print_sample(time.monotonic() - started, process.pid, metrics)
    print(
        f"\n{faults} faults injected over {arguments.duration:.0f}s on {len(build_ids)} builds; "
        f"settled {settled:.0f}s after the last fault; "
        f"RSS {baseline_rss:.1f} -> {rss_mib(process.pid):.1f} MiB; "
        f"internal errors {internal_errors(metrics):.0f}"
    )
    if wrong:
        print(f"FAIL: {len(wrong)} builds differ from the simulator: {list(wrong.items())[:5]}")
        return 1
    print(f"OK: all {len(build_ids)} builds show the simulator's final status")
    return 1 if internal_errors(metrics) or process.poll() is not None else 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Soak the exporter against a faulty API.")
    parser.add_argument("--builds", type=int, default=300)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of faults")
    parser.add_argument("--seed", type=int, default=7)
    arguments = parser.parse_args()
    rng = random.Random(arguments.seed)
    # Lifecycles end before the faults stop, so the final state is known.
    build_plans = plans(arguments.builds, time.time(), arguments.duration * 0.8, rng)

    with Simulator(API_KEY, build_plans) as simulator, tempfile.TemporaryDirectory() as work:
        config = Path(work) / "config.yaml"
        log_file = Path(work) / "exporter.log"
        (Path(work) / "builds.txt").write_text("\n".join(p.build_id for p in build_plans))
        config.write_text(
            f"api:\n  base_url: {simulator.base_url}\n  timeout: 1s\n"
            "  max_concurrency: 8\n  requests_per_second: 200\n"
            "polling:\n  interval: 2s\n  stale_after: 1m\n"
            f"build_files: [builds.txt]\nweb:\n  listen_address: {LISTEN}\n"
        )
        # A file, not a pipe: a pipe nobody reads fills up and blocks the exporter's logging.
        with log_file.open("w") as log_output:
            process = subprocess.Popen(
                [str(SCRIPT), "--config.file", str(config)],
                stderr=log_output,
                text=True,
                env={**os.environ, "PRIME_API_KEY": API_KEY},
            )
            with httpx.Client(timeout=10) as client:
                try:
                    result = soak(arguments, rng, simulator, process, client)
                finally:
                    process.send_signal(signal.SIGTERM)
                    process.wait(timeout=15)
        stderr = log_file.read_text()
        levels = Counter(
            part.split("=", 1)[1]
            for line in stderr.splitlines()
            for part in line.split()
            if part.startswith("level=")
        )
        print(f"exporter exit code {process.returncode}; log lines by level: {dict(levels)}")
        if API_KEY in stderr:
            print("FAIL: the API key appears in the log")
            return 1
        return result or process.returncode


if __name__ == "__main__":
    sys.exit(main())
