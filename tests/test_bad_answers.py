"""Bad API answers, each over real HTTP on loopback against the simulator.

Every row serves one "victim" build a bad answer while two healthy builds are tracked beside
it, and checks what the victim's series say, what is logged, that the daemon lives, that the
healthy builds stay fresh, and that the whole exposition stays valid (promtool and both of
prometheus_client's parsers). Rows that do not pause the whole API share one exporter and
one simulator, each with its own victim; rows that pause every request (401, 403, 429) and
the unreachable API get an exporter of their own.
"""

from __future__ import annotations

import email.utils
import functools
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
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from exporter.models import BUILD_STATUSES, MAX_LABEL_LENGTH
from exporter.simulator import BUILD_PATH_PREFIX, BuildPlan, Fault, Simulator
from exporter.telemetry import API_DOWN_AFTER_SECONDS
from tests.conftest import StartExporter
from tests.support import (
    CANARY_API_KEY,
    EPOCH,
    FastClock,
    RunningExporter,
    assert_label_value_is_clean,
    find_binary,
    make_config,
    parse_samples,
    wait_until,
)

# Each test here starts an outside tool (see the `tooling` marker in pyproject.toml).
pytestmark = pytest.mark.tooling

HEALTHY = ("healthy-1", "healthy-2")
OPENMETRICS = "application/openmetrics-text;version=1.0.0"
SUCCESS_TIMESTAMP = "primeintellect_image_build_last_poll_success_timestamp_seconds"
RATE_LIMITED_UNTIL = "primeintellect_exporter_rate_limited_until_timestamp_seconds"
# Small enough that one padded answer exceeds it, large enough for the 10 KB hostile strings.
MAX_RESPONSE_SIZE = 64 * 1024
DEADLINE = 0.5
# Wall clock minus monotonic clock: turns the simulator's request times into wall-clock times.
WALL_OFFSET = time.time() - time.monotonic()

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

SHARED_ROWS = [
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


def first_request_after(
    api: Simulator, build_id: str | None, after: float, status: int | None = None
) -> float:
    """Monotonic time of the first request (for ``build_id``, or any) answered after ``after``.

    A request answered after ``set_fault`` or ``set_payload`` returned got that answer.
    """

    def answered() -> list[float]:
        return [
            request.at
            for request in api.requests(build_id)
            if request.at > after and (status is None or request.status == status)
        ]

    times: list[float] = wait_until(answered, message=f"a request for {build_id or 'any build'}")
    return min(times)


def wall_time(monotonic: float) -> float:
    return monotonic + WALL_OFFSET


def succeeded_after(running: RunningExporter, build_id: str, since: float) -> bool:
    return (running.value(SUCCESS_TIMESTAMP, build_id=build_id) or 0) > since


def wait_until_fresh(running: RunningExporter, build_ids: Sequence[str], since: float) -> None:
    """Wait until each build has a successful poll newer than wall-clock time ``since``."""
    for build_id in build_ids:
        wait_until(
            functools.partial(succeeded_after, running, build_id, since),
            message=f"a successful poll of {build_id} after the bad answer",
        )
        assert running.value("primeintellect_image_build_last_poll_success", build_id=build_id) == 1


def records(
    caplog: pytest.LogCaptureFixture, message: str, build_id: str | None = None
) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.getMessage().startswith(message)
        and (build_id is None or getattr(record, "build_id", None) == build_id)
    ]


def assert_no_key_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert CANARY_API_KEY not in record.getMessage()
        assert CANARY_API_KEY not in repr(vars(record))


def assert_healthy(running: RunningExporter) -> None:
    assert running.get("/-/healthy").status_code == 200


# -- rows that share one exporter ---------------------------------------------------------------


@dataclass(frozen=True)
class Shared:
    api: Simulator
    elsewhere: Simulator
    running: RunningExporter


