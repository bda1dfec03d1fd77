"""Splitting the builds across replicas: a stable hash, disjoint shares, every build covered."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from exporter.config.grammar import parse_shard_index
from exporter.config.loading import load_config
from exporter.config.schema import ShardSettings
from exporter.config.wording import ConfigError
from exporter.demo.simulator import Simulator
from tests.conftest import StartExporter
from tests.helpers.support import (
    CANARY_API_KEY,
    environment,
    forever_building,
    make_config,
    run_script,
)

BUILD_IDS = [f"shard-build-{index:03d}" for index in range(40)]


def test_two_replicas_poll_disjoint_sets_whose_union_is_every_build(
    simulator: Simulator, start_exporter: StartExporter
) -> None:
    for build_id in BUILD_IDS:
        simulator.add(forever_building(build_id))
    config = make_config(simulator.base_url, BUILD_IDS)
    replicas = [
        start_exporter(
            dataclasses.replace(
                config,
                file=config.file.model_copy(update={"shard": ShardSettings(count=2, index=index)}),
            )
        )
        for index in (0, 1)
    ]
    for replica in replicas:
        replica.wait_until_all_polled()
    shares = [set(replica.exporter.store.snapshot().records) for replica in replicas]
    assert shares[0].isdisjoint(shares[1])
    assert shares[0] | shares[1] == set(BUILD_IDS)
    assert all(len(share) >= 10 for share in shares), [len(share) for share in shares]
    assert {request.build_id for request in simulator.requests()} == set(BUILD_IDS)
    for index, replica in enumerate(replicas):
        samples = replica.samples()
        exposed = {
            dict(labels)["build_id"]
            for name, labels in samples
            if name == "primeintellect_image_build_last_poll_success"
        }
        assert exposed == shares[index]
        assert replica.value("primeintellect_exporter_shard", index=str(index), count="2") == 1


def test_the_shard_of_a_build_does_not_depend_on_the_process() -> None:
    # Pinned values: Python's salted hash() would make these change from run to run.
    owners = [ShardSettings(count=3, index=index) for index in range(3)]
    assignment = {
        build_id: next(index for index, shard in enumerate(owners) if shard.owns(build_id))
        for build_id in ("cmf3k2x0c0001", "trainer-v1", "a")
    }
    expected = {
        build_id: int.from_bytes(hashlib.blake2b(build_id.encode(), digest_size=8).digest(), "big")
        % 3
        for build_id in assignment
    }
    assert assignment == expected


def test_every_build_belongs_to_exactly_one_shard() -> None:
    shards = [ShardSettings(count=5, index=index) for index in range(5)]
    for build_id in BUILD_IDS:
        assert sum(shard.owns(build_id) for shard in shards) == 1


@pytest.mark.parametrize(
    ("value", "index"),
    [("0", 0), ("2", 2), ("exporter-2", 2), ("primeintellect-build-exporter-13", 13)],
)
def test_shard_index_may_be_a_statefulset_pod_name(value: str, index: int) -> None:
    assert parse_shard_index(value) == index


@pytest.mark.parametrize("value", ["", "exporter", "-", "2x", "exporter-two"])
def test_a_shard_index_without_a_number_is_rejected(value: str) -> None:
    with pytest.raises(ValueError, match="is not a shard index"):
        parse_shard_index(value)


def test_shard_index_must_be_below_the_count() -> None:
    with pytest.raises(ValueError, match="index 3 must be below count 3"):
        ShardSettings(count=3, index=3)


def test_shard_flags_override_the_file_and_config_check_reports_the_share(
    tmp_path: Path,
) -> None:
    builds = "".join(f"\n  - {build_id}" for build_id in BUILD_IDS)
    config = tmp_path / "config.yaml"
    config.write_text(f"shard:\n  count: 2\n  index: 0\nbuilds:{builds}\n")
    env = environment(PRIME_API_KEY=CANARY_API_KEY)
    owned = sum(ShardSettings(count=4, index=3).owns(build_id) for build_id in BUILD_IDS)

    result = run_script(
        "--config.file",
        str(config),
        "--config.check",
        "--shard.count=4",
        "--shard.index=exporter-3",
        env=env,
    )

    assert result.returncode == 0, result.stderr
    assert f"OK, 40 builds ({owned} in shard 3 of 4)" in result.stdout


def test_bad_shard_flags_are_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("builds: [b1]\n")
    env = environment(PRIME_API_KEY=CANARY_API_KEY)
    result = run_script(
        "--config.file",
        str(config),
        "--config.check",
        "--shard.count=2",
        "--shard.index=5",
        env=env,
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip() == "error: --shard.count/--shard.index: index 5 must be below count 2"
    )


def test_a_shard_section_with_a_bad_index_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("shard:\n  count: 2\n  index: 2\n")
    with pytest.raises(ConfigError, match="shard: index 2 must be below count 2"):
        load_config(config, {"PRIME_API_KEY": "k"})
