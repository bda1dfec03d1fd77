"""Image discovery over real HTTP against the simulator: every page within the key's budget,
the latest row of each image, a failed listing that keeps the last complete one, and the
listing's 429 pausing build polls too."""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest

from exporter.demo.simulator import BuildPlan, Fault, ImageListing, Simulator
from exporter.models import Outcome, parse_image_page
from exporter.store import latest_rows
from tests.helpers.clock import DrivenClock
from tests.helpers.images import TEAM, TWO_TYPES, discovering, listed, team_images
from tests.helpers.support import (
    CANARY_API_KEY,
    EPOCH,
    RunningExporter,
    forever_building,
    make_config,
    parse_samples,
    wait_until,
)

# A request budget whose slot (0.25 s) is exact in binary, as are the driven times it makes:
# a wait that ends a rounding error after a deadline would never be woken by the driven clock.
SLOTS_PER_SECOND = 4
SLOT = 1 / SLOTS_PER_SECOND


def samples(running: RunningExporter) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return parse_samples(running.get("/metrics").text)


def value(running: RunningExporter, name: str, **labels: str) -> float | None:
    return samples(running).get((name, frozenset(labels.items())))


def test_three_pages_of_images_are_listed_within_the_request_budget(
    stopping: list[RunningExporter],
) -> None:
    clock = DrivenClock()
    with Simulator(
        CANARY_API_KEY, team_images(600), team_id=TEAM, monotonic=clock.monotonic
    ) as simulator:
        running = discovering(simulator, clock=clock, requests_per_second=5)
        stopping.append(running)
        # Five requests a second: each page, once answered, waits 0.2 s for the next slot, and
        # no page is asked while the driven clock stands still.
        for page in (1, 2):
            clock.wait_for_sleep(0.2, message=f"the wait for a slot after page {page}")
            assert len(simulator.listing_requests()) == page
            clock.advance(0.2)
        wait_until(lambda: listed(running), message="a complete listing")
        requests = simulator.listing_requests()
        assert [request.query.split("&")[0] for request in requests] == [
            "offset=0",
            "offset=250",
            "offset=500",
        ]
        assert all(
            "limit=250" in request.query and "teamId=team-1" in request.query
            for request in requests
        )
        started = requests[0].at
        assert [round(request.at - started, 6) for request in requests] == [0.0, 0.2, 0.4]
        found = samples(running)
        completed = [
            key
            for key, sample in found.items()
            if key[0] == "primeintellect_image_status" and ("status", "COMPLETED") in key[1]
        ]
        assert len(completed) == 1200
        assert all(found[key] == 1.0 for key in completed)


def test_the_latest_row_of_an_image_wins_over_older_and_stale_building_rows(
    stopping: list[RunningExporter],
) -> None:
    plans = [BuildPlan("b1", "trainer", "v1", EPOCH, 5, 5, 5, artifacts=TWO_TYPES)]
    with Simulator(CANARY_API_KEY, plans, team_id=TEAM) as simulator:
        stale = {
            "id": "stale-building",
            "artifactType": "CONTAINER_IMAGE",
            "imageName": "trainer",
            "imageTag": "v1",
            "status": "BUILDING",
            "createdAt": "2025-12-31T23:00:00Z",
            "startedAt": "2025-12-31T23:01:00Z",
            "teamId": TEAM,
        }
        rebuilt = {
            **stale,
            "id": "rebuilt",
            "artifactType": "VM_SANDBOX",
            "status": "FAILED",
            "errorMessage": "disk image: <out of space>",
            "createdAt": "2026-01-02T00:00:00Z",
            "startedAt": "2026-01-02T00:00:05Z",
            "completedAt": "2026-01-02T00:03:00Z",
        }
        simulator.add_image_rows(stale, rebuilt)
        running = discovering(simulator)
        stopping.append(running)
        wait_until(lambda: listed(running), message="a complete listing")
        container = {"image_name": "trainer", "image_tag": "v1", "artifact_type": "CONTAINER_IMAGE"}
        assert value(running, "primeintellect_image_status", **container, status="COMPLETED") == 1
        assert value(running, "primeintellect_image_status", **container, status="BUILDING") == 0
        sandbox = {**container, "artifact_type": "VM_SANDBOX"}
        assert value(running, "primeintellect_image_status", **sandbox, status="FAILED") == 1
        assert (
            value(
                running,
                "primeintellect_image_error_info",
                **sandbox,
                error_message="disk image: <out of space>",
            )
            == 1
        )


