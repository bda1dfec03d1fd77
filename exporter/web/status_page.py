"""The status page at ``/`` and a page per build at ``/build/{id}``: what is wrong right now,
problems first. Plain HTML from one snapshot: no script, nothing loaded from elsewhere, every
API string escaped; it refreshes itself with a meta refresh and filters with a GET form."""

from __future__ import annotations

import base64
import enum
import hashlib
import html
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from exporter import __version__
from exporter.config.wording import counted
from exporter.models import BUILD_STATUSES, Artifact, Build, ImageRow, Outcome
from exporter.store import BuildRecord, Inventory, Snapshot
from exporter.telemetry import TelemetrySnapshot

STATUS_PAGE_MAX_ROWS = 1000
# The shipped alert rules' defaults: stuck after an hour in one status, data stale after ten
# minutes without a successful poll.
STUCK_AFTER_SECONDS = 3600.0
STALE_AFTER_SECONDS = 600.0
DEFAULT_REFRESH_SECONDS = 30
SORTS = ("problems", "build", "image", "status", "created")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em; color: #111; }
h1 { font-size: 1.4em; overflow-wrap: anywhere; }
.summary { font-size: 1.05em; list-style: none; padding: 0; display: flex; flex-wrap: wrap;
  gap: 0.3em 0.6em; }
.summary li + li::before { content: "·"; margin-right: 0.6em; color: #777; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top;
  overflow-wrap: anywhere; }
