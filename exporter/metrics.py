"""Metric families from store snapshots and telemetry, as prometheus_client families.

They are the reference for every byte of ``/metrics``: ``exporter.exposition`` renders them.
The build families are made from their declarations in ``exporter.families``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeGuard

from prometheus_client.core import (
    CounterMetricFamily,
    Exemplar,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from exporter import __version__
from exporter.families import (
    ANSWER,
    ARTIFACT,
    BUILD_FAMILIES,
    INFO,
    POLL,
    SHOWN,
    AnyBuildFamily,
    BuildFamily,
    Labelled,
    One,
    OneHot,
    S,
    Value,
    in_scope,
    shown_artifacts,
)
from exporter.health import (
    FINISHED_STATUSES,
    HEALTH_FAMILIES,
    HEALTH_LABELS,
    LAST_FINISHED_STATUS,
    HealthKey,
    ImageHealth,
)
from exporter.models import BUILD_STATUSES, UNKNOWN, Outcome
from exporter.store import (
    FINISHED_DURATION_BUCKETS,
    QUEUE_DURATION_BUCKETS,
    BuildRecord,
    Inventory,
    Snapshot,
)
from exporter.telemetry import Exemplar as TelemetryExemplar
from exporter.telemetry import Histogram, StateStatus, TelemetrySnapshot


def per_build_families(
    records: Iterable[BuildRecord], max_artifacts_per_build: int = 64
) -> list[Metric]:
    """The build families (``exporter.families``) of these builds; always the same families, in
    one order."""
    metrics = [_empty_family(family) for family in BUILD_FAMILIES]
    for record in records:
        # Past metrics.finished_build_retention: tracked, never polled, no series of its own.
        if record.retired:
            continue
        build = record.build
        shown = None if build is None else shown_artifacts(build.artifacts, max_artifacts_per_build)
        for family, metric in zip(BUILD_FAMILIES, metrics, strict=True):
            if in_scope(family, POLL):
                _add_samples(metric, family, POLL.values(record), record)
            elif build is None or shown is None:
                continue
            elif in_scope(family, ANSWER):
                _add_samples(metric, family, ANSWER.values(build), build)
            elif in_scope(family, SHOWN):
                _add_samples(metric, family, ANSWER.values(build), shown)
            elif in_scope(family, ARTIFACT):
                for artifact in shown.artifacts:
                    labels = (*ANSWER.values(build), *ARTIFACT.values(artifact))
                    _add_samples(metric, family, labels, artifact)
    return list(metrics)


def _empty_family(family: AnyBuildFamily) -> GaugeMetricFamily | InfoMetricFamily:
    if family.type == INFO:
        return InfoMetricFamily(family.name, family.documentation, labels=family.labels)
    return GaugeMetricFamily(family.name, family.documentation, labels=family.labels)


def _add_samples(
    metric: GaugeMetricFamily | InfoMetricFamily,
    family: BuildFamily[S],
    labels: tuple[str, ...],
    subject: S,
) -> None:
    """The samples ``family`` carries for one subject, named by ``labels`` (its scope's)."""
    samples = family.samples
    if isinstance(samples, Value):
        value = samples.of(subject)
        if value is not None:
            _add(metric, labels, value)
    elif isinstance(samples, One):
        _add(metric, labels, 1.0)
    elif isinstance(samples, Labelled):
        label = samples.of(subject)
        if label is not None:
            _add(metric, (*labels, label), 1.0)
    elif isinstance(samples, OneHot):
        current = samples.of(subject)
        for known in samples.values:
            _add(metric, (*labels, known), 1.0 if known == current else 0.0)
        if current not in samples.values:
            _add(metric, (*labels, current), 1.0)
    else:
        for outer, by_inner in samples.of(subject).items():
            for inner, count in by_inner.items():
                _add(metric, (*labels, outer, inner), float(count))


def _add(metric: GaugeMetricFamily | InfoMetricFamily, labels: Sequence[str], value: float) -> None:
    if isinstance(metric, InfoMetricFamily):
        metric.add_metric(labels, {})
    else:
        metric.add_metric(labels, value)


def summary_families(snapshot: Snapshot) -> list[Metric]:
    """Families about all builds together: finishes and starts seen, and builds by state.

    Sample: ``primeintellect_exporter_builds{state="failing"} 2.0``
    """
    return [*tally_families(snapshot), tracked_family(snapshot)]


def tally_families(snapshot: Snapshot) -> list[Metric]:
    """The finishes and starts seen, by image: every image the exporter knows (``images``, and
    those already counted) has each series, at 0 until it counts, so that the first finish or
    start is an increase ``rate()`` and ``increase()`` see.

    Sample: ``primeintellect_image_builds_finished_total{image_name="app",status="FAILED"} 0.0``
    """
    finished = CounterMetricFamily(
        "primeintellect_image_builds_finished",
        "Builds seen to finish (unfinished at an earlier poll), each counted once, across restarts"
        " with state.path.",
        labels=("image_name", "status"),
    )
    finished_durations = HistogramMetricFamily(
        "primeintellect_image_builds_finished_duration_seconds",
        "Durations of the builds seen to finish, each observed once, across restarts with"
        " state.path.",
        labels=("image_name", "status"),
    )
    images = tally_images(snapshot)
    no_durations = _zero_buckets(FINISHED_DURATION_BUCKETS)
    for key in finished_keys(images, snapshot.finished):
        value = snapshot.finished.get(key)
        if value is None:
            finished.add_metric(key, 0)
            finished_durations.add_metric(key, no_durations, 0.0)
            continue
        finished.add_metric(key, value.count)
        finished_durations.add_metric(
            key, _cumulative_buckets(value.durations), value.durations.total
        )
    queued = HistogramMetricFamily(
        "primeintellect_image_builds_queue_duration_seconds",
        "Queue times (startedAt - createdAt) of the builds seen to start, each counted once.",
        labels=("image_name",),
    )
    no_queue_times = _zero_buckets(QUEUE_DURATION_BUCKETS)
    for image_name in images:
        histogram = snapshot.queued.get(image_name)
        if histogram is None:
            queued.add_metric((image_name,), no_queue_times, 0.0)
        else:
            queued.add_metric((image_name,), _cumulative_buckets(histogram), histogram.total)
    return [finished, finished_durations, queued]


def tally_images(snapshot: Snapshot) -> list[str]:
    """The images the tally families have series for, in order: those of tracked builds and
    those already counted."""
    images = {*snapshot.images, *snapshot.queued}
    images.update(image_name for image_name, _ in snapshot.finished)
    return sorted(images)


def finished_keys(
    images: Iterable[str], finished: Mapping[tuple[str, str], object]
) -> list[tuple[str, str]]:
    """The ``(image_name, status)`` of each finished series, in order: every image's finished
    statuses, and any other status already counted."""
    keys = {(image_name, status) for image_name in images for status in FINISHED_STATUSES}
    return sorted(keys.union(finished))


def tracked_family(snapshot: Snapshot) -> Metric:
    """Tracked builds by state."""
    tracked = GaugeMetricFamily(
        "primeintellect_exporter_builds",
        "Tracked builds by state: active, finished, failing (last poll failed), unpolled.",
        labels=("state",),
    )
    for state, count in snapshot.states.items():
        tracked.add_metric((state.value,), count)
    return tracked


def health_families(health: Mapping[HealthKey, ImageHealth]) -> list[Metric]:
    """Each image's health (``exporter.health``), by image name and tag.

    Sample: ``primeintellect_image_builds_consecutive_failures{image_name="app",``
    ``image_tag="v1"} 2.0``
    """
    families: list[Metric] = []
    for declared in HEALTH_FAMILIES:
        labels = (*HEALTH_LABELS, "status") if declared is LAST_FINISHED_STATUS else HEALTH_LABELS
        family = GaugeMetricFamily(declared.name, declared.documentation, labels=labels)
        for key in sorted(health):
            image = health[key]
            if declared is LAST_FINISHED_STATUS:
                for status in FINISHED_STATUSES:
                    current = status == image.last_finished_status
                    family.add_metric((*key, status), 1.0 if current else 0.0)
            else:
                _add_if_known(family, key, declared.value(image))
        families.append(family)
    return families


def exporter_families(
    telemetry: TelemetrySnapshot, shard_index: int = 0, shard_count: int = 1
) -> list[Metric]:
    """The exporter's own small families, rendered on every scrape.

    Sample: ``primeintellect_exporter_api_requests_total{outcome="ok"} 42.0``
    """
    requests = CounterMetricFamily(
        "primeintellect_exporter_api_requests",
        "Requests to the Prime Intellect API by endpoint and outcome.",
        labels=("endpoint", "outcome"),
    )
    for endpoint, counts in sorted(telemetry.requests_by_endpoint.items()):
        for outcome in Outcome:
            requests.add_metric((endpoint, outcome.value), counts.get(outcome, 0))
    durations = HistogramMetricFamily(
        "primeintellect_exporter_api_request_duration_seconds",
        "Duration of requests to the Prime Intellect API, by endpoint.",
        labels=("endpoint",),
    )
    for endpoint, histogram in sorted(telemetry.request_durations_by_endpoint.items()):
        durations.add_metric((endpoint,), _cumulative_buckets(histogram), sum_value=histogram.total)
    api_up = GaugeMetricFamily(
        "primeintellect_exporter_api_up",
        "0 once no usable API answer (anything but 401, 5xx or a transport failure) has come"
        " for 60s while requests were made; 1 again at the next usable one.",
    )
    # Before the first usable answer, or the first minute of unusable ones, there is nothing to
    # say, and 0 would read as an outage.
    if telemetry.api_up is not None:
        api_up.add_metric((), 1.0 if telemetry.api_up else 0.0)
    internal_errors = CounterMetricFamily(
        "primeintellect_exporter_internal_errors",
        "Unexpected exceptions by component; each was logged, none stopped the exporter.",
        labels=("component",),
    )
    for component, count in sorted(telemetry.internal_errors.items()):
        internal_errors.add_metric((component,), count)
    shard = GaugeMetricFamily(
        "primeintellect_exporter_shard",
        "The share of the builds this replica polls (--shard.index of --shard.count); always 1.",
        labels=("index", "count"),
    )
    shard.add_metric((str(shard_index), str(shard_count)), 1.0)
    return [
        requests,
        durations,
        api_up,
        internal_errors,
        GaugeMetricFamily(
            "primeintellect_exporter_rate_limited_until_timestamp_seconds",
            "End of the current pause after HTTP 429, or 0 if none.",
            value=telemetry.rate_limited_until,
        ),
        GaugeMetricFamily(
            "primeintellect_exporter_poll_lag_seconds",
            "How long the most overdue unfinished build has waited past its due time.",
            value=telemetry.poll_lag_seconds,
        ),
        GaugeMetricFamily(
            "primeintellect_exporter_poll_demand_ratio",
            "Polls per second the schedule needs over this replica's request budget; "
            "above 1 the interval cannot be kept.",
            value=telemetry.poll_demand_ratio,
        ),
        GaugeMetricFamily(
            "primeintellect_exporter_state_restored_builds",
            "Builds whose last answer came from the state file at start.",
            value=telemetry.state_restored_builds,
        ),
        *_state_families(telemetry),
        _reload_successful(telemetry),
        InfoMetricFamily(
            "primeintellect_exporter_build",
            "The exporter's version; always 1.",
            value={"version": __version__},
        ),
        shard,
    ]


def _add_if_known(family: GaugeMetricFamily, labels: Sequence[str], value: float | None) -> None:
    if value is not None:
        family.add_metric(labels, value)


# OpenMetrics allows an exemplar's label names and values 128 characters together; Prometheus
# fails the whole scrape past that.
_EXEMPLAR_LABELS_LIMIT = 128


def exemplar_shown(exemplar: TelemetryExemplar | None) -> TypeGuard[TelemetryExemplar]:
    """Whether a bucket's exemplar is written (in OpenMetrics): one within the size limit."""
    return (
        exemplar is not None and len("build_id") + len(exemplar.build_id) <= _EXEMPLAR_LABELS_LIMIT
    )


def _cumulative_buckets(
    histogram: Histogram,
) -> list[tuple[str, float] | tuple[str, float, Exemplar]]:
    """The buckets as prometheus_client takes them, with their exemplars, which only the
    OpenMetrics format writes."""
    buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
    running = 0
    exemplars = histogram.exemplars or (None,) * len(histogram.counts)
    for bound, count, exemplar in zip(
        (*histogram.bounds, float("inf")), histogram.counts, exemplars, strict=True
    ):
        running += count
        bucket = (floatToGoString(bound), float(running))  # type: ignore[no-untyped-call]
        if not exemplar_shown(exemplar):
            buckets.append(bucket)
        else:
            labels = {"build_id": exemplar.build_id}
            buckets.append((*bucket, Exemplar(labels, exemplar.value, exemplar.timestamp)))
    return buckets


def _zero_buckets(bounds: Sequence[float]) -> list[tuple[str, float]]:
    """The buckets of a histogram that has observed nothing."""
    return [(floatToGoString(bound), 0.0) for bound in (*bounds, float("inf"))]  # type: ignore[no-untyped-call]


def _state_families(telemetry: TelemetrySnapshot) -> list[Metric]:
    """The state file's health: what is done with state.path, and what was lost at start."""
    status = GaugeMetricFamily(
        "primeintellect_exporter_state_status",
        "1 for what is done with state.path, 0 for the others: in_use; read_only, locked or"
        " unusable (the state is kept in memory only); disabled (no state.path).",
        labels=("status",),
    )
    for known in StateStatus:
        status.add_metric((known.value,), 1.0 if known == telemetry.state_status else 0.0)
    last_write = GaugeMetricFamily(
        "primeintellect_exporter_state_last_write_success_timestamp_seconds",
        "When the state file last held everything the exporter knew (a write, or a check that"
        " found nothing to write); absent while the file is not in use.",
    )
    _add_if_known(last_write, (), telemetry.state_last_write_success)
    return [
        status,
        GaugeMetricFamily(
            "primeintellect_exporter_state_lost_at_start",
            "1 if the state file could not be read as a whole at start (corrupt, cut short, or a"
            " newer exporter's): it was moved aside if it could be, and every build started"
            " afresh.",
            value=1.0 if telemetry.state_lost_at_start else 0.0,
        ),
        GaugeMetricFamily(
            "primeintellect_exporter_state_unreadable_rows",
            "Rows of the state file that could not be read at start; their builds started afresh.",
            value=telemetry.state_unreadable_rows,
        ),
        last_write,
    ]


def _reload_successful(telemetry: TelemetrySnapshot) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "primeintellect_exporter_config_last_reload_successful",
        "1 if the last load of this source (the config file, or the build files) succeeded.",
        labels=["source"],
    )
    for source, successful in telemetry.config_reload_successful.items():
        family.add_metric([source], 1.0 if successful else 0.0)
    return family


