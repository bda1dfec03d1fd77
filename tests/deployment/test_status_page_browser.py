"""The status page in a real browser: Debian's chromium, headless, driven by Playwright,
against the exporter and the simulator on loopback."""

from __future__ import annotations

import itertools
import math
import os
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect

from exporter.demo.simulator import ArtifactPlan, BuildPlan, Simulator
from tests.helpers.browser import chromium, watched_page
from tests.helpers.prometheus import FAILED_ERROR, finish, plans
from tests.helpers.support import (
    CANARY_API_KEY,
    REPOSITORY,
    Daemon,
    RunningExporter,
    environment,
    make_config,
    wait_until,
)

pytestmark = pytest.mark.xdist_group("browser")

HOSTILE_NAME = "<img src=x onerror=alert(1)>"
HOSTILE_TAG = '"><script>alert(2)</script>'
HOSTILE_ERROR = "<script>alert(3)</script> \u202egnp.exe"
MISSING_BUILD = "e2e-missing"
TEAM = "browser-team"
SCREENSHOT = REPOSITORY / "docs" / "status-page.png"
README = REPOSITORY / "README.md"
# Playwright's waits, in milliseconds: far above what a healthy run takes.
WAIT_MS = 15_000
# A phone, and the two most common laptop widths.
WIDTHS = (375, 1280, 1440)
CROWD = 40


@dataclass(frozen=True)
class Served:
    simulator: Simulator
    exporter: RunningExporter
    plans: dict[str, BuildPlan]

    @property
    def url(self) -> str:
        return self.exporter.url.rstrip("/")


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    now = time.time()
    build_plans = [*plans(now), BuildPlan("e2e-hostile", HOSTILE_NAME, HOSTILE_TAG, now - 30, 5)]
    with Simulator(CANARY_API_KEY, build_plans, team_id=TEAM) as simulator:
        payload = build_plans[-1].payload(now)
        payload["errorMessage"] = HOSTILE_ERROR
        simulator.set_payload("e2e-hostile", payload)
        build_ids = [plan.build_id for plan in build_plans] + [MISSING_BUILD]
        discovery = {"enabled": True, "interval": "30s", "team_id": TEAM}
        config = make_config(simulator.base_url, build_ids, discovery=discovery)
        exporter = RunningExporter(config).start()
        try:
            exporter.wait_until_all_polled()
            wait_until(
                lambda: exporter.exporter.inventory.snapshot().listed_at,
                message="the team's image listing",
            )
            yield Served(simulator, exporter, {plan.build_id: plan for plan in build_plans})
        finally:
            exporter.stop()


def crowd_plans(now: float) -> list[BuildPlan]:
    """Many builds with the longest names, tags and IDs the API and the config allow, and
    long failure reasons without a space to break them at."""
    plans = []
    for index in range(CROWD):
        reason = f"step{index}/" + "pip-install-" * 30 + "exit-code-1"
        plans.append(
            BuildPlan(
                f"crowd-{index:02d}-" + "x" * 119,
                f"registry-mirror-{index:02d}-" + "very-long-image-name-" * 4,
                "release-candidate-" * 6 + str(index),
                now - 60 - index,
                5,
                5,
                10 if index % 2 else math.inf,
                "FAILED" if index % 2 else "COMPLETED",
                (ArtifactPlan("CONTAINER_IMAGE", reason), ArtifactPlan("VM_SANDBOX", reason)),
            )
        )
    return plans


@pytest.fixture(scope="module")
def crowded() -> Iterator[str]:
    """An exporter watching a crowd of long-named builds, half of them FAILED; its URL."""
    plans = crowd_plans(time.time())
    with Simulator(CANARY_API_KEY, plans) as simulator:
        config = make_config(simulator.base_url, [plan.build_id for plan in plans])
        exporter = RunningExporter(config).start()
        try:
            exporter.wait_until_all_polled()
            yield exporter.url.rstrip("/")
        finally:
            exporter.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as running:
        yield running


def test_the_failed_build_is_listed_first_and_marked_in_text_not_colour_alone(
    served: Served, browser: Browser
) -> None:
    with watched_page(browser) as watched:
        watched.page.goto(served.url + "/")
        first = watched.page.locator("#builds tbody tr").first
        expect(first).to_have_attribute("data-build", "e2e-failing")
        expect(first).to_contain_text("✖ FAILED")
        expect(first).to_have_class("bad")
        # Then the stuck build and the one whose polls fail, before the quiet ones.
        order = watched.page.locator("#builds tbody tr").evaluate_all(
            "rows => rows.map(row => row.dataset.build)"
        )
        assert order.index("e2e-stuck") < order.index("e2e-completed")
        assert order.index(MISSING_BUILD) < order.index("e2e-completed")


def test_the_failed_builds_error_message_is_visible(served: Served, browser: Browser) -> None:
    with watched_page(browser) as watched:
        watched.page.goto(served.url + "/")
        row = watched.page.locator('#builds tr[data-build="e2e-failing"]')
        expect(row.locator("td.error")).to_be_visible()
        expect(row.locator("td.error")).to_contain_text(FAILED_ERROR)
        # A failed poll says what failed, not only its reason.
        missing = watched.page.locator(f'#builds tr[data-build="{MISSING_BUILD}"]')
        expect(missing).to_contain_text("not_found since ")
        expect(missing).to_contain_text("the API answered 404: no such build")


