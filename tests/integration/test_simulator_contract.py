"""The simulator answers as the published spec says, so tests against it mean something."""

from __future__ import annotations

import math
import random
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from exporter.demo.simulator import (
    ArtifactPlan,
    BuildPlan,
    Fault,
    Simulator,
    demo_plans,
    random_plans,
)
from tests.helpers.support import CANARY_API_KEY, EPOCH, REPOSITORY

SPEC_PATH = REPOSITORY / "tests" / "contract" / "get-build-status.openapi.yaml"


def spec_validator(schema_name: str) -> jsonschema.Draft202012Validator:
    spec = yaml.safe_load(SPEC_PATH.read_text())
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": spec["components"]}
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


BUILD_VALIDATOR = spec_validator("BuildStatusResponse")

PLAN = BuildPlan(
    "contract-1",
    "trainer",
    "v1",
    EPOCH,
    pending=10,
    uploading=20,
    building=30,
    artifacts=(ArtifactPlan("CONTAINER_IMAGE", "boom"), ArtifactPlan("VM_SANDBOX")),
)
PHASE_TIMES = {"PENDING": 5, "UPLOADING": 15, "BUILDING": 45, "finished": 100}


def every_phase_payload() -> list[tuple[str, dict[str, Any]]]:
    payloads = []
    for outcome in ("COMPLETED", "FAILED", "CANCELLED"):
        plan = BuildPlan(**{**PLAN.__dict__, "outcome": outcome})
        for phase, offset in PHASE_TIMES.items():
            payloads.append((f"{outcome}-{phase}", plan.payload(EPOCH + offset)))
    never_started = BuildPlan("contract-2", "x", "y", EPOCH, 10, 0, 0, outcome="CANCELLED")
    payloads.append(("cancelled-before-start", never_started.payload(EPOCH + 60)))
    held = BuildPlan("contract-3", "x", "y", EPOCH, 1, 1, math.inf)
    payloads.append(("held-building", held.payload(EPOCH + 1e6)))
    now = EPOCH + 300
    payloads += [(f"demo-{p.build_id}", p.payload(now)) for p in demo_plans(EPOCH)]
    payloads += [
        (f"random-{p.build_id}", p.payload(now)) for p in random_plans(20, EPOCH, random.Random(3))
    ]
    return payloads


@pytest.mark.parametrize(
    ("name", "payload"), every_phase_payload(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_simulated_answer_validates_against_the_spec(
    name: str, payload: dict[str, Any]
) -> None:
    errors = sorted(BUILD_VALIDATOR.iter_errors(payload), key=str)
    assert not errors, f"{name}: {errors[0].message} at {list(errors[0].absolute_path)}"


def test_the_spec_check_catches_a_wrong_answer() -> None:
    payload = PLAN.payload(EPOCH + 100)
    payload["createdAt"] = "yesterday"
    del payload["imageTag"]
    assert len(list(BUILD_VALIDATOR.iter_errors(payload))) == 2


@pytest.mark.parametrize(
    ("offset", "status", "artifact_statuses"),
    [
        (5, "PENDING", ["PENDING", "PENDING"]),
        (15, "UPLOADING", ["PENDING", "PENDING"]),
        (45, "BUILDING", ["BUILDING", "BUILDING"]),
        (100, "FAILED", ["FAILED", "CANCELLED"]),
    ],
)
def test_lifecycle_moves_through_the_documented_statuses(
    offset: float, status: str, artifact_statuses: list[str]
) -> None:
    plan = BuildPlan(**{**PLAN.__dict__, "outcome": "FAILED"})
    payload = plan.payload(EPOCH + offset)
    assert payload["status"] == status
    assert [artifact["status"] for artifact in payload["artifacts"]] == artifact_statuses
    if status == "FAILED":
        assert payload["artifacts"][0]["errorMessage"] == "boom"
        assert payload["completedAt"] == "2026-01-01T00:01:00.000Z"


def test_served_answer_needs_the_bearer_token() -> None:
    with Simulator(CANARY_API_KEY, [PLAN]) as simulator:
        url = simulator.base_url + "/api/v1/images/build/contract-1"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        good = httpx.get(url, headers={"Authorization": f"Bearer {CANARY_API_KEY}"})
        assert good.status_code == 200
        assert good.headers["Content-Type"] == "application/json"
        assert not list(BUILD_VALIDATOR.iter_errors(good.json()))
        unknown = httpx.get(url + "x", headers={"Authorization": f"Bearer {CANARY_API_KEY}"})
        assert unknown.status_code == 404


def test_injected_faults_are_served_and_can_expire() -> None:
    auth = {"Authorization": f"Bearer {CANARY_API_KEY}"}
    with Simulator(CANARY_API_KEY, [PLAN]) as simulator:
        url = simulator.base_url + "/api/v1/images/build/contract-1"
        simulator.set_fault("contract-1", Fault.rate_limited(retry_after="7", times=1))
        limited = httpx.get(url, headers=auth)
        assert (limited.status_code, limited.headers["Retry-After"]) == (429, "7")
        assert httpx.get(url, headers=auth).status_code == 200
        simulator.set_fault("contract-1", Fault.garbage())
        assert httpx.get(url, headers=auth).text == "<html>not json</html>"
        simulator.set_fault("contract-1", Fault.html_error(502))
        assert httpx.get(url, headers=auth).status_code == 502
        simulator.set_fault("contract-1", None)
        assert [request.status for request in simulator.requests("contract-1")] == [
            429,
            200,
            200,
            502,
        ]
