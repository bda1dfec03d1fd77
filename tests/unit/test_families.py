"""The build families are declared once, in exporter.families: the reference families
(exporter.metrics) and the lines written directly (exporter.exposition) both come from that
one table. Their bytes are compared in tests/unit/test_build_lines.py."""

from __future__ import annotations

import pytest

from exporter.exposition import render_build_lines
from exporter.families import (
    ANSWER,
    BUILD_FAMILIES,
    INFO,
    POLL,
    POLL_FAMILIES_START,
    BuildFamily,
    Labelled,
    Value,
)
from exporter.metrics import per_build_families


def test_each_build_family_is_declared_once_by_name() -> None:
    names = [family.name for family in BUILD_FAMILIES]
    assert len(names) == len(set(names))


def test_the_reference_families_are_the_table_in_its_order() -> None:
    assert [
        (family.name, family.type, family.documentation) for family in per_build_families(())
    ] == [(family.name, family.type, family.documentation) for family in BUILD_FAMILIES]


def test_the_direct_writer_writes_one_piece_per_declared_family() -> None:
    assert len(render_build_lines([]).pieces) == len(BUILD_FAMILIES)


def test_the_poll_families_come_last() -> None:
    # A poll rewrites only them: the body keeps the families before them as one block.
    assert [family.scope is POLL for family in BUILD_FAMILIES] == [
        index >= POLL_FAMILIES_START for index in range(len(BUILD_FAMILIES))
    ]


def test_a_familys_labels_are_its_scopes_then_its_own_each_once() -> None:
    for family in BUILD_FAMILIES:
        assert family.labels[: len(family.scope.all_labels)] == family.scope.all_labels
        assert len(set(family.labels)) == len(family.labels), family.name


def test_an_info_family_that_would_carry_other_values_than_1_is_refused() -> None:
    with pytest.raises(ValueError, match="info"):
        BuildFamily("example", INFO, "Not an info.", ANSWER, Value(lambda build: build.created_at))


def test_a_family_that_would_name_a_label_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        BuildFamily(
            "example", INFO, "Twice.", ANSWER, Labelled("image_tag", lambda build: build.id)
        )
