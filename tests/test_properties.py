"""Property: no API answer, however malformed, escapes the poller or breaks the exposition.

Hypothesis generates answer bodies biased toward the BuildStatusResponse shape: random subsets
of its fields, values of the right type or any JSON at all, strings with control characters,
lone surrogates and quotes, timestamps in many formats, deep nesting, and bytes that are not
JSON at all. Each body goes through ``parse_build``, the real API client (over
``httpx.MockTransport``), the poller and the store, and the result is rendered in both
exposition formats and parsed back with prometheus_client's parsers.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter.api import BuildStatusClient, Outcome
from exporter.exposition import ExpositionFormat, render
from exporter.metrics import build_families, exporter_families
from exporter.models import ARTIFACT_TYPES, BUILD_STATUSES, InvalidBuildError, parse_build
from exporter.poller import Poller, PollSettings
from exporter.store import BuildStore
from exporter.telemetry import Telemetry
from tests.test_bad_answers import assert_label_value_is_clean

BUILD_IDS = ("build-a", "build-b")
BASE_URL = "https://api.example.test"
POLL_TIME = 1767225600.0

# Deterministic in CI: the same examples on every run, nothing saved between runs.
DETERMINISTIC = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strings -------------------------------------------------------------------------------------

NASTY_CHARACTERS = [
    *"\x00\x01\t\n\r\x0b\x0c\x1b\x7f\x85\u2028\u2029",  # control characters and line breaks
    *"\ud800\udbff\udc00\udfff",  # lone surrogates: JSON can carry them, UTF-8 cannot
    *'"\\{}=,# ',  # what the exposition format escapes or splits on
    *"…\ufffd\ufeff\u200b\uffffé😀",
]
characters = st.one_of(st.characters(), st.sampled_from(NASTY_CHARACTERS))
short_texts = st.text(characters, max_size=12)
texts = st.one_of(
    short_texts,
    short_texts,
    # Long ones, cheaply: past the 256-character limit, with nasty characters at the cut.
    st.builds(lambda unit, count: unit * count, short_texts, st.integers(20, 400)),
    st.builds(
        lambda unit, count: unit * count,
        st.sampled_from(["x", "é", "\n", "\ud800", "😀", '"\\']),
        st.integers(250, 3000),
    ),
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | texts,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=5,
)


def mostly(right: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The right kind of value most of the time, any JSON value otherwise."""
    return st.one_of(right, right, right, json_values)


# -- timestamps ----------------------------------------------------------------------------------

offsets = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
# From year 1 to 9999, naive or with a UTC offset of up to a day either way.
moments = st.one_of(
    st.datetimes(datetime(1, 1, 1), datetime(9999, 12, 31)),  # noqa: DTZ001 (naive on purpose)
    st.datetimes(
        datetime(1, 1, 2),  # noqa: DTZ001 (the zone comes from the strategy)
        datetime(9999, 12, 30),  # noqa: DTZ001
        timezones=st.one_of(st.just(UTC), offsets),
    ),
)
TIMESTAMP_STYLES = (
    "iso",
    "iso-milliseconds",
    "iso-z",
    "space",
    "date",
    "rfc2822",
    "unix",
    "compact",
    "nanoseconds",
)


def format_moment(moment: datetime, style: str) -> str:
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    match style:
        case "iso":
            return moment.isoformat()
        case "iso-milliseconds":
            return moment.isoformat(timespec="milliseconds")
        case "iso-z":
            return aware.astimezone(UTC).isoformat().replace("+00:00", "Z")
        case "space":
            return moment.isoformat(sep=" ")
        case "date":
            return moment.date().isoformat()
        case "rfc2822":
            return email.utils.format_datetime(moment)
        case "unix":
            return str(int(aware.timestamp()))
        case "compact":
            return moment.strftime("%Y%m%dT%H%M%S")
        case _:
            return moment.strftime("%Y-%m-%dT%H:%M:%S") + ".123456789Z"


