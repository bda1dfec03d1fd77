"""The command line's overrides (Config.with_overrides) and the ConfigLoader that a reload
calls: the same messages as the flags have always given, and the file read again each time."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from exporter.config.credentials import ApiKeySource
from exporter.config.loading import ConfigLoader, load_config
from exporter.config.schema import Config, ConfigFile
from exporter.config.wording import ConfigError

WITH_KEY: Mapping[str, str] = {"PRIME_API_KEY": "pk-test-0123456789abcdef"}


def config_file(directory: Path, text: str) -> Path:
    path = directory / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """A config with four shards, this replica the second, listening on :9000."""
    text = "builds: [b1, b2]\nshard:\n  count: 4\n  index: 1\nweb:\n  listen_address: ':9000'\n"
    return load_config(config_file(tmp_path, text), WITH_KEY)


def test_without_overrides_the_config_is_the_files(config: Config) -> None:
    assert config.with_overrides() is config


def test_a_listen_address_override_replaces_the_files_and_nothing_else(config: Config) -> None:
    overridden = config.with_overrides(listen_address="127.0.0.1:0")
    assert overridden.web.listen_address == "127.0.0.1:0"
    assert overridden.file.model_copy(update={"web": config.web}) == config.file
    assert overridden.build_ids == config.build_ids
    assert overridden.api_key is config.api_key
    assert config.web.listen_address == ":9000"


def test_a_shard_count_override_keeps_the_files_index(config: Config) -> None:
    shard = config.with_overrides(shard_count=8).shard
    assert (shard.count, shard.index) == (8, 1)


def test_a_shard_index_override_may_be_a_statefulset_pod_name(config: Config) -> None:
    shard = config.with_overrides(shard_index="exporter-3").shard
    assert (shard.count, shard.index) == (4, 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"listen_address": "nope"},
            "--web.listen-address: 'nope' is not a listen address such as :9862 or 127.0.0.1:9862",
        ),
        (
            {"listen_address": "::1:80"},
            "--web.listen-address: '::1:80': write IPv6 addresses in brackets, such as [::1]:9862",
        ),
        (
            {"shard_count": 2, "shard_index": "5"},
            "--shard.count/--shard.index: index 5 must be below count 2",
        ),
        (
            {"shard_count": 0},
            "--shard.count/--shard.index: count: Input should be greater than or equal to 1 "
            "(got 0)",
        ),
        (
            {"shard_count": 1001},
            "--shard.count/--shard.index: count: Input should be less than or equal to 1000 "
            "(got 1001)",
        ),
        (
            {"shard_index": "abc"},
            "--shard.count/--shard.index: 'abc' is not a shard index: give a number, "
            "or a pod name ending in -<number>",
        ),
        (
            # The file's count is 4: an index the count from the file cannot hold.
            {"shard_index": "4"},
            "--shard.count/--shard.index: index 4 must be below count 4",
        ),
        (
            # The listen address is checked first.
            {"listen_address": "nope", "shard_count": 0},
            "--web.listen-address: 'nope' is not a listen address such as :9862 or 127.0.0.1:9862",
        ),
    ],
)
def test_a_bad_override_names_its_flag(
    config: Config, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config.with_overrides(**overrides)
    assert str(caught.value) == message


def test_a_config_loader_reads_the_file_again_at_each_call(tmp_path: Path) -> None:
    path = config_file(tmp_path, "builds: [b1]\n")
    load = ConfigLoader(path, WITH_KEY, listen_address="127.0.0.1:0", shard_index="pod-0")
    first = load()
    config_file(tmp_path, "builds: [b1, b2]\nshard:\n  count: 2\n")
    second = load()
    assert (first.build_ids, second.build_ids) == (("b1",), ("b1", "b2"))
    assert {first.web.listen_address, second.web.listen_address} == {"127.0.0.1:0"}
    assert (second.shard.count, second.shard.index) == (2, 0)


def test_a_config_loader_reads_the_environment_it_was_given(tmp_path: Path) -> None:
    load = ConfigLoader(
        config_file(tmp_path, "builds: [b1]\n"),
        {**WITH_KEY, "PRIME_API_BASE_URL": "http://127.0.0.1:8080"},
    )
    assert load().api.base_url == "http://127.0.0.1:8080"


def test_a_config_loader_gives_the_files_mistake_as_the_file_load_does(tmp_path: Path) -> None:
    path = config_file(tmp_path, "polling_interval: 5s\n")
    with pytest.raises(ConfigError) as direct:
        load_config(path, WITH_KEY)
    with pytest.raises(ConfigError) as loaded:
        ConfigLoader(path, WITH_KEY)()
    assert str(loaded.value) == str(direct.value)


def test_a_config_loader_over_a_made_config_applies_only_the_overrides() -> None:
    made = Config(
        source=Path("(demo)"),
        file=ConfigFile.model_validate({"builds": ["b1"]}),
        api_key=ApiKeySource(value=SecretStr("pk-demo"), origin="the demo simulator"),
        build_ids=("b1",),
    )
    assert ConfigLoader(made)() is made
    overridden = ConfigLoader(made, listen_address="127.0.0.1:0")()
    assert overridden.web.listen_address == "127.0.0.1:0"
    assert (overridden.source, overridden.build_ids) == (made.source, made.build_ids)
