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
import json
import time
from collections.abc import Sequence
from html.parser import HTMLParser

import httpx
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter.api import ApiClient
from exporter.exposition import ExpositionFormat, render
from exporter.metrics import exporter_families
from exporter.models import InvalidBuildError, Outcome, parse_build
from exporter.poller import Poller, PollSettings
from exporter.store import BuildStore
from exporter.telemetry import Telemetry
from exporter.web.status_page import PageContext, PageQuery, render_build_page, render_status_page
from tests.helpers.support import (
    DETERMINISTIC,
    assert_label_value_is_clean,
    build_families,
    documents,
    json_values,
)

BUILD_IDS = ("build-a", "build-b")
BASE_URL = "https://api.example.test"
POLL_TIME = 1767225600.0


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
    client = ApiClient(
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
                assert (result.value is not None) == (result.outcome is Outcome.OK)
                assert result.outcome is Outcome.OK or result.detail
        api.served = dict.fromkeys(answers, 0)
        return await poll_until_served(api, client, store, telemetry)
    finally:
        await client.aclose()


async def poll_until_served(
    api: ScriptedApi, client: ApiClient, store: BuildStore, telemetry: Telemetry
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


# Every element and attribute the status pages write themselves: an answer's text that
# became markup would add another.
PAGE_TAGS = {
    "html",
    "head",
    "meta",
    "title",
    "style",
    "body",
    "h1",
    "h2",
    "p",
    "a",
    "form",
    "label",
    "select",
    "option",
    "input",
    "button",
    "div",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "span",
    "code",
    "ul",
    "li",
}
PAGE_ATTRIBUTES = {
    "lang",
    "charset",
    "name",
    "content",
    "http-equiv",
    "class",
    "href",
    "method",
    "action",
    "value",
    "selected",
    "type",
    "id",
    "data-build",
    "data-image",
    "data-label",
}


class _MarkupCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.attributes: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)


def assert_only_the_pages_own_markup(page: str) -> None:
    collector = _MarkupCollector()
    collector.feed(page)
    collector.close()
    assert collector.tags <= PAGE_TAGS, collector.tags - PAGE_TAGS
    assert collector.attributes <= PAGE_ATTRIBUTES, collector.attributes - PAGE_ATTRIBUTES


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
    context = PageContext(store.snapshot(), telemetry.snapshot(), time.time(), 2.0)
    pages = [render_status_page(context, PageQuery())]
    pages += [render_build_page(context, build_id) or "" for build_id in BUILD_IDS]
    for page in pages:
        assert_only_the_pages_own_markup(page)
