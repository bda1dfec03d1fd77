"""One build listing pass against scripted pages, no HTTP: the order learned from createdAt,
where a pass stops, what reaches the sink, and how a failure is told. Time is a fixed wall
clock and a driven monotonic one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from exporter.api import Answer
from exporter.build_discovery import PAGE_LIMIT, BuildDiscovery, Order, PassResult
from exporter.config.grammar import format_duration
from exporter.config.schema import BuildDiscoverySettings
from exporter.models import BUILD, Build, BuildPage, Outcome
from exporter.telemetry import BUILD_LIST_ENDPOINT, Telemetry
from tests.helpers.clock import DrivenClock
from tests.helpers.support import EPOCH

NOW = EPOCH + 30 * 86400
HOUR = 3600.0
# One build every 20 s: an hour's window holds the newest 181 (ages 0 s to 3600 s).
SPACING = 20.0
IN_AN_HOUR = 181
UNAVAILABLE = (
    "the API does not serve GET /api/v1/images/builds: discovery.builds is off in effect; "
    "configured builds are polled as before"
)
FAILED = "build listing failed: nothing changed"
COMPLETE = "build listing complete"
TRUNCATED = (
    "build listing cut short at discovery.builds.max_pages before the window's end: its builds "
    "are tracked, none is removed; raise max_pages or shorten window"
)


def build(build_id: str, age: float, status: str = "BUILDING") -> Build:
    """A build created ``age`` seconds before NOW, as a listing item parses."""
    created = datetime.fromtimestamp(NOW - age, UTC).isoformat()
    return BUILD.validate_python({"id": build_id, "status": status, "createdAt": created})


def every_twenty_seconds(count: int) -> list[Build | None]:
    """``count`` builds, newest first: b0 just created, b1 20 s before, and so on."""
    return [build(f"b{index}", index * SPACING) for index in range(count)]


@dataclass
class FakeListing:
    """The build listing as a script: items in the API's order (None: an item that is no
    build), a total or none (or one off by ``total_skew``), a server cap on the page size, an
    offset ignored (every page is the first), failures by offset, and a hook run after each
    answer (builds arriving between pages)."""

    items: list[Build | None]
    with_total: bool = True
    cap: int | None = None
    state_limit: bool = True
    ignore_offset: bool = False
    total_skew: int = 0
    faults: dict[int, Answer[BuildPage]] = field(default_factory=dict)
    after_request: Callable[[FakeListing], None] | None = None
    requests: list[tuple[int, int, str]] = field(default_factory=list)

    @property
    def offsets(self) -> list[int]:
        return [offset for offset, _, _ in self.requests]

    async def list_builds(self, *, offset: int, limit: int, team_id: str = "") -> Answer[BuildPage]:
        self.requests.append((offset, limit, team_id))
        try:
            if offset in self.faults:
                return self.faults[offset]
            served = min(limit, self.cap) if self.cap is not None else limit
            start = 0 if self.ignore_offset else offset
            chunk = self.items[start : start + served]
            builds = tuple(item for item in chunk if item is not None)
            page = BuildPage(
                builds=builds,
                skipped=len(chunk) - len(builds),
                total=max(0, len(self.items) + self.total_skew) if self.with_total else None,
                offset=offset,
                limit=served if self.state_limit else None,
            )
            return Answer(Outcome.OK, page)
        finally:
            if self.after_request is not None:
                self.after_request(self)


class FakeSlots:
    """The budget's side: every slot taken is given back, with its answer."""

    def __init__(self) -> None:
        self.taken = 0
        self.answers: list[Answer[BuildPage] | None] = []

    async def listing_slot(self) -> None:
        self.taken += 1

    def listing_done(self, result: Answer[BuildPage] | None) -> None:
        self.answers.append(result)


