"""The HTTP endpoints, over real HTTP on loopback."""

from __future__ import annotations

import dataclasses
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from exporter.demo.simulator import Fault, Simulator
from exporter.exposition import ExpositionFormat, accepts_gzip, negotiate_format
from exporter.exposition_cache import ExpositionCache
from exporter.store import BuildStore, Snapshot
from exporter.telemetry import Component
from exporter.web.server import Endpoints, MetricsServer
from exporter.web.status_page import PageQuery
from tests.conftest import StartExporter
from tests.helpers.clock import SETTLE_TIMEOUT, DrivenClock
from tests.helpers.support import EPOCH, ServerThread, forever_building, make_config, wait_until

PROMETHEUS_2_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("", ExpositionFormat.TEXT),
        ("text/plain;version=0.0.4", ExpositionFormat.TEXT),
        ("*/*", ExpositionFormat.TEXT),
        (PROMETHEUS_2_ACCEPT, ExpositionFormat.OPENMETRICS),
        ("application/openmetrics-text", ExpositionFormat.OPENMETRICS),
        ("application/openmetrics-text;version=0.0.1", ExpositionFormat.TEXT),
        ("application/openmetrics-text;q=0", ExpositionFormat.TEXT),
        ("text/plain;q=0.9,application/openmetrics-text;q=0.5", ExpositionFormat.TEXT),
        ("application/openmetrics-text;q=bogus", ExpositionFormat.TEXT),
        (",,;;", ExpositionFormat.TEXT),
    ],
)
def test_format_follows_the_accept_header(accept: str, expected: ExpositionFormat) -> None:
    assert negotiate_format(accept) is expected


@pytest.mark.parametrize(
    ("accept_encoding", "expected"),
    [
        ("gzip", True),
        ("br, gzip;q=0.5", True),
        ("*", True),
        ("gzip;q=0", False),
        ("identity", False),
        ("", False),
    ],
)
def test_gzip_only_when_the_client_accepts_it(accept_encoding: str, expected: bool) -> None:
    assert accepts_gzip(accept_encoding) is expected


def test_metrics_head_request_has_headers_and_no_body(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator.add(forever_building("b1"))
    running = start_exporter(make_config(simulator.base_url, ["b1"]))
    running.wait_until_all_polled()
    response = httpx.head(running.url + "/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(response.headers["Content-Length"]) > 1000
    assert response.content == b""


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("GET", "/metrics/extra", 404),
        ("POST", "/metrics", 405),
        ("PUT", "/-/healthy", 405),
        ("DELETE", "/", 405),
        ("POST", "/nope", 404),
        ("POST", "/-/reload", 403),
        ("GET", "/-/reload", 405),
    ],
)
def test_other_paths_are_404_and_other_methods_405(
    simulator: Simulator, start_exporter: StartExporter, method: str, path: str, status: int
) -> None:
    running = start_exporter(make_config(simulator.base_url, []))
    response = httpx.request(method, running.url + path)
    assert response.status_code == status
    if status == 405:
        assert response.headers["Allow"] == ("POST, PUT" if path == "/-/reload" else "GET, HEAD")
    if status == 403:
        assert "--web.enable-lifecycle" in response.text


