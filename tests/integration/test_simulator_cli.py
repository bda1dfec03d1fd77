"""The simulator's own command line (``primeintellect-build-simulator``) over loopback: it plays
a team as the API does, and misbehaves as its options ask, so a user can try the exporter
against a team's listings and against faults."""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.helpers.support import (
    CANARY_API_KEY,
    SIMULATOR_SCRIPT,
    Daemon,
    environment,
    parse_samples,
    wait_until,
)

AUTHORIZED = {"Authorization": f"Bearer {CANARY_API_KEY}"}
DEMO_BUILDS = 8
REPEATED_PAGE = frozenset({("reason", "repeated_page")})


@dataclass
class RunningSimulator:
    url: str
    banner: list[str]

    def get(self, path: str, **params: str) -> httpx.Response:
        return httpx.get(self.url + path, params=params, headers=AUTHORIZED, timeout=10)


@contextmanager
def simulator(*arguments: str) -> Iterator[RunningSimulator]:
    """The console script with these options, once its banner is out; stopped after."""
    with subprocess.Popen(
        [SIMULATOR_SCRIPT, "--listen-address", "127.0.0.1:0", *arguments],
        stdout=subprocess.PIPE,
        text=True,
        env=environment(PRIME_API_KEY=CANARY_API_KEY),
    ) as process:
        try:
            assert process.stdout is not None
            banner: list[str] = []
            # Up to "Builds:" and the demo's builds under it.
            while "Builds:" not in banner[-DEMO_BUILDS - 1 :]:
                line = process.stdout.readline()
                assert line, f"the simulator ended early: {banner}"
                banner.append(line.rstrip("\n"))
            match = re.search(r"(http://127\.0\.0\.1:\d+)", banner[0])
            assert match, banner
            yield RunningSimulator(match.group(1), banner)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def listed_builds(running: RunningSimulator, **params: str) -> int:
    response = running.get("/api/v1/images/builds", **params)
    assert response.status_code == 200
    return len(response.json()["data"])


def listed_images(running: RunningSimulator, **params: str) -> int:
    response = running.get("/api/v1/images", limit="250", **params)
    assert response.status_code == 200
    return len(response.json()["data"])


def test_the_simulator_plays_the_team_its_command_line_names() -> None:
    with simulator("--team-id", "team-blue") as running:
        assert (
            "Team: team-blue (the listings answer its builds and images for teamId=team-blue)"
            in (running.banner)
        )
        assert listed_builds(running, teamId="team-blue") == DEMO_BUILDS
        assert listed_builds(running, teamId="team-red") == 0
        assert listed_images(running, teamId="team-blue") > 0
        assert listed_images(running, teamId="team-red") == 0
        # The key's personal images: none, they are all the team's.
        assert listed_images(running) == 0
        assert running.get("/api/v1/images/build/cmdemo0web0001").status_code == 200


def test_the_simulator_without_a_team_lists_everything_as_the_keys_own() -> None:
    with simulator() as running:
        assert not any(line.startswith("Team:") for line in running.banner)
        assert listed_builds(running) == DEMO_BUILDS
        assert listed_images(running) > 0


def test_the_simulator_answers_with_the_faults_its_command_line_names() -> None:
    with simulator(
        "--status-fault",
        "503",
        "--status-fault",
        "cmdemo0web0001=403",
        "--image-listing-fault",
        "500",
        "--build-listing-fault",
        "invalid",
    ) as running:
        assert (
            "Faults: build status of every build, build status of cmdemo0web0001, image listing, "
            "build listing" in running.banner
        )
        assert running.get("/api/v1/images/build/cmdemo0web0001").status_code == 403
        assert running.get("/api/v1/images/build/cmdemo0trn0002").status_code == 503
        assert running.get("/api/v1/images").status_code == 500
        garbage = running.get("/api/v1/images/builds")
        assert garbage.status_code == 200
        assert not garbage.text.startswith("{")


def test_the_simulator_pages_its_listings_wrongly_as_its_command_line_asks() -> None:
    with simulator(
        "--image-listing-fault", "endless", "--build-listing-fault", "short-total"
    ) as running:
        assert "Faults: image listing (endless), build listing (short-total)" in running.banner
        pages = [running.get("/api/v1/images", offset=offset).json() for offset in ("0", "250")]
        # Every page is the first, and no total says where the listing ends.
        assert pages[0]["data"]
        assert pages[1]["data"] == pages[0]["data"]
        assert not {"totalCount", "total_count"} & (pages[0].keys() | pages[1].keys())
        builds = running.get("/api/v1/images/builds").json()
        assert (len(builds["data"]), builds["total_count"]) == (DEMO_BUILDS, DEMO_BUILDS - 1)


def test_an_exporter_process_against_the_simulators_endless_listings_reports_repeated_pages(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    with simulator(
        "--image-listing-fault", "endless", "--build-listing-fault", "endless"
    ) as running:
        config = tmp_path / "config.yaml"
        config.write_text(
            f"api:\n  base_url: {running.url}\n"
            "web:\n  listen_address: 127.0.0.1:0\n"
            "discovery:\n"
            "  images:\n    enabled: true\n"
            "  builds:\n    enabled: true\n"
        )
        daemon = Daemon("--config.file", str(config), env=environment(PRIME_API_KEY=CANARY_API_KEY))
        daemons.append(daemon)
        url = daemon.wait_for_url()

        def reasons() -> dict[str, float | None]:
            samples = parse_samples(httpx.get(url + "/metrics", timeout=10).text)
            return {
                name: samples.get((f"primeintellect_exporter_{name}", REPEATED_PAGE))
                for name in ("image_list_last_error", "build_list_last_error")
            }

        wait_until(
            lambda: reasons() == {"image_list_last_error": 1.0, "build_list_last_error": 1.0},
            message="both listings reported as repeated_page",
        )
        returncode, _, stderr = daemon.stop()
        assert returncode == 0, stderr
        # One warning each, saying what to do.
        for listing in ("image", "build"):
            told = [
                line
                for line in stderr.splitlines()
                if f"{listing} listing answered a page it had already sent" in line
            ]
            assert len(told) == 1, stderr
            assert "api.base_url" in told[0]


def test_the_simulator_rate_limits_every_nth_request_with_the_retry_after_given() -> None:
    with simulator("--rate-limit-every", "3", "--retry-after", "7") as running:
        answers = [running.get("/api/v1/images/build/cmdemo0web0001") for _ in range(6)]
        assert [answer.status_code for answer in answers] == [200, 200, 429, 200, 200, 429]
        assert answers[2].headers["Retry-After"] == "7"
        assert "Faults: a 429 every 3 requests" in running.banner


def test_the_simulator_refuses_a_fault_it_does_not_know() -> None:
    result = subprocess.run(
        [SIMULATOR_SCRIPT, "--status-fault", "b1=302"],
        capture_output=True,
        text=True,
        env=environment(PRIME_API_KEY=CANARY_API_KEY),
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "'302' is no fault" in result.stderr