def test_a_listing_that_fails_on_page_two_keeps_the_last_complete_one_and_says_why(
    stopping: list[RunningExporter],
) -> None:
    clock = DrivenClock()
    with Simulator(
        CANARY_API_KEY,
        team_images(300),
        team_id=TEAM,
        clock=clock.wall,
        monotonic=clock.monotonic,
    ) as simulator:
        running = discovering(simulator, clock=clock, requests_per_second=SLOTS_PER_SECOND)
        stopping.append(running)
        list_two_pages(clock, "the first listing")
        first = wait_until(lambda: listed(running), message="a complete listing")
        simulator.set_listing_fault(Fault.server_error(503), offset=250)
        clock.wait_for_sleep(30, message="the wait for the second listing")
        clock.advance(30)
        list_two_pages(clock, "the listing that fails")
        wait_until(
            lambda: (
                value(
                    running, "primeintellect_exporter_image_list_last_error", reason="server_error"
                )
                == 1
            ),
            message="the failed listing reported",
        )
        assert [r.status for r in simulator.listing_requests()] == [200, 200, 200, 503]
        inventory = running.exporter.inventory.snapshot()
        assert inventory.listed_at == first
        assert inventory.last_error is Outcome.SERVER_ERROR
        assert len(inventory.images) == 600
        assert (
            value(running, "primeintellect_exporter_image_list_last_success_timestamp_seconds")
            == first
        )
        simulator.set_listing_fault(None, offset=250)
        clock.wait_for_sleep(30, message="the wait for the third listing")
        clock.advance(30)
        list_two_pages(clock, "the listing after the fault")
        wait_until(lambda: listed(running) > first, message="a complete listing again")
        # Each listing began 30 s after the previous one ended, its second page a slot later.
        assert round(listed(running) - first, 6) == 2 * (30 + SLOT)
        assert (
            value(running, "primeintellect_exporter_image_list_last_error", reason="server_error")
            is None
        )


@pytest.mark.parametrize(
    ("paging", "reason"),
    [
        # No total, and every page the first: a listing that would never end.
        pytest.param(ImageListing(offset="ignored", total_field=""), "repeated_page", id="endless"),
        pytest.param(ImageListing(total_skew=-1), "over_total", id="short-total"),
    ],
)
def test_a_listing_cut_short_keeps_the_last_complete_one_in_metrics_and_says_why(
    stopping: list[RunningExporter], paging: ImageListing, reason: str
) -> None:
    clock = DrivenClock()
    with Simulator(
        CANARY_API_KEY,
        team_images(300),
        team_id=TEAM,
        clock=clock.wall,
        monotonic=clock.monotonic,
    ) as simulator:
        running = discovering(simulator, clock=clock, requests_per_second=SLOTS_PER_SECOND)
        stopping.append(running)
        list_two_pages(clock, "the first listing")
        first = wait_until(lambda: listed(running), message="a complete listing")
        complete = image_series(running)
        # 300 images of two artifact types, each with its status set to 1.
        assert sum(complete.values()) == 600
        simulator.set_image_listing(paging)
        clock.wait_for_sleep(30, message="the wait for the second listing")
        clock.advance(30)
        list_two_pages(clock, "the listing cut short")
        wait_until(
            lambda: value(running, "primeintellect_exporter_image_list_last_error", reason=reason),
            message=f"the cut listing reported as {reason}",
        )
        # The cut listing stopped at page two: the next request is the next listing's, an
        # interval later.
        clock.wait_for_sleep(30, message="the wait for the third listing")
        assert [r.query.split("&")[0] for r in simulator.listing_requests()] == [
            "offset=0",
            "offset=250",
        ] * 2
        assert image_series(running) == complete
        assert (
            value(running, "primeintellect_exporter_image_list_last_success_timestamp_seconds")
            == first
        )
        assert running.exporter.inventory.snapshot().listed_at == first


@pytest.mark.parametrize(
    ("total_field", "offsets"),
    [
        pytest.param("total_count", ["offset=0", "offset=250"], id="total_count"),
        pytest.param("totalCount", ["offset=0", "offset=250"], id="totalCount"),
        pytest.param("", ["offset=0", "offset=250", "offset=500"], id="no-total"),
    ],
)
def test_a_total_in_either_spelling_ends_the_listing_without_an_empty_page(
    stopping: list[RunningExporter],
    total_field: Literal["total_count", "totalCount", ""],
    offsets: list[str],
) -> None:
    with Simulator(
        CANARY_API_KEY,
        team_images(300),
        team_id=TEAM,
        image_listing=ImageListing(total_field=total_field),
    ) as simulator:
        running = discovering(simulator)
        stopping.append(running)
        wait_until(lambda: listed(running), message="a complete listing")
        assert [r.query.split("&")[0] for r in simulator.listing_requests()] == offsets
        assert len(running.exporter.inventory.snapshot().images) == 600


def image_series(running: RunningExporter) -> dict[frozenset[tuple[str, str]], float]:
    """Every primeintellect_image_status sample, by its labels."""
    return {
        labels: sample
        for (name, labels), sample in samples(running).items()
        if name == "primeintellect_image_status"
    }