def test_query_strings_do_not_change_the_route(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    running = start_exporter(make_config(simulator.base_url, []))
    assert running.get("/metrics?debug=1").status_code == 200


# The exporter's request timeout while an answer is held: longer than any hold.
HELD_TIMEOUT = f"{2 * SETTLE_TIMEOUT:g}s"


@contextmanager
def answer_held(simulator: Simulator, build_id: str) -> Iterator[None]:
    """The build's requests reach the simulator but are answered only when the block ends: it
    stays unpolled for as long as the test needs, however busy the machine."""
    released = threading.Event()
    simulator.set_fault(build_id, Fault.held(released, at_most=SETTLE_TIMEOUT))
    try:
        yield
    finally:
        simulator.set_fault(build_id, None)
        released.set()


def test_ready_at_once_while_builds_wait_for_their_first_poll(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator.add(forever_building("quick"))
    simulator.add(forever_building("sluggish"))
    with answer_held(simulator, "sluggish"):
        running = start_exporter(
            make_config(simulator.base_url, ["quick", "sluggish"], timeout=HELD_TIMEOUT)
        )
        ready = running.get("/-/ready")
        assert (ready.status_code, ready.text) == (200, "Ready\n")
        wait_until(
            lambda: running.value("primeintellect_exporter_builds", state="active") == 1,
            message="the quick build polled",
        )
        assert running.value("primeintellect_exporter_builds", state="unpolled") == 1
    running.wait_until_all_polled()
    assert running.value("primeintellect_exporter_builds", state="unpolled") == 0


def test_status_page_lists_builds_and_escapes_api_strings(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    payload = forever_building("hostile").payload(EPOCH + 100)
    payload["imageName"] = "<script>alert('x')</script>"
    payload["imageTag"] = 'v1" onmouseover="steal()'
    payload["status"] = "FAILED"
    payload["errorMessage"] = "<b>2 of 2</b> artifacts failed"
    simulator.set_payload("hostile", payload)
    running = start_exporter(make_config(simulator.base_url, ["hostile", "absent"]))
    running.wait_until_all_polled()
    page = running.get("/")
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "<script>" not in page.text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page.text
    assert "v1&quot; onmouseover=&quot;steal()" in page.text
    # The build's own error message, escaped too.
    assert "&lt;b&gt;2 of 2&lt;/b&gt; artifacts failed" in page.text
    assert "not_found" in page.text
    for link in ('href="/metrics"', 'href="/-/healthy"', 'href="/-/ready"'):
        assert link in page.text


def test_status_page_shows_unpolled_builds_and_this_replicas_request_budget(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator.add(forever_building("slow"))
    config = make_config(
        simulator.base_url, ["slow"], requests_per_second=3, shard=(0, 2), timeout=HELD_TIMEOUT
    )
    assert config.owned_build_ids == ("slow",)
    with answer_held(simulator, "slow"):
        page = start_exporter(config).get("/")
    assert page.status_code == 200
    assert "1 not yet polled" in page.text
    # The key's 3 requests per second, shared by two shards.
    assert "Request budget of this replica: 1.5 per second<" in page.text


def test_build_page_lists_artifacts_and_an_untracked_build_is_404(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator.add(forever_building("known"))
    running = start_exporter(make_config(simulator.base_url, ["known"]))
    running.wait_until_all_polled()
    page = running.get("/build/known")
    assert page.status_code == 200
    assert 'id="artifacts"' in page.text
    assert "primeintellect_image_build_status{build_id=&quot;known&quot;} == 1" in page.text
    for path in ("/build/unknown", "/build/", "/build/known/extra"):
        assert running.get(path).status_code == 404, path


def test_pages_count_ages_on_the_exporters_wall_clock(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator.add(forever_building("known"))
    # Two hours and three minutes after the build started (createdAt + 10 s queued).
    now = EPOCH + 10 + 2 * 3600 + 3 * 60
    config = make_config(simulator.base_url, ["known"])
    running = start_exporter(config, wall_clock=lambda: now)
    running.wait_until_all_polled()
    build_page = running.get("/build/known").text
    status_page = running.get("/").text
    assert "As of 2026-01-01 02:03:10Z" in build_page
    assert "2h 3m so far" in build_page
    assert "As of 2026-01-01 02:03:10Z" in status_page


def test_pages_carry_a_policy_that_allows_nothing_from_elsewhere_and_no_script(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator.add(forever_building("known"))
    running = start_exporter(make_config(simulator.base_url, ["known"]))
    for path in ("/", "/build/known"):
        headers = running.get(path).headers
        policy = headers["Content-Security-Policy"]
        assert policy.startswith("default-src 'none'; ")
        assert "script-src" not in policy
        assert headers["Cache-Control"] == "no-store"
        assert headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, PageQuery()),
        ({"status": "FAILED", "sort": "image"}, PageQuery(status="FAILED", sort="image")),
        ({"status": "<script>", "sort": "rm -rf"}, PageQuery()),
        ({"refresh": "0"}, PageQuery(refresh=1)),
        ({"refresh": "99999999999999999999"}, PageQuery(refresh=3600)),
        ({"refresh": "-5"}, PageQuery()),
        ({"refresh": "1e3"}, PageQuery()),
        ({"image": "x" * 10_000}, PageQuery(image="x" * 256)),
    ],
)
def test_status_page_query_keeps_only_values_it_knows(
    params: dict[str, str], expected: PageQuery
) -> None:
    assert PageQuery.from_params(params) == expected


def test_status_page_filters_by_image_and_status_from_the_query(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator.add(forever_building("one"))
    other = forever_building("two")
    simulator.add(dataclasses.replace(other, image_name="other"))
    running = start_exporter(make_config(simulator.base_url, ["one", "two"]))
    running.wait_until_all_polled()
    assert running.get("/").text.count("data-build=") == 2
    only_other = running.get("/?image=other").text
    assert 'data-build="two"' in only_other
    assert 'data-build="one"' not in only_other
    assert "data-build=" not in running.get("/?status=FAILED").text
    assert running.get("/?status=BUILDING").text.count("data-build=") == 2


def test_status_page_says_the_key_is_rejected(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    simulator.add(forever_building("known"))
    running = start_exporter(make_config(simulator.base_url, ["known"], api_key="pk-revoked"))
    running.wait_until_all_polled()
    assert "✖ API key rejected</span> (1 build got 401)" in running.get("/").text


def test_status_page_says_until_when_the_api_rate_limits(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    clock = DrivenClock()
    simulator.add(forever_building("limited"))
    simulator.set_fault("limited", Fault.rate_limited("600"))
    running = start_exporter(make_config(simulator.base_url, ["limited"]), clock=clock)
    page = wait_until(
        lambda: (text := running.get("/").text) and "rate-limited until" in text and text,
        message="the 429 pause on the status page",
    )
    until = re.search(r"rate-limited until (\S+ \S+Z)", page)
    assert until is not None
    # Retry-After from the moment of the 429, on the exporter's wall clock, which stood still.
    assert until.group(1) == time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(clock.wall() + 600))


def require_ipv6_loopback(*, dual_stack: bool = False) -> None:
    """Skip unless ::1 can be bound (and, with ``dual_stack``, IPv4 can share the socket)."""
    if not (socket.has_dualstack_ipv6() if dual_stack else socket.has_ipv6):
        pytest.skip("this machine has no dual-stack IPv6" if dual_stack else "no IPv6 here")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not configured here")


def test_listens_on_ipv6_loopback(simulator: Simulator, start_exporter: StartExporter) -> None:
    require_ipv6_loopback()
    running = start_exporter(make_config(simulator.base_url, [], listen_address="[::1]:0"))
    assert running.url.startswith("http://[::1]:")
    assert running.get("/-/healthy").status_code == 200


def test_a_bare_port_listens_on_ipv4_and_ipv6(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    require_ipv6_loopback(dual_stack=True)
    running = start_exporter(make_config(simulator.base_url, [], listen_address=":0"))
    port = running.url.rsplit(":", 1)[1]
    for host in ("127.0.0.1", "[::1]"):
        assert httpx.get(f"http://{host}:{port}/-/healthy").status_code == 200


def test_api_up_is_absent_until_the_api_has_answered(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    idle = start_exporter(make_config(simulator.base_url, []))
    assert idle.value("primeintellect_exporter_api_up") is None
    simulator.add(forever_building("b1"))
    busy = start_exporter(make_config(simulator.base_url, ["b1"]))
    busy.wait_until_all_polled()
    assert busy.value("primeintellect_exporter_api_up") == 1.0


def test_a_renderer_failure_answers_500_and_is_counted_not_fatal() -> None:
    def broken_snapshot() -> Snapshot:
        raise RuntimeError("bug in rendering")

    errors: list[tuple[Component, BaseException]] = []
    server = MetricsServer(
        "127.0.0.1:0",
        Endpoints(
            metrics=ExpositionCache(broken_snapshot, list),
            snapshot=BuildStore().snapshot,
            unhealthy_reason=lambda: None,
            unready_reason=lambda: None,
            reload=None,
            internal_error=lambda component, error: errors.append((component, error)),
        ),
    )
    with ServerThread(server) as served:
        first = httpx.get(served.url + "/metrics")
        second = httpx.get(served.url + "/metrics")
        healthy = httpx.get(served.url + "/-/healthy")
    assert (first.status_code, second.status_code, healthy.status_code) == (500, 500, 200)
    assert "see the exporter's log" in first.text
    assert [component for component, _ in errors] == [Component.RENDERER, Component.RENDERER]


def test_a_request_handler_failure_answers_500_and_is_counted_as_the_server() -> None:
    def broken_reason() -> str | None:
        raise RuntimeError("bug in a handler")

    errors: list[tuple[Component, BaseException]] = []
    server = MetricsServer(
        "127.0.0.1:0",
        Endpoints(
            metrics=ExpositionCache(BuildStore().snapshot, list),
            snapshot=BuildStore().snapshot,
            unhealthy_reason=broken_reason,
            unready_reason=lambda: None,
            reload=None,
            internal_error=lambda component, error: errors.append((component, error)),
        ),
    )
    with ServerThread(server) as served:
        broken = httpx.get(served.url + "/-/healthy")
        scraped = httpx.get(served.url + "/metrics")
    assert (broken.status_code, scraped.status_code) == (500, 200)
    assert [component for component, _ in errors] == [Component.SERVER]


def test_internal_errors_are_counted_per_component_and_logged_once_per_class(
    simulator: Simulator, start_exporter: StartExporter, caplog: pytest.LogCaptureFixture
) -> None:
    running = start_exporter(make_config(simulator.base_url, []))
    for _ in range(3):
        running.exporter.internal_error(Component.RENDERER, RuntimeError("boom"))
    running.exporter.internal_error(Component.RENDERER, KeyError("other class"))
    assert running.value("primeintellect_exporter_internal_errors_total", component="renderer") == 4
    others = {
        component: running.value(
            "primeintellect_exporter_internal_errors_total", component=component
        )
        for component in Component
        if component is not Component.RENDERER
    }
    assert others == dict.fromkeys(others, 0), "every component is declared from the start"
    first_time = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(first_time) == 2