timestamps = st.one_of(
    st.builds(format_moment, moments, st.sampled_from(TIMESTAMP_STYLES)),
    st.sampled_from(
        [
            "",
            "now",
            "2026-13-45T25:61:61Z",
            "2026-06-30T23:59:60Z",
            "0000-00-00T00:00:00Z",
            "-0001-01-01T00:00:00Z",
            "1e308",
            "-1",
            "9" * 30,
            "\uff12\uff10\uff12\uff16-01-01T00:00:00Z",  # full-width digits
            "2026-01-01T00:00:00+24:00",
        ]
    ),
    texts,
    json_values,
)

# -- documents -----------------------------------------------------------------------------------


def shaped(
    required: dict[str, st.SearchStrategy[Any]], optional: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with all required fields (most often) or a random subset, plus unknown ones."""
    complete = st.fixed_dictionaries(required, optional=optional)
    partial = st.fixed_dictionaries({}, optional={**required, **optional})
    extras = st.dictionaries(st.text(max_size=8), json_values, max_size=2)
    return st.builds(lambda extra, known: {**extra, **known}, extras, complete | complete | partial)


statuses = mostly(st.sampled_from([*BUILD_STATUSES, "UNKNOWN", "", "building"]) | texts)
optional_texts = st.none() | texts

artifacts = shaped(
    {
        "id": mostly(st.sampled_from(["a1", "a2", "a1\n"]) | texts),
        "status": statuses,
        "createdAt": timestamps,
    },
    {
        "artifactType": mostly(st.sampled_from([*ARTIFACT_TYPES, "WASM_MODULE", None]) | texts),
        "fullImagePath": mostly(optional_texts),
        "errorMessage": mostly(optional_texts),
        "startedAt": st.none() | timestamps,
        "completedAt": st.none() | timestamps,
    },
)


def documents(build_id: str) -> st.SearchStrategy[dict[str, Any]]:
    other_ids = st.sampled_from([build_id, build_id, "someone-else", build_id.upper()])
    return shaped(
        {
            "id": mostly(other_ids),
            "imageName": mostly(texts),
            "imageTag": mostly(texts),
            "status": statuses,
            "createdAt": timestamps,
        },
        {
            "startedAt": st.none() | timestamps,
            "completedAt": st.none() | timestamps,
            "errorMessage": mostly(optional_texts),
            "error_message": mostly(optional_texts),
            "artifacts": mostly(st.none() | st.lists(mostly(artifacts), max_size=4)),
        },
    )


def encoded(document: object, ascii_only: bool) -> bytes:
    """JSON as an API might send it; lone surrogates become invalid UTF-8 unless escaped."""
    return json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def bodies(build_id: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(encoded, documents(build_id), st.booleans()),
        st.builds(encoded, documents(build_id), st.booleans()),
        st.builds(encoded, json_values, st.booleans()),
        st.binary(max_size=40),
        st.sampled_from(
            [
                b"",
                b"null",
                b"<html><body>502</body></html>",
                b"[" * 100_000,
                b'{"id": "' + build_id.encode() + b'"',
                b"\xef\xbb\xbf{}",
            ]
        ),
    )


# One to three answers per build, served in turn; finished builds are not asked again.
scenarios = st.tuples(
    *(st.lists(bodies(build_id), min_size=1, max_size=3) for build_id in BUILD_IDS)
)


# -- the property --------------------------------------------------------------------------------


class ScriptedApi:
    """Answers each build's requests with its bodies in turn, repeating the last one."""

    def __init__(self, answers: dict[str, Sequence[bytes]]) -> None:
        self.answers = answers
        self.served = dict.fromkeys(answers, 0)

    def handle(self, request: httpx.Request) -> httpx.Response:
        build_id = request.url.path.rsplit("/", 1)[-1]
        sequence = self.answers[build_id]
        body = sequence[min(self.served[build_id], len(sequence) - 1)]
        self.served[build_id] += 1
        # A stream still to be read, as from the network (``content=`` would preload it).
        return httpx.Response(
            200,
            headers={"Content-Type": "application/json", "Content-Length": str(len(body))},
            stream=httpx.ByteStream(body),
        )

    def exhausted(self, store: BuildStore) -> bool:
        records = store.snapshot().records
        return all(
            self.served[build_id] >= len(sequence) or records[build_id].finished
            for build_id, sequence in self.answers.items()
        )


def expected_outcome(build_id: str, body: bytes) -> Outcome:
    """What ``parse_build`` says of a body; any exception but InvalidBuildError escapes."""
    try:
        build = parse_build(body)
    except InvalidBuildError:
        return Outcome.INVALID_RESPONSE
    return Outcome.OK if build.id == build_id else Outcome.INVALID_RESPONSE


async def serve_every_answer(
    answers: dict[str, Sequence[bytes]], store: BuildStore, telemetry: Telemetry
) -> list[BaseException]:
    """Each answer once through the client alone, then all through the poller.

    Returns the exceptions the poller caught (it catches everything, to keep polling).
    """
    api = ScriptedApi(answers)
    client = BuildStatusClient(
        BASE_URL,
        None,
        timeout=10.0,
        max_connections=4,
        transport=httpx.MockTransport(api.handle),
        wall_clock=lambda: POLL_TIME,
    )
    try:
        for build_id, sequence in answers.items():
            for body in sequence:
                result = await client.fetch(build_id)
                assert result.outcome is expected_outcome(build_id, body), result.detail
                assert (result.build is not None) == (result.outcome is Outcome.OK)
                assert result.outcome is Outcome.OK or result.detail
        api.served = dict.fromkeys(answers, 0)
        return await poll_until_served(api, client, store, telemetry)
    finally:
        await client.aclose()


async def poll_until_served(
    api: ScriptedApi, client: BuildStatusClient, store: BuildStore, telemetry: Telemetry
) -> list[BaseException]:
    errors: list[BaseException] = []
    poller = Poller(
        client,
        store,
        telemetry,
        PollSettings(
            interval=0.0001, stale_after=3600, requests_per_second=100_000, max_concurrency=4
        ),
        wall_clock=lambda: POLL_TIME,
        jitter=lambda: 0.0,
        on_internal_error=lambda component, error: errors.append(error),
    )
    poller.set_builds(api.answers)
    task = asyncio.create_task(poller.run())
    deadline = time.monotonic() + 10
    try:
        while not api.exhausted(store):
            assert not task.done(), "the poller stopped"
            assert time.monotonic() < deadline, f"answers not all served: {api.served}"
            await asyncio.sleep(0.0001)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return errors


def assert_parses(body: bytes, format: ExpositionFormat) -> None:
    text = body.decode("utf-8")  # strict: valid UTF-8 only
    if format is ExpositionFormat.OPENMETRICS:
        assert text.endswith("# EOF\n")
        families = list(openmetrics_families(text))  # type: ignore[no-untyped-call]
    else:
        families = list(text_string_to_metric_families(text))
    for family in families:
        for sample in family.samples:
            for label, value in sample.labels.items():
                assert_label_value_is_clean(sample.name, label, value)


@DETERMINISTIC
@given(scenario=scenarios, max_artifacts=st.sampled_from([0, 1, 64]))
def test_any_answer_is_polled_without_errors_and_renders_a_parseable_exposition(
    scenario: tuple[list[bytes], ...], max_artifacts: int
) -> None:
    answers: dict[str, Sequence[bytes]] = dict(zip(BUILD_IDS, scenario, strict=True))
    store, telemetry = BuildStore(), Telemetry()
    errors = asyncio.run(serve_every_answer(answers, store, telemetry))
    assert not errors, f"the poller caught {errors[0]!r}"
    requests = telemetry.snapshot().requests
    assert {outcome for outcome, count in requests.items() if count} <= {
        Outcome.OK,
        Outcome.INVALID_RESPONSE,
    }
    for record in store.snapshot().records.values():
        assert record.polled
        assert record.last_poll_ok == (record.last_error is None)
        assert not record.last_poll_ok or record.build is not None

    families = [
        *build_families(store.snapshot(), max_artifacts),
        *exporter_families(telemetry.snapshot()),
    ]
    for format in ExpositionFormat:
        assert_parses(render(families, format), format)
