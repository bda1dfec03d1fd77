"""The status page's judgement of each build, on a driven clock: what counts as a problem."""

from __future__ import annotations

import json
import math

import pytest

from exporter.demo.simulator import ArtifactPlan, BuildPlan
from exporter.models import Outcome, parse_build
from exporter.store import BuildRecord, BuildStore
from exporter.web.status_page import (
    PageContext,
    PageQuery,
    Problem,
    problem_of,
    render_build_page,
    render_status_page,
)
from tests.helpers.support import EPOCH

HOUR = 3600.0


def record(plan: BuildPlan, at: float, **fields: object) -> BuildRecord:
    """The record of a build last answered at ``at``, as the store keeps it."""
    build = parse_build(json.dumps(plan.payload(at)).encode())
    values: dict[str, object] = {
        "polled": True,
        "last_poll_ok": True,
        "last_success_time": at,
        "last_poll_time": at,
        "finished": build.finished,
        **fields,
    }
    return BuildRecord(plan.build_id, build, **values)  # type: ignore[arg-type]


PENDING = BuildPlan("pending", "app", "v1", EPOCH, pending=math.inf)
BUILDING = BuildPlan("building", "app", "v1", EPOCH, 60, 60, math.inf)
FAILED = BuildPlan("failed", "app", "v1", EPOCH, 10, 10, 10, outcome="FAILED")
COMPLETED = BuildPlan("completed", "app", "v1", EPOCH, 10, 10, 10)


@pytest.mark.parametrize(
    ("build", "now", "fields", "problem"),
    [
        (PENDING, EPOCH + 59 * 60, {}, Problem.NONE),
        (PENDING, EPOCH + HOUR + 1, {}, Problem.STUCK),
        # Started (UPLOADING) at EPOCH + 60: stuck an hour from then, not from creation.
        (BUILDING, EPOCH + HOUR + 60, {}, Problem.NONE),
        (BUILDING, EPOCH + HOUR + 121, {}, Problem.STUCK),
        (FAILED, EPOCH + 60, {}, Problem.FAILED),
        # A failed build whose polls now fail is still, first of all, failed.
        (
            FAILED,
            EPOCH + 60,
            {"last_poll_ok": False, "last_error": Outcome.TIMEOUT},
            Problem.FAILED,
        ),
        (COMPLETED, EPOCH + 9 * HOUR, {}, Problem.NONE),
        (
            COMPLETED,
            EPOCH + 60,
            {"last_poll_ok": False, "last_error": Outcome.TIMEOUT},
            Problem.POLL_FAILING,
        ),
    ],
)
def test_a_build_is_judged_as_the_alerts_judge_it(
    build: BuildPlan, now: float, fields: dict[str, object], problem: Problem
) -> None:
    assert problem_of(record(build, now, **fields), now) == problem


def test_an_unfinished_build_without_a_good_poll_for_ten_minutes_is_stale() -> None:
    answered = EPOCH + 300
    fresh = record(BUILDING, answered)
    assert problem_of(fresh, answered + 599) is Problem.NONE
    assert problem_of(fresh, answered + 601) is Problem.STALE
    # A finished build's last answer never goes stale: it cannot change.
    done = record(COMPLETED, EPOCH + 60)
    assert problem_of(done, EPOCH + 60 + 7 * 24 * HOUR) is Problem.NONE


def test_the_page_says_which_builds_discovery_brought() -> None:
    store = BuildStore()
    store.track(["configured"], ["found"])
    for plan in (BuildPlan("configured", "app", "v1", EPOCH, 10, 10, 10), BUILDING_FOUND):
        store.record_success(plan.build_id, record(plan, EPOCH + 60).build, EPOCH + 60)  # type: ignore[arg-type]
    context = PageContext(store.snapshot(), None, EPOCH + 60, 2.0)
    page = render_status_page(context, PageQuery())
    assert "2 builds (1 discovered)" in page
    found_row = page[page.index('data-build="found"') :].split("</tr>")[0]
    configured_row = page[page.index('data-build="configured"') :].split("</tr>")[0]
    assert "discovered" in found_row
    assert "discovered" not in configured_row
    assert "listed by build discovery" in (render_build_page(context, "found") or "")
    assert "in the configuration" in (render_build_page(context, "configured") or "")


BUILDING_FOUND = BuildPlan("found", "app", "v2", EPOCH, 10, 10, math.inf)


def test_one_build_is_counted_in_the_singular() -> None:
    store = BuildStore()
    store.track(["found"], [])
    store.record_success("found", record(BUILDING_FOUND, EPOCH + 60).build, EPOCH + 60)  # type: ignore[arg-type]
    page = render_status_page(PageContext(store.snapshot(), None, EPOCH + 60, 2.0), PageQuery())
    assert "<li>1 build</li>" in page
    assert "Showing 1 of 1 build." in page
    assert "1 builds" not in page


def error_cell(page: str, build_id: str) -> str:
    row = page[page.index(f'data-build="{build_id}"') :].split("</tr>")[0]
    return row.split('<td class="error" data-label="Error">', 1)[1].split("</td>")[0]


def test_a_failed_build_shows_its_own_error_else_its_artifacts_errors_by_type() -> None:
    artifacts = (
        ArtifactPlan("CONTAINER_IMAGE", "COPY failed: <no such file>"),
        ArtifactPlan("VM_SANDBOX", "disk quota exceeded"),
    )
    own = BuildPlan("own", "app", "v1", EPOCH, 10, 10, 10, "FAILED", artifacts)
    by_artifact = BuildPlan("by-artifact", "app", "v1", EPOCH, 10, 10, 10, "FAILED", artifacts)
    store = BuildStore()
    store.track(["own", "by-artifact"], [])
    for plan in (own, by_artifact):
        answer = plan.payload(EPOCH + 60)
        if plan is own:
            answer["errorMessage"] = "2 of 2 artifacts failed"
        store.record_success(plan.build_id, parse_build(json.dumps(answer).encode()), EPOCH + 60)
    context = PageContext(store.snapshot(), None, EPOCH + 60)
    page = render_status_page(context, PageQuery())
    assert error_cell(page, "own") == "2 of 2 artifacts failed"
    assert error_cell(page, "by-artifact") == (
        "container: COPY failed: &lt;no such file&gt;; vm_sandbox: disk quota exceeded"
    )
    build_page = render_build_page(context, "by-artifact") or ""
    assert "<th>Error</th><td>container: COPY failed: &lt;no such file&gt;; vm_sandbox: " in (
        build_page
    )
