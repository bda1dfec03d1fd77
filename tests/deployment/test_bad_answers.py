"""Bad API answers, each over real HTTP on loopback against the simulator.

Every row serves one "victim" build a bad answer while two healthy builds are tracked beside
it, and checks what the victim's series say, what is logged, that the daemon lives, that the
healthy builds stay fresh, and that the whole exposition stays valid (promtool and both of
prometheus_client's parsers). Each row, and each test of answers about the whole API (a
pause, a rejected key, a failing or missing API), starts an exporter and a simulator of its
own on a driven clock (tests/helpers/clock.py): the schedule, the request budget, back-offs, pauses
and the api_up window move only when the test advances the clock, so what a test sees never
depends on how fast or busy the machine is. The last tests check the simulator's own delivery
faults.
"""

from __future__ import annotations

import email.utils
import gzip
import http.client
import json
import logging
import math
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from exporter.budget import MAX_RATE_LIMIT_PAUSE, MIN_RATE_LIMIT_PAUSE
from exporter.demo.simulator import BUILD_PATH_PREFIX, BuildPlan, Fault, Simulator
from exporter.models import BUILD_STATUSES, MAX_LABEL_LENGTH
from exporter.poller import TICK
from tests.conftest import StartExporter
from tests.helpers.clock import SETTLE_TIMEOUT, DrivenClock
from tests.helpers.support import (
    CANARY_API_KEY,
    EPOCH,
    RunningExporter,
    assert_label_value_is_clean,
    find_binary,
    make_config,
    parse_samples,
    wait_until,
)

HEALTHY = ("healthy-1", "healthy-2")
OPENMETRICS = "application/openmetrics-text;version=1.0.0"
SUCCESS_TIMESTAMP = "primeintellect_image_build_last_poll_success_timestamp_seconds"
RATE_LIMITED_UNTIL = "primeintellect_exporter_rate_limited_until_timestamp_seconds"
API_UP = "primeintellect_exporter_api_up"
REQUESTS_TOTAL = "primeintellect_exporter_api_requests_total"
# Small enough that one padded answer exceeds it, large enough for the 10 KB hostile strings.
MAX_RESPONSE_SIZE = 64 * 1024
# Real seconds an answer may take (httpx's deadline): about a hundred times what a loopback
# answer takes on a quiet machine, and far less than the drip row's answer takes.
DEADLINE = 0.5
# The polling interval of every exporter here, in driven seconds.
INTERVAL = 1.0
# A request budget whose slot (0.125 s) is exact in binary, as are the driven times it makes:
# a wait that ends a rounding error after a deadline would never be woken by the driven clock.
SLOTS_PER_SECOND = 8
SLOT = 1 / SLOTS_PER_SECOND
# What a step through a pause known only to the microsecond (an HTTP date's) adds, so that
# the pause is always over.
OVERSHOOT = 2e-6
# The README: api_up reads 0 once a minute of nothing but unusable answers has passed.
API_DOWN_AFTER = 60.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Serve = Callable[[Simulator, str, Simulator], None]
"""Make the simulator ``api`` answer ``victim`` badly; ``elsewhere`` is another host."""
Series = tuple[str, dict[str, str], float | None]
"""A sample's name, labels and value; a value of None: the series must be absent."""


def building(build_id: str) -> BuildPlan:
    """A build held in BUILDING with one container artifact: its answer never changes."""
    return BuildPlan(build_id, "app", "v1", EPOCH, 10, 10, math.inf)


def good_payload(build_id: str) -> dict[str, Any]:
    return building(build_id).payload(EPOCH + 100)


# -- how each bad answer is served --------------------------------------------------------------


def fault(make: Callable[[], Fault]) -> Serve:
    def serve(api: Simulator, victim: str, elsewhere: Simulator) -> None:
        api.set_fault(victim, make())

    return serve


def payload(edit: Callable[[dict[str, Any]], object]) -> Serve:
    """Serve the victim's good answer after ``edit`` changed it in place."""

    def serve(api: Simulator, victim: str, elsewhere: Simulator) -> None:
        document = good_payload(victim)
        edit(document)
        api.set_payload(victim, document)

    return serve


def gzip_bomb() -> Fault:
    """A few kilobytes on the wire that inflate to ten megabytes, though nobody asked for gzip."""
    inflated = b'{"id": "x", "padding": "' + b"0" * 10_000_000 + b'"}'
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    return Fault(status=200, body=gzip.compress(inflated), headers=headers)


def redirect_elsewhere(api: Simulator, victim: str, elsewhere: Simulator) -> None:
    location = elsewhere.base_url + BUILD_PATH_PREFIX + victim
    api.set_fault(victim, Fault(status=302, body=b"", headers={"Location": location}))


def hostile_strings(text: str) -> Serve:
    """``text`` as image name, image tag, full image path and error message."""

    def edit(document: dict[str, Any]) -> None:
        document["imageName"] = document["imageTag"] = text
        artifact = document["artifacts"][0]
        artifact["fullImagePath"] = artifact["errorMessage"] = text

    return payload(edit)


# -- what the victim's series must show ---------------------------------------------------------


def failed_with(reason: str) -> Callable[[str], list[Series]]:
    def series(victim: str) -> list[Series]:
        return [
            (
                "primeintellect_image_build_last_poll_error",
                {"build_id": victim, "reason": reason},
                1,
            ),
            ("primeintellect_image_build_last_poll_success", {"build_id": victim}, 0),
        ]

    return series


