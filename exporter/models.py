"""The API's answers (a build's status, a page of the image listing, a page of the build
listing), parsed tolerantly and cleaned for use as label values."""

from __future__ import annotations

import enum
import json
import re
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)
from pydantic.dataclasses import dataclass

BUILD_STATUSES = ("PENDING", "UPLOADING", "BUILDING", "COMPLETED", "FAILED", "CANCELLED")
FINISHED_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
ARTIFACT_TYPES = ("CONTAINER_IMAGE", "VM_SANDBOX")
DEFAULT_ARTIFACT_TYPE = "CONTAINER_IMAGE"
UNKNOWN = "UNKNOWN"
MAX_LABEL_LENGTH = 256


class Outcome(enum.StrEnum):
    """How one request ended; the values are the ``outcome`` and ``reason`` label values."""

    OK = "ok"
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    CLIENT_ERROR = "client_error"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    INVALID_RESPONSE = "invalid_response"


# Answers that say the API itself is not usable right now, as opposed to one build's problem:
# everything else is a usable answer, for primeintellect_exporter_api_up.
API_DOWN_OUTCOMES = frozenset(
    {Outcome.UNAUTHORIZED, Outcome.SERVER_ERROR, Outcome.TIMEOUT, Outcome.CONNECTION_ERROR}
)

# Answers that prove the API accepted our key.
KEY_ACCEPTED_OUTCOMES = frozenset(
    {Outcome.OK, Outcome.NOT_FOUND, Outcome.CLIENT_ERROR, Outcome.INVALID_RESPONSE}
)

_datetime_adapter = TypeAdapter(datetime)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_LEAP_SECOND = re.compile(r"(?P<before>.*T23:59:)60(?P<after>(?:\.\d+)?(?:Z|z|[+-]\d\d:?\d\d)?)")
# A run of whitespace holding a control character or line separator becomes one space.
_CONTROL = "\x00-\x1f\x7f-\x9f\u2028\u2029"
_LINE_BREAKS = re.compile(f"[\\s{_CONTROL}]*[{_CONTROL}][\\s{_CONTROL}]*")
# ECMA-48 escape sequences: CSI (colours, cursor moves, with ESC [ or the C1 byte), OSC (titles,
# links, ended by BEL or ESC \\), and the two-character ones.
_ESCAPE_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[@-Z\\-_]"
)
_ELISION = " … "
# How a failure reason names an artifact's type: as the user says it, not as the API spells it.
_ARTIFACT_SHORT_NAMES = {"CONTAINER_IMAGE": "container", "VM_SANDBOX": "vm_sandbox"}


class InvalidAnswerError(ValueError):
    """The body of a 200 answer is not what the endpoint answers; the message says why, briefly
    and without secrets."""


class InvalidBuildError(InvalidAnswerError):
    """The body of a 200 answer of a build's status is not a usable build status."""


class InvalidPageError(InvalidAnswerError):
    """The body of a 200 answer of a listing (images, builds) is no listing page at all."""


def clean_label_text(value: str, *, keep_end: bool = False) -> str:
    """Make an API string safe as a label value: valid UTF-8, no terminal escape sequences,
    one line, at most 256 characters (with ``keep_end``, its start and its end)."""
    if len(value) <= MAX_LABEL_LENGTH and value.isascii() and value.isprintable():
        return value
    # json.loads keeps lone surrogates, which cannot be encoded as UTF-8 later.
    text = _LONE_SURROGATE.sub("\ufffd", value)
    if "\x1b" in text or "\x9b" in text:
        # Colour codes from a build log would leave "[31m" behind once ESC became a space.
        text = _ESCAPE_SEQUENCE.sub("", text)
    text = _LINE_BREAKS.sub(" ", text)
    if len(text) > MAX_LABEL_LENGTH:
        if keep_end:
            # A build log's cause is usually in its last lines.
            head = (MAX_LABEL_LENGTH - len(_ELISION)) // 2
            tail = MAX_LABEL_LENGTH - len(_ELISION) - head
            text = text[:head] + _ELISION + text[-tail:]
        else:
            text = text[: MAX_LABEL_LENGTH - 1] + "…"
    return text


