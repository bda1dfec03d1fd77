"""The recording rules file, monitoring/rules.yaml: its rules, the names they record, and the
labels each recorded series keeps, which its name's level says (level:metric:operations)."""

from __future__ import annotations

from typing import Any

import yaml

from tests.helpers.support import REPOSITORY

RECORDING_RULES_FILE = REPOSITORY / "monitoring" / "rules.yaml"
# The level of a recorded SLO target: a constant, it keeps no label.
CONSTANT_LEVEL = "slo"
# The levels of every recorded constant: SLO targets, and alert thresholds.
CONSTANT_LEVELS = frozenset({CONSTANT_LEVEL, "threshold"})


def load_recording_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RECORDING_RULES_FILE.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def recorded_names() -> list[str]:
    """Each recorded name once, in the file's order (one name may have several rules, such as
    one per quantile)."""
    return list(dict.fromkeys(rule["record"] for rule in load_recording_rules()))


def level_labels(level: str, vocabulary: set[str]) -> frozenset[str]:
    """The labels a recorded series keeps, from the level of its name: label names of
    ``vocabulary`` joined by ``_`` (``job_image_name`` is job and image_name), or none for a
    constant."""
    if level in CONSTANT_LEVELS:
        return frozenset()
    labels: list[str] = []
    rest = level
    while rest:
        fits = [label for label in vocabulary if rest == label or rest.startswith(label + "_")]
        assert fits, f"level {level!r}: {rest!r} starts with no label name"
        label = max(fits, key=len)
        labels.append(label)
        rest = rest[len(label) + 1 :]
    return frozenset(labels)