def build_labels(victim: str, name: str = "app", tag: str = "v1") -> dict[str, str]:
    return {"build_id": victim, "image_name": name, "image_tag": tag}


def undocumented_build_status(victim: str) -> list[Series]:
    labels = build_labels(victim)
    return [
        ("primeintellect_image_build_last_poll_success", {"build_id": victim}, 1),
        ("primeintellect_image_build_status", {**labels, "status": "UNKNOWN"}, 1),
        *[
            ("primeintellect_image_build_status", {**labels, "status": status}, 0)
            for status in BUILD_STATUSES
        ],
    ]


def undocumented_artifact_type(victim: str) -> list[Series]:
    labels = build_labels(victim)
    artifact = {**labels, "artifact_id": f"{victim}-container-image-0", "artifact_type": "UNKNOWN"}
    return [
        ("primeintellect_image_build_last_poll_success", {"build_id": victim}, 1),
        (
            "primeintellect_image_build_artifacts",
            {**labels, "artifact_type": "UNKNOWN", "status": "BUILDING"},
            1,
        ),
        ("primeintellect_image_build_artifact_info", {**artifact, "full_image_path": ""}, 1),
        ("primeintellect_image_build_status", {**labels, "status": "BUILDING"}, 1),
    ]


def retagged(tag: str) -> Callable[[str], list[Series]]:
    def series(victim: str) -> list[Series]:
        return [
            ("primeintellect_image_build_last_poll_success", {"build_id": victim}, 1),
            ("primeintellect_image_build_info", build_labels(victim, tag=tag), 1),
        ]

    return series


def cleaned_to(value: str, error_message: str | None = None) -> Callable[[str], list[Series]]:
    """The hostile string, cleaned to ``value``, in all four places it was sent (the error
    message to ``error_message`` where that differs)."""

    def series(victim: str) -> list[Series]:
        labels = build_labels(victim, value, value)
        artifact = {
            **labels,
            "artifact_id": f"{victim}-container-image-0",
            "artifact_type": "CONTAINER_IMAGE",
        }
        return [
            ("primeintellect_image_build_last_poll_success", {"build_id": victim}, 1),
            ("primeintellect_image_build_info", labels, 1),
            ("primeintellect_image_build_artifact_info", {**artifact, "full_image_path": value}, 1),
            (
                "primeintellect_image_build_artifact_error_info",
                {**artifact, "error_message": value if error_message is None else error_message},
                1,
            ),
        ]

    return series


LogLine = tuple[str, dict[str, str]]
"""A log message, and some of its extras as text."""


@dataclass(frozen=True)
class BadAnswer:
    """One row: how the bad answer is served, and what the exporter must make of it."""

    id: str
    serve: Serve
    series: Callable[[str], list[Series]]
    # The poll's outcome; None when the answer is tolerated (a successful poll).
    reason: str | None = None
    # The one line logged about the victim (None: no line at WARNING or above), and a part of
    # its ``detail``.
    log: LogLine | None = None
    detail: str = ""
    marks: Sequence[pytest.MarkDecorator] = field(default=())

    @property
    def victim(self) -> str:
        return f"victim-{self.id}"


def failing(id: str, serve: Serve, reason: str, detail: str) -> BadAnswer:
    return BadAnswer(
        id, serve, failed_with(reason), reason, ("poll failed", {"reason": reason}), detail
    )


def tolerated(
    id: str, serve: Serve, series: Callable[[str], list[Series]], log: LogLine | None = None
) -> BadAnswer:
    return BadAnswer(id, serve, series, log=log)


def missing_fields(api: Simulator, victim: str, elsewhere: Simulator) -> None:
    api.set_payload(victim, {"id": victim, "status": "BUILDING", "artifacts": []})


def latin_1_error_message(api: Simulator, victim: str, elsewhere: Simulator) -> None:
    document = good_payload(victim)
    document["artifacts"][0]["errorMessage"] = "failed in cafe"
    # "café" as a Latin-1 build log writes it, in a body that is otherwise UTF-8.
    body = json.dumps(document).encode().replace(b"cafe", b"caf\xe9")
    api.set_fault(victim, Fault(status=200, body=body))


def latin_1_cleaned(victim: str) -> list[Series]:
    labels = build_labels(victim)
    artifact = {
        **labels,
        "artifact_id": f"{victim}-container-image-0",
        "artifact_type": "CONTAINER_IMAGE",
    }
    return [
        ("primeintellect_image_build_last_poll_success", {"build_id": victim}, 1),
        (
            "primeintellect_image_build_artifact_error_info",
            {**artifact, "error_message": "failed in caf\ufffd"},
            1,
        ),
    ]


UNPROCESSABLE = b'{"errors": [{"param": "build_id", "details": "must be a cuid, not \\"x\\""}]}'
HTML_BAD_GATEWAY = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
TEN_KB = "x" * 10 * 1024

