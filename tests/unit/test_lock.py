"""The lock files: every dependency pyproject.toml asks for, at one exact version with hashes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers.lock import DEV_LOCK, LOCK, read_lock
from tests.helpers.support import REPOSITORY


def project() -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    return table


@pytest.mark.parametrize(
    ("lock", "requirements"),
    [
        (LOCK, project()["dependencies"]),
        (DEV_LOCK, project()["dependencies"] + project()["optional-dependencies"]["dev"]),
    ],
    ids=["runtime", "dev"],
)
def test_lock_pins_each_dependency_of_pyproject_within_its_range(
    lock: Path, requirements: list[str]
) -> None:
    pins = read_lock(lock)
    outside = []
    for line in requirements:
        requirement = Requirement(line)
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None or pin.version is None or pin.version not in requirement.specifier:
            outside.append(f"{line}: locked {pin and pin.version}")
    assert outside == [], f"pyproject.toml changed without `make lock`: {outside}"


def test_every_locked_package_has_an_exact_version_and_sha256_hashes() -> None:
    for lock in (LOCK, DEV_LOCK):
        for pin in read_lock(lock).values():
            assert pin.version is not None, f"{lock.name}: {pin.requirement}"
            assert pin.hashes, f"{lock.name}: {pin.name} has no hash"
            assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in pin.hashes), pin.name


def test_dev_lock_holds_the_runtime_lock_unchanged() -> None:
    """Installing the dev toolchain over `make demo`'s install moves no runtime package."""
    runtime = read_lock(LOCK)
    dev = read_lock(DEV_LOCK)
    assert {name: dev.get(name) for name in runtime} == runtime


def test_lock_files_name_the_command_that_refreshes_them() -> None:
    makefile = (REPOSITORY / "Makefile").read_text()
    assert re.search(r"^lock: ", makefile, flags=re.MULTILINE)
    for lock in (LOCK, DEV_LOCK):
        assert "#    make lock\n" in lock.read_text(), lock.name
