"""The image inventory's metric contract (discovery.images), pinned by golden files.

Refresh them with ``UPDATE_GOLDEN=1`` after an intended change, and review the diff.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from exporter.demo.simulator import Simulator
from tests.helpers.support import (
    CANARY_API_KEY,
    EPOCH,
    REPOSITORY,
    RunningExporter,
    family_blocks,
    fixed_plans,
    make_config,
    wait_until,
)

GOLDEN_DIRECTORY = REPOSITORY / "tests" / "golden"
LISTED_AT = EPOCH + 86400.0
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
TEAM = "golden-team"


def row(**fields: Any) -> dict[str, Any]:
    return {
        "id": "extra",
        "artifactType": "CONTAINER_IMAGE",
        "imageName": "extra",
        "imageTag": "v1",
        "status": "COMPLETED",
        "createdAt": "2026-01-01T00:00:00Z",
        "teamId": TEAM,
        **fields,
    }


# Rows beside those of the fixed builds: an older row and a stale BUILDING one of a rebuilt
# tag, an undocumented status and type, strings that need cleaning and escaping.
EXTRA_ROWS = [
    row(id="rebuilt-old", imageName="rebuilt", status="FAILED", errorMessage="old failure"),
    row(
        id="rebuilt-stale",
        imageName="rebuilt",
        status="BUILDING",
        createdAt="2025-12-31T00:00:00Z",
        startedAt="2025-12-31T00:00:10Z",
    ),
    row(
        id="rebuilt-new",
        imageName="rebuilt",
        createdAt="2026-01-01T01:00:00Z",
        completedAt="2026-01-01T01:05:00Z",
        pushedAt="2026-01-01T01:06:00Z",
        sizeBytes=123456789,
        visibility="PUBLIC",
        ownerType="team",
        fullImagePath="registry.primeintellect.ai/team/rebuilt:v1",
    ),
    row(id="queued", imageName="future", status="QUEUED", artifactType="WASM"),
    row(
        id="hostile",
        imageName='say "hi"\\now',
        imageTag="\x1b[31mred\x1b[0m",
        status="FAILED",
        errorMessage='step 2: "quote" and \\ backslash\nsecond line',
    ),
]


@pytest.fixture(scope="module")
def golden_listing() -> Iterator[RunningExporter]:
    with Simulator(
        CANARY_API_KEY, fixed_plans(), team_id=TEAM, clock=lambda: LISTED_AT
    ) as simulator:
        simulator.add_image_rows(*EXTRA_ROWS)
        config = make_config(
            simulator.base_url,
            [],
            discovery={"enabled": True, "interval": "1h", "team_id": TEAM},
        )
        running = RunningExporter(config, wall_clock=lambda: LISTED_AT).start()
        try:
            wait_until(
                lambda: running.exporter.inventory.snapshot().listed_at,
                message="the golden listing",
            )
            yield running
        finally:
            running.stop()


def inventory_part(exposition: str) -> str:
    return "".join(
        block
        for name, block in family_blocks(exposition).items()
        if (
            name.startswith("primeintellect_image_")
            and not name.startswith("primeintellect_image_build")
        )
        or name.startswith("primeintellect_exporter_image_list")
    )


@pytest.mark.parametrize(
    ("accept", "golden_name"),
    [("", "images.prom"), (OPENMETRICS, "images.openmetrics")],
    ids=["text", "openmetrics"],
)
def test_image_inventory_matches_the_golden_file(
    golden_listing: RunningExporter, accept: str, golden_name: str
) -> None:
    response = golden_listing.get("/metrics", headers={"Accept": accept} if accept else None)
    actual = inventory_part(response.text)
    golden = GOLDEN_DIRECTORY / golden_name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.write_text(actual)
    assert golden.exists(), f"{golden} is missing; run with UPDATE_GOLDEN=1 to create it"
    assert actual == golden.read_text(), (
        f"exposition differs from {golden}; review the diff, then UPDATE_GOLDEN=1"
    )


def test_every_inventory_contract_metric_is_exposed(golden_listing: RunningExporter) -> None:
    names = set(family_blocks(golden_listing.metrics_text()))
    contract = {
        "primeintellect_image_status",
        "primeintellect_image_info",
        "primeintellect_image_created_timestamp_seconds",
        "primeintellect_image_completed_timestamp_seconds",
        "primeintellect_image_pushed_timestamp_seconds",
        "primeintellect_image_size_bytes",
        "primeintellect_image_error_info",
        "primeintellect_exporter_image_list_last_success_timestamp_seconds",
    }
    assert contract <= names, f"missing: {sorted(contract - names)}"


def test_the_rebuilt_tag_shows_only_its_newest_row(golden_listing: RunningExporter) -> None:
    text = golden_listing.metrics_text()
    lines = [line for line in text.splitlines() if 'image_name="rebuilt"' in line]
    assert any('artifact_id="rebuilt-new"' in line for line in lines)
    assert not any("rebuilt-old" in line or "rebuilt-stale" in line for line in lines)
    assert not any("old failure" in line for line in lines)