def _clean_message(value: str | None) -> str | None:
    return (clean_label_text(value, keep_end=True).strip() or None) if value else None


def _parse_timestamp(value: object) -> float:
    if not isinstance(value, str):
        raise ValueError("timestamps must be ISO 8601 strings")
    # A leap second (23:59:60) is a valid UTC time that datetime cannot hold: it is read as
    # the second after 23:59:59.
    leap = _LEAP_SECOND.fullmatch(value)
    if leap is not None:
        return _parse_timestamp(f"{leap['before']}59{leap['after']}") + 1.0
    moment = _datetime_adapter.validate_python(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _none_as_empty_text(value: object) -> object:
    return "" if value is None else value


def _none_as_unknown(value: object) -> object:
    return UNKNOWN if value is None else value


def _none_as_empty(value: object) -> object:
    return () if value is None else value


def _first_of_each_id(artifacts: tuple[Artifact, ...]) -> tuple[Artifact, ...]:
    # Two rows with one ID would be two identical series, which Prometheus rejects.
    unique: dict[str, Artifact] = {}
    for artifact in artifacts:
        unique.setdefault(artifact.id, artifact)
    return tuple(unique.values()) if len(unique) < len(artifacts) else artifacts


def _none_as_default_type(value: object) -> object:
    return DEFAULT_ARTIFACT_TYPE if value is None else value


def _shared_label_text(value: str) -> str:
    # Statuses, types, image names and tags repeat across thousands of builds: one copy each.
    return sys.intern(clean_label_text(value))


LabelText = Annotated[str, AfterValidator(clean_label_text)]
SharedLabelText = Annotated[str, AfterValidator(_shared_label_text)]
# Null, or left out, is an empty label: the rest of the answer is still worth showing.
OptionalText = Annotated[SharedLabelText, BeforeValidator(_none_as_empty_text)]
# Null, or left out, is a status nobody documented.
Status = Annotated[SharedLabelText, BeforeValidator(_none_as_unknown)]
Timestamp = Annotated[float, BeforeValidator(_parse_timestamp)]
ErrorMessage = Annotated[str | None, AfterValidator(_clean_message)]


# Extra fields are schema drift, not errors. Answers are slotted dataclasses, not models: a
# model instance carries a dict and a set of its own, about 0.8 KiB each, times thousands.
_ANSWER = ConfigDict(extra="ignore", populate_by_name=True)


@dataclass(frozen=True, slots=True, kw_only=True, config=_ANSWER)
class Artifact:
    """One artifact row of a build."""

    # Every field names its key: pydantic then reports errors in the order declared.
    id: LabelText = Field(alias="id")
    artifact_type: Annotated[SharedLabelText, BeforeValidator(_none_as_default_type)] = Field(
        default=DEFAULT_ARTIFACT_TYPE, alias="artifactType"
    )
    status: Status = Field(default=UNKNOWN, alias="status")
    full_image_path: LabelText | None = Field(default=None, alias="fullImagePath")
    error_message: ErrorMessage = Field(default=None, alias="errorMessage")
    created_at: Timestamp = Field(alias="createdAt")
    started_at: Timestamp | None = Field(default=None, alias="startedAt")
    completed_at: Timestamp | None = Field(default=None, alias="completedAt")

    @property
    def status_label(self) -> str:
        return known_or_unknown(self.status, BUILD_STATUSES)

    @property
    def type_label(self) -> str:
        return known_or_unknown(self.artifact_type, ARTIFACT_TYPES)

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at is None or self.completed_at is None:
            return None
        return _elapsed(self.started_at, self.completed_at)


@dataclass(frozen=True, slots=True, kw_only=True, config=_ANSWER)
class Build:
    """A build group: its image, aggregated status, timestamps and artifacts."""

    id: str = Field(alias="id")
    image_name: OptionalText = Field(default="", alias="imageName")
    image_tag: OptionalText = Field(default="", alias="imageTag")
    status: Status = Field(default=UNKNOWN, alias="status")
    created_at: Timestamp = Field(alias="createdAt")
    started_at: Timestamp | None = Field(default=None, alias="startedAt")
    completed_at: Timestamp | None = Field(default=None, alias="completedAt")
    # Not in the spec, but the official client reads it from this answer (``errorMessage``,
    # else ``error_message``, which populate_by_name accepts as the field's own name).
    error_message: ErrorMessage = Field(default=None, alias="errorMessage")
    artifacts: Annotated[
        tuple[Artifact, ...],
        BeforeValidator(_none_as_empty),
        AfterValidator(_first_of_each_id),
    ] = ()

    @property
    def status_label(self) -> str:
        return known_or_unknown(self.status, BUILD_STATUSES)

    @property
    def failure_reason(self) -> str | None:
        """What the build failed with, as the log line and the status page say it: its own
        error message, else each artifact's (``container: …; vm_sandbox: …``), cleaned and
        bounded as a label value; None while there is none."""
        if self.error_message:
            return self.error_message
        reasons = [
            f"{_ARTIFACT_SHORT_NAMES.get(artifact.artifact_type, artifact.artifact_type.lower())}:"
            f" {artifact.error_message}"
            for artifact in self.artifacts
            if artifact.error_message
        ]
        return clean_label_text("; ".join(reasons), keep_end=True) if reasons else None

    @property
    def finished(self) -> bool:
        """The build and every artifact are COMPLETED, FAILED or CANCELLED."""
        return self.status in FINISHED_STATUSES and all(
            artifact.status in FINISHED_STATUSES for artifact in self.artifacts
        )

    @property
    def queued_seconds(self) -> float | None:
        if self.started_at is None:
            return None
        return _elapsed(self.created_at, self.started_at)

    @property
    def duration_seconds(self) -> float | None:
        if not self.finished or self.started_at is None or self.completed_at is None:
            return None
        return _elapsed(self.started_at, self.completed_at)


BUILD = TypeAdapter(Build)


def _elapsed(start: float, end: float) -> float | None:
    # A start after the end is clock skew on the API's side: no duration, rather than a
    # negative one.
    return end - start if end >= start else None


def known_or_unknown(value: str, known: tuple[str, ...]) -> str:
    """The value itself if the spec documents it, else ``UNKNOWN``."""
    return value if value in known else UNKNOWN


def _json_object(body: bytes, invalid: type[InvalidAnswerError]) -> dict[str, Any]:
    """A 200 answer's body as a JSON object; raise ``invalid`` if it is none."""
    # A stray byte (Latin-1 in a build log) becomes U+FFFD, not a lost answer.
    text = body.decode("utf-8", errors="replace").removeprefix("\ufeff")
    try:
        # The standard library keeps lone surrogates (cleaned later); pydantic's parser refuses
        # the whole document for one bad character.
        document: Any = json.loads(text)
    except (ValueError, RecursionError):
        raise invalid("body is not JSON") from None
    if not isinstance(document, dict):
        raise invalid("body is not a JSON object")
    return document


def parse_build(body: bytes) -> Build:
    """Parse a 200 answer's body; raise InvalidBuildError with a short, secret-free reason."""
    return _build_of(_json_object(body, InvalidBuildError))


def _build_of(document: dict[str, Any]) -> Build:
    """A build status answer, as a poll or a listing page holds it; raise InvalidBuildError."""
    if not document.get("errorMessage") and document.get("error_message"):
        # As the official client reads it: errorMessage, else error_message.
        document = {**document, "errorMessage": document["error_message"]}
    try:
        return BUILD.validate_python(document)
    except ValidationError as error:
        first = error.errors(include_url=False, include_input=False)[0]
        location = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidBuildError(f"{location}: {first['msg']}") from None


# -- the image listing (GET /api/v1/images) ------------------------------------------------------


def _count_or_none(value: object) -> int | None:
    """A whole number, 0 or more; anything else (negative, fractional, text, true) is none."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


@dataclass(frozen=True, slots=True, kw_only=True, config=_ANSWER)
class ImageRow(Artifact):
    """One artifact row of the image listing: an artifact as a build's answer lists it, with
    its image name and tag and what only the listing says."""

    image_name: OptionalText = Field(default="", alias="imageName")
    image_tag: OptionalText = Field(default="", alias="imageTag")
    # A size is a count of bytes.
    size_bytes: Annotated[int | None, BeforeValidator(_count_or_none)] = Field(
        default=None, alias="sizeBytes"
    )
    visibility: OptionalText = Field(default="", alias="visibility")
    owner_type: OptionalText = Field(default="", alias="ownerType")
    pushed_at: Timestamp | None = Field(default=None, alias="pushedAt")

    @property
    def updated_at(self) -> float:
        """When the row last changed, as the official CLI reads it: pushed, else completed,
        else started, else created."""
        for moment in (self.pushed_at, self.completed_at, self.started_at):
            if moment is not None:
                return moment
        return self.created_at


@dataclass(frozen=True, slots=True)
class ImagePage:
    """One page of the listing: its usable rows, how many rows were not, and the count of
    logical images (name:tag) the API says the listing holds, if it says."""

    rows: tuple[ImageRow, ...]
    unusable_rows: int
    total_count: int | None


IMAGE_ROW = TypeAdapter(ImageRow)


def parse_image_page(body: bytes) -> ImagePage:
    """Parse a 200 answer of the listing; raise InvalidPageError if it is no listing at all.

    A row that is not an artifact row (no id, no createdAt) is counted and left out: one bad
    row must not hide a team's other images.
    """
    document = _json_object(body, InvalidPageError)
    data = document.get("data")
    if not isinstance(data, list):
        raise InvalidPageError("data: not a list of images")
    rows = []
    for item in data:
        try:
            rows.append(IMAGE_ROW.validate_python(item))
        except ValidationError:
            continue
    return ImagePage(tuple(rows), len(data) - len(rows), _stated_total(document))


def _stated_total(document: dict[str, Any]) -> int | None:
    """The total count a listing page states: ``total_count`` as the platform's schema spells
    it, else ``totalCount`` as the image listing's SDK model reads it; None if neither is a
    whole number."""
    total = _count_or_none(document.get("total_count"))
    return total if total is not None else _count_or_none(document.get("totalCount"))


# -- the build listing (GET /api/v1/images/builds) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class BuildPage:
    """One page of the build listing: its builds, each as good as a poll of it, in the API's
    order (duplicates kept: the reader decides), how many items were no build at all, and the
    counts the page states, if it states them."""

    builds: tuple[Build, ...]
    skipped: int
    total: int | None
    offset: int | None
    limit: int | None


def parse_build_page(body: bytes) -> BuildPage:
    """Parse a 200 answer of the build listing; raise InvalidPageError if it is no listing.

    An item that is no build (not an object, no id, not a usable build status answer) is
    counted and left out: one bad item must not hide the key's other builds. A page may hold
    more items than its ``limit``; they are all kept.
    """
    document = _json_object(body, InvalidPageError)
    data = document.get("data")
    if not isinstance(data, list):
        raise InvalidPageError("data: not a list of builds")
    builds = []
    for item in data:
        if not isinstance(item, dict):
            continue
        try:
            build = _build_of(item)
        except InvalidBuildError:
            continue
        # An empty id names no build that could be polled.
        if build.id:
            builds.append(build)
    return BuildPage(
        builds=tuple(builds),
        skipped=len(data) - len(builds),
        total=_stated_total(document),
        offset=_count_or_none(document.get("offset")),
        limit=_count_or_none(document.get("limit")),
    )
