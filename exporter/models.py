"""The API's build status answer, parsed tolerantly and cleaned for use as label values."""

from __future__ import annotations

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

_datetime_adapter = TypeAdapter(datetime)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# A run of whitespace holding a control character or line separator becomes one space.
_CONTROL = "\x00-\x1f\x7f-\x9f\u2028\u2029"
_LINE_BREAKS = re.compile(f"[\\s{_CONTROL}]*[{_CONTROL}][\\s{_CONTROL}]*")


class InvalidBuildError(ValueError):
    """The body of a 200 answer is not a usable build status."""


def clean_label_text(value: str) -> str:
    """Make an API string safe as a label value: valid UTF-8, one line, at most 256 characters."""
    if len(value) <= MAX_LABEL_LENGTH and value.isascii() and value.isprintable():
        return value
    # json.loads keeps lone surrogates, which cannot be encoded as UTF-8 later.
    text = _LINE_BREAKS.sub(" ", _LONE_SURROGATE.sub("\ufffd", value))
    if len(text) > MAX_LABEL_LENGTH:
        text = text[: MAX_LABEL_LENGTH - 1] + "…"
    return text


def _clean_message(value: str | None) -> str | None:
    return (clean_label_text(value).strip() or None) if value else None


def _parse_timestamp(value: object) -> float:
    if not isinstance(value, str):
        raise ValueError("timestamps must be ISO 8601 strings")
    moment = _datetime_adapter.validate_python(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


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
    status: SharedLabelText = Field(alias="status")
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
    image_name: SharedLabelText = Field(alias="imageName")
    image_tag: SharedLabelText = Field(alias="imageTag")
    status: SharedLabelText = Field(alias="status")
    created_at: Timestamp = Field(alias="createdAt")
    started_at: Timestamp | None = Field(default=None, alias="startedAt")
    completed_at: Timestamp | None = Field(default=None, alias="completedAt")
    artifacts: Annotated[
        tuple[Artifact, ...],
        BeforeValidator(_none_as_empty),
        AfterValidator(_first_of_each_id),
    ] = ()

    @property
    def status_label(self) -> str:
        return known_or_unknown(self.status, BUILD_STATUSES)

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


def parse_build(body: bytes) -> Build:
    """Parse a 200 answer's body; raise InvalidBuild with a short, secret-free reason."""
    try:
        # The standard library keeps lone surrogates (cleaned later); pydantic's parser refuses
        # the whole document for one bad character.
        document: Any = json.loads(body)
    except UnicodeDecodeError:
        raise InvalidBuildError("body is not UTF-8") from None
    except (ValueError, RecursionError):
        raise InvalidBuildError("body is not JSON") from None
    if not isinstance(document, dict):
        raise InvalidBuildError("body is not a JSON object")
    try:
        return BUILD.validate_python(document)
    except ValidationError as error:
        first = error.errors(include_url=False, include_input=False)[0]
        location = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidBuildError(f"{location}: {first['msg']}") from None