ROWS = [
    failing(
        "html-body-on-200",
        fault(lambda: Fault.garbage(b"<!doctype html><html><body>Maintenance</body></html>")),
        "invalid_response",
        "not JSON",
    ),
    failing(
        "json-missing-required-fields",
        missing_fields,
        "invalid_response",
        "Field required",
    ),
    failing(
        "json-array-instead-of-object",
        fault(lambda: Fault(status=200, body=b"[1, 2, 3]")),
        "invalid_response",
        "not a JSON object",
    ),
    failing(
        "wrong-type-image-name-number",
        payload(lambda document: document.update(imageName=42)),
        "invalid_response",
        "imageName",
    ),
    failing(
        "wrong-type-artifacts-string",
        payload(lambda document: document.update(artifacts="x")),
        "invalid_response",
        "artifacts",
    ),
    failing(
        "wrong-type-created-at-number",
        payload(lambda document: document.update(createdAt=1767225600)),
        "invalid_response",
        "createdAt",
    ),
    tolerated(
        "unknown-build-status",
        payload(lambda document: document.update(status="QUARANTINED")),
        undocumented_build_status,
        ("build status changed", {"status": "QUARANTINED", "previous_status": "BUILDING"}),
    ),
    failing(
        "json-artifact-missing-fields",
        payload(lambda document: document.update(artifacts=[{"artifactType": "VM_SANDBOX"}])),
        "invalid_response",
        "artifacts.0",
    ),
    tolerated(
        "null-image-name-tag-and-status",
        payload(lambda document: document.update(imageName=None, imageTag=None, status=None)),
        lambda victim: [
            ("primeintellect_image_build_info", build_labels(victim, "", ""), 1),
            (
                "primeintellect_image_build_status",
                {**build_labels(victim, "", ""), "status": "UNKNOWN"},
                1,
            ),
        ],
    ),
    tolerated(
        "null-artifacts",
        payload(lambda document: document.update(artifacts=None)),
        lambda victim: [
            ("primeintellect_image_build_info", build_labels(victim), 1),
            (
                "primeintellect_image_build_artifacts",
                {**build_labels(victim), "artifact_type": "CONTAINER_IMAGE", "status": "BUILDING"},
                None,
            ),
        ],
    ),
    tolerated("latin-1-byte-in-an-error-message", latin_1_error_message, latin_1_cleaned),
    tolerated(
        "top-level-error-message-in-snake-case",
        payload(lambda document: document.update(error_message="quota exceeded for team")),
        lambda victim: [
            (
                "primeintellect_image_build_error_info",
                {**build_labels(victim), "error_message": "quota exceeded for team"},
                1,
            ),
        ],
    ),
    tolerated(
        "leap-second",
        payload(lambda document: document.update(createdAt="2016-12-31T23:59:60Z")),
        lambda victim: [
            (
                "primeintellect_image_build_created_timestamp_seconds",
                build_labels(victim),
                1483228800.0,
            ),
        ],
    ),
    tolerated(
        "clock-skew-started-before-created",
        payload(lambda document: document.update(createdAt="2027-01-01T00:00:00Z")),
        lambda victim: [
            ("primeintellect_image_build_info", build_labels(victim), 1),
            ("primeintellect_image_build_queued_seconds", build_labels(victim), None),
        ],
    ),
    tolerated(
        "unknown-artifact-type",
        payload(lambda document: document["artifacts"][0].update(artifactType="WASM_MODULE")),
        undocumented_artifact_type,
    ),
    tolerated(
        "extra-fields",
        payload(
            lambda document: (
                document.update(imageTag="with-extras", region="eu-west", quota={"cpu": [1, 2]}),
                document["artifacts"][0].update(sizeBytes=123, layers=[{"digest": "sha256:0"}]),
            )
        ),
        retagged("with-extras"),
    ),
    failing(
        "id-mismatch",
        payload(lambda document: document.update(id="someone-else")),
        "invalid_response",
        "different build id",
    ),
    failing(
        "body-over-the-cap",
        payload(lambda document: document.update(padding="p" * MAX_RESPONSE_SIZE)),
        "invalid_response",
        f"larger than {MAX_RESPONSE_SIZE} bytes",
    ),
    failing(
        "gzip-bomb",
        fault(gzip_bomb),
        "invalid_response",
        f"larger than {MAX_RESPONSE_SIZE} bytes",
    ),
    failing(
        "body-stops-mid-way",
        fault(lambda: Fault.truncated(sent=16)),
        "connection_error",
        "closed connection",
    ),
    failing(
        "drip-slower-than-the-deadline",
        fault(lambda: Fault.drip(interval=0.05, size=2)),
        "timeout",
        f"within {DEADLINE:g}s",
    ),
    failing(
        "http-204-no-content",
        fault(lambda: Fault(status=204, body=b"", headers={})),
        "invalid_response",
        "unexpected HTTP 204",
    ),
    # The path shows where the answer came from: a wrong base path answers 404 for all.
    failing(
        "http-404", fault(Fault.not_found), "not_found", f"HTTP 404 for {BUILD_PATH_PREFIX}victim"
    ),
    failing(
        "http-422-with-errors-body",
        fault(lambda: Fault(status=422, body=UNPROCESSABLE)),
        "client_error",
        "HTTP 422",
    ),
    failing(
        "http-422-without-body",
        fault(lambda: Fault(status=422, body=b"", headers={})),
        "client_error",
        "HTTP 422",
    ),
    failing("http-500", fault(lambda: Fault.server_error(500)), "server_error", "HTTP 500"),
    failing(
        "http-502-html-body",
        fault(
            lambda: Fault(status=502, body=HTML_BAD_GATEWAY, headers={"Content-Type": "text/html"})
        ),
        "server_error",
        "HTTP 502",
    ),
    failing("http-503", fault(lambda: Fault.server_error(503)), "server_error", "HTTP 503"),
    failing("http-504", fault(lambda: Fault.server_error(504)), "server_error", "HTTP 504"),
    failing(
        "redirect-to-another-host",
        redirect_elsewhere,
        "invalid_response",
        "redirect to http://127.0.0.1:",
    ),
    tolerated(
        "hostile-quotes",
        hostile_strings("say \"hi\" and 'bye'"),
        cleaned_to("say \"hi\" and 'bye'"),
    ),
    tolerated(
        "hostile-backslashes",
        hostile_strings('C:\\new\\table\\"\\'),
        cleaned_to('C:\\new\\table\\"\\'),
    ),
    tolerated(
        "hostile-newlines",
        hostile_strings("line one\nline two\rline three\u2028end"),
        cleaned_to("line one line two line three end"),
    ),
    tolerated("hostile-nul", hostile_strings("nul\x00byte"), cleaned_to("nul byte")),
    tolerated(
        "hostile-10-kb",
        hostile_strings(TEN_KB),
        # An error message keeps its start and its end, where a build log's cause usually is.
        cleaned_to("x" * (MAX_LABEL_LENGTH - 1) + "…", "x" * 126 + " … " + "x" * 127),
    ),
    tolerated(
        "error-message-with-colour-codes-and-its-cause-at-the-end",
        payload(
            lambda document: document["artifacts"][0].update(
                errorMessage="\x1b[31mERROR\x1b[0m " + "x" * 1000 + " no space left on device"
            )
        ),
        lambda victim: [
            (
                "primeintellect_image_build_artifact_error_info",
                {
                    **build_labels(victim),
                    "artifact_id": f"{victim}-container-image-0",
                    "artifact_type": "CONTAINER_IMAGE",
                    "error_message": "ERROR "
                    + "x" * 120
                    + " … "
                    + "x" * 103
                    + " no space left on device",
                },
                1,
            )
        ],
    ),
    tolerated(
        "hostile-lone-surrogates",
        hostile_strings("lone \ud800 high, lone \udfff low"),
        cleaned_to("lone \ufffd high, lone \ufffd low"),
    ),
]


