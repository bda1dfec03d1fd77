"""The simulator's build listing answers as its published spec says (list-image-builds.openapi.yaml
and BUILDS_LIST.md in tests/contract), in each of the ways the spec leaves open."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from exporter.demo.simulator import (
    BUILDS_PATH,
    BuildListing,
    BuildPlan,
    Fault,
    Simulator,
    demo_plans,
    random_plans,
)
from tests.helpers.support import CANARY_API_KEY, EPOCH, REPOSITORY

SPEC = yaml.safe_load(
    (REPOSITORY / "tests" / "contract" / "list-image-builds.openapi.yaml").read_text()
)


def spec_validator(schema_name: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": SPEC["components"]}
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


PAGE_VALIDATOR = spec_validator("GenericPaginationResponse_List_BuildStatusResponse__")
ERROR_VALIDATOR = spec_validator("ErrorResponse")
# Forty builds created over ten minutes, seen five minutes later: every phase is among them.
NOW = EPOCH + 900


def many_plans() -> list[BuildPlan]:
    return [*random_plans(32, EPOCH, random.Random(24)), *demo_plans(EPOCH)]


def listing(api: httpx.Client, **params: Any) -> httpx.Response:
    return api.get(BUILDS_PATH, params=params)


def read_all(api: httpx.Client, limit: int, **params: Any) -> list[dict[str, Any]]:
    """Every page from offset 0 until an empty one."""
    items: list[dict[str, Any]] = []
    for offset in range(0, 10_000, limit):
        page = listing(api, offset=offset, limit=limit, **params).json()
        if not page["data"]:
            return items
        items += page["data"]
    raise AssertionError("the listing never ended")


def client_of(simulator: Simulator) -> httpx.Client:
    """A client of the simulator with the key, one connection kept for every request."""
    return httpx.Client(
        base_url=simulator.base_url,
        headers={"Authorization": f"Bearer {CANARY_API_KEY}"},
        timeout=5,
    )


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    with Simulator(CANARY_API_KEY, many_plans(), clock=lambda: NOW, team_id="team-1") as running:
        yield running


@pytest.fixture
def api(simulator: Simulator) -> Iterator[httpx.Client]:
    with client_of(simulator) as client:
        yield client


@pytest.mark.parametrize("order", ["newest", "oldest"])
@pytest.mark.parametrize("total_field", ["total_count", "totalCount", ""])
def test_every_page_validates_against_the_published_spec(
    simulator: Simulator, api: httpx.Client, order: Any, total_field: Any
) -> None:
    simulator.set_build_listing(BuildListing(order=order, total_field=total_field))
    pages = [listing(api, offset=offset, limit=15).json() for offset in (0, 15, 30, 45)]

    for page in pages:
        errors = sorted(PAGE_VALIDATOR.iter_errors(page), key=str)
        assert not errors, f"{errors[0].message} at {list(errors[0].absolute_path)}"
    assert [len(page["data"]) for page in pages] == [15, 15, 10, 0]
    assert {page.get("total_count") for page in pages} == {
        40 if total_field == "total_count" else None
    }
    assert {page.get("totalCount") for page in pages} == {
        40 if total_field == "totalCount" else None
    }


def test_the_spec_check_catches_a_wrong_page(api: httpx.Client) -> None:
    page = listing(api, limit=1).json()
    page["data"][0]["createdAt"] = "yesterday"
    page["total_count"] = "40"

    assert len(list(PAGE_VALIDATOR.iter_errors(page))) == 2


def test_each_item_is_the_answer_a_poll_of_that_build_gets(
    simulator: Simulator, api: httpx.Client
) -> None:
    simulator.set_payload("explicit-1", {"id": "explicit-1", "status": "QUEUED"})
    items = listing(api, limit=100).json()["data"]

    polls = [api.get(f"/api/v1/images/build/{item['id']}").json() for item in items]
    assert items == polls
    assert len(items) == 41
    assert {"id": "explicit-1", "status": "QUEUED"} in items


@pytest.mark.parametrize(("order", "newest_first"), [("newest", True), ("oldest", False)])
@pytest.mark.parametrize("limit", [1, 7, 40, 100])
def test_paging_lists_every_build_once_ordered_by_creation(
    simulator: Simulator, api: httpx.Client, order: Any, newest_first: bool, limit: int
) -> None:
    simulator.set_build_listing(BuildListing(order=order))
    poll = simulator.payload("cmsim00000000")
    assert poll is not None
    simulator.set_payload("explicit-1", {**poll, "id": "explicit-1"})

    items = read_all(api, limit)

    ids = [item["id"] for item in items]
    assert sorted(ids) == sorted([*simulator.build_ids, "explicit-1"])
    assert len(set(ids)) == len(ids) == 41
    created = [item["createdAt"] for item in items]
    assert created == sorted(created, reverse=newest_first)
    assert items == simulator.listed_builds()


def test_the_defaults_are_offset_0_and_limit_100() -> None:
    plans = random_plans(130, EPOCH, random.Random(1))
    with (
        Simulator(CANARY_API_KEY, plans, clock=lambda: NOW) as simulator,
        client_of(simulator) as api,
    ):
        page = listing(api).json()
    assert (len(page["data"]), page["offset"], page["limit"], page["total_count"]) == (
        100,
        0,
        100,
        130,
    )
    assert page["status"] == "success"


def test_a_limit_past_the_servers_maximum_is_cut_and_the_answer_says_so(
    simulator: Simulator,
    api: httpx.Client,
) -> None:
    simulator.set_build_listing(BuildListing(max_limit=10))

    page = listing(api, offset=5, limit=100).json()

    assert (len(page["data"]), page["offset"], page["limit"]) == (10, 5, 10)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": "-1"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": "-5"}, "offset"),
        ({"offset": "1.5"}, "offset"),
    ],
)
def test_a_parameter_that_is_no_whole_number_is_refused_with_the_spec_error(
    simulator: Simulator, api: httpx.Client, params: dict[str, str], param: str
) -> None:
    answer = listing(api, **params)

    assert answer.status_code == 422
    assert not list(ERROR_VALIDATOR.iter_errors(answer.json()))
    assert answer.json()["errors"][0]["param"] == param


def test_the_listing_needs_the_bearer_token(simulator: Simulator) -> None:
    url = simulator.base_url + BUILDS_PATH
    assert httpx.get(url, timeout=5).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401


def test_a_team_id_can_be_ignored_honoured_or_refused(
    simulator: Simulator, api: httpx.Client
) -> None:
    def counts() -> list[int | None]:
        answers = [listing(api, teamId=team) for team in ("team-1", "team-2")]
        answers.append(listing(api))
        return [a.json().get("total_count") if a.status_code == 200 else None for a in answers]

    assert counts() == [40, 40, 40]
    simulator.set_build_listing(BuildListing(team_id="honoured"))
    assert counts() == [40, 0, 40]
    simulator.set_build_listing(BuildListing(team_id="refused"))
    assert counts() == [None, None, 40]
    refused = listing(api, teamId="team-1")
    assert refused.status_code == 422
    assert refused.json() == {"errors": [{"param": "teamId", "details": "unknown query parameter"}]}


def test_an_api_without_the_listing_answers_404_to_anyone(
    simulator: Simulator, api: httpx.Client
) -> None:
    simulator.set_build_listing(BuildListing(served=False))

    assert listing(api).status_code == 404
    assert api.get(BUILDS_PATH, headers={"Authorization": ""}).status_code == 404
    # A build is still polled as ever.
    assert api.get("/api/v1/images/build/cmsim00000000").status_code == 200


def test_a_fault_on_one_page_is_served_there_only_and_can_expire(
    simulator: Simulator, api: httpx.Client
) -> None:
    simulator.set_build_listing_fault(Fault.server_error(503, times=1), offset=10)
    assert listing(api, offset=0, limit=10).status_code == 200
    assert listing(api, offset=10, limit=10).status_code == 503
    assert listing(api, offset=10, limit=10).status_code == 200
    simulator.set_build_listing_fault(Fault.rate_limited("7"))
    limited = listing(api, offset=20, limit=10)
    assert (limited.status_code, limited.headers["Retry-After"]) == (429, "7")
    assert listing(api, offset=30, limit=10).status_code == 429
    simulator.set_build_listing_fault(None)
    assert listing(api, offset=30, limit=10).status_code == 200
    # The image listing and the builds' polls have faults of their own.
    assert simulator.listing_requests() == []
    assert [request.status for request in simulator.build_listing_requests()] == [
        200,
        503,
        200,
        429,
        429,
        200,
    ]
    assert [request.query for request in simulator.build_listing_requests()][:2] == [
        "offset=0&limit=10",
        "offset=10&limit=10",
    ]


def test_a_delivery_fault_sends_the_correct_page_its_way(
    simulator: Simulator, api: httpx.Client
) -> None:
    simulator.set_build_listing_fault(Fault.truncated(20, body=b""), offset=0)

    with pytest.raises(httpx.HTTPError):
        listing(api, offset=0, limit=5)
    assert listing(api, offset=5, limit=5).status_code == 200