@pytest.fixture(scope="module")
def shared() -> Iterator[Shared]:
    """One simulator, another host for redirects, and one exporter tracking every victim.

    Each victim answers correctly until its row serves it a bad answer.
    """
    victims = [row.victim for row in SHARED_ROWS]
    with Simulator(CANARY_API_KEY) as api, Simulator(CANARY_API_KEY) as elsewhere:
        for build_id in (*victims, *HEALTHY):
            api.add(building(build_id))
        # Healthy builds last: in each round of polls they come after the victims.
        config = make_config(
            api.base_url,
            [*victims, *HEALTHY],
            timeout=f"{int(DEADLINE * 1000)}ms",
            max_concurrency=16,
            max_response_size=f"{MAX_RESPONSE_SIZE // 1024}KiB",
            # The adaptive cadence off: the victims' answers stay the same for minutes while
            # the rows before theirs run, and each row waits for its victim's next poll.
            max_interval="1s",
        )
        running = RunningExporter(config).start()
        try:
            running.wait_until_all_polled()
            yield Shared(api, elsewhere, running)
        finally:
            running.stop()


@pytest.mark.parametrize(
    "row", [pytest.param(row, id=row.id, marks=row.marks) for row in SHARED_ROWS]
)
def test_bad_answer_for_one_build_shows_on_that_build_only(
    shared: Shared, row: BadAnswer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    running, victim = shared.running, row.victim
    row.serve(shared.api, victim, shared.elsewhere)
    served = wall_time(first_request_after(shared.api, victim, time.monotonic()))
    expected = row.series(victim)
    wait_until(lambda: shows(running, expected), message=f"the series of {victim}")
    if row.log is not None:
        message, extras = row.log
        line = wait_until(lambda: records(caplog, message, victim), message=repr(message))[0]
        assert {name: str(getattr(line, name, None)) for name in extras} == extras
        assert row.detail in str(getattr(line, "detail", ""))

    assert_healthy(running)
    wait_until_fresh(running, HEALTHY, since=served)
    samples = assert_valid_exposition(running)
    assert_series(samples, expected)
    tracked = {*HEALTHY, *(other.victim for other in SHARED_ROWS)}
    assert {dict(labels).get("build_id", victim) for _, labels in samples} <= tracked
    if row.log is not None:
        # Once per change, however often the bad answer was served meanwhile.
        assert len(records(caplog, row.log[0], victim)) == 1
    warnings = [line for line in caplog.records if line.levelno >= logging.WARNING]
    assert len([line for line in warnings if getattr(line, "build_id", None) == victim]) == (
        0 if row.reason is None else 1
    )
    if row.reason is not None:
        outcome = frozenset({("endpoint", "build_status"), ("outcome", row.reason)})
        assert samples[("primeintellect_exporter_api_requests_total", outcome)] >= 1
        # The last good answer stays until it goes stale.
        assert samples[("primeintellect_image_build_info", frozenset(build_labels(victim).items()))]
    assert not shared.elsewhere.requests(), "a request, and the API key, went to another host"
    assert_no_key_in_logs(caplog)


# -- rows that pause every request: each with an exporter of its own ----------------------------


def start_with_a_victim(
    simulator: Simulator,
    start_exporter: StartExporter,
    fault: Fault,
    *,
    requests_per_second: float = 100.0,
) -> RunningExporter:
    """An exporter watching two healthy builds and a victim that answers with ``fault``.

    The victim comes last, so every first request for the healthy builds is sent before the
    victim's: any later request was sent after the bad answer arrived. A low
    ``requests_per_second`` also leaves the healthy answers time to arrive before it.
    """
    for build_id in (*HEALTHY, "victim"):
        simulator.add(building(build_id))
    simulator.set_fault("victim", fault)
    config = make_config(
        simulator.base_url, [*HEALTHY, "victim"], requests_per_second=requests_per_second
    )
    return start_exporter(config)


def nth_request(api: Simulator, build_id: str, n: int) -> float:
    """Monotonic time of the ``n``-th request for ``build_id`` (1 for the first)."""
    times: list[float] = wait_until(
        lambda: [request.at for request in api.requests(build_id)][n - 1 : n],
        message=f"request {n} for {build_id}",
    )
    return times[0]


@dataclass(frozen=True)
class RateLimit:
    """A 429 with this ``Retry-After``, and the pause it must cause, in seconds."""

    id: str
    retry_after: Callable[[], str]
    pause: tuple[float, float]
    marks: Sequence[pytest.MarkDecorator] = field(default=())

    @property
    def short(self) -> bool:
        """Short enough to wait for the end of the pause."""
        return self.pause[1] <= 5


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


RATE_LIMIT_ROWS = [
    RateLimit("seconds", lambda: "2", (2, 2)),
    # An HTTP date has whole seconds: two seconds from now is one to two from the answer.
    RateLimit("http-date", lambda: http_date(2), (1, 2)),
    RateLimit("zero", lambda: "0", (1, 1)),
    RateLimit("http-date-in-the-past", lambda: http_date(-3600), (1, 1)),
    # Unusable: the first of the default pauses.
    RateLimit("negative", lambda: "-5", (10, 10)),
    RateLimit("garbage", lambda: "soon, maybe", (10, 10)),
    RateLimit("huge-seconds", lambda: "9999999999", (600, 600)),
    RateLimit("huge-http-date", lambda: "Fri, 31 Dec 9999 23:59:59 GMT", (600, 600)),
    RateLimit("huge-seconds-beyond-ten-digits", lambda: "9" * 20, (600, 600)),
]


@pytest.mark.parametrize(
    "row", [pytest.param(row, id=row.id, marks=row.marks) for row in RATE_LIMIT_ROWS]
)
def test_rate_limit_pauses_every_request_for_a_bounded_time(
    simulator: Simulator,
    start_exporter: StartExporter,
    row: RateLimit,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    running = start_with_a_victim(
        simulator, start_exporter, Fault.rate_limited(row.retry_after(), times=1)
    )
    limited = first_request_after(simulator, "victim", -math.inf, status=429)
    pause_end = wait_until(lambda: running.value(RATE_LIMITED_UNTIL), message="the pause gauge")
    # Read at once: the pause lasts at least a second, so the victim is not polled again yet.
    during = running.samples()
    pause = pause_end - wall_time(limited)
    assert 1 <= pause <= 600 + 0.5, pause
    low, high = row.pause
    assert low - 0.01 <= pause <= high + 0.5, pause
    assert during[(RATE_LIMITED_UNTIL, frozenset())] == pause_end
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
    line = wait_until(
        lambda: records(caplog, "API rate limit hit: pausing all requests"),
        message="the rate-limit log line",
    )[0]
    assert getattr(line, "build_id", None) == "victim"
    assert low - 0.01 <= getattr(line, "pause_seconds", -1) <= high + 0.5
    assert_healthy(running)
    assert_valid_exposition(running)

    if row.short:
        # Every build's first request was sent before the 429 arrived; its second must wait.
        for build_id in ("victim", *HEALTHY):
            resumed = nth_request(simulator, build_id, 2)
            assert resumed - limited >= low - 0.05, f"{build_id} was polled during the pause"
        wait_until_fresh(running, HEALTHY, since=wall_time(limited) + low)
        wait_until(
            lambda: running.value(RATE_LIMITED_UNTIL) == 0.0, message="the pause gauge to clear"
        )
        wait_until(
            lambda: (
                running.value("primeintellect_image_build_last_poll_success", build_id="victim")
                == 1
            ),
            message="the victim to recover",
        )
        assert_valid_exposition(running)
    assert len(records(caplog, "API rate limit hit: pausing all requests")) == 1
    assert_no_key_in_logs(caplog)


def test_a_403_for_one_build_is_that_build_forbidden_not_the_key_rejected(
    simulator: Simulator, start_exporter: StartExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    running = start_with_a_victim(
        simulator,
        start_exporter,
        Fault(status=403, body=b'{"detail": "Not allowed for this team"}'),
        requests_per_second=5,
    )
    forbidden_at = first_request_after(simulator, "victim", -math.inf, status=403)
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
    wait_until(lambda: shows(running, expected), message="the victim's forbidden reason")
    # The healthy builds are polled on, with no pause, and the API counts as up.
    wait_until_fresh(running, HEALTHY, since=wall_time(forbidden_at))
    assert running.value("primeintellect_exporter_api_up") == 1
    assert_healthy(running)
    assert_series(assert_valid_exposition(running), expected)
    line = wait_until(lambda: records(caplog, "poll failed", "victim"), message="the log line")[0]
    assert getattr(line, "reason", None) == "forbidden"
    assert getattr(line, "detail", None) == "HTTP 403"
    assert not records(caplog, "API key rejected: ")
    assert not records(caplog, "API key accepted again")
    assert_no_key_in_logs(caplog)


def test_a_403_for_every_build_is_the_key_rejected(
    simulator: Simulator, start_exporter: StartExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    for build_id in ("one", "two"):
        simulator.add(building(build_id))
        simulator.set_fault(build_id, Fault(status=403, body=b'{"detail": "Forbidden"}'))
    running = start_exporter(make_config(simulator.base_url, ["one", "two"]))
    line = wait_until(
        lambda: records(caplog, "API key rejected: "), message="the key rejection log line"
    )[0]
    assert getattr(line, "detail", None) == "HTTP 403"
    # The first build's 403 alone was that build's problem, logged as such.
    assert len(records(caplog, "poll failed")) == 1
    assert_healthy(running)
    assert_no_key_in_logs(caplog)


def test_rejected_key_is_reported_and_logged_once(
    simulator: Simulator,
    start_exporter: StartExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    status = 401
    caplog.set_level(logging.INFO, logger="exporter")
    # Requests 200 ms apart: the healthy answers arrive before the rejection. One rejection
    # after usable answers is not a minute of them, so api_up stays 1; the key-rejected alert
    # reads last_poll_error{reason="unauthorized"}.
    running = start_with_a_victim(
        simulator,
        start_exporter,
        Fault(status=status, body=b'{"detail": "Not authenticated"}'),
        requests_per_second=5,
    )
    first_request_after(simulator, "victim", -math.inf, status=status)
    expected: list[Series] = [
        (
            "primeintellect_image_build_last_poll_error",
            {"build_id": "victim", "reason": "unauthorized"},
            1,
        ),
        ("primeintellect_image_build_last_poll_success", {"build_id": "victim"}, 0),
        ("primeintellect_exporter_api_up", {}, 1),
        (
            "primeintellect_exporter_api_requests_total",
            {"endpoint": "build_status", "outcome": "unauthorized"},
            1,
        ),
    ]
    wait_until(lambda: shows(running, expected), message="the key rejection")
    line = wait_until(
        lambda: records(caplog, "API key rejected: "), message="the key rejection log line"
    )[0]
    assert line.levelno == logging.ERROR
    assert getattr(line, "detail", None) == f"HTTP {status}"
    assert_healthy(running)
    assert_series(assert_valid_exposition(running), expected)
    assert len(records(caplog, "API key rejected: ")) == 1
    assert not records(caplog, "poll failed", "victim")
    assert_no_key_in_logs(caplog)


def test_one_failing_build_among_good_ones_leaves_api_up_at_one(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    for build_id in (*HEALTHY, "victim"):
        simulator.add(building(build_id))
    simulator.set_fault("victim", Fault.server_error(503))
    # Twenty times real time: a simulated minute and a half of polling in about 4.5 s.
    clock = FastClock(speed=20)
    config = make_config(simulator.base_url, [*HEALTHY, "victim"], max_interval="1s")
    running = start_exporter(config, clock=clock)
    readings: list[float | None] = []
    while clock.elapsed() < API_DOWN_AFTER_SECONDS * 1.5:
        readings.append(running.value("primeintellect_exporter_api_up"))
    # The victim's answers were the last ones many times over; api_up never said so.
    victim_failures = len(simulator.requests("victim"))
    assert victim_failures >= 5
    assert set(readings[len(readings) // 10 :]) == {1.0}
    assert (
        running.value(
            "primeintellect_image_build_last_poll_error", build_id="victim", reason="server_error"
        )
        == 1
    )


def test_unreachable_api_fails_every_build_and_the_daemon_lives(
    start_exporter: StartExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Closed again: nothing listens on the port, so every connection is refused.
    build_ids = ["victim", *HEALTHY]
    # Twenty times real time, so the minute of refusals that turns api_up off passes in 3 s.
    clock = FastClock(speed=20)
    running = start_exporter(make_config(f"http://127.0.0.1:{port}", build_ids), clock=clock)
    expected: list[Series] = []
    for build_id in build_ids:
        expected += failed_with("connection_error")(build_id)
    wait_until(lambda: shows(running, expected), message="every build to fail")
    expected.append(("primeintellect_exporter_api_up", {}, 0))
    wait_until(lambda: shows(running, expected), message="api_up to read 0 after a minute")
    assert clock.elapsed() >= API_DOWN_AFTER_SECONDS
    assert_healthy(running)
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
    simulator.set_fault("victim", Fault.drip(interval=0.05, size=4, body=b"0123456789abcdef"))
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
    # Four writes with three pauses between them, all after the headers arrived.
    assert elapsed - headers_after >= 0.15 - 0.01


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