# -- shared checks ------------------------------------------------------------------------------


def assert_valid_exposition(running: RunningExporter) -> Samples:
    """The full /metrics output in both formats: promtool, both parsers, clean label values."""
    response = running.get("/metrics")
    assert response.status_code == 200
    text = response.content.decode("utf-8")  # strict: the body must be valid UTF-8
    result = subprocess.run(
        [find_binary("promtool"), "check", "metrics"],
        input=response.content,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == ""
    samples = parse_samples(text)
    for name, labels in samples:
        for label, value in labels:
            assert_label_value_is_clean(name, label, value)
    openmetrics = running.get("/metrics", headers={"Accept": OPENMETRICS})
    assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")
    families = list(openmetrics_families(openmetrics.content.decode("utf-8")))  # type: ignore[no-untyped-call]
    assert any(family.name == "primeintellect_exporter_api_requests" for family in families)
    return samples


def assert_series(samples: Samples, expected: list[Series]) -> None:
    for name, labels, value in expected:
        assert samples.get((name, frozenset(labels.items()))) == value, (name, labels)


def shows(running: RunningExporter, expected: list[Series]) -> bool:
    samples = running.samples()
    return all(
        samples.get((name, frozenset(labels.items()))) == value for name, labels, value in expected
    )


def polled_fine_since(running: RunningExporter, build_ids: Sequence[str], since: float) -> bool:
    """Each build's last poll succeeded, after wall-clock time ``since`` (read in the store)."""
    records = running.exporter.store.snapshot().records
    return all(
        records[build_id].last_poll_ok and (records[build_id].last_success_time or 0) > since
        for build_id in build_ids
    )


def assert_fresh(samples: Samples, build_ids: Sequence[str], since: float) -> None:
    """Each build has a successful poll newer than wall-clock time ``since``."""
    for build_id in build_ids:
        labels = frozenset({("build_id", build_id)})
        assert samples.get((SUCCESS_TIMESTAMP, labels), 0) > since, build_id
        assert samples[("primeintellect_image_build_last_poll_success", labels)] == 1, build_id


def scrape(client: httpx.Client, running: RunningExporter, *names: str) -> Samples:
    """The samples of the series ``names`` from one scrape: cheaper to parse than all of it,
    for tests that read a few series at every step of the driven clock."""
    text = client.get(running.url + "/metrics").text
    heads = tuple(head for name in names for head in (f"{name} ", f"{name}{{"))
    return parse_samples(
        "".join(f"{line}\n" for line in text.splitlines() if line.startswith(heads))
    )


def records(
    caplog: pytest.LogCaptureFixture, message: str, build_id: str | None = None, *, since: int = 0
) -> list[logging.LogRecord]:
    """Log records whose message starts with ``message``, from the ``since``-th on."""
    return [
        record
        for record in caplog.records[since:]
        if record.getMessage().startswith(message)
        and (build_id is None or getattr(record, "build_id", None) == build_id)
    ]


def one(lines: list[logging.LogRecord]) -> logging.LogRecord:
    assert len(lines) == 1, [line.getMessage() for line in lines]
    return lines[0]


def assert_no_key_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert CANARY_API_KEY not in record.getMessage()
        assert CANARY_API_KEY not in repr(vars(record))


def assert_healthy(running: RunningExporter) -> None:
    assert running.get("/-/healthy").status_code == 200


# -- the driven clock ---------------------------------------------------------------------------


@pytest.fixture
def clock() -> DrivenClock:
    return DrivenClock()


def driven_simulator(clock: DrivenClock) -> Simulator:
    """The simulator on the driven clock: each request recorded at its driven monotonic time,
    answers dated by its wall clock."""
    return Simulator(CANARY_API_KEY, clock=clock.wall, monotonic=clock.monotonic)


@pytest.fixture
def api(clock: DrivenClock) -> Iterator[Simulator]:
    with driven_simulator(clock) as running:
        yield running


@pytest.fixture
def elsewhere(clock: DrivenClock) -> Iterator[Simulator]:
    """Another host, for redirects: no request may reach it."""
    with driven_simulator(clock) as running:
        yield running


def start_driven(
    start_exporter: StartExporter,
    clock: DrivenClock,
    config_url: str,
    build_ids: list[str],
    **options: Any,
) -> RunningExporter:
    """An exporter on the driven clock, polling every ``INTERVAL`` within a budget of
    ``SLOTS_PER_SECOND``. The adaptive cadence is off: a build's next poll is an interval after
    its last, an exact step like the budget's slot."""
    config = make_config(
        config_url,
        build_ids,
        interval=f"{INTERVAL:g}s",
        max_interval=f"{INTERVAL:g}s",
        requests_per_second=SLOTS_PER_SECOND,
        **options,
    )
    return start_exporter(config, clock=clock)


def wait_for_nap(clock: DrivenClock, seconds: float, *, within: float = 0.0) -> None:
    """Block until the exporter waits on the clock for ``seconds`` (to ``within``) from now."""
    if within == 0:
        clock.wait_for_sleep(seconds)
        return
    wait_until(
        lambda: any(abs(wait - seconds) <= within for wait in clock.deadlines()),
        timeout=SETTLE_TIMEOUT,
        message=f"a wait of {seconds}s on the driven clock",
    )


# -- one build's bad answer, with two healthy builds beside it ---------------------------------


@pytest.mark.parametrize("row", [pytest.param(row, id=row.id, marks=row.marks) for row in ROWS])
def test_bad_answer_for_one_build_shows_on_that_build_only(
    api: Simulator,
    elsewhere: Simulator,
    clock: DrivenClock,
    start_exporter: StartExporter,
    row: BadAnswer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    victim = row.victim
    for build_id in (victim, *HEALTHY):
        api.add(building(build_id))
    # The victim first: in each round of polls the healthy builds come after it.
    running = start_driven(
        start_exporter,
        clock,
        api.base_url,
        [victim, *HEALTHY],
        timeout=f"{int(DEADLINE * 1000)}ms",
        max_response_size=f"{MAX_RESPONSE_SIZE // 1024}KiB",
    )
    clock.run_until(
        running.exporter,
        lambda: polled_fine_since(running, [victim, *HEALTHY], 0),
        limit=5 * INTERVAL,
        message="a good answer for every build",
    )
    # The victim answered correctly until now; from here on it answers badly.
    row.serve(api, victim, elsewhere)
    served, asked, logged = clock.wall(), len(api.requests(victim)), len(caplog.records)
    clock.run_until(
        running.exporter,
        lambda: (
            len(api.requests(victim)) >= asked + 2 and polled_fine_since(running, HEALTHY, served)
        ),
        limit=5 * INTERVAL,
        message=f"the bad answer served twice, and a newer poll of {HEALTHY}",
    )
    bad_answers = len(api.requests(victim)) - asked
    expected = row.series(victim)
    if row.log is not None:
        message, extras = row.log
        # Once per change, however often the bad answer was served meanwhile.
        line = one(records(caplog, message, victim, since=logged))
        assert {name: str(getattr(line, name, None)) for name in extras} == extras
        assert row.detail in str(getattr(line, "detail", ""))

    assert_healthy(running)
    samples = assert_valid_exposition(running)
    assert_series(samples, expected)
    assert_fresh(samples, HEALTHY, since=served)
    assert {dict(labels).get("build_id", victim) for _, labels in samples} <= {victim, *HEALTHY}
    warnings = [
        line
        for line in caplog.records[logged:]
        if line.levelno >= logging.WARNING and getattr(line, "build_id", None) == victim
    ]
    assert len(warnings) == (0 if row.reason is None else 1)
    if row.reason is not None:
        outcome = frozenset({("endpoint", "build_status"), ("outcome", row.reason)})
        assert samples[("primeintellect_exporter_api_requests_total", outcome)] == bad_answers
        # The last good answer stays until it goes stale.
        assert samples[("primeintellect_image_build_info", frozenset(build_labels(victim).items()))]
    assert not elsewhere.requests(), "a request, and the API key, went to another host"
    assert_no_key_in_logs(caplog)


# -- answers about the whole API: pauses, a rejected key, a failing or missing API ---------------


def start_with_a_victim(
    api: Simulator, start_exporter: StartExporter, clock: DrivenClock, fault: Fault
) -> RunningExporter:
    """An exporter watching two healthy builds and a victim that answers with ``fault``, once
    its first round of requests is over.

    The three go out one budget slot apart, the victim last, and the clock moves to the next
    slot only once the answer before is in: the healthy builds' answers have arrived before
    the victim is asked, and any later request was sent after the bad answer arrived.
    """
    build_ids = [*HEALTHY, "victim"]
    for build_id in build_ids:
        api.add(building(build_id))
    api.set_fault("victim", fault)
    running = start_driven(start_exporter, clock, api.base_url, build_ids)
    for build_id in HEALTHY:
        clock.wait_for_sleep(SLOT, message=f"the wait for a slot after {build_id}'s request")
        clock.settle(running.exporter)
        clock.advance(SLOT)
    clock.settle(running.exporter)
    assert [request.build_id for request in api.requests()] == build_ids
    return running


@dataclass(frozen=True)
class RateLimit:
    """A 429 with this ``Retry-After`` (from the driven wall-clock time it is served at), and
    the pause it must cause, in seconds: exact when both bounds are the same."""

    id: str
    retry_after: Callable[[float], str]
    pause: tuple[float, float]
    marks: Sequence[pytest.MarkDecorator] = field(default=())

    @property
    def exact(self) -> bool:
        return self.pause[0] == self.pause[1]


def http_date(now: float, seconds_from_now: float) -> str:
    return email.utils.formatdate(now + seconds_from_now, usegmt=True)


RATE_LIMIT_ROWS = [
    RateLimit("seconds", lambda now: "2", (2, 2)),
    # An HTTP date has whole seconds: two seconds from now is one to two from the answer.
    RateLimit("http-date", lambda now: http_date(now, 2), (1, 2)),
    RateLimit("zero", lambda now: "0", (1, 1)),
    RateLimit("http-date-in-the-past", lambda now: http_date(now, -3600), (1, 1)),
    # Unusable: the first of the default pauses.
    RateLimit("negative", lambda now: "-5", (10, 10)),
    RateLimit("garbage", lambda now: "soon, maybe", (10, 10)),
    RateLimit("huge-seconds", lambda now: "9999999999", (600, 600)),
    RateLimit("huge-http-date", lambda now: "Fri, 31 Dec 9999 23:59:59 GMT", (600, 600)),
    RateLimit("huge-seconds-beyond-ten-digits", lambda now: "9" * 20, (600, 600)),
]
# Pauses up to this long are sat out a second at a time; longer ones leap to their last second.
STEPPED_PAUSE = 10.0


def sit_out_pause(
    running: RunningExporter, clock: DrivenClock, api: Simulator, pause: float, *, exact: bool
) -> None:
    """Advance the clock through a pause of every request that begins now: a second at a time,
    the poller's longest wait (a long pause in one leap to its last second), checking at each
    step that the poller still waits and has sent nothing. Unless ``exact``, ``pause`` is only
    known to a few microseconds, and each step goes OVERSHOOT further."""
    sent = len(api.requests())
    remaining = pause
    while remaining > 0:
        nap = min(remaining, TICK)
        if exact or nap > 1e-5:
            wait_for_nap(clock, nap, within=0 if exact else 1e-5)
            clock.settle(running.exporter)
            assert len(api.requests()) == sent, f"a request {pause - remaining:g}s into the pause"
        step = remaining - TICK if remaining > STEPPED_PAUSE else nap
        clock.advance(step if exact else step + OVERSHOOT)
        remaining -= step


@pytest.mark.parametrize(
    "row", [pytest.param(row, id=row.id, marks=row.marks) for row in RATE_LIMIT_ROWS]
)
def test_rate_limit_pauses_every_request_for_a_bounded_time(
    api: Simulator,
    clock: DrivenClock,
    start_exporter: StartExporter,
    row: RateLimit,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    fault = Fault.rate_limited(row.retry_after(clock.wall()), times=1)
    running = start_with_a_victim(api, start_exporter, clock, fault)
    limited = api.requests("victim")[0]
    assert limited.status == 429
    # The clock has stood still since the 429 arrived.
    limited_wall = clock.wall()
    during = running.samples()
    pause_end = during[(RATE_LIMITED_UNTIL, frozenset())]
    pause = pause_end - limited_wall
    assert MIN_RATE_LIMIT_PAUSE <= pause <= MAX_RATE_LIMIT_PAUSE, pause
    low, high = row.pause
    if row.exact:
        assert pause_end == limited_wall + low
    else:
        # The exporter reads the date against the real clock, not the driven one it was given:
        # the real time the test has taken so far shortens the pause, down to its floor.
        assert low - 1e-6 <= pause <= high + 1e-6, pause
    assert during[
        (
            "primeintellect_image_build_last_poll_error",
            frozenset({("build_id", "victim"), ("reason", "rate_limited")}),
        )
    ]
    assert (
        during[
            (
                "primeintellect_exporter_api_requests_total",
                frozenset({("endpoint", "build_status"), ("outcome", "rate_limited")}),
            )
        ]
        == 1
    )
    line = one(records(caplog, "API rate limit hit: pausing all requests"))
    assert getattr(line, "build_id", None) == "victim"
    assert getattr(line, "pause_seconds", -1) == pytest.approx(pause, abs=0.0005)
    assert_healthy(running)
    assert_valid_exposition(running)

    # Every build's first request was sent before the 429 arrived; its second waits for the
    # end of the pause, then all go one budget slot apart.
    sit_out_pause(running, clock, api, pause, exact=row.exact)
    for _ in range(2):
        clock.wait_for_sleep(SLOT, message="the wait for a slot after the pause")
        clock.settle(running.exporter)
        clock.advance(SLOT)
    # Polling goes on as before: the healthy builds' next polls an interval after these.
    clock.wait_for_sleep(INTERVAL - 2 * SLOT, message="the wait for the next round of polls")
    clock.settle(running.exporter)
    resumed = api.requests()[3:]
    assert [request.build_id for request in resumed] == [*HEALTHY, "victim"]
    assert [request.at - limited.at for request in resumed] == pytest.approx(
        [pause, pause + SLOT, pause + 2 * SLOT], rel=0, abs=0 if row.exact else 1e-5
    )
    after = assert_valid_exposition(running)
    assert after[(RATE_LIMITED_UNTIL, frozenset())] == 0.0
    assert_fresh(after, [*HEALTHY, "victim"], since=limited_wall)
    assert len(records(caplog, "API rate limit hit: pausing all requests")) == 1
    assert len(records(caplog, "rate limit pause over, polling resumes")) == 1
    assert_no_key_in_logs(caplog)


def test_a_403_for_one_build_is_that_build_forbidden_not_the_key_rejected(
    api: Simulator,
    clock: DrivenClock,
    start_exporter: StartExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    running = start_with_a_victim(
        api,
        start_exporter,
        clock,
        Fault(status=403, body=b'{"detail": "Not allowed for this team"}'),
    )
    expected: list[Series] = [
        (
            "primeintellect_image_build_last_poll_error",
            {"build_id": "victim", "reason": "forbidden"},
            1,
        ),
        ("primeintellect_image_build_last_poll_success", {"build_id": "victim"}, 0),
        (
            "primeintellect_exporter_api_requests_total",
            {"endpoint": "build_status", "outcome": "forbidden"},
            1,
        ),
    ]
    # The clock stands still: the victim is not asked again until the test moves it.
    assert_series(assert_valid_exposition(running), expected)
    line = one(records(caplog, "poll failed", "victim"))
    assert getattr(line, "reason", None) == "forbidden"
    assert getattr(line, "detail", None) == "HTTP 403"
    assert not records(caplog, "API key rejected: ")
    # The healthy builds are polled on at their interval, with no pause (a rejected key would
    # pause every poll for 30 s), and the API counts as up.
    forbidden_at = clock.wall()
    clock.run_until(
        running.exporter,
        lambda: polled_fine_since(running, HEALTHY, forbidden_at),
        limit=2 * INTERVAL,
        message="the healthy builds' next polls",
    )
    assert_healthy(running)
    samples = assert_valid_exposition(running)
    assert_fresh(samples, HEALTHY, since=forbidden_at)
    assert samples[(API_UP, frozenset())] == 1
    assert_series(samples, expected[:2])
    assert not records(caplog, "API key rejected: ")
    assert not records(caplog, "API key accepted again")
    assert_no_key_in_logs(caplog)


def test_a_403_for_every_build_is_the_key_rejected(
    api: Simulator,
    clock: DrivenClock,
    start_exporter: StartExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    for build_id in ("one", "two"):
        api.add(building(build_id))
        api.set_fault(build_id, Fault(status=403, body=b'{"detail": "Forbidden"}'))
    running = start_driven(start_exporter, clock, api.base_url, ["one", "two"])
    clock.run_until(
        running.exporter,
        lambda: len(api.requests()) == 2,
        limit=INTERVAL,
        message="a 403 for each build",
    )
    line = one(records(caplog, "API key rejected: "))
    assert getattr(line, "detail", None) == "HTTP 403"
    # The first build's 403 alone was that build's problem, logged as such.
    assert [getattr(line, "build_id", None) for line in records(caplog, "poll failed")] == ["one"]
    assert_healthy(running)
    assert_no_key_in_logs(caplog)


def test_rejected_key_is_reported_and_logged_once(
    api: Simulator,
    clock: DrivenClock,
    start_exporter: StartExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    status = 401
    caplog.set_level(logging.INFO, logger="exporter")
    # The healthy answers arrive before the rejection. One rejection after usable answers is
    # not a minute of them, so api_up stays 1; the key-rejected alert reads
    # last_poll_error{reason="unauthorized"}.
    running = start_with_a_victim(
        api, start_exporter, clock, Fault(status=status, body=b'{"detail": "Not authenticated"}')
    )
    expected: list[Series] = [
        (
            "primeintellect_image_build_last_poll_error",
            {"build_id": "victim", "reason": "unauthorized"},
            1,
        ),
        ("primeintellect_image_build_last_poll_success", {"build_id": "victim"}, 0),
        (API_UP, {}, 1),
        (
            "primeintellect_exporter_api_requests_total",
            {"endpoint": "build_status", "outcome": "unauthorized"},
            1,
        ),
    ]
    line = one(records(caplog, "API key rejected: "))
    assert line.levelno == logging.ERROR
    assert getattr(line, "detail", None) == f"HTTP {status}"
    assert_healthy(running)
    assert_series(assert_valid_exposition(running), expected)
    assert not records(caplog, "poll failed", "victim")
    assert_no_key_in_logs(caplog)


def test_one_failing_build_among_good_ones_leaves_api_up_at_one(
    api: Simulator, clock: DrivenClock, start_exporter: StartExporter
) -> None:
    running = start_with_a_victim(api, start_exporter, clock, Fault.server_error(503))
    # A minute and a half of polling, api_up read at every moment the exporter acts: right
    # after each of the victim's failures too.
    readings: list[float | None] = []
    with httpx.Client() as client:
        while clock.elapsed() < API_DOWN_AFTER * 1.5:
            readings.append(scrape(client, running, API_UP).get((API_UP, frozenset())))
            clock.wake_next(running.exporter)
    # The victim's answers were the last ones many times over; api_up never said so.
    victim_failures = len(api.requests("victim"))
    assert victim_failures >= 5
    assert set(readings) == {1.0}
    assert (
        running.value(
            "primeintellect_image_build_last_poll_error", build_id="victim", reason="server_error"
        )
        == 1
    )


def test_unreachable_api_fails_every_build_and_the_daemon_lives(
    clock: DrivenClock, start_exporter: StartExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Closed again: nothing listens on the port, so every connection is refused.
    build_ids = ["victim", *HEALTHY]
    running = start_driven(start_exporter, clock, f"http://127.0.0.1:{port}", build_ids)
    expected: list[Series] = []
    for build_id in build_ids:
        expected += failed_with("connection_error")(build_id)
    clock.run_until(
        running.exporter,
        lambda: shows(running, expected),
        limit=INTERVAL,
        message="every build to fail",
    )
    # From the first refusal, at driven time 0: each reading's time, refusals so far, api_up.
    refused = frozenset({("endpoint", "build_status"), ("outcome", "connection_error")})
    readings: list[tuple[float, float, float | None]] = []
    with httpx.Client() as client:
        while not readings or readings[-1][2] != 0:
            if clock.elapsed() > 3 * API_DOWN_AFTER:
                pytest.fail(f"api_up still {readings[-1][2]} after {clock.elapsed():g}s")
            samples = scrape(client, running, API_UP, REQUESTS_TOTAL)
            readings.append(
                (
                    clock.elapsed(),
                    samples[(REQUESTS_TOTAL, refused)],
                    samples.get((API_UP, frozenset())),
                )
            )
            if readings[-1][2] != 0:
                clock.wake_next(running.exporter)
    refused_at = [at for (_, before, _), (at, count, _) in pairwise(readings) if count > before]
    # Absent while no minute had passed; 0 from the first refusal a minute in.
    assert {up for _, _, up in readings[:-1]} == {None}
    down_at = readings[-1][0]
    assert down_at >= API_DOWN_AFTER, f"api_up read 0 after {down_at:g}s of refusals"
    assert down_at == min(at for at in refused_at if at >= API_DOWN_AFTER)
    assert_healthy(running)
    expected.append((API_UP, {}, 0))
    assert_series(assert_valid_exposition(running), expected)
    for build_id in build_ids:
        lines = records(caplog, "poll failed", build_id)
        assert [getattr(line, "reason", None) for line in lines] == ["connection_error"]
        # The log line says where the connection failed.
        assert str(getattr(lines[0], "detail", "")).endswith(f"(127.0.0.1:{port})")
    assert_no_key_in_logs(caplog)


# -- the simulator's delivery faults themselves -------------------------------------------------


def test_drip_fault_sends_headers_at_once_and_the_body_a_few_bytes_at_a_time(
    simulator: Simulator,
) -> None:
    pause = 0.1
    simulator.set_fault("victim", Fault.drip(interval=pause, size=4, body=b"0123456789abcdef"))
    started = time.monotonic()
    with (
        httpx.Client(timeout=5) as client,
        client.stream(
            "GET",
            simulator.base_url + BUILD_PATH_PREFIX + "victim",
            headers={"Authorization": f"Bearer {CANARY_API_KEY}"},
        ) as response,
    ):
        headers_after = time.monotonic() - started
        chunks = list(response.iter_raw())
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.headers["Content-Length"] == "16"
    assert b"".join(chunks) == b"0123456789abcdef"
    assert len(chunks) >= 2, chunks
    # Four writes with three pauses between them: the answer cannot end sooner.
    assert elapsed >= 3 * pause - 0.01
    # The pauses come after the headers: a client that reads the headers up to two pauses late
    # (a busy machine) still sees one pause after them; headers held back would leave none.
    assert elapsed - headers_after >= pause - 0.01


def test_truncated_fault_declares_more_than_it_sends_and_hangs_up(simulator: Simulator) -> None:
    simulator.add(building("victim"))
    simulator.set_fault("victim", Fault.truncated(sent=16))
    whole = json.dumps(simulator.payload("victim")).encode()
    host, port = urlsplit(simulator.base_url).hostname, urlsplit(simulator.base_url).port
    connection = http.client.HTTPConnection(host or "", port, timeout=5)
    try:
        connection.request(
            "GET",
            BUILD_PATH_PREFIX + "victim",
            headers={"Authorization": f"Bearer {CANARY_API_KEY}"},
        )
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Length") == str(len(whole))
        with pytest.raises(http.client.IncompleteRead) as cut:
            response.read()
        assert cut.value.partial == whole[:16]
    finally:
        connection.close()