IMAGE_LABELS = ("image_name", "image_tag", "artifact_type")


def inventory_families(inventory: Inventory) -> list[Metric]:
    """The image inventory's families: the latest row of each image, tag and artifact type.

    Sample: ``primeintellect_image_status{artifact_type="VM_SANDBOX",image_name="trainer",``
    ``image_tag="v1",status="FAILED"} 1.0``
    """
    status = GaugeMetricFamily(
        "primeintellect_image_status",
        "1 for the status of the image's latest artifact row, 0 for the others; UNKNOWN for an"
        " undocumented one.",
        labels=(*IMAGE_LABELS, "status"),
    )
    info = GaugeMetricFamily(
        "primeintellect_image_info",
        "The latest artifact row of an image, tag and artifact type in the listing; always 1.",
        labels=(*IMAGE_LABELS, "artifact_id", "full_image_path", "visibility", "owner_type"),
    )
    created = _image_gauge("primeintellect_image_created_timestamp_seconds", "createdAt.")
    completed = _image_gauge("primeintellect_image_completed_timestamp_seconds", "completedAt.")
    pushed = _image_gauge("primeintellect_image_pushed_timestamp_seconds", "pushedAt.")
    size = _image_gauge("primeintellect_image_size_bytes", "sizeBytes.")
    error = GaugeMetricFamily(
        "primeintellect_image_error_info",
        "The error message of the image's latest artifact row; 1 while it has one.",
        labels=(*IMAGE_LABELS, "error_message"),
    )
    for key in sorted(inventory.images):
        row = inventory.images[key]
        labels = list(key)
        current = row.status_label
        for documented in BUILD_STATUSES:
            status.add_metric([*labels, documented], 1.0 if documented == current else 0.0)
        if current == UNKNOWN:
            status.add_metric([*labels, UNKNOWN], 1.0)
        info.add_metric(
            [*labels, row.id, row.full_image_path or "", row.visibility, row.owner_type], 1.0
        )
        created.add_metric(labels, row.created_at)
        _add_if_known(completed, labels, row.completed_at)
        _add_if_known(pushed, labels, row.pushed_at)
        _add_if_known(size, labels, None if row.size_bytes is None else float(row.size_bytes))
        if row.error_message:
            error.add_metric([*labels, row.error_message], 1.0)
    last_success = GaugeMetricFamily(
        "primeintellect_exporter_image_list_last_success_timestamp_seconds",
        "End of the last complete image listing; absent before the first.",
    )
    if inventory.listed_at is not None:
        last_success.add_metric((), inventory.listed_at)
    last_error = GaugeMetricFamily(
        "primeintellect_exporter_image_list_last_error",
        "1 while the latest image listing failed, by reason; the last complete one stays.",
        labels=("reason",),
    )
    if inventory.last_error is not None:
        last_error.add_metric((inventory.last_error.value,), 1.0)
    return [status, info, created, completed, pushed, size, error, last_success, last_error]