def list_two_pages(clock: DrivenClock, listing: str) -> None:
    """Let a listing of two pages through: page two waits a slot, and no page is asked while
    the driven clock stands still."""
    clock.wait_for_sleep(SLOT, message=f"the wait for a slot for page two of {listing}")
    clock.advance(SLOT)


def test_a_429_on_the_listing_pauses_build_polls_too(stopping: list[RunningExporter]) -> None:
    clock = DrivenClock()
    with Simulator(
        CANARY_API_KEY, team_id=TEAM, clock=clock.wall, monotonic=clock.monotonic
    ) as simulator:
        simulator.add(forever_building("busy"))
        simulator.set_listing_fault(Fault.rate_limited("40", times=1))
        running = discovering(
            simulator, ["busy"], clock=clock, requests_per_second=SLOTS_PER_SECOND
        )
        stopping.append(running)
        # The build is polled first, then the listing waits for the next slot.
        running.wait_until_all_polled()
        clock.wait_for_sleep(SLOT, message="the listing's wait for a slot")
        clock.advance(SLOT)
        [limited] = wait_until(
            lambda: [r for r in simulator.listing_requests() if r.status == 429],
            message="the listing's 429",
        )
        wait_until(
            lambda: running.exporter.telemetry.snapshot().requests[Outcome.RATE_LIMITED] == 1,
            message="the 429 counted",
        )

        def polls_after_the_429() -> list[float]:
            return [
                round(r.at - limited.at, 6) for r in simulator.requests("busy") if r.at > limited.at
            ]

        # The build fell due a second after its poll, inside the pause: 40 s (Retry-After)
        # pass a tick at a time without a request.
        for second in range(40):
            # A shorter wait would be for the next request's slot: polling during the pause.
            clock.wait_for_sleep(1.0, message=f"the poller's 1 s tick {second} s into the pause")
            assert polls_after_the_429() == [], f"polled {second} s into the 40 s pause"
            clock.advance(1.0)
        # Then polls resume at once, the build first, the listing in the next slot.
        wait_until(polls_after_the_429, message="a build poll after the pause")
        assert polls_after_the_429() == [40.0]
        clock.wait_for_sleep(SLOT, message="the listing's wait for the slot after the poll")
        clock.advance(SLOT)
        wait_until(
            lambda: len(simulator.listing_requests()) == 2, message="the listing after the pause"
        )
        assert [round(r.at - limited.at, 6) for r in simulator.listing_requests()] == [
            0.0,
            40 + SLOT,
        ]
        assert running.exporter.telemetry.snapshot().requests[Outcome.RATE_LIMITED] == 1


def test_discovery_off_exposes_no_image_series(stopping: list[RunningExporter]) -> None:
    with Simulator(CANARY_API_KEY, team_images(3), team_id=TEAM) as simulator:
        running = RunningExporter(make_config(simulator.base_url, ["img-0000"])).start()
        stopping.append(running)
        running.wait_until_all_polled()
        names = {name for name, _ in samples(running)}
        assert not {name for name in names if name.startswith("primeintellect_image_status")}
        assert simulator.listing_requests() == []


def test_with_shards_only_the_first_replica_lists_the_images(
    stopping: list[RunningExporter],
) -> None:
    with Simulator(CANARY_API_KEY, team_images(3), team_id=TEAM) as simulator:
        second = discovering(simulator, shard=(1, 2))
        first = discovering(simulator, shard=(0, 2))
        stopping.extend([second, first])
        wait_until(lambda: listed(first), message="the first replica's listing")
        assert len(simulator.listing_requests()) == 1
        assert (
            value(
                first,
                "primeintellect_image_status",
                image_name="image-0000",
                image_tag="v1",
                artifact_type="VM_SANDBOX",
                status="COMPLETED",
            )
            == 1
        )
        names = {name for name, _ in samples(second)}
        assert "primeintellect_image_status" not in names


def test_latest_rows_follow_pushed_then_completed_then_started_then_created() -> None:
    base = {"artifactType": "VM_SANDBOX", "imageName": "a", "imageTag": "1", "status": "BUILDING"}
    rows = parse_image_page(
        json_page(
            {
                **base,
                "id": "old",
                "createdAt": "2026-01-01T00:00:00Z",
                "pushedAt": "2026-01-01T05:00:00Z",
            },
            {
                **base,
                "id": "new",
                "createdAt": "2026-01-01T04:00:00Z",
                "startedAt": "2026-01-01T04:30:00Z",
            },
        )
    ).rows
    [kept] = latest_rows(rows).values()
    assert kept.id == "old"


def json_page(*rows: dict[str, Any]) -> bytes:
    return json.dumps({"data": list(rows)}).encode()
