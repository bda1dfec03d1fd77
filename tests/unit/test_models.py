"""Unit tests of the build status models: tolerant parsing, derived values, label cleaning."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from exporter.models import (
    ARTIFACT_TYPES,
    BUILD_STATUSES,
    MAX_LABEL_LENGTH,
    Build,
    InvalidBuildError,
    clean_label_text,
    parse_build,
)
from tests.helpers.support import EPOCH, REPOSITORY

SPEC_PATH = REPOSITORY / "tests" / "contract" / "get-build-status.openapi.yaml"


def artifact_document(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": "artifact-1",
        "artifactType": "CONTAINER_IMAGE",
        "status": "BUILDING",
        "createdAt": "2026-01-01T00:00:00Z",
    }
    document.update(overrides)
    return document


def build_document(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": "build-1",
        "imageName": "trainer",
        "imageTag": "v1",
        "status": "BUILDING",
        "createdAt": "2026-01-01T00:00:00Z",
    }
    document.update(overrides)
    return document


def without(document: dict[str, Any], key: str) -> dict[str, Any]:
    return {name: value for name, value in document.items() if name != key}


def parse(document: object) -> Build:
    return parse_build(json.dumps(document).encode())


def load_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    return spec


def response_validator() -> Draft202012Validator:
    spec = load_spec()
    schema = {
        "$ref": "#/components/schemas/BuildStatusResponse",
        "components": spec["components"],
    }
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


REALISTIC_ANSWER: dict[str, Any] = {
    "id": "bld_7f3a9c2e41d84b6f",
    "imageName": "team-a/inference-server",
    "imageTag": "2026.01.3",
    "status": "FAILED",
    "createdAt": "2026-01-01T00:00:00Z",
    "startedAt": "2026-01-01T00:00:42.125Z",
    "completedAt": "2026-01-01T00:10:42.125Z",
    "artifacts": [
        {
            "id": "art_01",
            "artifactType": "CONTAINER_IMAGE",
            "status": "FAILED",
            "fullImagePath": None,
            "errorMessage": 'step 3/9: RUN pip install -r requirements.txt\n"exit code: 1"',
            "createdAt": "2026-01-01T00:00:00Z",
            "startedAt": "2026-01-01T00:00:42.125Z",
            "completedAt": "2026-01-01T00:10:42.125Z",
        },
        {
            "id": "art_02",
            "artifactType": "VM_SANDBOX",
            "status": "CANCELLED",
            "fullImagePath": None,
            "errorMessage": None,
            "createdAt": "2026-01-01T00:00:00Z",
            "startedAt": None,
            "completedAt": "2026-01-01T00:10:43Z",
        },
    ],
}


def test_realistic_answer_matches_the_openapi_schema_and_parses() -> None:
    errors = [error.message for error in response_validator().iter_errors(REALISTIC_ANSWER)]
    assert errors == []

    build = parse(REALISTIC_ANSWER)

    assert build.id == "bld_7f3a9c2e41d84b6f"
    assert build.image_name == "team-a/inference-server"
    assert build.image_tag == "2026.01.3"
    assert build.status_label == "FAILED"
    assert build.finished is True
    assert build.queued_seconds == pytest.approx(42.125)
    assert build.duration_seconds == pytest.approx(600.0)
    first, second = build.artifacts
    assert (first.type_label, first.status_label) == ("CONTAINER_IMAGE", "FAILED")
    assert first.error_message == ('step 3/9: RUN pip install -r requirements.txt "exit code: 1"')
    assert first.duration_seconds == pytest.approx(600.0)
    assert (second.type_label, second.status_label) == ("VM_SANDBOX", "CANCELLED")
    assert second.error_message is None
    assert second.duration_seconds is None


def test_schema_rejects_an_answer_without_image_name() -> None:
    errors = [
        error.message
        for error in response_validator().iter_errors(without(REALISTIC_ANSWER, "imageName"))
    ]

    assert errors == ["'imageName' is a required property"]


def test_documented_enums_are_the_ones_the_models_know() -> None:
    schemas = load_spec()["components"]["schemas"]

    assert tuple(schemas["ImageBuildStatusEnum"]["enum"]) == BUILD_STATUSES
    assert tuple(schemas["ImageBuildArtifactTypeEnum"]["enum"]) == ARTIFACT_TYPES


@pytest.mark.parametrize(
    ("timestamp", "epoch_seconds"),
    [
        ("2026-01-01T00:00:00Z", EPOCH),
        ("2026-01-01T00:00:00z", EPOCH),
        ("2026-01-01T00:00:00+00:00", EPOCH),
        ("2026-01-01T02:00:00+02:00", EPOCH),
        ("2025-12-31T19:00:00-05:00", EPOCH),
        ("2026-01-01T00:00:00.5Z", EPOCH + 0.5),
        ("2026-01-01T00:00:00.250+01:00", EPOCH - 3600 + 0.25),
        ("2026-01-01T00:00:00.123456Z", EPOCH + 0.123456),
        ("2026-01-01T00:00:00.123456789Z", EPOCH + 0.123456789),
        ("2026-01-01T00:00:00", EPOCH),
        ("2026-01-01T00:00:00.75", EPOCH + 0.75),
    ],
)
def test_timestamps_give_epoch_seconds(timestamp: str, epoch_seconds: float) -> None:
    build = parse(
        build_document(
            createdAt=timestamp,
            startedAt=timestamp,
            completedAt=timestamp,
            artifacts=[artifact_document(createdAt=timestamp)],
        )
    )

    assert build.created_at == pytest.approx(epoch_seconds, abs=1e-6)
    assert build.started_at == pytest.approx(epoch_seconds, abs=1e-6)
    assert build.completed_at == pytest.approx(epoch_seconds, abs=1e-6)
    assert build.artifacts[0].created_at == pytest.approx(epoch_seconds, abs=1e-6)


def test_optional_timestamps_may_be_absent_or_null() -> None:
    absent = parse(build_document())
    null = parse(build_document(startedAt=None, completedAt=None))

    assert (absent.started_at, absent.completed_at) == (None, None)
    assert (null.started_at, null.completed_at) == (None, None)


@pytest.mark.parametrize(
    "document",
    [build_document(), build_document(artifacts=None), build_document(artifacts=[])],
    ids=["absent", "null", "empty"],
)
def test_missing_or_null_artifacts_are_empty(document: dict[str, Any]) -> None:
    assert parse(document).artifacts == ()


@pytest.mark.parametrize(
    "artifact",
    [without(artifact_document(), "artifactType"), artifact_document(artifactType=None)],
    ids=["absent", "null"],
)
def test_missing_or_null_artifact_type_means_container_image(artifact: dict[str, Any]) -> None:
    (parsed,) = parse(build_document(artifacts=[artifact])).artifacts

    assert parsed.artifact_type == "CONTAINER_IMAGE"
    assert parsed.type_label == "CONTAINER_IMAGE"


def test_documented_artifact_type_is_kept() -> None:
    build = parse(build_document(artifacts=[artifact_document(artifactType="VM_SANDBOX")]))

    assert build.artifacts[0].artifact_type == "VM_SANDBOX"
    assert build.artifacts[0].type_label == "VM_SANDBOX"


def test_unknown_build_status_is_labelled_unknown_but_kept_raw() -> None:
    build = parse(build_document(status="QUARANTINED"))

    assert build.status == "QUARANTINED"
    assert build.status_label == "UNKNOWN"


@pytest.mark.parametrize("status", BUILD_STATUSES)
def test_documented_build_status_is_its_own_label(status: str) -> None:
    assert parse(build_document(status=status)).status_label == status


def test_status_labels_are_case_sensitive() -> None:
    build = parse(build_document(status="completed"))

    assert build.status_label == "UNKNOWN"
    assert build.finished is False


def test_unknown_artifact_status_and_type_are_labelled_unknown_but_kept_raw() -> None:
    artifact = artifact_document(artifactType="WASM_MODULE", status="QUARANTINED")
    (parsed,) = parse(build_document(artifacts=[artifact])).artifacts

    assert parsed.artifact_type == "WASM_MODULE"
    assert parsed.type_label == "UNKNOWN"
    assert parsed.status == "QUARANTINED"
    assert parsed.status_label == "UNKNOWN"


def test_extra_fields_are_ignored_at_every_level() -> None:
    plain = build_document(artifacts=[artifact_document()])
    drifted = build_document(
        region="eu-west",
        gpu={"count": 8, "model": ["H100"]},
        artifacts=[artifact_document(sizeBytes=123456789, layers=[{"digest": "sha256:00"}])],
    )

    assert parse(drifted) == parse(plain)
    assert not hasattr(parse(drifted), "region")
    assert not hasattr(parse(drifted).artifacts[0], "sizeBytes")


@pytest.mark.parametrize(
    "changes",
    [
        {"imageName": None, "imageTag": None, "status": None},
        {"imageName": ..., "imageTag": ..., "status": ...},
    ],
    ids=["null", "left out"],
)
def test_null_or_missing_names_and_status_keep_the_build(changes: dict[str, Any]) -> None:
    document = build_document(artifacts=[artifact_document(status=None)])
    for key, value in changes.items():
        if value is ...:
            del document[key]
        else:
            document[key] = value

    build = parse(document)

    assert (build.image_name, build.image_tag) == ("", "")
    assert (build.status, build.status_label) == ("UNKNOWN", "UNKNOWN")
    assert build.artifacts[0].status_label == "UNKNOWN"
    assert not build.finished


def test_a_stray_byte_becomes_a_replacement_character_not_a_lost_answer() -> None:
    document = json.dumps(build_document(imageTag="cafe")).encode()
    # "café" as Latin-1 writes it, in a body that is otherwise UTF-8.
    build = parse_build(document.replace(b"cafe", b"caf\xe9"))

    assert build.image_tag == "caf\ufffd"


@pytest.mark.parametrize(
    ("timestamp", "epoch_seconds"),
    [
        ("2016-12-31T23:59:60Z", 1483228800.0),
        ("2016-12-31T23:59:60.25Z", 1483228800.25),
        ("2016-12-31T23:59:60+00:00", 1483228800.0),
    ],
)
def test_a_leap_second_is_read_as_the_second_after_23_59_59(
    timestamp: str, epoch_seconds: float
) -> None:
    assert parse(build_document(createdAt=timestamp)).created_at == epoch_seconds


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "body is not JSON"),
        (b"<html><body>502 Bad Gateway</body></html>", "body is not JSON"),
        (b'{"id": "build-1",', "body is not JSON"),
        (b"NaN-ish garbage", "body is not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "body is not JSON"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "body is not JSON"),
        (b"{}", "id: Field required"),
        (b'{"createdAt": ' + b"9" * 5000 + b"}", "body is not JSON"),
        (b"\xc3\x28", "body is not JSON"),
        (b"[]", "body is not a JSON object"),
        (b"null", "body is not a JSON object"),
        (b"42", "body is not a JSON object"),
        (b'"a string"', "body is not a JSON object"),
    ],
    ids=[
        "empty",
        "html",
        "truncated",
        "garbage",
        "100000 nested arrays",
        "100000 nested objects",
        "empty object",
        "5000-digit number",
        "invalid UTF-8 alone",
        "array",
        "null",
        "number",
        "string",
    ],
)
def test_unusable_body_raises_invalid_build_error_only(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidBuildError) as caught:
        parse_build(body)

    assert str(caught.value) == reason


@pytest.mark.parametrize(
    ("document", "location"),
    [
        (without(build_document(), "id"), "id"),
        (without(build_document(), "createdAt"), "createdAt"),
        (build_document(id=17), "id"),
        (build_document(status=["BUILDING"]), "status"),
        (build_document(createdAt=EPOCH), "createdAt"),
        (build_document(createdAt=None), "createdAt"),
        (build_document(createdAt=True), "createdAt"),
        (build_document(createdAt={"seconds": 1}), "createdAt"),
        (build_document(startedAt=1767225630), "startedAt"),
        (build_document(createdAt="yesterday"), "createdAt"),
        (build_document(createdAt="2026-13-01T00:00:00Z"), "createdAt"),
        (build_document(artifacts={"id": "a"}), "artifacts"),
        (build_document(artifacts="artifact-1"), "artifacts"),
        (build_document(artifacts=["artifact-1"]), "artifacts.0"),
        (build_document(artifacts=[without(artifact_document(), "id")]), "artifacts.0.id"),
        (
            build_document(artifacts=[artifact_document(), artifact_document(createdAt=0)]),
            "artifacts.1.createdAt",
        ),
        (
            build_document(artifacts=[artifact_document(completedAt=1767225630)]),
            "artifacts.0.completedAt",
        ),
        (build_document(artifacts=[artifact_document(errorMessage=5)]), "artifacts.0.errorMessage"),
    ],
)
def test_missing_or_mistyped_field_raises_invalid_build_error_naming_it(
    document: dict[str, Any], location: str
) -> None:
    with pytest.raises(InvalidBuildError) as caught:
        parse(document)

    assert str(caught.value).startswith(f"{location}: ")


def test_invalid_build_error_does_not_echo_the_offending_value() -> None:
    secret_looking = "pk-canary-0b7f5e2d9c4a41e8b3f6a1d2c9e8f7a6"
    with pytest.raises(InvalidBuildError) as caught:
        parse(build_document(createdAt=secret_looking, status=[secret_looking]))

    assert secret_looking not in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("build_status", "artifact_statuses", "finished"),
    [
        ("COMPLETED", [], True),
        ("FAILED", [], True),
        ("CANCELLED", [], True),
        ("COMPLETED", ["COMPLETED", "FAILED", "CANCELLED"], True),
        ("FAILED", ["COMPLETED", "FAILED"], True),
        ("COMPLETED", ["COMPLETED", "BUILDING"], False),
        ("FAILED", ["PENDING"], False),
        ("CANCELLED", ["UPLOADING"], False),
        ("COMPLETED", ["QUARANTINED"], False),
        ("PENDING", [], False),
        ("UPLOADING", [], False),
        ("BUILDING", ["COMPLETED"], False),
        ("QUARANTINED", ["COMPLETED"], False),
    ],
)
def test_finished_only_when_build_and_every_artifact_are_final(
    build_status: str, artifact_statuses: list[str], finished: bool
) -> None:
    artifacts = [
        artifact_document(id=f"artifact-{index}", status=status)
        for index, status in enumerate(artifact_statuses)
    ]
    build = parse(build_document(status=build_status, artifacts=artifacts))

    assert build.finished is finished


def test_queued_seconds_runs_from_creation_to_start() -> None:
    build = parse(build_document(startedAt="2026-01-01T00:01:30.5Z"))

    assert build.queued_seconds == 90.5


def test_queued_seconds_is_none_before_the_build_starts() -> None:
    assert parse(build_document(startedAt=None)).queued_seconds is None


def test_duration_runs_from_start_to_completion_of_a_finished_build() -> None:
    build = parse(
        build_document(
            status="COMPLETED",
            startedAt="2026-01-01T00:00:30Z",
            completedAt="2026-01-01T00:10:30Z",
            artifacts=[artifact_document(status="COMPLETED")],
        )
    )

    assert build.duration_seconds == 600.0


@pytest.mark.parametrize(
    "document",
    [
        build_document(
            status="BUILDING",
            startedAt="2026-01-01T00:00:30Z",
            completedAt="2026-01-01T00:10:30Z",
        ),
        build_document(
            status="COMPLETED",
            startedAt="2026-01-01T00:00:30Z",
            completedAt="2026-01-01T00:10:30Z",
            artifacts=[artifact_document(status="BUILDING")],
        ),
        build_document(status="CANCELLED", startedAt=None, completedAt="2026-01-01T00:00:30Z"),
        build_document(status="COMPLETED", startedAt="2026-01-01T00:00:30Z", completedAt=None),
    ],
    ids=["build not finished", "artifact not finished", "never started", "no completion time"],
)
def test_duration_is_none_unless_finished_with_both_times(document: dict[str, Any]) -> None:
    assert parse(document).duration_seconds is None


def test_times_out_of_order_give_no_duration_rather_than_a_negative_one() -> None:
    # Clock skew on the API's side: started before created, completed before started.
    build = parse(
        build_document(
            status="COMPLETED",
            createdAt="2026-01-01T00:05:00Z",
            startedAt="2026-01-01T00:01:00Z",
            completedAt="2026-01-01T00:00:30Z",
            artifacts=[
                artifact_document(
                    status="COMPLETED",
                    startedAt="2026-01-01T00:01:00Z",
                    completedAt="2026-01-01T00:00:59Z",
                )
            ],
        )
    )

    assert build.queued_seconds is None
    assert build.duration_seconds is None
    assert build.artifacts[0].duration_seconds is None


def test_artifact_duration_needs_both_start_and_completion() -> None:
    started_and_completed = artifact_document(
        startedAt="2026-01-01T00:00:10Z", completedAt="2026-01-01T00:00:25.5Z"
    )
    only_started = artifact_document(id="artifact-2", startedAt="2026-01-01T00:00:10Z")
    build = parse(build_document(artifacts=[started_and_completed, only_started]))

    assert build.artifacts[0].duration_seconds == 15.5
    assert build.artifacts[1].duration_seconds is None


@pytest.mark.parametrize(
    "text",
    ['step "3" failed', "C:\\build\\out", 'a\\"b', "plain-ascii_label.1"],
)
def test_clean_label_text_keeps_quotes_and_backslashes(text: str) -> None:
    assert clean_label_text(text) == text


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("exit\ncode", "exit code"),
        ("exit\r\ncode", "exit code"),
        ("exit\tcode", "exit code"),
        ("exit\x00code", "exit code"),
        ("exit\x1bcode", "exit code"),
        ("exit\x7fcode", "exit code"),
        ("exit\x85code", "exit code"),
        ("exit\u2028code", "exit code"),
        ("exit\u2029code", "exit code"),
        ("exit\n\n\t code", "exit code"),
        ("café\nlatte", "café latte"),
    ],
)
def test_clean_label_text_turns_line_breaks_and_controls_into_one_space(
    text: str, cleaned: str
) -> None:
    assert clean_label_text(text) == cleaned


def test_clean_label_text_replaces_lone_surrogates_from_json_escapes() -> None:
    body = (
        b'{"id": "build-1", "imageName": "img\\ud800", "imageTag": "\\udfff-tag",'
        b' "status": "BUILDING", "createdAt": "2026-01-01T00:00:00Z", "artifacts": [{"id":'
        b' "a\\udbff", "status": "FAILED", "errorMessage": "boom \\ud83d here",'
        b' "createdAt": "2026-01-01T00:00:00Z"}]}'
    )
    build = parse_build(body)

    assert build.image_name == "img\ufffd"
    assert build.image_tag == "\ufffd-tag"
    assert build.artifacts[0].id == "a\ufffd"
    assert build.artifacts[0].error_message == "boom \ufffd here"
    for value in (build.image_name, build.image_tag, build.artifacts[0].error_message or ""):
        assert value.encode("utf-8").decode("utf-8") == value


def test_clean_label_text_keeps_a_proper_surrogate_pair() -> None:
    build = parse_build(
        b'{"id": "build-1", "imageName": "rocket \\ud83d\\ude80", "imageTag": "v1",'
        b' "status": "BUILDING", "createdAt": "2026-01-01T00:00:00Z"}'
    )

    assert build.image_name == "rocket \U0001f680"


@pytest.mark.parametrize("unit", ["x", "é", "\U0001f680", "a\nb "])
def test_clean_label_text_cuts_long_text_to_256_characters_with_an_ellipsis(unit: str) -> None:
    text = unit * (10240 // len(unit))
    cleaned = clean_label_text(text)

    assert len(cleaned) == MAX_LABEL_LENGTH == 256
    assert cleaned.endswith("…")
    assert cleaned[:-1] == clean_label_text(text[:1000])[: MAX_LABEL_LENGTH - 1]
    cleaned.encode("utf-8")


def test_clean_label_text_keeps_text_of_exactly_256_characters() -> None:
    assert clean_label_text("x" * 256) == "x" * 256
    assert clean_label_text("x" * 257) == "x" * 255 + "…"


def test_long_label_values_from_the_api_are_cut() -> None:
    build = parse(build_document(imageName="n" * 10240, imageTag="t" * 300))

    assert build.image_name == "n" * 255 + "…"
    assert build.image_tag == "t" * 255 + "…"


@pytest.mark.parametrize("message", [None, "", " ", "   ", "\n", "\t\r\n", "\u2028", "\x00"])
def test_empty_or_blank_error_message_becomes_none(message: str | None) -> None:
    build = parse(build_document(artifacts=[artifact_document(errorMessage=message)]))

    assert build.artifacts[0].error_message is None


def test_error_message_is_cleaned_and_trimmed() -> None:
    message = '  step 3/9: "pip install" failed\nexit code 1\n'
    build = parse(build_document(artifacts=[artifact_document(errorMessage=message)]))

    assert build.artifacts[0].error_message == 'step 3/9: "pip install" failed exit code 1'


@pytest.mark.parametrize(
    "text",
    [
        "\x1b[1;31mfailed\x1b[0m",
        "\x9b31mfailed\x9b0m",
        "\x1b]0;window title\x07failed",
        "\x1b]8;;https://example.com\x1b\\failed\x1b]8;;\x1b\\",
        "\x1bMfailed",
    ],
    ids=["CSI colours", "C1 CSI", "OSC title", "OSC hyperlink", "reverse line feed"],
)
def test_terminal_escape_sequences_are_removed_not_left_as_text(text: str) -> None:
    assert clean_label_text(text) == "failed"


def test_a_long_error_message_keeps_its_start_and_its_end() -> None:
    message = "step 3/9 " + "." * 1000 + " error: no space left on device"
    build = parse(build_document(artifacts=[artifact_document(errorMessage=message)]))

    cleaned = build.artifacts[0].error_message
    assert cleaned is not None
    assert len(cleaned) == MAX_LABEL_LENGTH
    assert cleaned.startswith("step 3/9 ...")
    assert cleaned.endswith("... error: no space left on device")
    assert " … " in cleaned


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"errorMessage": "out of memory"}, "out of memory"),
        ({"error_message": "out of memory"}, "out of memory"),
        ({"errorMessage": None, "error_message": "out of memory"}, "out of memory"),
        ({"errorMessage": "first", "error_message": "second"}, "first"),
        ({"errorMessage": "  \n"}, None),
        ({}, None),
    ],
    ids=["camel case", "snake case", "camel null", "both", "blank", "absent"],
)
def test_a_build_level_error_message_is_read_as_the_official_client_reads_it(
    changes: dict[str, Any], expected: str | None
) -> None:
    assert parse(build_document(status="FAILED", **changes)).error_message == expected


def test_artifacts_repeating_an_id_are_kept_once_so_series_stay_unique() -> None:
    artifact = {"id": "a1", "status": "BUILDING", "createdAt": "2026-01-01T00:00:00Z"}
    payload = {
        "id": "b1",
        "imageName": "app",
        "imageTag": "v1",
        "status": "BUILDING",
        "createdAt": "2026-01-01T00:00:00Z",
        "artifacts": [artifact, {**artifact, "status": "FAILED"}, {**artifact, "id": "a2"}],
    }
    build = parse_build(json.dumps(payload).encode())
    assert [(a.id, a.status) for a in build.artifacts] == [("a1", "BUILDING"), ("a2", "BUILDING")]


def failed_with(build_message: str | None, *artifact_errors: tuple[str, str | None]) -> Build:
    """A FAILED build with its own error message (or none) and one artifact per type given."""
    artifacts = [
        artifact_document(
            id=f"artifact-{index}", artifactType=kind, status="FAILED", errorMessage=message
        )
        for index, (kind, message) in enumerate(artifact_errors)
    ]
    return parse(build_document(status="FAILED", errorMessage=build_message, artifacts=artifacts))


def test_a_failure_reason_is_the_builds_own_message_first() -> None:
    build = failed_with("2 of 2 artifacts failed", ("CONTAINER_IMAGE", "COPY failed"))
    assert build.failure_reason == "2 of 2 artifacts failed"


def test_a_failure_reason_without_the_builds_message_names_each_artifacts_error_by_type() -> None:
    build = failed_with(
        None,
        ("CONTAINER_IMAGE", "COPY failed: no such file"),
        ("VM_SANDBOX", "disk quota exceeded"),
        ("WASM_MODULE", "bad module"),
        ("CONTAINER_IMAGE", None),
    )
    assert build.failure_reason == (
        "container: COPY failed: no such file; vm_sandbox: disk quota exceeded; "
        "wasm_module: bad module"
    )


def test_a_build_without_any_error_message_has_no_failure_reason() -> None:
    assert failed_with(None, ("CONTAINER_IMAGE", None)).failure_reason is None
    assert failed_with(None).failure_reason is None


def test_a_failure_reason_of_many_long_artifact_errors_is_bounded_and_keeps_its_end() -> None:
    long = "step 1/9 " + "x" * 300 + "\x1b[31m error: exit code 1\nsee log"
    build = failed_with(None, ("CONTAINER_IMAGE", long), ("VM_SANDBOX", long))
    reason = build.failure_reason
    assert reason is not None
    assert len(reason) == MAX_LABEL_LENGTH
    assert reason.startswith("container: step 1/9 ")
    assert reason.endswith("error: exit code 1 see log")
    assert reason.isprintable()
