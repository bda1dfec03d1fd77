"""The status page at ``/``: every tracked build in a small HTML table, API strings escaped."""

from __future__ import annotations

import html

from exporter import __version__
from exporter.models import Build
from exporter.store import BuildRecord, BuildState, Snapshot

STATUS_PAGE_MAX_ROWS = 1000

_STATE_ORDER = {
    BuildState.FAILING: 0,
    BuildState.ACTIVE: 1,
    BuildState.UNPOLLED: 2,
    BuildState.FINISHED: 3,
}


def render_status_page(
    snapshot: Snapshot, now: float, requests_per_second: float | None = None
) -> str:
    """A small HTML page listing every tracked build; all API strings escaped."""
    records = sorted(
        snapshot.records.values(), key=lambda record: (_STATE_ORDER[record.state], record.build_id)
    )
    rows = "\n".join(_status_row(record, now) for record in records[:STATUS_PAGE_MAX_ROWS])
    hidden = len(records) - STATUS_PAGE_MAX_ROWS
    more = f"<p>and {hidden} more builds, see /metrics.</p>" if hidden > 0 else ""
    counts = dict.fromkeys(BuildState, 0)
    for record in records:
        counts[record.state] += 1
    summary = ", ".join(f"{count} {state.value}" for state, count in counts.items())
    budget = (
        ""
        if requests_per_second is None
        else f" Request budget of this replica: {requests_per_second:g} per second."
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Prime Intellect build exporter</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
.failing {{ background: #fdd; }}
</style></head>
<body>
<h1>Prime Intellect build exporter</h1>
<p>Version {html.escape(__version__)}. Tracking {len(records)} builds: {summary}.{budget}</p>
<ul>
<li><a href="/metrics">Metrics</a></li>
<li><a href="/-/healthy">Health</a></li>
<li><a href="/-/ready">Readiness</a></li>
</ul>
<table>
<thead><tr><th>Build ID</th><th>Image</th><th>Tag</th><th>Status</th><th>Age</th>
<th>Last poll</th><th>Error</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
{more}
</body>
</html>
"""


def _status_row(record: BuildRecord, now: float) -> str:
    build = record.build
    if not record.polled:
        poll = "not yet"
    elif record.last_poll_ok:
        poll = "ok"
    else:
        poll = record.last_error.value if record.last_error else "failed"
    cells = [
        record.build_id,
        build.image_name if build else "",
        build.image_tag if build else "",
        build.status if build else "",
        _age(now - build.created_at) if build else "",
        poll,
        _error_of(build) if build else "",
    ]
    css = ' class="failing"' if record.state is BuildState.FAILING else ""
    return f"<tr{css}>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>"


def _error_of(build: Build) -> str:
    # The build's own message, else each artifact's: what a FAILED build failed with.
    if build.error_message:
        return build.error_message
    return "; ".join(
        f"{artifact.id}: {artifact.error_message}"
        for artifact in build.artifacts
        if artifact.error_message
    )


def _age(seconds: float) -> str:
    days, rest = divmod(max(0, int(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds_left = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{seconds_left}s"
    return f"{seconds_left}s"