def test_the_summary_counts_builds_by_status_and_says_the_api_is_up(
    served: Served, browser: Browser
) -> None:
    with watched_page(browser) as watched:
        watched.page.goto(served.url + "/")
        summary = watched.page.locator(".summary")
        expect(summary).to_contain_text("1 FAILED")
        expect(summary).to_contain_text("Polls failing: 1")
        expect(summary).to_contain_text("Stuck: 1")
        expect(summary).to_contain_text("✔ API up")


def test_the_image_filter_hides_other_images(served: Served, browser: Browser) -> None:
    trainer = sorted(
        build_id for build_id, plan in served.plans.items() if plan.image_name == "trainer"
    )
    assert 1 < len(trainer) < len(served.plans)
    with watched_page(browser) as watched:
        page = watched.page
        page.goto(served.url + "/")
        page.select_option('select[name="image"]', "trainer")
        page.get_by_role("button", name="Show").click()
        page.wait_for_url("**/?image=trainer*")
        rows = page.locator("#builds tbody tr")
        expect(rows).to_have_count(len(trainer))
        shown = rows.evaluate_all("rows => rows.map(row => row.dataset.build)")
        assert sorted(shown) == trainer
        # The filter survives the page's own refresh: it lives in the URL.
        expect(page.locator('select[name="image"]')).to_have_value("trainer")


def test_the_teams_images_are_listed_failed_first_with_their_error(
    served: Served, browser: Browser
) -> None:
    with watched_page(browser) as watched:
        watched.page.goto(served.url + "/")
        images = watched.page.locator("#images tbody tr")
        first = images.first
        expect(first).to_contain_text("✖ FAILED")
        expect(first).to_contain_text("eval")
        expect(first.locator("td.error")).to_contain_text(FAILED_ERROR)
        expect(first).to_have_class("bad")
        expect(watched.page.locator("#images").get_by_text(HOSTILE_NAME, exact=True)).to_have_count(
            1
        )
        # The image filter applies to them too.
        watched.page.goto(served.url + "/?image=trainer")
        shown = watched.page.locator("#images tbody tr td:first-child").all_inner_texts()
        assert shown
        assert set(shown) == {"trainer"}


def test_the_build_page_lists_every_artifact(served: Served, browser: Browser) -> None:
    with watched_page(browser) as watched:
        page = watched.page
        page.goto(served.url + "/")
        page.get_by_role("link", name="e2e-failing", exact=True).click()
        page.wait_for_url("**/build/e2e-failing")
        artifacts = page.locator("#artifacts tbody tr")
        expect(artifacts).to_have_count(2)
        expect(artifacts.nth(0)).to_contain_text("CONTAINER_IMAGE")
        expect(artifacts.nth(0)).to_contain_text(FAILED_ERROR)
        expect(artifacts.nth(1)).to_contain_text("VM_SANDBOX")
        expect(page.locator("#build")).to_contain_text(
            'primeintellect_image_build_status{build_id="e2e-failing"} == 1'
        )


def test_a_hostile_build_renders_as_text_and_runs_no_script(
    served: Served, browser: Browser
) -> None:
    with watched_page(browser) as watched:
        page = watched.page
        for path, table in (("/", "#builds"), ("/build/e2e-hostile", "#build")):
            page.goto(served.url + path)
            expect(page.locator(table).get_by_text(HOSTILE_NAME, exact=True)).to_have_count(1)
            expect(page.locator(table).get_by_text(HOSTILE_TAG, exact=True)).to_have_count(1)
            assert page.locator("img, script").count() == 0
        assert watched.dialogs == []


def test_the_pages_log_no_errors_and_load_nothing_from_elsewhere(
    served: Served, browser: Browser
) -> None:
    with watched_page(browser) as watched:
        for path in (
            "/",
            "/?status=problems&sort=image",
            "/build/e2e-failing",
            "/build/e2e-hostile",
        ):
            response = watched.page.goto(served.url + path)
            assert response is not None
            assert response.status == 200
            assert "default-src 'none'" in response.headers["content-security-policy"]
        # A style the Content-Security-Policy refused, or any script error, would be here.
        assert watched.console_errors == []
        assert [url for url in watched.requests if not url.startswith(served.url)] == []


