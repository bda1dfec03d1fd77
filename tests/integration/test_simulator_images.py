"""The simulator's image listing answers as the official client expects (IMAGES_LIST.md in
tests/contract): paged by logical image, searchable, scoped by team, faults injectable."""

from __future__ import annotations

from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from exporter.demo.simulator import IMAGES_PATH, ArtifactPlan, BuildPlan, Fault, Simulator
from tests.helpers.support import CANARY_API_KEY, EPOCH, REPOSITORY

SCHEMA = yaml.safe_load((REPOSITORY / "tests" / "contract" / "images-list.schema.yaml").read_text())
VALIDATOR = jsonschema.Draft202012Validator(
    SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)
TWO_TYPES = (ArtifactPlan("CONTAINER_IMAGE"), ArtifactPlan("VM_SANDBOX"))


def team_images(count: int) -> list[BuildPlan]:
    return [
        BuildPlan(f"img-{n:03}", f"image-{n:03}", "v1", EPOCH, 5, 5, 5, artifacts=TWO_TYPES)
        for n in range(count)
    ]


def listing(simulator: Simulator, **params: Any) -> httpx.Response:
    return httpx.get(
        simulator.base_url + IMAGES_PATH,
        params=params,
        headers={"Authorization": f"Bearer {CANARY_API_KEY}"},
        timeout=5,
    )


@pytest.fixture
def team() -> Any:
    with Simulator(CANARY_API_KEY, team_images(7), team_id="team-1") as running:
        yield running


def test_every_listed_row_has_the_fields_the_official_client_reads(team: Simulator) -> None:
    team.add_image_rows(
        {
            "id": "stale-row",
            "artifactType": "CONTAINER_IMAGE",
            "imageName": "image-000",
            "imageTag": "v1",
            "status": "BUILDING",
            "createdAt": "2025-01-01T00:00:00Z",
            "teamId": "team-1",
        }
    )
    answer = listing(team, teamId="team-1", limit=250).json()
    errors = [error.message for error in VALIDATOR.iter_errors(answer)]
    assert errors == []
    assert len(answer["data"]) == 7 * 2 + 1


def test_the_schema_check_catches_a_wrong_row() -> None:
    wrong = {"data": [{"id": 1, "artifactType": "TARBALL", "imageName": "x", "imageTag": "y"}]}
    assert len(list(VALIDATOR.iter_errors(wrong))) >= 3


def test_pages_hold_every_row_of_limit_logical_images_until_an_empty_page(
    team: Simulator,
) -> None:
    pages = [
        listing(team, teamId="team-1", offset=offset, limit=3).json() for offset in (0, 3, 6, 9)
    ]
    assert [len(page["data"]) for page in pages] == [6, 6, 2, 0]
    assert {page["totalCount"] for page in pages} == {7}
    names = [row["imageName"] for page in pages for row in page["data"]]
    assert sorted(set(names)) == [f"image-{n:03}" for n in range(7)]
    assert len(team.listing_requests()) == 4


def test_search_matches_name_tag_or_reference_without_regard_to_case(team: Simulator) -> None:
    rows = listing(team, teamId="team-1", search="GE-003").json()["data"]
    assert {row["imageName"] for row in rows} == {"image-003"}
    by_tag = listing(team, teamId="team-1", search="V1", limit=250).json()["data"]
    assert len(by_tag) == 14
    assert listing(team, teamId="team-1", search="nothing-like-it").json()["data"] == []


def test_the_team_scope_decides_what_is_listed(team: Simulator) -> None:
    assert listing(team).json() == {
        "data": [],
        "totalCount": 0,
        "offset": 0,
        "limit": 100,
        "status": "success",
    }
    assert listing(team, teamId="team-2").json()["data"] == []


@pytest.mark.parametrize("limit", ["0", "251", "-1", "ten"])
def test_a_limit_outside_1_to_250_is_refused(team: Simulator, limit: str) -> None:
    assert listing(team, teamId="team-1", limit=limit).status_code == 422


def test_the_listing_needs_the_bearer_token(team: Simulator) -> None:
    answer = httpx.get(team.base_url + IMAGES_PATH, params={"teamId": "team-1"}, timeout=5)
    assert answer.status_code == 401


def test_a_fault_on_one_page_is_served_there_only_and_can_expire(team: Simulator) -> None:
    team.set_listing_fault(Fault.server_error(503, times=1), offset=3)
    assert listing(team, teamId="team-1", offset=0, limit=3).status_code == 200
    assert listing(team, teamId="team-1", offset=3, limit=3).status_code == 503
    assert listing(team, teamId="team-1", offset=3, limit=3).status_code == 200
    team.set_listing_fault(Fault.rate_limited("7"))
    limited = listing(team, teamId="team-1", offset=6, limit=3)
    assert (limited.status_code, limited.headers["Retry-After"]) == (429, "7")
    team.set_listing_fault(None)
    assert listing(team, teamId="team-1", offset=6, limit=3).status_code == 200