def _image_gauge(name: str, documentation: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        name, f"The latest artifact row's {documentation}", labels=IMAGE_LABELS
    )


def build_list_families(telemetry: TelemetrySnapshot) -> list[Metric]:
    """The build listing's health (discovery.builds), exposed while it is on.

    Sample: ``primeintellect_exporter_build_list_last_error{reason="truncated"} 1.0``
    """
    last_success = GaugeMetricFamily(
        "primeintellect_exporter_build_list_last_success_timestamp_seconds",
        "End of the last complete build listing pass; absent before the first.",
    )
    pages = GaugeMetricFamily(
        "primeintellect_exporter_build_list_pages",
        "Pages the last complete build listing pass read; absent before the first.",
    )
    if telemetry.build_list_last_success is not None:
        last_success.add_metric((), telemetry.build_list_last_success)
        pages.add_metric((), telemetry.build_list_pages)
    last_error = GaugeMetricFamily(
        "primeintellect_exporter_build_list_last_error",
        "1 while the last build listing pass failed, by reason; unavailable: the API does not"
        " serve the listing; truncated, repeated_page, over_total: cut short (applied, removing"
        " nothing).",
        labels=("reason",),
    )
    if telemetry.build_list_last_error is not None:
        last_error.add_metric((telemetry.build_list_last_error,), 1.0)
    discovered = GaugeMetricFamily(
        "primeintellect_exporter_builds_discovered",
        "Tracked builds that only discovery brought (not configured).",
        value=telemetry.builds_discovered,
    )
    return [last_success, last_error, pages, discovered]
