"""The build lines written directly are byte for byte what prometheus_client writes.

Random builds come from the same hostile answer documents as tests/unit/test_properties.py
(control characters, quotes, backslashes, lone surrogates, long texts, odd timestamps),
parsed and cleaned by the real model; each is compared with prometheus_client's rendering
of the same families, in both formats.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from exporter.exposition import ExpositionFormat, render, render_build_lines
from exporter.metrics import per_build_families
from exporter.models import Build, InvalidBuildError, Outcome, parse_build
from exporter.store import BuildRecord
from tests.helpers.support import DETERMINISTIC, documents, texts


def parsed_or_none(document: object, ascii_only: bool) -> Build | None:
    body = json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    try:
        return parse_build(body)
    except InvalidBuildError:
        return None


values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=1.5e9, max_value=2.5e9),
    st.integers(-(10**7), 10**7).map(float),
)


def encodable(text: str) -> bool:
    return not any(0xD800 <= ord(character) <= 0xDFFF for character in text)


# Build IDs come from the config, which holds UTF-8 text; API strings are cleaned by the model.
build_ids = st.sampled_from(["b1", "b-2", 'q"uote', "back\\slash", "new\nline"]) | texts.filter(
    encodable
)


@st.composite
def records(draw: st.DrawFn) -> BuildRecord:
    build_id = draw(build_ids)
    build = draw(st.builds(parsed_or_none, documents(build_id), st.booleans()) | st.none())
    return BuildRecord(
        build_id=build_id,
        build=build,
        finished=draw(st.booleans()),
        polled=draw(st.booleans()),
        last_poll_ok=draw(st.booleans()),
        last_error=draw(st.none() | st.sampled_from(list(Outcome)[1:])),
        last_success_time=draw(st.none() | values),
        retired=draw(st.booleans()) and draw(st.booleans()),
    )


def reference_lines(
    records: list[BuildRecord], format: ExpositionFormat, max_artifacts: int
) -> tuple[bytes, ...]:
    """prometheus_client's rendering of each build family, without its HELP and TYPE lines."""
    pieces = []
    for family in per_build_families(records, max_artifacts):
        text = render([family], format).removesuffix(b"# EOF\n")
        pieces.append(text.split(b"\n", 2)[2])
    return tuple(pieces)


@DETERMINISTIC
@given(
    builds=st.lists(records(), max_size=5),
    max_artifacts=st.sampled_from([0, 1, 2, 64]),
)
def test_build_lines_are_what_prometheus_client_writes_in_both_formats(
    builds: list[BuildRecord], max_artifacts: int
) -> None:
    written = render_build_lines(builds, max_artifacts)
    for format in ExpositionFormat:
        assert written.pieces == reference_lines(builds, format, max_artifacts), format
    # Each build's share of each piece is exactly its own lines: what a change splices.
    for family, (piece, lengths) in enumerate(zip(*written, strict=True)):
        assert len(lengths) == len(builds)
        start = 0
        for build, length in zip(builds, lengths, strict=True):
            alone = render_build_lines([build], max_artifacts).pieces[family]
            assert piece[start : start + length] == alone
            start += length
        assert start == len(piece)


def test_the_property_sees_hostile_labels_and_every_family() -> None:
    # The random cases above are only worth something if they reach the escapes and every
    # family; these fixed builds do, so a renderer that skipped one fails here too.
    def answer(status: str) -> Build:
        return parse_build(
            json.dumps(
                {
                    "id": 'b"1\\',
                    "imageName": "app\\name",
                    "imageTag": 'v"1',
                    "status": status,
                    "createdAt": "2026-01-01T00:00:00Z",
                    "startedAt": "2026-01-01T00:01:00Z",
                    "completedAt": "2026-01-01T00:02:00Z",
                    "errorMessage": 'build "failed" \\ at step 3',
                    "artifacts": [
                        {
                            "id": f"a{index}",
                            "artifactType": "VM_SANDBOX" if index else "WASM",
                            "status": "FAILED",
                            "errorMessage": 'disk "full" \\ again',
                            "fullImagePath": "registry/app:v1",
                            "createdAt": "2026-01-01T00:00:00Z",
                            "startedAt": "2026-01-01T00:00:30Z",
                            "completedAt": "2026-01-01T00:01:30Z",
                        }
                        for index in range(3)
                    ],
                }
            ).encode()
        )

    records = [
        BuildRecord(
            build_id=f'b"{status}\\',
            build=answer(status),
            polled=True,
            last_poll_ok=False,
            last_error=Outcome.TIMEOUT,
            last_success_time=1767225600.5,
        )
        for status in ("FAILED", "SOMETHING_NEW")
    ]
    written = render_build_lines(records, max_artifacts_per_build=2).pieces
    assert all(written), "every build family has a line"
    assert b'build_id="b\\"1\\\\"' in written[0]
    assert b'image_name="app\\\\name"' in written[0]
    assert b'status="UNKNOWN"} 1.0' in written[1]
    for format in ExpositionFormat:
        assert written == reference_lines(records, format, 2)