th, td.time, td.poll { overflow-wrap: normal; }
th a { color: inherit; }
select { max-width: 16em; }
/* API strings break anywhere, but not below a width their usual values fit in. */
td.name { min-width: 6.5em; }
td.id { min-width: 10em; }
td.status { min-width: 6.5em; }
td.kind { min-width: 11em; }
td.error { min-width: 12em; }
td.name .quiet { display: block; }
.badge { font-weight: 600; white-space: nowrap; }
.bad { background: #fde2e2; }
.warn { background: #fff4d6; }
.good { background: #e6f4ea; }
.quiet { color: #555; }
form { margin: 0.8em 0; display: flex; flex-wrap: wrap; gap: 0.6em; align-items: end; }
code { overflow-wrap: anywhere; }
@media (max-width: 40em) {
  body { margin: 0.5em; }
  th, td { padding: 0.2em 0.3em; font-size: 0.9em; }
  #builds thead, #builds .wide, #builds td:empty,
  #images thead, #images .wide, #images td:empty { display: none; }
  #builds tr, #images tr { display: block; border: 1px solid #ccc; margin-bottom: 0.5em; }
  #builds td, #images td { display: block; border: none; }
  #builds td::before, #images td::before { content: attr(data-label) ": "; font-weight: 600; }
}
"""
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
# Nothing from elsewhere, no script at all; only the page's own style block and forms to
# itself.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)

_OUTCOME_DETAIL = {
    Outcome.OK: "the API answered",
    Outcome.NOT_FOUND: "the API answered 404: no such build",
    Outcome.UNAUTHORIZED: "the API refused the key (401)",
    Outcome.FORBIDDEN: "the API refused this build to the key (403)",
    Outcome.RATE_LIMITED: "the API answered 429: rate-limited",
    Outcome.CLIENT_ERROR: "the API answered another 4xx",
    Outcome.SERVER_ERROR: "the API answered 5xx",
    Outcome.TIMEOUT: "the request timed out",
    Outcome.CONNECTION_ERROR: "the API could not be reached",
    Outcome.INVALID_RESPONSE: "the answer was not a valid build",
}


class Problem(enum.Enum):
    """What is wrong with a build, most urgent first; its marker is text, not colour alone."""

    FAILED = (0, "✖ FAILED", "bad")
    STUCK = (1, "⏳ stuck", "warn")
    POLL_FAILING = (2, "⚠ poll failing", "bad")
    STALE = (3, "⌛ stale", "warn")
    NONE = (9, "", "")

    @property
    def rank(self) -> int:
        return self.value[0]

    @property
    def marker(self) -> str:
        return self.value[1]

    @property
    def css(self) -> str:
        return self.value[2]


def problem_of(record: BuildRecord, now: float) -> Problem:
    """The most urgent problem of one build at ``now``."""
    build = record.build
    if build is not None and build.status == "FAILED":
        return Problem.FAILED
    if build is not None and not build.finished:
        since = build.created_at if build.status == "PENDING" else build.started_at
        in_progress = build.status in {"PENDING", "UPLOADING", "BUILDING"}
        if in_progress and since is not None and now - since > STUCK_AFTER_SECONDS:
            return Problem.STUCK
    if record.polled and not record.last_poll_ok:
        return Problem.POLL_FAILING
    last_success = record.last_success_time
    unfinished = build is not None and not build.finished
    if unfinished and last_success is not None and now - last_success > STALE_AFTER_SECONDS:
        return Problem.STALE
    return Problem.NONE


@dataclass(frozen=True)
class PageQuery:
    """The status page's filter, sort order and refresh period, from the URL's query."""

    image: str = ""
    status: str = ""
    sort: str = "problems"
    refresh: int = DEFAULT_REFRESH_SECONDS

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> PageQuery:
        """Read the query; a value out of its range falls back to the default."""
        status = params.get("status", "")
        if status not in {"", "problems", "UNKNOWN", *BUILD_STATUSES}:
            status = ""
        sort = params.get("sort", "problems")
        refresh = params.get("refresh", "")
        seconds = int(refresh) if refresh.isdigit() else DEFAULT_REFRESH_SECONDS
        return cls(
            image=params.get("image", "")[:256],
            status=status,
            sort=sort if sort in SORTS else "problems",
            refresh=min(max(seconds, 1), 3600),
        )

    def link(self, **changes: str) -> str:
        """This page's URL with some parameters changed, escaped for an attribute."""
        values = {"image": self.image, "status": self.status, "sort": self.sort}
        values.update(changes)
        values["refresh"] = str(self.refresh)
        kept = {key: value for key, value in values.items() if value}
        if kept.get("sort") == "problems":
            del kept["sort"]
        if kept.get("refresh") == str(DEFAULT_REFRESH_SECONDS):
            del kept["refresh"]
        return html.escape("/?" + urlencode(kept) if kept else "/")


@dataclass(frozen=True)
class PageContext:
    """What a page is rendered from: one snapshot of the builds and of the exporter."""

    snapshot: Snapshot
    telemetry: TelemetrySnapshot | None
    now: float
    requests_per_second: float | None = None
    # The scope's images (discovery.images), when on.
    inventory: Inventory | None = None


def render_status_page(context: PageContext, query: PageQuery) -> str:
    """The status page: a summary line, a filter, then the builds, problems first."""
    records = list(context.snapshot.records.values())
    problems = {record.build_id: problem_of(record, context.now) for record in records}
    shown = sorted(
        (record for record in records if _matches(record, problems[record.build_id], query)),
        key=_sort_key(query.sort, problems),
    )
    rows = "\n".join(
        _status_row(record, problems[record.build_id], context.now)
        for record in shown[:STATUS_PAGE_MAX_ROWS]
    )
    hidden = len(shown) - STATUS_PAGE_MAX_ROWS
    more = (
        f'<p class="quiet">and {counted(hidden, "more build")}: see /metrics.</p>'
        if hidden > 0
        else ""
    )
    headers = "".join(
        f"<th{' class=wide' if wide else ''}>"
        + (f'<a href="{query.link(sort=sort)}">{title}</a>' if sort else title)
        + "</th>"
        for title, sort, wide in (
            ("Build", "build", False),
            ("Image", "image", False),
            ("Tag", "", False),
            ("Status", "status", False),
            ("Created (UTC)", "created", True),
            ("Started", "", True),
            ("Completed", "", True),
            ("Queued", "", True),
            ("Duration", "", True),
            ("Last poll", "", False),
            ("Error", "", False),
        )
    )
    return _page(
        "Prime Intellect build exporter",
        query.refresh,
        f"""<ul class="summary">{_summary(context, records, problems)}</ul>
<p class="quiet">Version {html.escape(__version__)}. As of {_utc(context.now)}; refreshes
every {query.refresh} s. <a href="/metrics">Metrics</a> · <a href="/-/healthy">Health</a> ·
<a href="/-/ready">Readiness</a></p>
{_filter_form(records, query)}
<p>Showing {min(len(shown), STATUS_PAGE_MAX_ROWS)} of {counted(len(records), "build")}.</p>
<div class="scroll"><table id="builds">
<thead><tr>{headers}</tr></thead>
<tbody>
{rows}
</tbody>
</table></div>
{more}
{_images_section(context, query)}""",
    )


def _images_section(context: PageContext, query: PageQuery) -> str:
    inventory = context.inventory
    if inventory is None:
        return ""
    listed = (
        f"listed {_utc(inventory.listed_at)}"
        if inventory.listed_at is not None
        else "not listed yet"
    )
    failing = ""
    if inventory.last_error is not None:
        failing = (
            f' <span class="badge bad">✖ the latest listing failed: {inventory.last_error.value}'
            "</span> (the last complete one is shown)"
        )
    rows = sorted(
        (
            row
            for key, row in inventory.images.items()
            if (not query.image or key[0] == query.image)
            and (not query.status or query.status == "problems" or row.status_label == query.status)
            and (query.status != "problems" or row.status_label == "FAILED")
        ),
        key=lambda row: (row.status_label != "FAILED", -row.updated_at, row.image_name),
    )
    statuses = Counter(row.status_label for row in inventory.images.values())
    counts = ", ".join(f"{count} {status}" for status, count in sorted(statuses.items()))
    body = "\n".join(_image_row(row) for row in rows[:STATUS_PAGE_MAX_ROWS])
    images = counted(len(inventory.images), "image")
    return f"""<h2>Images of the scope</h2>
<p>{images} (name, tag and artifact type){": " + counts if counts else ""};
{listed}.{failing}</p>
<div class="scroll"><table id="images">
<thead><tr><th>Image</th><th>Tag</th><th>Type</th><th>Status</th><th class="wide">Created</th>
<th class="wide">Completed</th><th class="wide">Pushed</th><th class="wide">Size</th>
<th>Error</th></tr></thead>
<tbody>
{body}
</tbody>
</table></div>"""


def _image_row(row: ImageRow) -> str:
    failed = row.status_label == "FAILED"
    status = _badge(Problem.FAILED, "") if failed else html.escape(row.status)
    size = "" if row.size_bytes is None else f"{row.size_bytes / 1e6:.1f} MB"
    cells = (
        ("Image", "name", html.escape(row.image_name)),
        ("Tag", "name", html.escape(row.image_tag)),
        ("Type", "kind", html.escape(row.artifact_type)),
        ("Status", "status", status),
        ("Created", "wide time", _utc(row.created_at)),
        ("Completed", "wide time", _utc_after(row.completed_at, row.created_at)),
        ("Pushed", "wide time", _utc_after(row.pushed_at, row.created_at)),
        ("Size", "wide time", size),
        ("Error", "error", html.escape(row.error_message or "")),
    )
    return _table_row("bad" if failed else "", f'data-image="{html.escape(row.id)}"', cells)


def render_build_page(context: PageContext, build_id: str) -> str | None:
    """One build's page with every artifact, or None when the build is not tracked."""
    record = context.snapshot.records.get(build_id)
    if record is None:
        return None
    problem = problem_of(record, context.now)
    build = record.build
    selector = f'{{build_id="{_promql_string(build_id)}"}}'
    facts: list[tuple[str, str]] = [
        ("Build ID", html.escape(build_id)),
        ("Tracked", "listed by build discovery" if record.discovered else "in the configuration"),
        ("Problem", _badge(problem, "none")),
    ]
    artifacts = ""
    if build is not None:
        facts += [
            ("Image", html.escape(build.image_name)),
            ("Tag", html.escape(build.image_tag)),
            ("Status", html.escape(build.status)),
            ("Created", _utc(build.created_at)),
            ("Started", _utc(build.started_at)),
            ("Completed", _utc(build.completed_at)),
            ("Queued", _span(build.queued_seconds)),
            ("Duration", _duration(build, context.now)),
            ("Error", _error_cell_text(build)),
        ]
        artifacts = _artifact_table(build.artifacts)
    facts += [
        ("Last poll", _last_poll(record, context.now)),
        ("Last good answer", _utc(record.last_success_time) or "never"),
        ("Answer last changed", _utc(record.last_change_time)),
        ("In /metrics", f"<code>{html.escape(selector)}</code>"),
        (
            "In Prometheus",
            f"<code>primeintellect_image_build_status{html.escape(selector)} == 1</code>",
        ),
    ]
    rows = "\n".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in facts)
    return _page(
        f"Build {build_id}",
        DEFAULT_REFRESH_SECONDS,
        f"""<p><a href="/">All builds</a> · As of {_utc(context.now)}</p>
<div class="scroll"><table id="build">
{rows}
</table></div>
<h2>Artifacts</h2>
{artifacts or '<p class="quiet">No artifacts.</p>'}""",
    )


def _page(title: str, refresh: int, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{refresh}">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
{body}
</body>
</html>
"""


def _matches(record: BuildRecord, problem: Problem, query: PageQuery) -> bool:
    build = record.build
    if query.image and (build is None or build.image_name != query.image):
        return False
    if query.status == "problems":
        return problem is not Problem.NONE
    if query.status:
        return build is not None and build.status_label == query.status
    return True


def _sort_key(
    sort: str, problems: Mapping[str, Problem]
) -> Callable[[BuildRecord], tuple[Any, ...]]:
    def key(record: BuildRecord) -> tuple[Any, ...]:
        build = record.build
        image = build.image_name if build else ""
        status = build.status if build else ""
        created = -(build.created_at if build else 0.0)
        by = {
            "build": (record.build_id,),
            "image": (image, record.build_id),
            "status": (status, record.build_id),
            "created": (created, record.build_id),
        }
        return by.get(sort, (problems[record.build_id].rank, created, record.build_id))

    return key


def _summary(
    context: PageContext, records: list[BuildRecord], problems: Mapping[str, Problem]
) -> str:
    """The summary's items, each a list item: the page's style sets them apart."""
    statuses = Counter(record.build.status_label for record in records if record.build)
    unpolled = sum(1 for record in records if not record.polled)
    discovered = sum(1 for record in records if record.discovered)
    items = [counted(len(records), "build") + (f" ({discovered} discovered)" if discovered else "")]
    items += [f"{count} {html.escape(status)}" for status, count in sorted(statuses.items())]
    if unpolled:
        items.append(f"{unpolled} not yet polled")
    by_problem = Counter(problems.values())
    items += [
        f"Polls failing: {by_problem[Problem.POLL_FAILING]}",
        f"Stuck: {by_problem[Problem.STUCK]}",
        f"Stale: {by_problem[Problem.STALE]}",
        *_api_state(context, records),
    ]
    return "".join(f"<li>{item}</li>" for item in items)


def _api_state(context: PageContext, records: Iterable[BuildRecord]) -> list[str]:
    telemetry = context.telemetry
    refused = [
        record
        for record in records
        if record.polled and not record.last_poll_ok and record.last_error is Outcome.UNAUTHORIZED
    ]
    if refused:
        got = f"{counted(len(refused), 'build')} got 401"
        state = f'<span class="badge bad">✖ API key rejected</span> ({got})'
    elif telemetry is None or telemetry.api_up is None:
        state = '<span class="badge">API: no answer yet</span>'
    elif telemetry.api_up:
        state = '<span class="badge good">✔ API up</span>'
    else:
        state = '<span class="badge bad">✖ API down</span> (no usable answer for a minute)'
    items = [state]
    wall_until = _rate_limited_until(telemetry, context.now)
    if wall_until is not None:
        items.append(f'<span class="badge warn">⏸ rate-limited until {_utc(wall_until)}</span>')
    if context.requests_per_second is not None:
        items.append(f"Request budget of this replica: {context.requests_per_second:g} per second")
    return items


def _rate_limited_until(telemetry: TelemetrySnapshot | None, now: float) -> float | None:
    # The pause is kept as a Unix time (the metric's value); show it while it lasts.
    if telemetry is None or telemetry.rate_limited_until <= now:
        return None
    return telemetry.rate_limited_until


def _filter_form(records: list[BuildRecord], query: PageQuery) -> str:
    images = sorted({record.build.image_name for record in records if record.build})
    image_options = _options([("", "every image"), *((name, name) for name in images)], query.image)
    status_options = _options(
        [
            ("", "every status"),
            ("problems", "problems only"),
            *((status, status) for status in (*BUILD_STATUSES, "UNKNOWN")),
        ],
        query.status,
    )
    sort_options = _options([(sort, sort) for sort in SORTS], query.sort)
    return f"""<form method="get" action="/">
<label>Image <select name="image">{image_options}</select></label>
<label>Status <select name="status">{status_options}</select></label>
<label>Sort by <select name="sort">{sort_options}</select></label>
<input type="hidden" name="refresh" value="{query.refresh}">
<button type="submit">Show</button>
</form>"""


def _options(choices: Iterable[tuple[str, str]], selected: str) -> str:
    return "".join(
        f'<option value="{html.escape(value)}"{" selected" if value == selected else ""}>'
        f"{html.escape(label)}</option>"
        for value, label in choices
    )


def _status_row(record: BuildRecord, problem: Problem, now: float) -> str:
    build = record.build
    link = f'<a href="/build/{quote(record.build_id, safe="")}">{html.escape(record.build_id)}</a>'
    if record.discovered:
        link += ' <span class="quiet" title="listed by build discovery">discovered</span>'
    if build is None:
        cells = [link, "", "", _badge(problem, ""), "", "", "", "", "", _last_poll(record, now), ""]
    else:
        status = html.escape(build.status)
        # The badge says FAILED itself; any other problem is said beside the status.
        marker = "" if problem is Problem.NONE else _badge(problem, "")
        if problem is Problem.FAILED:
            status = ""
        cells = [
            link,
            html.escape(build.image_name),
            html.escape(build.image_tag),
            f"{marker} {status}".strip(),
            _utc(build.created_at),
            _utc_after(build.started_at, build.created_at),
            _utc_after(build.completed_at, build.created_at),
            _span(build.queued_seconds),
            _duration(build, now),
            _last_poll(record, now),
            _error_cell_text(build),
        ]
    columns = [(label, kind, cell) for (label, kind), cell in zip(_COLUMNS, cells, strict=True)]
    return _table_row(problem.css, f'data-build="{html.escape(record.build_id)}"', columns)


def _table_row(css: str, data: str, cells: Iterable[tuple[str, str, str]]) -> str:
    """One row of the builds or images table; each cell carries its column's label, which
    heads it on a phone, where rows become cards."""
    row_class = f' class="{css}"' if css else ""
    return (
        f"<tr{row_class} {data}>"
        + "".join(
            f'<td class="{kind}" data-label="{label}">{cell}</td>'
            if kind
            else f'<td data-label="{label}">{cell}</td>'
            for label, kind, cell in cells
        )
        + "</tr>"
    )


# Each cell's column and class in the builds table.
_COLUMNS = (
    ("Build", "name id"),
    ("Image", "name"),
    ("Tag", "name"),
    ("Status", "status"),
    ("Created", "wide time"),
    ("Started", "wide time"),
    ("Completed", "wide time"),
    ("Queued", "wide time"),
    ("Duration", "time"),
    ("Last poll", "poll"),
    ("Error", "error"),
)


def _badge(problem: Problem, none_text: str) -> str:
    if problem is Problem.NONE:
        return html.escape(none_text)
    return f'<span class="badge {problem.css}">{problem.marker}</span>'


def _last_poll(record: BuildRecord, now: float) -> str:
    if not record.polled or record.last_poll_time is None:
        return '<span class="quiet">not yet</span>'
    at = _utc_after(record.last_poll_time, now)
    if record.last_poll_ok:
        return f"✔ ok at {at}"
    outcome = record.last_error or Outcome.INVALID_RESPONSE
    # A failure that repeats is not stored again, so the time is when this failure began.
    return f"✖ {outcome.value} since {at}: {html.escape(_OUTCOME_DETAIL[outcome])}"


def _error_cell_text(build: Build) -> str:
    # What the build failed with, as its log line says it; the build page lists each artifact.
    return html.escape(build.failure_reason or "")


def _artifact_table(artifacts: Iterable[Artifact]) -> str:
    rows = "\n".join(
        "<tr>"
        + "".join(
            f"<td>{cell}</td>"
            for cell in (
                html.escape(artifact.id),
                html.escape(artifact.artifact_type),
                html.escape(artifact.status),
                f"<code>{html.escape(artifact.full_image_path or '')}</code>",
                _span(artifact.duration_seconds),
                html.escape(artifact.error_message or ""),
            )
        )
        + "</tr>"
        for artifact in artifacts
    )
    if not rows:
        return ""
    return f"""<div class="scroll"><table id="artifacts">
<thead><tr><th>Artifact</th><th>Type</th><th>Status</th><th>Image path</th><th>Duration</th>
<th>Error</th></tr></thead>
<tbody>
{rows}
</tbody>
</table></div>"""


def _duration(build: Build, now: float) -> str:
    if build.duration_seconds is not None:
        return _span(build.duration_seconds)
    if build.started_at is not None and not build.finished:
        return f"{_span(now - build.started_at)} so far"
    return ""


def _utc(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(timestamp))


def _utc_after(timestamp: float | None, reference: float) -> str:
    # The time alone when it falls on the day of ``reference``, which the row shows in full.
    if timestamp is None:
        return ""
    if time.gmtime(timestamp)[:3] == time.gmtime(reference)[:3]:
        return time.strftime("%H:%M:%SZ", time.gmtime(timestamp))
    return _utc(timestamp)


def _span(seconds: float | None) -> str:
    if seconds is None:
        return ""
    days, rest = divmod(max(0, int(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds_left = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {seconds_left}s"
    return f"{seconds_left}s"


def _promql_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
