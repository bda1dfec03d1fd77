"""The lock files in requirements/ (written by ``make lock``), read back as pins."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

from tests.helpers.support import REPOSITORY

# What the exporter needs (and the image installs), and that plus the dev toolchain.
LOCK = REPOSITORY / "requirements" / "runtime.txt"
DEV_LOCK = REPOSITORY / "requirements" / "dev.txt"


@dataclass(frozen=True)
class Pin:
    """One locked package: its requirement line (``name==version ; marker``) and hashes."""

    requirement: Requirement
    hashes: tuple[str, ...]

    @property
    def name(self) -> NormalizedName:
        return canonicalize_name(self.requirement.name)

    @property
    def version(self) -> str | None:
        """The exact version, or None if the line pins none."""
        specifiers = list(self.requirement.specifier)
        if len(specifiers) == 1 and specifiers[0].operator == "==":
            return specifiers[0].version
        return None

    def applies_here(self) -> bool:
        """Whether pip installs it on this interpreter and platform (its marker holds)."""
        marker = self.requirement.marker
        return marker is None or marker.evaluate()


def read_lock(path: Path) -> dict[NormalizedName, Pin]:
    """Each package of a hashed requirements file, by normalized name."""
    text = path.read_text().replace("\\\n", " ")
    pins: dict[NormalizedName, Pin] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement, *options = re.split(r"\s+(?=--)", line)
        hashes = tuple(option.removeprefix("--hash=") for option in options)
        assert all(option.startswith("--hash=") for option in options), line
        pin = Pin(Requirement(requirement), hashes)
        assert pin.name not in pins, f"{pin.name} is locked twice in {path.name}"
        pins[pin.name] = pin
    return pins
