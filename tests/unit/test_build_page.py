"""Unit tests of the build listing's page (GET /api/v1/images/builds): each item read by the
build status parser, bad items counted and left out, only a body that is no listing refused."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from exporter.models import (
    ARTIFACT_TYPES,
    BUILD_STATUSES,
    BuildPage,
    InvalidBuildError,
    InvalidPageError,
    parse_build,
    parse_build_page,
)
from tests.helpers.support import DETERMINISTIC, REPOSITORY, documents, json_values

SPEC_PATH = REPOSITORY / "tests" / "contract" / "list-image-builds.openapi.yaml"

ITEM: dict[str, Any] = {
    "id": "build-1",
    "imageName": "trainer",
    "imageTag": "v1",
    "status": "FAILED",
    "createdAt": "2026-01-01T00:00:00Z",
    "startedAt": "2026-01-01T00:00:30Z",
    "completedAt": "2026-01-01T00:10:30Z",
    "artifacts": [
        {
            "id": "artifact-1",
            "artifactType": "CONTAINER_IMAGE",
            "status": "FAILED",
            "fullImagePath": None,
            "errorMessage": "step 3/9: exit code 1",
            "createdAt": "2026-01-01T00:00:00Z",
            "startedAt": "2026-01-01T00:00:30Z",
            "completedAt": "2026-01-01T00:10:30Z",
        }
    ],
}


def item(build_id: object = "build-1", **overrides: Any) -> dict[str, Any]:
    return {**ITEM, "id": build_id, **overrides}


def page_of(*items: Any, **fields: Any) -> bytes:
    return json.dumps({"data": list(items), **fields}).encode()


def load_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    return spec


def page_validator() -> Draft202012Validator:
    schema = {
        "$ref": "#/components/schemas/GenericPaginationResponse_List_BuildStatusResponse__",
        "components": load_spec()["components"],
    }
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def test_a_page_as_the_spec_describes_it_parses_each_item_as_a_poll_would() -> None:
    entries = [item("build-2"), item("build-1", status="BUILDING", completedAt=None)]
    document = {
        "data": entries,
        "total_count": 2,
        "offset": 0,
        "limit": 100,
        "status": "success",
    }
    assert [error.message for error in page_validator().iter_errors(document)] == []

    page = parse_build_page(json.dumps(document).encode())

    assert page == BuildPage(
        builds=tuple(parse_build(json.dumps(entry).encode()) for entry in entries),
        skipped=0,
        total=2,
        offset=0,
        limit=100,
    )
    assert page.builds[0].artifacts[0].error_message == "step 3/9: exit code 1"


def test_the_listing_spec_knows_the_enums_the_models_know() -> None:
    schemas = load_spec()["components"]["schemas"]

    assert tuple(schemas["ImageBuildStatusEnum"]["enum"]) == BUILD_STATUSES
    assert tuple(schemas["ImageBuildArtifactTypeEnum"]["enum"]) == ARTIFACT_TYPES


# What each almost-valid body comes to: the ids of its builds, the items skipped and the total;
# or InvalidPageError. Nothing else may escape.
ALMOST_VALID: dict[str, tuple[bytes, tuple[list[str], int, int | None] | None]] = {
    "empty page": (page_of(total_count=0), ([], 0, 0)),
    "nulls where strings are expected": (
        page_of(item(imageName=None, imageTag=None, status=None, startedAt=None, artifacts=None)),
        (["build-1"], 0, None),
    ),
    "unknown status and artifact type": (
        page_of(item(status="QUEUED", artifacts=[{**ITEM["artifacts"][0], "artifactType": "X"}])),
        (["build-1"], 0, None),
    ),
    "extra fields on the page and its items": (
        page_of(item(region="eu", gpu={"count": 8}), next_cursor="abc", total_count=1),
        (["build-1"], 0, 1),
    ),
    "duplicated ids": (
        page_of(item(), item(status="COMPLETED")),
        (["build-1", "build-1"], 0, None),
    ),
    "items that are no objects": (
        page_of(7, "build-2", [item("build-3")], None, True, 1.5, item()),
        (["build-1"], 6, None),
    ),
    "items without a usable id": (
        page_of(
            {**ITEM, "id": None}, item(""), item(17), {k: v for k, v in ITEM.items() if k != "id"}
        ),
        ([], 4, None),
    ),
    "items without a usable createdAt": (
        page_of(item(createdAt=None), item(createdAt=1767225600), item(createdAt="yesterday")),
        ([], 3, None),
    ),
    "an item with unusable artifacts": (
        page_of(item("build-1", artifacts="artifact-1"), item("build-2")),
        (["build-2"], 1, None),
    ),
    "snake-case error message": (page_of(item(error_message="oom")), (["build-1"], 0, None)),
    "huge numbers": (
        page_of(item(createdAt=10**30, sizeBytes=10**30), item("build-2"), total_count=10**30),
        (["build-2"], 1, 10**30),
    ),
    "infinite number": (b'{"data": [], "total_count": 1e999}', ([], 0, None)),
    "a number past what JSON can be read with": (
        b'{"data": [], "total_count": ' + b"9" * 5000 + b"}",
        None,
    ),
    "total as a string": (page_of(item(), total_count="1"), (["build-1"], 0, None)),
    "total negative": (page_of(total_count=-1), ([], 0, None)),
    "total fractional": (page_of(total_count=1.0), ([], 0, None)),
    "total true": (page_of(total_count=True), ([], 0, None)),
    "total null": (page_of(total_count=None), ([], 0, None)),
    "total spelt as the image listing spells it": (page_of(totalCount=3), ([], 0, 3)),
    "total spelt both ways": (page_of(total_count=3, totalCount=4), ([], 0, 3)),
    "total_count odd, totalCount usable": (page_of(total_count="3", totalCount=4), ([], 0, 4)),
    "an error status beside the data": (page_of(item(), status="error"), (["build-1"], 0, None)),
    "byte order mark": (b"\xef\xbb\xbf" + page_of(item()), (["build-1"], 0, None)),
    "a stray Latin-1 byte": (
        page_of(item(imageTag="cafe")).replace(b"cafe", b"caf\xe9"),
        (["build-1"], 0, None),
    ),
    "data null": (b'{"data": null}', None),
    "data an object": (b'{"data": {"0": {}}}', None),
    "data missing": (b'{"items": [], "total_count": 0}', None),
    "body an array": (json.dumps([ITEM]).encode(), None),
    "body null": (b"null", None),
    "body empty": (b"", None),
    "body HTML": (b"<html><body>502 Bad Gateway</body></html>", None),
    "body cut short": (page_of(item())[:-5], None),
    "body not UTF-8": (b"\xff\xfe", None),
    "deeply nested": (b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
}


@pytest.mark.parametrize(("body", "expected"), ALMOST_VALID.values(), ids=ALMOST_VALID.keys())
def test_an_almost_valid_body_is_a_page_or_an_invalid_page_error_only(
    body: bytes, expected: tuple[list[str], int, int | None] | None
) -> None:
    if expected is None:
        with pytest.raises(InvalidPageError):
            parse_build_page(body)
        return
    page = parse_build_page(body)
    assert ([build.id for build in page.builds], page.skipped, page.total) == expected


def test_unknown_values_pass_as_they_do_for_a_poll() -> None:
    [build] = parse_build_page(page_of(item(status="QUEUED", imageName=None))).builds

    assert (build.status, build.status_label, build.image_name) == ("QUEUED", "UNKNOWN", "")


def test_a_page_with_more_items_than_its_limit_is_taken_whole() -> None:
    items = [item(f"build-{n}") for n in range(300)]

    page = parse_build_page(page_of(*items, limit=100, offset=0))

    assert (len(page.builds), page.limit, page.offset) == (300, 100, 0)


@pytest.mark.parametrize(
    ("fields", "offset", "limit"),
    [
        ({}, None, None),
        ({"offset": 200, "limit": 100}, 200, 100),
        ({"offset": "200", "limit": -1}, None, None),
        ({"offset": None, "limit": 2.5}, None, None),
    ],
)
def test_offset_and_limit_are_read_when_they_are_whole_numbers(
    fields: dict[str, Any], offset: int | None, limit: int | None
) -> None:
    page = parse_build_page(page_of(**fields))

    assert (page.offset, page.limit) == (offset, limit)


def test_the_refusal_names_no_value_from_the_body() -> None:
    secret_looking = "pk-canary-0b7f5e2d9c4a41e8b3f6a1d2c9e8f7a6"
    with pytest.raises(InvalidPageError) as caught:
        parse_build_page(json.dumps({"data": secret_looking}).encode())

    assert str(caught.value) == "data: not a list of builds"


# -- any page ------------------------------------------------------------------------------------

items = st.one_of(documents("build-1"), documents("build-2"), json_values)
page_documents = st.builds(
    lambda data, extra: {**extra, "data": data},
    st.lists(items, max_size=5),
    st.fixed_dictionaries(
        {},
        optional={
            "total_count": json_values,
            "totalCount": json_values,
            "offset": json_values,
            "limit": json_values,
            "status": json_values,
        },
    ),
)
page_bodies = st.one_of(
    st.builds(
        lambda document: json.dumps(document).encode("utf-8", "surrogatepass"), page_documents
    ),
    st.builds(lambda document: json.dumps(document).encode(), json_values),
    st.binary(max_size=40),
)


def poll_of(entry: object) -> str | None:
    """The id of the build a poll answered with ``entry`` would give, if it gives one."""
    if not isinstance(entry, dict):
        return None
    try:
        build = parse_build(json.dumps(entry).encode("utf-8", "surrogatepass"))
    except InvalidBuildError:
        return None
    return build.id or None


@DETERMINISTIC
@given(body=page_bodies)
def test_any_body_is_a_page_of_the_items_a_poll_would_accept_or_an_invalid_page_error(
    body: bytes,
) -> None:
    try:
        page = parse_build_page(body)
    except InvalidPageError:
        return
    document = json.loads(body.decode("utf-8", errors="replace").removeprefix("\ufeff"))
    accepted = [build_id for entry in document["data"] if (build_id := poll_of(entry))]
    assert [build.id for build in page.builds] == accepted
    assert page.skipped == len(document["data"]) - len(accepted)
    for count in (page.total, page.offset, page.limit):
        assert count is None or (type(count) is int and count >= 0)