class Sink:
    """The poller side: what each applied pass gave it."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], bool]] = []
        self.builds: list[Build] = []
        self.holds: list[float] = []

    def listed(self, builds: Sequence[Build], *, complete: bool, hold: float) -> None:
        self.calls.append(([build.id for build in builds], complete))
        self.holds.append(hold)
        self.builds = list(builds)


@dataclass
class Setup:
    listing: FakeListing
    discovery: BuildDiscovery
    sink: Sink
    slots: FakeSlots
    telemetry: Telemetry
    clock: DrivenClock


def setup(
    listing: FakeListing,
    *,
    window: float = HOUR,
    max_pages: int = 100,
    team_id: str = "",
    owns: Callable[[str], bool] = lambda _: True,
) -> Setup:
    clock = DrivenClock(start=NOW)
    telemetry = Telemetry(clock.monotonic)
    sink = Sink()
    slots = FakeSlots()
    settings = BuildDiscoverySettings.model_validate(
        {
            "enabled": True,
            "window": format_duration(window),
            "max_pages": max_pages,
            "team_id": team_id,
        }
    )
    discovery = BuildDiscovery(
        lambda: listing,
        slots,
        sink,
        telemetry,
        settings,
        owns=owns,
        wall_clock=clock.wall,
        clock=clock,
    )
    return Setup(listing, discovery, sink, slots, telemetry, clock)


def one_pass(test: Setup) -> PassResult:
    return asyncio.run(test.discovery.list_once())


def newest(count: int) -> list[str]:
    return [f"b{index}" for index in range(count)]


# --- the order, and where a pass stops -----------------------------------------------------------


def test_newest_first_stops_at_the_first_page_that_reaches_past_the_window() -> None:
    test = setup(FakeListing(every_twenty_seconds(1000)))
    result = one_pass(test)
    # Page 2 holds b100 to b199: b181 and older are outside the hour, so no page 3 is read.
    assert test.listing.offsets == [0, 100]
    assert all(limit == PAGE_LIMIT for _, limit, _ in test.listing.requests)
    assert (result.order, result.pages, result.reason) == (Order.NEWEST_FIRST, 2, None)
    assert test.sink.calls == [(newest(IN_AN_HOUR), True)]


def test_oldest_first_with_a_total_reads_from_the_end_backwards() -> None:
    test = setup(FakeListing(list(reversed(every_twenty_seconds(1000)))))
    result = one_pass(test)
    # Page 1 shows the order; then the newest 100 (b99..b0), and b199..b100, which reaches
    # past the hour: 3 pages of 10.
    assert test.listing.offsets == [0, 900, 800]
    assert result.order is Order.OLDEST_FIRST
    assert sorted(test.sink.calls[0][0]) == sorted(newest(IN_AN_HOUR))
    assert test.sink.calls[0][1] is True


def test_oldest_first_from_the_end_stops_at_the_pages_read_from_the_front() -> None:
    test = setup(FakeListing(list(reversed(every_twenty_seconds(250)))), window=24 * HOUR)
    one_pass(test)
    # Everything is within the day: the pages from the end meet page 1, overlapping it once.
    assert test.listing.offsets == [0, 150, 100]
    assert sorted(test.sink.calls[0][0]) == sorted(newest(250))


def test_oldest_first_without_a_total_reads_until_an_empty_page() -> None:
    test = setup(FakeListing(list(reversed(every_twenty_seconds(250))), with_total=False))
    result = one_pass(test)
    # The page at 200 holds only 50 builds, which does not end the listing; the empty one does.
    assert test.listing.offsets == [0, 100, 200, 250]
    assert (result.order, result.pages, result.reason) == (Order.OLDEST_FIRST, 4, None)
    assert sorted(test.sink.calls[0][0]) == sorted(newest(IN_AN_HOUR))


def test_without_an_order_or_a_total_the_pass_reads_until_an_empty_page() -> None:
    same_moment: list[Build | None] = [build(f"b{index}", 60.0) for index in range(230)]
    test = setup(FakeListing(same_moment, with_total=False))
    result = one_pass(test)
    assert test.listing.offsets == [0, 100, 200, 230]
    assert (result.order, result.reason) == (None, None)
    assert test.sink.calls == [(newest(230), True)]


def test_a_total_ends_the_pass_without_asking_for_an_empty_page() -> None:
    same_moment: list[Build | None] = [build(f"b{index}", 60.0) for index in range(230)]
    test = setup(FakeListing(same_moment))
    one_pass(test)
    assert test.listing.offsets == [0, 100, 200]


def test_an_empty_listing_is_a_complete_pass_of_no_builds() -> None:
    test = setup(FakeListing([]))
    result = one_pass(test)
    assert test.listing.offsets == [0]
    assert (result.pages, result.reason, test.sink.calls) == (1, None, [([], True)])
    snapshot = test.telemetry.snapshot()
    assert (snapshot.build_list_last_success, snapshot.build_list_pages) == (NOW, 1)


def test_a_capped_page_size_does_not_end_the_pass_and_the_next_page_follows_it() -> None:
    test = setup(FakeListing(every_twenty_seconds(1000), cap=40))
    one_pass(test)
    # 40 builds a page: b160..b199 is the first page to reach past the hour.
    assert test.listing.offsets == [0, 40, 80, 120, 160]
    assert test.sink.calls == [(newest(IN_AN_HOUR), True)]


def test_a_capped_page_size_learned_from_page_one_sizes_the_pages_read_from_the_end() -> None:
    listing = FakeListing(list(reversed(every_twenty_seconds(1000))), cap=40, state_limit=False)
    test = setup(listing)
    one_pass(test)
    assert test.listing.offsets == [0, 960, 920, 880, 840, 800]
    assert sorted(test.sink.calls[0][0]) == sorted(newest(IN_AN_HOUR))


def test_a_server_that_starts_capping_mid_pass_leaves_no_gap_at_the_end() -> None:
    def cap_after_page_one(listing: FakeListing) -> None:
        listing.cap = 50

    listing = FakeListing(
        list(reversed(every_twenty_seconds(1000))), after_request=cap_after_page_one
    )
    test = setup(listing)
    one_pass(test)
    # The page at 900 comes back with 50 builds: the last 50 are read before going down.
    assert test.listing.offsets == [0, 900, 950, 900, 850, 800]
    assert sorted(test.sink.calls[0][0]) == sorted(newest(IN_AN_HOUR))


def test_a_build_seen_on_two_pages_is_given_once_with_its_later_answer() -> None:
    def a_build_arrives(listing: FakeListing) -> None:
        if len(listing.requests) == 1:
            # b99, at the end of page 1, is pushed to the start of page 2, finished meanwhile.
            listing.items[99] = build("b99", 99 * SPACING, status="COMPLETED")
            listing.items.insert(0, build("new", 0.0))

    test = setup(FakeListing(every_twenty_seconds(1000), after_request=a_build_arrives))
    one_pass(test)
    ids = test.sink.calls[0][0]
    assert len(ids) == len(set(ids)) == IN_AN_HOUR
    [b99] = [listed for listed in test.sink.builds if listed.id == "b99"]
    assert b99.status == "COMPLETED"


# --- what reaches the sink -----------------------------------------------------------------------


def test_builds_outside_the_window_are_left_out_wherever_they_are_listed() -> None:
    items = every_twenty_seconds(250)
    # An old build out of place on page 1: the order is still newest first.
    items[50] = build("old", HOUR + 1)
    test = setup(FakeListing(items))
    one_pass(test)
    # Page 1 already reaches past the hour, so it is the last page read.
    assert test.listing.offsets == [0]
    assert test.sink.calls == [([f"b{index}" for index in range(100) if index != 50], True)]
    oldest_first = setup(FakeListing(list(reversed(every_twenty_seconds(250))), with_total=False))
    one_pass(oldest_first)
    assert oldest_first.listing.offsets == [0, 100, 200, 250]
    # b181..b249 were read, and are older than the hour.
    assert sorted(oldest_first.sink.calls[0][0]) == sorted(newest(IN_AN_HOUR))


def test_items_that_are_no_build_are_counted_and_do_not_end_the_pass() -> None:
    items = every_twenty_seconds(150)
    items[10] = None
    items[120] = None
    test = setup(FakeListing(items))
    result = one_pass(test)
    assert test.listing.offsets == [0, 100]
    assert result.skipped == 2
    assert len(test.sink.calls[0][0]) == 148


def test_an_id_the_build_id_rule_refuses_is_skipped_and_told_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    items = every_twenty_seconds(10)
    items[3] = build("../etc", 60.0)
    items[4] = build("a b", 80.0)
    test = setup(FakeListing(items))
    with caplog.at_level(logging.DEBUG, logger="exporter.build_discovery"):
        first = one_pass(test)
        one_pass(test)
    assert first.skipped == 2
    assert "../etc" not in test.sink.calls[0][0]
    assert len(test.sink.calls[0][0]) == 8
    told = [record for record in caplog.records if "build-ID rule" in record.getMessage()]
    assert [record.levelno for record in told] == [logging.INFO, logging.DEBUG]
    assert told[0].__dict__["count"] == 2
    assert told[0].__dict__["build_ids"] == "'../etc','a b'"


def test_only_this_replicas_share_reaches_the_sink() -> None:
    def even(build_id: str) -> bool:
        return int(build_id.removeprefix("b")) % 2 == 0

    test = setup(FakeListing(every_twenty_seconds(150)), owns=even)
    one_pass(test)
    # Every replica reads the same pages, and keeps its own share.
    assert test.listing.offsets == [0, 100]
    assert test.sink.calls == [([f"b{index}" for index in range(0, 150, 2)], True)]


def test_a_team_is_sent_with_every_page_and_only_when_set() -> None:
    test = setup(FakeListing(every_twenty_seconds(150)), team_id="team-1")
    one_pass(test)
    assert [team for _, _, team in test.listing.requests] == ["team-1", "team-1"]
    plain = setup(FakeListing(every_twenty_seconds(10)))
    one_pass(plain)
    assert [team for _, _, team in plain.listing.requests] == [""]


def test_every_page_takes_a_slot_of_the_budget_and_is_counted_under_build_list() -> None:
    test = setup(FakeListing(every_twenty_seconds(1000)))
    one_pass(test)
    assert test.slots.taken == 2
    assert [answer.outcome for answer in test.slots.answers if answer] == [Outcome.OK] * 2
    snapshot = test.telemetry.snapshot()
    assert snapshot.requests_by_endpoint[BUILD_LIST_ENDPOINT][Outcome.OK] == 2
    assert snapshot.request_durations_by_endpoint[BUILD_LIST_ENDPOINT].count == 2


# --- cut short, failed ---------------------------------------------------------------------------


def test_a_pass_cut_short_by_max_pages_is_applied_removing_nothing_and_flagged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    test = setup(FakeListing(every_twenty_seconds(1000)), max_pages=1)
    with caplog.at_level(logging.DEBUG, logger="exporter.build_discovery"):
        result = one_pass(test)
        one_pass(test)
    assert test.listing.offsets == [0, 0]
    assert (result.reason, result.applied, result.complete) == ("truncated", True, False)
    assert test.sink.calls == [(newest(100), False)] * 2
    snapshot = test.telemetry.snapshot()
    assert snapshot.build_list_last_error == "truncated"
    # No complete pass yet: nothing to say of one.
    assert (snapshot.build_list_last_success, snapshot.build_list_pages) == (None, 0)
    told = [record for record in caplog.records if record.getMessage() == TRUNCATED]
    assert [record.levelno for record in told] == [logging.WARNING, logging.DEBUG]


@pytest.mark.parametrize(
    ("items", "with_total", "offsets"),
    [
        pytest.param(every_twenty_seconds(1000), True, [0, 100], id="newest-first"),
        pytest.param(every_twenty_seconds(1000), False, [0, 100], id="newest-first-no-total"),
        # Page one shows the order, then the pass reads from the end: the same page again.
        pytest.param(list(reversed(every_twenty_seconds(1000))), True, [0, 900], id="oldest-first"),
        pytest.param(
            [build(f"b{index}", 60.0) for index in range(1000)], False, [0, 100], id="no-order"
        ),
    ],
)
def test_a_listing_that_ignores_offset_stops_at_the_repeated_page_removing_nothing(
    items: list[Build | None], with_total: bool, offsets: list[int]
) -> None:
    listing = FakeListing(items, with_total=with_total, ignore_offset=True)
    test = setup(listing, window=24 * HOUR, max_pages=10_000)
    result = one_pass(test)
    # Two requests, not max_pages: the second page is the first again.
    assert test.listing.offsets == offsets
    assert (result.reason, result.applied, result.complete) == ("repeated_page", True, False)
    [(ids, complete)] = test.sink.calls
    assert not complete
    assert sorted(ids) == sorted(build.id for build in items[:100] if build is not None)
    assert test.telemetry.snapshot().build_list_last_error == "repeated_page"
    assert test.telemetry.snapshot().build_list_last_success is None


def test_a_page_that_reaches_past_the_window_completes_the_pass_even_if_offset_is_ignored() -> None:
    # One build a minute: everything the hour holds is on page one, so no second page is needed.
    items: list[Build | None] = [build(f"b{index}", index * 60.0) for index in range(1000)]
    test = setup(FakeListing(items, ignore_offset=True))
    result = one_pass(test)
    assert test.listing.offsets == [0]
    assert result.reason is None


@pytest.mark.parametrize(
    ("skew", "offsets"),
    [pytest.param(-1, [0, 100, 200], id="one-short"), pytest.param(-200, [0], id="page-one-over")],
)
def test_a_listing_with_more_builds_than_its_total_stops_there_removing_nothing(
    skew: int, offsets: list[int]
) -> None:
    test = setup(FakeListing(every_twenty_seconds(250), total_skew=skew), window=24 * HOUR)
    result = one_pass(test)
    # 249 says page three is over; 50 says page one is.
    assert test.listing.offsets == offsets
    assert (result.reason, result.applied, result.complete) == ("over_total", True, False)
    assert test.sink.calls[0][1] is False
    assert test.telemetry.snapshot().build_list_last_error == "over_total"


def test_builds_arriving_and_leaving_between_pages_are_no_cut() -> None:
    def churn(listing: FakeListing) -> None:
        # Two new builds at the front, the oldest gone: the pages shift under the pass, and
        # it reads more items than page one's total said.
        listing.items[:0] = [build(f"new{len(listing.requests)}-{n}", 0.0) for n in range(2)]
        del listing.items[-1:]

    test = setup(FakeListing(every_twenty_seconds(250), after_request=churn), window=24 * HOUR)
    result = one_pass(test)
    assert test.listing.offsets == [0, 100, 200]
    assert result.reason is None
    assert test.sink.calls[0][1] is True


@pytest.mark.parametrize(
    ("listing", "message", "told"),
    [
        pytest.param(
            FakeListing(every_twenty_seconds(1000), ignore_offset=True),
            "ignores offset",
            ("its builds are tracked, none is removed", "api.base_url"),
            id="repeated-page",
        ),
        pytest.param(
            FakeListing(every_twenty_seconds(1000), total_skew=-999),
            "more builds than its total_count",
            ("its builds are tracked, none is removed", "api.base_url"),
            id="over-total",
        ),
    ],
)
def test_a_cut_pass_is_warned_about_once_with_what_to_do_until_a_pass_completes(
    caplog: pytest.LogCaptureFixture, listing: FakeListing, message: str, told: tuple[str, ...]
) -> None:
    test = setup(listing, window=24 * HOUR)
    with caplog.at_level(logging.DEBUG, logger="exporter.build_discovery"):
        for _ in range(2):
            one_pass(test)
        listing.ignore_offset, listing.total_skew = False, 0
        one_pass(test)
        assert test.telemetry.snapshot().build_list_last_error is None
    cuts = [record for record in caplog.records if message in record.getMessage()]
    assert [record.levelno for record in cuts] == [logging.WARNING, logging.DEBUG]
    for what in told:
        assert what in cuts[0].getMessage()


def test_max_pages_reached_at_the_windows_end_is_a_complete_pass() -> None:
    test = setup(FakeListing(every_twenty_seconds(1000)), max_pages=2)
    result = one_pass(test)
    assert (result.reason, test.sink.calls[0][1]) == (None, True)


def test_max_pages_also_bounds_the_pages_read_from_the_end() -> None:
    test = setup(FakeListing(list(reversed(every_twenty_seconds(1000)))), max_pages=2)
    result = one_pass(test)
    assert test.listing.offsets == [0, 900]
    assert result.reason == "truncated"
    assert sorted(test.sink.calls[0][0]) == sorted(newest(100))
    assert test.sink.calls[0][1] is False


def test_a_pass_that_fails_on_page_two_gives_the_sink_nothing_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listing = FakeListing(
        every_twenty_seconds(1000),
        faults={100: Answer(Outcome.SERVER_ERROR, detail="HTTP 503")},
    )
    test = setup(listing)
    with caplog.at_level(logging.WARNING, logger="exporter.build_discovery"):
        result = one_pass(test)
    assert test.listing.offsets == [0, 100]
    assert (result.reason, result.applied, result.builds) == ("server_error", False, ())
    assert test.sink.calls == []
    snapshot = test.telemetry.snapshot()
    assert snapshot.build_list_last_error == "server_error"
    assert snapshot.build_list_last_success is None
    [record] = caplog.records
    assert record.getMessage() == FAILED
    assert (record.__dict__["page"], record.__dict__["detail"]) == (2, "HTTP 503")


def test_a_complete_pass_after_a_failed_one_clears_the_error() -> None:
    listing = FakeListing(
        every_twenty_seconds(1000), faults={0: Answer(Outcome.TIMEOUT, detail="slow")}
    )
    test = setup(listing)
    one_pass(test)
    assert test.telemetry.snapshot().build_list_last_error == "timeout"
    listing.faults.clear()
    test.clock.advance(30)
    one_pass(test)
    snapshot = test.telemetry.snapshot()
    assert snapshot.build_list_last_error is None
    assert (snapshot.build_list_last_success, snapshot.build_list_pages) == (NOW + 30, 2)


def test_an_api_without_the_listing_is_unavailable_and_told_once_until_it_serves_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    not_found: Answer[BuildPage] = Answer(
        Outcome.NOT_FOUND, detail="HTTP 404 for /api/v1/images/builds"
    )
    listing = FakeListing(every_twenty_seconds(10), faults={0: not_found})
    test = setup(listing)
    with caplog.at_level(logging.DEBUG, logger="exporter.build_discovery"):
        results = [one_pass(test) for _ in range(3)]
        listing.faults.clear()
        one_pass(test)
        listing.faults[0] = not_found
        one_pass(test)
    # One request each time: trying again is cheap.
    assert test.listing.offsets == [0] * 5
    assert [result.reason for result in results] == ["unavailable"] * 3
    assert test.telemetry.snapshot().build_list_last_error == "unavailable"
    told = [record for record in caplog.records if record.getMessage() == UNAVAILABLE]
    assert [record.levelno for record in told] == [
        logging.WARNING,
        logging.DEBUG,
        logging.DEBUG,
        logging.WARNING,
    ]
    assert test.sink.calls == [(newest(10), True)]


def test_a_refused_team_is_told_once_with_what_to_do(caplog: pytest.LogCaptureFixture) -> None:
    refused: Answer[BuildPage] = Answer(Outcome.CLIENT_ERROR, detail="HTTP 422")
    test = setup(FakeListing(every_twenty_seconds(10), faults={0: refused}), team_id="team-1")
    with caplog.at_level(logging.DEBUG, logger="exporter.build_discovery"):
        one_pass(test)
        one_pass(test)
        test.discovery.update(test.discovery.settings.model_copy(update={"window": 2 * HOUR}))
        one_pass(test)
    told = [record for record in caplog.records if "refused teamId" in record.getMessage()]
    # New settings are told again.
    assert [record.levelno for record in told] == [logging.WARNING, logging.DEBUG, logging.WARNING]
    assert "remove discovery.builds.team_id" in told[0].getMessage()
    assert test.telemetry.snapshot().build_list_last_error == "client_error"
    assert test.sink.calls == []


def test_a_client_error_without_a_team_is_an_ordinary_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refused: Answer[BuildPage] = Answer(Outcome.CLIENT_ERROR, detail="HTTP 422")
    test = setup(FakeListing(every_twenty_seconds(10), faults={0: refused}))
    with caplog.at_level(logging.WARNING, logger="exporter.build_discovery"):
        one_pass(test)
        one_pass(test)
    assert [record.getMessage() for record in caplog.records] == [FAILED, FAILED]


def told(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str, dict[str, object]]]:
    """The level, message and fields of each complete pass told so far."""
    fields = ("builds", "team_id", "previous_builds", "previous_team_id", "listed")
    return [
        (
            record.levelno,
            record.getMessage(),
            {name: getattr(record, name) for name in fields if hasattr(record, name)},
        )
        for record in caplog.records
        if record.getMessage() == COMPLETE or "holds no build" in record.getMessage()
    ]


def test_a_pass_is_told_when_its_team_or_its_size_changes_and_never_when_unchanged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listing = FakeListing(every_twenty_seconds(10))
    test = setup(listing)
    with caplog.at_level(logging.DEBUG, logger="exporter.build_discovery"):
        one_pass(test)
        one_pass(test)
        listing.items.insert(0, build("new", 0))
        one_pass(test)
        one_pass(test)
        test.discovery.update(test.discovery.settings.model_copy(update={"team_id": "team-1"}))
        one_pass(test)
        one_pass(test)
    assert told(caplog) == [
        (logging.INFO, COMPLETE, {"builds": 10, "team_id": ""}),
        (
            logging.INFO,
            COMPLETE,
            {"builds": 11, "team_id": "", "previous_builds": 10, "previous_team_id": ""},
        ),
        (
            logging.INFO,
            COMPLETE,
            {"builds": 11, "team_id": "team-1", "previous_builds": 11, "previous_team_id": ""},
        ),
    ]


def test_a_named_team_with_no_build_in_the_window_is_warned_about_once_with_what_to_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Five builds, all created before the hour's window.
    old = [build(f"old{index}", 2 * HOUR + index) for index in range(5)]
    test = setup(FakeListing(list(old)), team_id="team-1")
    with caplog.at_level(logging.DEBUG, logger="exporter.build_discovery"):
        one_pass(test)
        one_pass(test)
    [(level, message, fields)] = told(caplog)
    assert level == logging.WARNING
    assert fields == {"builds": 0, "team_id": "team-1", "listed": 5}
    for what in ("discovery.builds.team_id", "PRIME_TEAM_ID", "member", "discovery.builds.window"):
        assert what in message


def test_an_empty_pass_without_a_team_is_told_as_any_other(
    caplog: pytest.LogCaptureFixture,
) -> None:
    test = setup(FakeListing([]))
    with caplog.at_level(logging.DEBUG, logger="exporter.build_discovery"):
        one_pass(test)
    assert told(caplog) == [(logging.INFO, COMPLETE, {"builds": 0, "team_id": ""})]


# --- the loop ------------------------------------------------------------------------------------


def test_a_pass_runs_every_interval_after_the_previous_and_at_once_on_new_settings() -> None:
    test = setup(FakeListing(every_twenty_seconds(10)))

    async def scenario() -> None:
        task = asyncio.create_task(test.discovery.run())
        try:
            await passes(1)
            assert test.clock.deadlines() == [30.0]
            test.clock.advance(29)
            await settle()
            assert len(test.sink.calls) == 1
            test.clock.advance(1)
            await passes(2)
            test.discovery.update(test.discovery.settings.model_copy(update={"max_pages": 5}))
            await passes(3)
            # The same settings again change nothing.
            test.discovery.update(test.discovery.settings.model_copy())
            await settle()
            assert len(test.sink.calls) == 3
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    async def settle() -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def passes(count: int) -> None:
        for _ in range(1000):
            if len(test.sink.calls) >= count and test.clock.deadlines():
                break
            await asyncio.sleep(0)
        assert len(test.sink.calls) == count

    asyncio.run(scenario())


def test_a_pass_answers_for_its_builds_until_the_next_pass_is_an_interval_overdue() -> None:
    # Each page takes 5 s (the budget's pace): three pages and the empty one that ends the pass
    # take 20 s, and the next pass starts 30 s after this one ends and takes about as long.
    listing = FakeListing(every_twenty_seconds(250), with_total=False)
    test = setup(listing, window=24 * HOUR)
    listing.after_request = lambda _: test.clock.advance(5)
    one_pass(test)
    assert len(listing.requests) == 4
    assert test.sink.holds == [2 * 30 + 2 * 20]