@pytest.mark.parametrize("width", WIDTHS)
def test_a_crowd_of_long_names_and_failure_reasons_fits_the_width_without_scrolling_sideways(
    crowded: str, browser: Browser, width: int
) -> None:
    with watched_page(browser, width=width, height=900) as watched:
        page = watched.page
        page.goto(crowded + "/")
        expect(page.locator("#builds tbody tr")).to_have_count(CROWD)
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        # Nor does a table scroll inside its box: every column is on screen.
        boxes = page.locator(".scroll").evaluate_all(
            "boxes => boxes.map(box => [box.scrollWidth, box.clientWidth])"
        )
        assert boxes
        assert all(scroll <= client for scroll, client in boxes), boxes
        failed = page.locator("#builds tbody tr.bad").first
        expect(failed.locator("td.error")).to_contain_text("container: step")
        expect(failed.locator("td.error")).to_be_in_viewport()
        # And so does a build's own page, with every artifact's error.
        page.goto(crowded + "/build/crowd-01-" + "x" * 119)
        expect(page.locator("#artifacts tbody tr")).to_have_count(2)
        assert page.evaluate("document.documentElement.scrollWidth") <= width


@pytest.mark.parametrize("width", WIDTHS[1:])
def test_short_ids_names_and_statuses_stay_on_one_line_at_laptop_widths(
    served: Served, browser: Browser, width: int
) -> None:
    with watched_page(browser, width=width, height=900) as watched:
        watched.page.goto(served.url + "/")
        # The lines each short cell's text takes: cells that break anywhere must still leave
        # a word (no space, no hyphen) of up to 16 characters whole.
        cells = ", ".join(
            f'#{table} td[data-label="{label}"]'
            for table, labels in (
                ("builds", ("Build", "Image", "Tag", "Status")),
                ("images", ("Image", "Tag", "Type", "Status")),
            )
            for label in labels
        )
        lines = watched.page.locator(cells).evaluate_all(
            """cells => cells.map(cell => {
                const range = document.createRange();
                range.selectNodeContents(cell.querySelector("a") || cell);
                const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
                return [(cell.querySelector("a") || cell).innerText.trim(), tops.size];
            })"""
        )
        short = [(text, count) for text, count in lines if re.fullmatch(r"[^\s-]{1,16}", text)]
        assert len(short) > 10, lines
        assert [(text, count) for text, count in short if count > 1] == []


def test_the_summary_items_are_separate_and_visibly_apart(served: Served, browser: Browser) -> None:
    with watched_page(browser) as watched:
        watched.page.goto(served.url + "/")
        items = watched.page.locator(".summary li")
        texts = items.all_inner_texts()
        assert any(text.startswith("1 FAILED") for text in texts), texts
        assert any(text.startswith("Polls failing: 1") for text in texts), texts
        # Each item after the first is set off by a separator, with room on either side.
        boxes = items.evaluate_all(
            """items => items.map(item => {
                const box = item.getBoundingClientRect();
                return [box.left, box.right, box.top,
                        getComputedStyle(item, "::before").content];
            })"""
        )
        for (_, right, top, _), (left, _, next_top, separator) in itertools.pairwise(boxes):
            assert separator not in {"none", "normal", '""'}
            if top == next_top:
                assert left - right >= 4, boxes


def test_the_page_fits_a_phone_width_screen(served: Served, browser: Browser) -> None:
    with watched_page(browser, width=375, height=800) as watched:
        watched.page.goto(served.url + "/")
        overflow = watched.page.evaluate("document.documentElement.scrollWidth")
        assert overflow <= 375
        expect(watched.page.locator(".summary")).to_be_visible()
        # Rows become cards: the failed build's status and error are on screen, unscrolled.
        first = watched.page.locator("#builds tbody tr").first
        expect(first.locator('td[data-label="Status"]')).to_be_in_viewport()
        expect(first.locator("td.error")).to_be_in_viewport()


def test_the_page_refreshes_itself_and_picks_up_a_status_change(
    served: Served, browser: Browser
) -> None:
    with watched_page(browser) as watched:
        watched.page.goto(served.url + "/?refresh=1")
        row = watched.page.locator('#builds tr[data-build="e2e-finishing-1"]')
        expect(row).to_contain_text("BUILDING")
        finish(served.simulator, served.plans["e2e-finishing-1"])
        # No reload by the test: the page's own meta refresh brings the change.
        expect(row).to_contain_text("COMPLETED", timeout=WAIT_MS)


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def test_readme_shows_a_screenshot_of_the_demo_page(browser: Browser, tmp_path: Path) -> None:
    """With UPDATE_SCREENSHOT=1, first saves docs/status-page.png from the demo."""
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        demo = Daemon("--demo", "--web.listen-address=127.0.0.1:0", env=environment())
        try:
            url = demo.wait_for_url().rstrip("/")
            with watched_page(browser, width=1440, height=900) as watched:
                watched.page.goto(url + "/-/ready")
                expect(watched.page.locator("body")).to_have_text("Ready", timeout=WAIT_MS)
                # The demo's inference-server build fails about a minute in; the page, at a
                # one-second refresh, is taken once it shows that and every build polled.
                watched.page.goto(url + "/?refresh=1")
                summary = watched.page.locator(".summary")
                expect(summary).to_contain_text("1 FAILED", timeout=120_000)
                expect(summary).not_to_contain_text("not yet polled")
                watched.page.goto(url + "/")
                watched.page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            demo.kill()
    assert "(docs/status-page.png)" in README.read_text()
    width, height = png_size(SCREENSHOT)
    assert width == 1440
    assert height >= 400
