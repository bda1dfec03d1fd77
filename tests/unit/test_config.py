"""The config file: one readable ConfigError per mistake, defaults, build files and the API key."""

from __future__ import annotations

import errno
import json
from collections.abc import Mapping
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr

from exporter.config.credentials import ApiKeySource
from exporter.config.grammar import parse_duration, validate_build_id
from exporter.config.loading import load_config
from exporter.config.schema import BuildDiscoverySettings, ConfigFile
from exporter.config.wording import ConfigError, counted, more_problems, quoted, unreadable
from tests.helpers.support import CANARY_API_KEY, REPOSITORY

CONFIGS = REPOSITORY / "tests" / "configs"
INVALID = CONFIGS / "invalid"
VALID = CONFIGS / "valid"

KEY = "pk-test-0123456789abcdef"
WITH_KEY: Mapping[str, str] = {"PRIME_API_KEY": KEY}
NO_KEY: Mapping[str, str] = {}


def write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, creating parent directories, and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path, environ: Mapping[str, str]) -> str:
    """The message of the ConfigError that loading ``path`` must raise."""
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ)
    return str(caught.value)


# --- invalid files: one fixture per mistake ------------------------------------------------------

# (fixture name, environ, substrings the message must contain). In the substrings, {file} stands
# for the fixture's path and {dir} for its directory. Each message must name the field (or the
# file and line) that is wrong, so the operator knows where to look.
INVALID_CASES: list[tuple[str, Mapping[str, str], tuple[str, ...]]] = [
    (
        "unknown_top_level_key.yaml",
        WITH_KEY,
        (
            "{file}: polling_interval: unknown key",
            "(allowed: api, polling, builds, build_files, metrics, shard, web, state, discovery)",
        ),
    ),
    (
        "unknown_nested_key.yaml",
        WITH_KEY,
        (
            "{file}: api.timout: unknown key",
            "(allowed: base_url, api_key_file, timeout, max_concurrency, requests_per_second, "
            "max_response_size)",
        ),
    ),
    (
        "duration_in_words.yaml",
        WITH_KEY,
        (
            "{file}: polling.interval: '5 minutes' is not a duration",
            "(ms, s, m, h, d, w, y), such as 30s, 5m or 1h30m",
        ),
    ),
    (
        "duration_bare_number.yaml",
        WITH_KEY,
        ("{file}: polling.interval: 30 is not a duration: write a number with a unit",),
    ),
    (
        "negative_interval.yaml",
        WITH_KEY,
        ("{file}: polling.interval: '-5s' is not a duration",),
    ),
    (
        "zero_interval.yaml",
        WITH_KEY,
        ("{file}: polling.interval: must be at least 1s",),
    ),
    (
        "stale_after_not_above_interval.yaml",
        WITH_KEY,
        (
            "{file}: polling: stale_after (30s) must be longer than interval (1m), or healthy "
            "builds blink out of /metrics between polls",
        ),
    ),
    (
        "timeout_above_limit.yaml",
        WITH_KEY,
        ("{file}: api.timeout: must be at most 5m",),
    ),
    (
        "build_id_parent_directory.yaml",
        WITH_KEY,
        (
            "{file}: builds[1]: build ID '../x' is invalid",
            "use 1 to 128 letters, digits, '-', '_' or '.'",
        ),
    ),
    (
        "build_id_with_slash.yaml",
        WITH_KEY,
        ("{file}: builds[0]: build ID 'a/b' is invalid",),
    ),
    (
        "build_id_dot_dot.yaml",
        WITH_KEY,
        ("{file}: builds[0]: build ID '..' is invalid", "and not '.' or '..'"),
    ),
    (
        "build_id_empty.yaml",
        WITH_KEY,
        ("{file}: builds[0]: build ID '' is invalid",),
    ),
    (
        "build_id_too_long.yaml",
        WITH_KEY,
        ("{file}: builds[0]: build ID a 200-character value (not repeated", "use 1 to 128"),
    ),
    (
        "build_id_unquoted_number.yaml",
        WITH_KEY,
        (
            "{file}: builds[1]: build ID 12345 is not a string",
            "quote it in YAML ('12345')",
        ),
    ),
    (
        "build_id_unquoted_leading_zero.yaml",
        WITH_KEY,
        ("{file}: builds[0]: build ID", "quote it in YAML ('012345')"),
    ),
    (
        "builds_not_a_list.yaml",
        WITH_KEY,
        ("{file}: builds: must be a list",),
    ),
    (
        "section_not_a_mapping.yaml",
        WITH_KEY,
        ("{file}: polling: must be a mapping of keys",),
    ),
    (
        "no_api_key.yaml",
        NO_KEY,
        (
            "{file}: no API key: set api.api_key_file in the file "
            "or PRIME_API_KEY in the environment",
        ),
    ),
    (
        "two_key_sources.yaml",
        WITH_KEY,
        ("{file}: api.api_key_file is set and so is PRIME_API_KEY: keep only one key source",),
    ),
    (
        "api_key_file_missing.yaml",
        NO_KEY,
        (
            "{file}: api.api_key_file: cannot read {dir}/keys/missing.key: "
            "No such file or directory",
        ),
    ),
    (
        "api_key_file_empty.yaml",
        NO_KEY,
        ("{file}: api.api_key_file: {dir}/keys/empty.key is empty",),
    ),
    (
        "api_key_file_not_utf8.yaml",
        NO_KEY,
        ("{file}: api.api_key_file: cannot read {dir}/keys/not-utf8.key",),
    ),
    (
        "duplicate_key.yaml",
        WITH_KEY,
        ("{file}:5:1: duplicate key 'polling'",),
    ),
    (
        "yaml_syntax_error.yaml",
        WITH_KEY,
        ("{file}:5:", "mapping values are not allowed here"),
    ),
    (
        "yaml_unhashable_key.yaml",
        WITH_KEY,
        ("{file}:3:", "unhashable key"),
    ),
    (
        "top_level_list.yaml",
        WITH_KEY,
        ("{file}: the config file must be a YAML mapping of sections",),
    ),
    (
        "python_object_tag.yaml",
        WITH_KEY,
        (
            "{file}:4:",
            "could not determine a constructor for the tag",
            "python/object/apply:os.system",
        ),
    ),
    (
        "base_url_plain_http.yaml",
        WITH_KEY,
        (
            "{file}: api.base_url: 'http://api.example.com' uses plain http",
            "the API key is only sent over https",
        ),
    ),
    (
        "base_url_with_credentials.yaml",
        WITH_KEY,
        (
            "{file}: api.base_url: credentials do not belong in the URL: "
            "use api_key_file or PRIME_API_KEY",
        ),
    ),
    (
        "base_url_port_out_of_range.yaml",
        WITH_KEY,
        ("{file}: api.base_url:", "port"),
    ),
    (
        "base_url_env_plain_http.yaml",
        {"PRIME_API_KEY": KEY, "PRIME_API_BASE_URL": "http://api.example.com"},
        ("{file}: PRIME_API_BASE_URL: 'http://api.example.com' uses plain http",),
    ),
    (
        "max_concurrency_zero.yaml",
        WITH_KEY,
        ("{file}: api.max_concurrency: Input should be greater than or equal to 1 (got 0)",),
    ),
    (
        "max_concurrency_quoted.yaml",
        WITH_KEY,
        ("{file}: api.max_concurrency: Input should be a valid integer (got '4')",),
    ),
    (
        "requests_per_second_zero.yaml",
        WITH_KEY,
        ("{file}: api.requests_per_second: Input should be greater than 0 (got 0)",),
    ),
    (
        "requests_per_second_boolean.yaml",
        WITH_KEY,
        ("{file}: api.requests_per_second:", "valid number"),
    ),
    (
        "listen_address_without_colon.yaml",
        WITH_KEY,
        (
            "{file}: web.listen_address: '9862' is not a listen address "
            "such as :9862 or 127.0.0.1:9862",
        ),
    ),
    (
        "listen_address_unbracketed_ipv6.yaml",
        WITH_KEY,
        (
            "{file}: web.listen_address: '::1:9862': "
            "write IPv6 addresses in brackets, such as [::1]:9862",
        ),
    ),
    (
        "build_file_invalid_id.yaml",
        WITH_KEY,
        ("{dir}/builds/bad-id.txt:3: build ID 'a/b' is invalid",),
    ),
    (
        "discovery_enabled_not_boolean.yaml",
        WITH_KEY,
        ("{file}: discovery.images.enabled: must be true or false",),
    ),
    (
        "discovery_interval_too_short.yaml",
        WITH_KEY,
        ("{file}: discovery.images.interval:", "30"),
    ),
    (
        "discovery_team_id_invalid.yaml",
        WITH_KEY,
        ("{file}: discovery.images.team_id: 'team 1; drop' is not a team ID",),
    ),
    (
        "discovery_unknown_key.yaml",
        WITH_KEY,
        ("{file}: discovery.image: unknown key", "(allowed: images, builds)"),
    ),
    (
        "discovery_builds_enabled_not_boolean.yaml",
        WITH_KEY,
        ("{file}: discovery.builds.enabled: must be true or false",),
    ),
    (
        "discovery_builds_interval_too_short.yaml",
        WITH_KEY,
        ("{file}: discovery.builds.interval: must be at least 10s",),
    ),
    (
        "discovery_builds_window_too_short.yaml",
        WITH_KEY,
        ("{file}: discovery.builds.window: must be at least 1h",),
    ),
    (
        "discovery_builds_window_too_long.yaml",
        WITH_KEY,
        ("{file}: discovery.builds.window: must be at most 1y",),
    ),
    (
        "discovery_max_pages_too_many.yaml",
        WITH_KEY,
        (
            "{file}: discovery.images.max_pages: Input should be less than or equal to 10000 "
            "(got 10001)",
        ),
    ),
    (
        "discovery_max_pages_quoted.yaml",
        WITH_KEY,
        ("{file}: discovery.images.max_pages: Input should be a valid integer (got '400')",),
    ),
    (
        "discovery_builds_max_pages_zero.yaml",
        WITH_KEY,
        ("{file}: discovery.builds.max_pages: Input should be greater than or equal to 1 (got 0)",),
    ),
    (
        "discovery_builds_max_pages_quoted.yaml",
        WITH_KEY,
        ("{file}: discovery.builds.max_pages: Input should be a valid integer (got '100')",),
    ),
    (
        "discovery_builds_team_id_invalid.yaml",
        WITH_KEY,
        (
            "{file}: discovery.builds.team_id: '../team' is not a team ID "
            "(letters, digits, '.', '_' or '-')",
        ),
    ),
    (
        "discovery_builds_unknown_key.yaml",
        WITH_KEY,
        (
            "{file}: discovery.builds.page_size: unknown key "
            "(allowed: enabled, interval, window, max_pages, team_id)",
        ),
    ),
]


@pytest.mark.parametrize(
    ("name", "environ", "expected"),
    [
        pytest.param(name, environ, expected, id=name.removesuffix(".yaml"))
        for name, environ, expected in INVALID_CASES
    ],
)
def test_invalid_config_is_rejected_with_a_message_naming_the_field(
    name: str, environ: Mapping[str, str], expected: tuple[str, ...]
) -> None:
    path = INVALID / name
    message = config_error(path, environ)
    for text in expected:
        wanted = text.replace("{file}", str(path)).replace("{dir}", str(path.parent))
        assert wanted in message


def test_every_invalid_fixture_has_exactly_one_table_entry() -> None:
    names = [name for name, _, _ in INVALID_CASES]
    assert len(names) == len(set(names))
    assert set(names) == {path.name for path in INVALID.glob("*.yaml")}


def test_a_python_object_tag_is_rejected_without_running_anything(tmp_path: Path) -> None:
    marker = tmp_path / "created-by-yaml"
    path = write(
        tmp_path / "config.yaml",
        f'builds:\n  - !!python/object/apply:os.mkdir ["{marker}"]\n',
    )
    message = config_error(path, WITH_KEY)
    assert f"{path}:2:" in message
    assert "could not determine a constructor" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "base_url",
    [
        pytest.param("https://user:hunter2@api.example.com", id="https"),
        pytest.param(
            "ftp://user:hunter2@api.example.com",
            id="not-http",
        ),
        pytest.param(
            "https://user:hunter2@",
            id="no-host",
        ),
    ],
)
def test_a_password_in_base_url_is_not_repeated_in_the_error(tmp_path: Path, base_url: str) -> None:
    path = write(tmp_path / "config.yaml", f"api:\n  base_url: '{base_url}'\n")
    message = config_error(path, WITH_KEY)
    assert f"{path}: api.base_url:" in message
    assert "hunter2" not in message


def test_a_duration_below_its_minimum_is_explained_in_duration_units() -> None:
    message = config_error(INVALID / "zero_interval.yaml", WITH_KEY)
    assert "polling.interval" in message
    assert "1s" in message


def test_an_empty_api_section_is_judged_the_same_with_or_without_a_base_url_override(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "config.yaml", "api:\nbuilds:\n  - trainer-v1\n")
    outcomes = []
    for environ in (WITH_KEY, {**WITH_KEY, "PRIME_API_BASE_URL": "https://api.example.com"}):
        try:
            load_config(path, environ)
        except ConfigError:
            outcomes.append("rejected")
        else:
            outcomes.append("accepted")
    assert outcomes[0] == outcomes[1]


# --- valid files ---------------------------------------------------------------------------------

VALID_CASES: dict[str, Mapping[str, str]] = {
    "minimal.yaml": WITH_KEY,
    "durations.yaml": WITH_KEY,
    "fractional_rate.yaml": WITH_KEY,
    "base_url_in_file.yaml": WITH_KEY,
    "key_file.yaml": NO_KEY,
    "empty.yaml": WITH_KEY,
    "build_files.yaml": WITH_KEY,
}


@pytest.mark.parametrize(
    ("name", "environ"),
    [
        pytest.param(name, environ, id=name.removesuffix(".yaml"))
        for name, environ in VALID_CASES.items()
    ],
)
def test_valid_fixture_loads_with_an_api_key(name: str, environ: Mapping[str, str]) -> None:
    config = load_config(VALID / name, environ)
    assert config.source == VALID / name
    assert config.api_key is not None
    assert config.api_key.current().get_secret_value().startswith("pk-test-")


def test_every_valid_fixture_has_a_table_entry() -> None:
    assert set(VALID_CASES) == {path.name for path in VALID.glob("*.yaml")}


def test_a_minimal_config_gets_the_documented_defaults() -> None:
    config = load_config(VALID / "minimal.yaml", WITH_KEY)
    assert config.build_ids == ("trainer-v1",)
    assert config.api.base_url == "https://api.primeintellect.ai"
    assert config.api.api_key_file is None
    assert config.api.timeout == 10.0
    assert config.api.max_concurrency == 4
    assert config.api.requests_per_second == 2.0
    assert config.polling.interval == 30.0
    assert config.polling.stale_after == 15 * 60.0
    assert config.web.listen_address == ":9862"
    assert config.api_key is not None
    assert config.api_key.file is None
    assert config.api_key.current().get_secret_value() == KEY


def test_the_key_from_the_environment_is_trimmed() -> None:
    config = load_config(VALID / "minimal.yaml", {"PRIME_API_KEY": f"  {KEY}\n"})
    assert config.api_key is not None
    assert config.api_key.current().get_secret_value() == KEY


def test_a_blank_key_in_the_environment_counts_as_no_key() -> None:
    message = config_error(VALID / "minimal.yaml", {"PRIME_API_KEY": "  \n"})
    assert "no API key" in message


def test_a_missing_key_is_allowed_when_the_caller_does_not_require_one() -> None:
    config = load_config(VALID / "minimal.yaml", NO_KEY, require_api_key=False)
    assert config.api_key is None
    assert config.build_ids == ("trainer-v1",)


def test_durations_accept_compound_and_sub_second_units() -> None:
    config = load_config(VALID / "durations.yaml", WITH_KEY)
    assert config.api.timeout == 0.5
    assert config.polling.interval == 90 * 60.0
    assert config.polling.stale_after == 2 * 86400.0


def test_requests_per_second_may_be_fractional() -> None:
    config = load_config(VALID / "fractional_rate.yaml", WITH_KEY)
    assert config.api.requests_per_second == 0.5


def test_a_trailing_api_v1_is_stripped_from_the_base_url_in_the_file() -> None:
    config = load_config(VALID / "base_url_in_file.yaml", WITH_KEY)
    assert config.api.base_url == "https://file.example.com"


@pytest.mark.parametrize(
    "override",
    ["https://override.example.com/api/v1", "https://override.example.com/api/v1/"],
)
def test_prime_api_base_url_overrides_the_file_and_loses_a_trailing_api_v1(override: str) -> None:
    environ = {**WITH_KEY, "PRIME_API_BASE_URL": override}
    config = load_config(VALID / "base_url_in_file.yaml", environ)
    assert config.api.base_url == "https://override.example.com"


def test_prime_base_url_is_read_as_the_official_client_reads_it() -> None:
    environ = {**WITH_KEY, "PRIME_BASE_URL": "https://other.example.com/api/v1"}
    assert load_config(VALID / "minimal.yaml", environ).api.base_url == (
        "https://other.example.com"
    )
    # PRIME_API_BASE_URL comes first when both are set.
    environ["PRIME_API_BASE_URL"] = "https://first.example.com"
    assert load_config(VALID / "minimal.yaml", environ).api.base_url == (
        "https://first.example.com"
    )


def test_a_plain_http_prime_base_url_is_refused_under_its_own_name(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", "builds: [b1]\n")
    message = config_error(path, {**WITH_KEY, "PRIME_BASE_URL": "http://api.example.com"})
    assert message.startswith(f"{path}: PRIME_BASE_URL: 'http://api.example.com' uses plain http")


def test_prime_api_base_url_applies_when_the_file_has_no_api_section() -> None:
    environ = {**WITH_KEY, "PRIME_API_BASE_URL": "http://127.0.0.1:8080/"}
    config = load_config(VALID / "minimal.yaml", environ)
    assert config.api.base_url == "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    "base_url",
    ["http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080"],
    ids=["ipv4-loopback", "localhost", "ipv6-loopback"],
)
def test_plain_http_is_allowed_to_a_loopback_host(tmp_path: Path, base_url: str) -> None:
    path = write(tmp_path / "config.yaml", f"api:\n  base_url: '{base_url}'\n")
    config = load_config(path, WITH_KEY)
    assert config.api.base_url == base_url


@pytest.mark.parametrize(
    "listen_address",
    [":9862", "0.0.0.0:9862", "127.0.0.1:0", "[::]:9862", "[::1]:9862", "localhost:9862"],
)
def test_listen_address_accepts_host_and_port_forms(tmp_path: Path, listen_address: str) -> None:
    path = write(tmp_path / "config.yaml", f"web:\n  listen_address: '{listen_address}'\n")
    config = load_config(path, WITH_KEY)
    assert config.web.listen_address == listen_address


def test_api_key_file_is_found_next_to_the_config_file_and_trimmed() -> None:
    config = load_config(VALID / "key_file.yaml", NO_KEY)
    assert config.api_key is not None
    assert config.api_key.file == VALID / "keys" / "padded.key"
    assert config.api_key.current().get_secret_value() == "pk-test-from-file"


def test_an_absolute_api_key_file_is_used_as_is(tmp_path: Path) -> None:
    key_file = write(tmp_path / "secrets" / "prime.key", "pk-absolute\n")
    path = write(tmp_path / "etc" / "config.yaml", f"api:\n  api_key_file: '{key_file}'\n")
    config = load_config(path, NO_KEY)
    assert config.api_key is not None
    assert config.api_key.file == key_file
    assert config.api_key.current().get_secret_value() == "pk-absolute"


def test_a_key_file_of_only_whitespace_is_rejected_as_empty(tmp_path: Path) -> None:
    write(tmp_path / "prime.key", " \n\t\n")
    path = write(tmp_path / "config.yaml", "api:\n  api_key_file: prime.key\n")
    message = config_error(path, NO_KEY)
    assert f"{path}: api.api_key_file: {tmp_path / 'prime.key'} is empty" in message


def test_an_empty_file_is_valid_with_a_key_in_the_environment_and_has_no_builds() -> None:
    config = load_config(VALID / "empty.yaml", WITH_KEY)
    assert config.build_ids == ()
    assert config.file.builds == []


def test_an_empty_file_without_a_key_in_the_environment_is_rejected() -> None:
    path = VALID / "empty.yaml"
    message = config_error(path, NO_KEY)
    assert f"{path}: no API key" in message


def test_a_config_file_gone_on_reload_is_a_config_error_without_first_run_advice(
    tmp_path: Path,
) -> None:
    path = tmp_path / "missing.yaml"
    assert config_error(path, WITH_KEY) == f"{path}: the config file does not exist"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            PermissionError(errno.EACCES, "Permission denied"),
            "permission denied: give the exporter's user read access to it",
        ),
        (IsADirectoryError(errno.EISDIR, "Is a directory"), "it is a directory: name a file"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), "it does not exist"),
        (OSError(errno.EIO, "Input/output error"), "input/output error"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "it is not UTF-8 text"),
    ],
    ids=["permission", "directory", "missing", "other", "not_utf8"],
)
def test_an_unreadable_file_is_described_without_python_errno_text(
    error: OSError | UnicodeDecodeError, reason: str
) -> None:
    assert unreadable(error) == reason


@pytest.mark.parametrize(("count", "text"), [(0, "0 builds"), (1, "1 build"), (2, "2 builds")])
def test_a_count_takes_its_noun_in_the_right_number(count: int, text: str) -> None:
    assert counted(count, "build") == text


def test_more_problems_than_one_are_counted_in_the_right_number() -> None:
    assert (more_problems(1), more_problems(2), more_problems(3)) == (
        "",
        " (and 1 more problem)",
        " (and 2 more problems)",
    )


# --- build files ---------------------------------------------------------------------------------


def test_build_files_merge_with_builds_in_order_without_duplicates() -> None:
    config = load_config(VALID / "build_files.yaml", WITH_KEY)
    assert config.file.builds == ["alpha", "shared"]
    assert config.build_ids == ("alpha", "shared", "beta", "gamma", "delta")


def test_build_file_globs_are_relative_to_the_config_directory(tmp_path: Path) -> None:
    # The tests run from the repository root, so a glob resolved against the working
    # directory would find nothing here.
    write(tmp_path / "etc" / "builds" / "one.txt", "from-etc\n")
    write(tmp_path / "builds" / "one.txt", "from-parent\n")
    path = write(tmp_path / "etc" / "config.yaml", "build_files:\n  - builds/*.txt\n")
    assert load_config(path, WITH_KEY).build_ids == ("from-etc",)


def test_an_absolute_build_file_glob_is_used_as_is(tmp_path: Path) -> None:
    write(tmp_path / "shared" / "ids.txt", "absolute-one\n")
    path = write(
        tmp_path / "etc" / "config.yaml", f"build_files:\n  - '{tmp_path / 'shared' / '*.txt'}'\n"
    )
    assert load_config(path, WITH_KEY).build_ids == ("absolute-one",)


def test_a_line_build_file_skips_blank_lines_and_comments(tmp_path: Path) -> None:
    write(
        tmp_path / "ids.txt",
        "# builds of the trainer team\n\ntrainer-v1\n   \n  trainer-v2  \n# end\ntrainer-v3",
    )
    path = write(tmp_path / "config.yaml", "build_files:\n  - ids.txt\n")
    assert load_config(path, WITH_KEY).build_ids == ("trainer-v1", "trainer-v2", "trainer-v3")


@pytest.mark.parametrize(
    "text",
    [
        "# a block list\n- trainer-v1\n- 'trainer-v2'\n",
        "[trainer-v1, trainer-v2]\n",
    ],
    ids=["block", "flow"],
)
def test_a_build_file_may_be_a_yaml_list(tmp_path: Path, text: str) -> None:
    write(tmp_path / "ids.yaml", text)
    path = write(tmp_path / "config.yaml", "build_files:\n  - ids.yaml\n")
    assert load_config(path, WITH_KEY).build_ids == ("trainer-v1", "trainer-v2")


def test_files_matched_by_one_glob_are_read_in_name_order(tmp_path: Path) -> None:
    write(tmp_path / "builds" / "b.txt", "second\n")
    write(tmp_path / "builds" / "a.txt", "first\n")
    write(tmp_path / "builds" / "c.txt", "third\nfirst\n")
    path = write(tmp_path / "config.yaml", "build_files:\n  - builds/*.txt\n")
    assert load_config(path, WITH_KEY).build_ids == ("first", "second", "third")


def test_an_invalid_id_in_a_line_build_file_names_the_file_and_line(tmp_path: Path) -> None:
    build_file = write(tmp_path / "ids.txt", "# comment\ntrainer-v1\n\n../etc/passwd\n")
    path = write(tmp_path / "config.yaml", "build_files:\n  - ids.txt\n")
    message = config_error(path, WITH_KEY)
    assert f"{build_file}:4: build ID '../etc/passwd' is invalid" in message


def test_an_invalid_id_in_a_yaml_list_build_file_names_the_file_and_item(tmp_path: Path) -> None:
    build_file = write(tmp_path / "ids.yaml", "- trainer-v1\n- 12345\n")
    path = write(tmp_path / "config.yaml", "build_files:\n  - ids.yaml\n")
    message = config_error(path, WITH_KEY)
    assert f"{build_file}: item 2: build ID 12345 is not a string" in message
    assert "quote it in YAML ('12345')" in message


def test_a_yaml_build_file_that_is_not_a_list_is_rejected(tmp_path: Path) -> None:
    build_file = write(tmp_path / "ids.yaml", "---\nbuilds: [trainer-v1]\n")
    path = write(tmp_path / "config.yaml", "build_files:\n  - ids.yaml\n")
    message = config_error(path, WITH_KEY)
    assert f"{build_file}: expected a YAML list of build IDs" in message


@pytest.mark.parametrize("starting", [True, False], ids=["at_start", "on_reload"])
def test_a_build_file_glob_that_matches_nothing_in_an_existing_directory_is_fine(
    tmp_path: Path, starting: bool
) -> None:
    (tmp_path / "builds.d").mkdir()
    path = write(
        tmp_path / "config.yaml",
        "builds:\n  - trainer-v1\nbuild_files:\n  - builds.d/*.txt\n  - none-*.txt\n",
    )
    assert load_config(path, WITH_KEY, starting=starting).build_ids == ("trainer-v1",)


@pytest.mark.parametrize("starting", [True, False], ids=["at_start", "on_reload"])
@pytest.mark.parametrize(
    ("pattern", "looks_in"),
    [("nothing-here/*.txt", "nothing-here"), ("teams/*/ids.txt", "teams")],
)
def test_a_build_file_glob_in_a_missing_directory_is_an_error_naming_the_key_and_directory(
    tmp_path: Path, starting: bool, pattern: str, looks_in: str
) -> None:
    path = write(
        tmp_path / "config.yaml", f"builds: [b1]\nbuild_files:\n  - ids.txt\n  - {pattern}\n"
    )
    write(tmp_path / "ids.txt", "b2\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, WITH_KEY, starting=starting)
    assert str(caught.value) == (
        f"{path}: build_files[1]: {pattern} looks in {tmp_path / looks_in}, which does not "
        "exist: create the directory (an empty one is fine), or correct the pattern"
    )


def test_a_build_file_glob_whose_directory_is_a_file_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "builds.d", "b1\n")
    path = write(tmp_path / "config.yaml", "build_files:\n  - builds.d/*.txt\n")
    assert config_error(path, WITH_KEY) == (
        f"{path}: build_files[0]: builds.d/*.txt looks in {tmp_path / 'builds.d'}, which is not "
        "a directory: create the directory (an empty one is fine), or correct the pattern"
    )


def test_a_literal_build_file_that_does_not_exist_is_an_error_at_start(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", "builds: [b1]\nbuild_files:\n  - typo.txt\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, WITH_KEY, starting=True)
    assert str(caught.value) == (
        f"{path}: build_files[0]: {tmp_path / 'typo.txt'} does not exist: create it, "
        "or correct or remove the entry"
    )


def test_build_files_are_found_when_the_config_directory_has_glob_characters(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "conf[1]"
    write(directory / "ids.txt", "trainer-v1\n")
    path = write(directory / "config.yaml", "build_files:\n  - ids.txt\n")
    assert load_config(path, WITH_KEY).build_ids == ("trainer-v1",)


def test_a_line_build_file_may_start_with_an_id_that_begins_with_a_dash(tmp_path: Path) -> None:
    write(tmp_path / "ids.txt", "-nightly\ntrainer-v1\n")
    path = write(tmp_path / "config.yaml", "build_files:\n  - ids.txt\n")
    assert load_config(path, WITH_KEY).build_ids == ("-nightly", "trainer-v1")


# --- the API key source --------------------------------------------------------------------------


def test_api_key_source_rereads_the_file_after_it_changes(tmp_path: Path) -> None:
    key_file = write(tmp_path / "prime.key", "pk-first\n")
    source = ApiKeySource(file=key_file)
    assert source.current().get_secret_value() == "pk-first"
    # A different length changes the size, so no wait for a new mtime is needed.
    write(key_file, "pk-second-and-longer\n")
    assert source.current().get_secret_value() == "pk-second-and-longer"


def test_api_key_source_picks_up_a_file_replaced_by_a_rename(tmp_path: Path) -> None:
    key_file = write(tmp_path / "prime.key", "pk-first\n")
    source = ApiKeySource(file=key_file)
    write(tmp_path / "prime.key.new", "pk-rotated-key\n").replace(key_file)
    assert source.current().get_secret_value() == "pk-rotated-key"


def test_api_key_source_keeps_the_last_key_when_the_file_becomes_empty(tmp_path: Path) -> None:
    key_file = write(tmp_path / "prime.key", "pk-first\n")
    source = ApiKeySource(file=key_file)
    write(key_file, "")
    assert source.current().get_secret_value() == "pk-first"
    write(key_file, "pk-after-the-gap\n")
    assert source.current().get_secret_value() == "pk-after-the-gap"


def test_api_key_source_keeps_the_last_key_when_the_file_is_deleted(tmp_path: Path) -> None:
    key_file = write(tmp_path / "prime.key", "pk-first\n")
    source = ApiKeySource(file=key_file)
    key_file.unlink()
    assert source.current().get_secret_value() == "pk-first"
    write(key_file, "pk-recreated-key\n")
    assert source.current().get_secret_value() == "pk-recreated-key"


def test_api_key_source_keeps_the_last_key_when_the_file_is_not_utf8(tmp_path: Path) -> None:
    key_file = write(tmp_path / "prime.key", "pk-first\n")
    source = ApiKeySource(file=key_file)
    key_file.write_bytes(b"\xff\xfe-not-text\n")
    assert source.current().get_secret_value() == "pk-first"


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ("\ufeffpk-rotated\n", "pk-rotated"),
        ("Bearer pk-rotated\n", "pk-rotated"),
        ("bearer   pk-rotated", "pk-rotated"),
    ],
    ids=["byte-order mark", "Bearer prefix", "lower-case bearer"],
)
def test_api_key_source_reads_a_rotated_key_as_editors_and_headers_write_it(
    tmp_path: Path, content: str, key: str
) -> None:
    key_file = write(tmp_path / "prime.key", "pk-first\n")
    source = ApiKeySource(file=key_file)
    write(key_file, content)
    assert source.current().get_secret_value() == key


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("pk-one\npk-two\n", "must hold the key on one line"),
        ("", "is empty"),
        ("pk-clé\n", "the key holds spaces or characters an API key cannot have"),
    ],
    ids=["two lines", "empty", "not ASCII"],
)
def test_a_key_file_rotated_to_unusable_content_is_warned_about_once_and_the_last_key_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str, error: str
) -> None:
    key_file = write(tmp_path / "prime.key", "pk-first\n")
    source = ApiKeySource(file=key_file)
    write(key_file, content)
    with caplog.at_level("WARNING", logger="exporter.config"):
        for _ in range(3):
            assert source.current().get_secret_value() == "pk-first"
    (record,) = caplog.records
    assert record.getMessage() == "the API key file is unusable; the last good key stays in use"
    assert record.__dict__["error"].endswith(error)
    assert "pk-one" not in record.__dict__["error"]


def test_a_non_ascii_key_in_the_environment_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", "builds: [b1]\n")
    assert config_error(path, {"PRIME_API_KEY": "pk-clé"}) == (
        "PRIME_API_KEY: the key holds spaces or characters an API key cannot have"
    )


def test_api_key_source_from_a_value_returns_that_value() -> None:
    assert ApiKeySource(value=SecretStr(KEY)).current().get_secret_value() == KEY


def test_api_key_source_refuses_both_a_file_and_a_value(tmp_path: Path) -> None:
    key_file = write(tmp_path / "prime.key", "pk-from-file\n")
    with pytest.raises(ValueError, match="exactly one of file and value"):
        ApiKeySource(file=key_file, value=SecretStr(KEY))


def test_api_key_source_refuses_neither_a_file_nor_a_value() -> None:
    with pytest.raises(ValueError, match="exactly one of file and value"):
        ApiKeySource()


# --- the key `prime login` saved ----------------------------------------------------------------


def home_with_login(tmp_path: Path, saved: str) -> dict[str, str]:
    """An environment whose home holds ``.prime/config.json`` with the text ``saved``."""
    write(tmp_path / "home" / ".prime" / "config.json", saved)
    return {"HOME": str(tmp_path / "home")}


def test_without_a_file_or_environment_key_the_prime_login_key_is_used(tmp_path: Path) -> None:
    environ = home_with_login(tmp_path, json.dumps({"api_key": KEY, "team_id": None}))
    config = load_config(VALID / "minimal.yaml", environ)
    assert config.api_key is not None
    assert config.api_key.current().get_secret_value() == KEY
    login_file = tmp_path / "home" / ".prime" / "config.json"
    assert config.api_key.origin == f"{login_file} (prime login)"


def test_the_environment_key_wins_over_the_prime_login_key(tmp_path: Path) -> None:
    environ = home_with_login(tmp_path, json.dumps({"api_key": "pk-from-login"}))
    config = load_config(VALID / "minimal.yaml", {**environ, **WITH_KEY})
    assert config.api_key is not None
    assert config.api_key.current().get_secret_value() == KEY
    assert config.api_key.origin == "PRIME_API_KEY"


def test_the_demo_reads_no_prime_login_file(tmp_path: Path) -> None:
    environ = home_with_login(tmp_path, "not json")
    assert load_config(VALID / "minimal.yaml", environ, require_api_key=False).api_key is None


@pytest.mark.parametrize(
    ("saved", "expected"),
    [
        # No file, or a file without a key: the usual error, which now names the file too.
        (
            None,
            "{config}: no API key: set api.api_key_file in the file or PRIME_API_KEY in the "
            "environment, or run prime login, which saves it in {login}",
        ),
        (
            json.dumps({"team_id": "t1"}),
            "{config}: no API key: set api.api_key_file in the file or PRIME_API_KEY in the "
            "environment, or run prime login, which saves it in {login}",
        ),
        (
            json.dumps({"api_key": "  "}),
            "{config}: no API key: set api.api_key_file in the file or PRIME_API_KEY in the "
            "environment, or run prime login, which saves it in {login}",
        ),
        ("{not json", "{config}: no API key set; {login} is not JSON"),
        (json.dumps({"api_key": 12345}), "{config}: {login}: api_key must be a string"),
        (
            json.dumps({"api_key": "pk-ünïcode"}),
            "{config}: {login}: api_key: the key holds spaces or characters an API key cannot have",
        ),
    ],
    ids=["no_file", "no_api_key", "blank_api_key", "not_json", "not_a_string", "non_ascii"],
)
def test_an_unusable_prime_login_file_is_a_config_error_naming_it(
    tmp_path: Path, saved: str | None, expected: str
) -> None:
    login = tmp_path / "home" / ".prime" / "config.json"
    environ = (
        {"HOME": str(tmp_path / "home")} if saved is None else home_with_login(tmp_path, saved)
    )
    config = VALID / "minimal.yaml"
    message = config_error(config, environ)
    assert message == expected.format(config=config, login=login)
    assert "pk-ünïcode" not in message


def test_a_prime_login_key_pasted_as_a_header_is_trimmed_like_the_others(tmp_path: Path) -> None:
    environ = home_with_login(tmp_path, "\ufeff" + json.dumps({"api_key": f"Bearer {KEY}"}))
    config = load_config(VALID / "minimal.yaml", environ)
    assert config.api_key is not None
    assert config.api_key.current().get_secret_value() == KEY


# --- pure helpers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("1w", 604800.0),
        ("500ms", 0.5),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("1s500ms", 1.5),
        ("1w2d3h4m5s6ms", 604800 + 172800 + 10800 + 240 + 5 + 0.006),
        ("0s", 0.0),
        ("  15m\n", 900.0),
    ],
)
def test_parse_duration_reads_prometheus_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", "'' is not a duration"),
        ("   ", "is not a duration"),
        ("30", "'30' is not a duration: write a number with a unit (ms, s, m, h, d, w, y)"),
        ("5 minutes", "'5 minutes' is not a duration"),
        ("-5s", "'-5s' is not a duration"),
        ("1.5h", "'1.5h' is not a duration"),
        ("30m1h", "'30m1h' is not a duration"),
        ("5M", "'5M' is not a duration"),
        ("ms", "'ms' is not a duration"),
        (30, "30 is not a duration: write a number with a unit, such as 30s"),
        (1.5, "1.5 is not a duration"),
        (True, "True is not a duration"),
        (None, "None is not a duration"),
    ],
)
def test_parse_duration_rejects_values_without_a_unit_or_in_the_wrong_form(
    value: object, expected: str
) -> None:
    with pytest.raises(ValueError, match="is not a duration") as caught:
        parse_duration(value)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    "build_id",
    ["trainer-v1", "a", "A.b_c-9", "...", "-", "x" * 128],
    ids=["typical", "one-char", "all-classes", "three-dots", "dash", "128-chars"],
)
def test_validate_build_id_accepts_safe_path_segments(build_id: str) -> None:
    assert validate_build_id(build_id) == build_id


@pytest.mark.parametrize(
    "build_id",
    ["", ".", "..", "../x", "a/b", "a\\b", "a b", "a\n", "caf\u00e9", "a?b", "a%2Fb", "x" * 129],
    ids=[
        "empty",
        "dot",
        "dot-dot",
        "parent-path",
        "slash",
        "backslash",
        "space",
        "trailing-newline",
        "non-ascii",
        "query",
        "percent-encoded",
        "129-chars",
    ],
)
def test_validate_build_id_rejects_unsafe_ids(build_id: str) -> None:
    with pytest.raises(ValueError, match="is invalid: use 1 to 128 letters, digits"):
        validate_build_id(build_id)


SHAPE = "use 1 to 128 letters, digits, '-', '_' or '.', and not '.' or '..'"
PASTED_BUILD_IDS = {
    "a_dashboard_url": (
        "https://app.primeintellect.ai/dashboard/builds/cmf3k2x0c0001",
        f"build ID a URL (https://app.primeintellect.ai/…) is invalid: {SHAPE}; did you mean "
        "'cmf3k2x0c0001'?",
    ),
    "a_url_that_goes_on_after_the_id": (
        "https://app.primeintellect.ai/builds/cmf3k2x0c0001/logs?tab=2",
        f"build ID a URL (https://app.primeintellect.ai/…) is invalid: {SHAPE}; did you mean "
        "'cmf3k2x0c0001'?",
    ),
    "the_api_path": (
        "/api/v1/images/build/cmf3k2x0c0001",
        f"build ID '/api/v1/images/build/cmf3k2x0c0001' is invalid: {SHAPE}; did you mean "
        "'cmf3k2x0c0001'?",
    ),
    "a_stray_space": (
        "cmf3k2x0c0001 ",
        f"build ID 'cmf3k2x0c0001 ' is invalid: {SHAPE}; did you mean 'cmf3k2x0c0001'?",
    ),
    "two_ids_on_one_line": (
        "cmf3k2x0c0001 cmf3k2x0c0002",
        f"build ID 'cmf3k2x0c0001 cmf3k2x0c0002' is invalid: {SHAPE}; list each build ID as an "
        "item (or a line) of its own",
    ),
    "a_url_with_no_id": (
        "https://app.primeintellect.ai/dashboard/images",
        f"build ID a URL (https://app.primeintellect.ai/…) is invalid: {SHAPE}",
    ),
    "a_key_where_the_id_would_be": (
        f"https://app.primeintellect.ai/builds/{CANARY_API_KEY}",
        f"build ID a URL (https://app.primeintellect.ai/…) is invalid: {SHAPE}; did you mean the "
        f"{len(CANARY_API_KEY)}-character ID in it (not repeated: it may be a secret)?",
    ),
    "a_key_in_the_query": (
        f"https://app.primeintellect.ai/builds/?token={CANARY_API_KEY}",
        f"build ID a URL (https://app.primeintellect.ai/…) is invalid: {SHAPE}",
    ),
    "a_key_like_host": (
        f"https://{CANARY_API_KEY}.example/builds/c1",
        f"build ID a URL (https://…/…) is invalid: {SHAPE}; did you mean 'c1'?",
    ),
}


@pytest.mark.parametrize(
    ("value", "message"), PASTED_BUILD_IDS.values(), ids=PASTED_BUILD_IDS.keys()
)
def test_a_pasted_url_or_path_as_a_build_id_says_the_shape_and_the_id_it_holds(
    value: str, message: str
) -> None:
    with pytest.raises(ValueError, match="is invalid: use 1 to 128") as raised:
        validate_build_id(value)
    assert str(raised.value) == message
    assert CANARY_API_KEY[:24] not in str(raised.value)


def test_a_pasted_url_in_a_build_file_names_the_file_and_line(tmp_path: Path) -> None:
    build_file = write(
        tmp_path / "ids.txt", "trainer-v1\nhttps://app.primeintellect.ai/builds/cmf3k2x0c0001\n"
    )
    path = write(tmp_path / "config.yaml", "build_files:\n  - ids.txt\n")
    assert config_error(path, WITH_KEY) == (
        f"{build_file}:2: build ID a URL (https://app.primeintellect.ai/…) is invalid: {SHAPE}; "
        "did you mean 'cmf3k2x0c0001'?"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            12345,
            "build ID 12345 is not a string (YAML reads it as a number): "
            "quote it in YAML ('12345')",
        ),
        (1.5, "build ID 1.5 is not a string (YAML reads it as a number): quote it in YAML ('1.5')"),
        (
            True,
            "build ID True is not a string (YAML reads it as a boolean): quote it in YAML ('True')",
        ),
        (None, "build ID is empty: remove the empty list item, or quote the ID"),
    ],
    ids=["int", "float", "bool", "null"],
)
def test_validate_build_id_tells_to_quote_a_non_string(value: object, message: str) -> None:
    with pytest.raises(ValueError, match="build ID") as caught:
        validate_build_id(value)
    assert str(caught.value) == message


def test_a_yaml_boolean_build_id_is_quoted_as_written(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", "builds:\n  - ok-1\n  - yes\n")
    assert config_error(path, WITH_KEY) == (
        f"{path}: builds[1]: build ID yes is not a string (YAML reads it as a boolean): "
        "quote it in YAML ('yes')"
    )


def test_yaml_merge_keys_may_be_overridden_without_a_duplicate_key_error(tmp_path: Path) -> None:
    path = write(
        tmp_path / "config.yaml",
        "polling:\n  <<: {interval: 30s, stale_after: 1h}\n  interval: 10s\n",
    )
    config = load_config(path, WITH_KEY)
    assert config.polling.interval == 10.0
    assert config.polling.stale_after == 3600.0


def test_an_empty_api_key_file_setting_is_rejected_with_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", "api:\n  api_key_file: ''\n")
    assert config_error(path, NO_KEY) == (
        f"{path}: api.api_key_file: must be a file path, or leave it out to use PRIME_API_KEY"
    )


def test_a_key_file_with_two_lines_is_rejected(tmp_path: Path) -> None:
    write(tmp_path / "prime.key", "pk-one\npk-two\n")
    path = write(tmp_path / "config.yaml", "api:\n  api_key_file: prime.key\n")
    message = config_error(path, NO_KEY)
    assert (
        message
        == f"{path}: api.api_key_file: {tmp_path / 'prime.key'} must hold the key on one line"
    )
    assert "pk-one" not in message


def test_a_literal_build_file_gone_on_reload_is_logged_and_its_builds_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "config.yaml", "builds: [b1]\nbuild_files:\n  - typo.txt\n")
    with caplog.at_level("WARNING", logger="exporter.config"):
        assert load_config(path, WITH_KEY).build_ids == ("b1",)
    (record,) = caplog.records
    assert record.getMessage() == "build file not found"
    assert record.__dict__["path"] == str(tmp_path / "typo.txt")


# --- the shipped example -------------------------------------------------------------------------

EXAMPLE = REPOSITORY / "config.example.yaml"


def test_the_example_config_is_valid() -> None:
    config = load_config(EXAMPLE, WITH_KEY)
    assert config.build_ids == ("cmf3k2x0c0001",)
    assert config.file == load_config(VALID / "minimal.yaml", WITH_KEY).file.model_copy(
        update={"builds": ["cmf3k2x0c0001"]}
    )


def test_the_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    sections = {name: field.annotation for name, field in ConfigFile.model_fields.items()}
    for name, annotation in sections.items():
        assert f"\n{name}:" in text, name
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for key in annotation.model_fields:
                assert f"  {key}:" in text or f"  # {key}:" in text, f"{name}.{key}"


def test_repeated_build_ids_are_tracked_once_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path / "more.txt", "b2\nb1\n")
    path = write(tmp_path / "config.yaml", "builds: [b1, b2, b1]\nbuild_files: [more.txt]\n")
    with caplog.at_level("WARNING", logger="exporter.config"):
        assert load_config(path, WITH_KEY).build_ids == ("b1", "b2")
    (record,) = caplog.records
    assert record.getMessage() == "duplicate build IDs ignored"
    assert (record.__dict__["count"], record.__dict__["build_ids"]) == (3, "b1,b2")


@pytest.mark.parametrize("text", ["", "builds: []\n", "build_files: [none-*.txt]\n"])
def test_a_config_that_watches_nothing_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    path = write(tmp_path / "config.yaml", text)
    with caplog.at_level("WARNING", logger="exporter.config"):
        assert load_config(path, WITH_KEY).build_ids == ()
    (record,) = caplog.records
    assert record.getMessage() == (
        "no builds to watch: list build IDs under builds or in the files build_files names"
    )


# --- a secret in the wrong field is never repeated -----------------------------------------------

SECRET = CANARY_API_KEY
MISPLACED_SECRETS = {
    "in_the_base_url_query": f"api:\n  base_url: https://api.example/?key={SECRET}\n",
    "in_the_base_url_fragment": f"api:\n  base_url: https://api.example/#{SECRET}\n",
    "over_plain_http": f"api:\n  base_url: http://api.example/{SECRET}\n",
    "as_the_timeout": f"api:\n  timeout: {SECRET}\n",
    "as_requests_per_second": f"api:\n  requests_per_second: {SECRET}\n",
    "as_the_interval": f"polling:\n  interval: {SECRET}\n",
    "as_the_response_size": f"api:\n  max_response_size: {SECRET}\n",
    "as_a_build_id": f"builds:\n  - {SECRET}/x\n",
    "as_the_listen_address": f"web:\n  listen_address: {SECRET}\n",
    "as_the_shard_index": f"shard:\n  count: 2\n  index: {SECRET}\n",
    "as_a_section": f"api: {SECRET}\n",
    "in_a_list_for_a_number": f"api:\n  max_concurrency: [{SECRET}]\n",
}


@pytest.mark.parametrize("text", MISPLACED_SECRETS.values(), ids=MISPLACED_SECRETS.keys())
def test_a_secret_in_the_wrong_field_is_not_repeated_in_the_error(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    message = config_error(path, {"PRIME_API_KEY": "pk-another-key"})
    assert SECRET not in message
    assert SECRET[:24] not in message
    # Still says where the mistake is.
    assert message.startswith(f"{path}: ")
    assert ": " in message.removeprefix(f"{path}: ")


@pytest.mark.parametrize("variable", ["PRIME_API_BASE_URL", "PRIME_BASE_URL"])
@pytest.mark.parametrize(
    "url",
    [
        f"https://api.example/?key={SECRET}",
        f"https://me:{SECRET}@api.example/",
        f"https://api.example/#{SECRET}",
        SECRET,
    ],
    ids=["query", "userinfo", "fragment", "bare"],
)
def test_a_secret_in_the_base_url_variable_is_not_repeated_in_the_error(
    tmp_path: Path, variable: str, url: str
) -> None:
    path = write(tmp_path / "config.yaml", "builds: [a]\n")
    message = config_error(path, {"PRIME_API_KEY": "pk-another-key", variable: url})
    assert SECRET[:24] not in message
    assert message.startswith(f"{path}: {variable}: ")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30 s", "'30 s'"),
        (45, "45"),
        ("/etc/primeintellect/builds.d/*.txt", "'/etc/primeintellect/builds.d/*.txt'"),
        ("x" * 65, "a 65-character value (not repeated: it may be a secret)"),
        (
            "pk-0123456789abcdefghijklmnop",
            "a 29-character value (not repeated: it may be a secret)",
        ),
        (["a"], "a YAML list"),
    ],
)
def test_short_values_are_quoted_and_key_like_ones_described(value: object, expected: str) -> None:
    assert quoted(value) == expected


def test_discovery_is_off_by_default_and_lists_every_five_minutes(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "c.yaml", "builds: [b1]\n"), WITH_KEY)
    images = config.file.discovery.images
    assert (images.enabled, images.interval, images.search, images.team_id) == (
        False,
        300.0,
        "",
        "",
    )
    # 400 pages of 250: 100,000 images, as before the cap could be set.
    assert images.max_pages == 400


def test_image_discovery_takes_the_page_caps_bounds_as_build_discovery_does(
    tmp_path: Path,
) -> None:
    for pages in (1, 10_000):
        path = write(tmp_path / "c.yaml", f"discovery:\n  images:\n    max_pages: {pages}\n")
        assert load_config(path, WITH_KEY).file.discovery.images.max_pages == pages
    for pages in (0, 10_001):
        for section in ("images", "builds"):
            path = write(tmp_path / "c.yaml", f"discovery:\n  {section}:\n    max_pages: {pages}\n")
            assert f"discovery.{section}.max_pages: Input should be" in config_error(path, WITH_KEY)


def test_the_team_comes_from_the_file_else_from_prime_team_id(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain.yaml", "discovery:\n  images:\n    enabled: true\n")
    from_env = load_config(plain, {**WITH_KEY, "PRIME_TEAM_ID": " team-env "})
    assert from_env.file.discovery.images.team_id == "team-env"
    named = write(
        tmp_path / "named.yaml",
        "discovery:\n  images:\n    enabled: true\n    team_id: team-file\n",
    )
    from_file = load_config(named, {**WITH_KEY, "PRIME_TEAM_ID": "team-env"})
    assert from_file.file.discovery.images.team_id == "team-file"
    assert load_config(plain, WITH_KEY).file.discovery.images.team_id == ""


def test_a_bad_prime_team_id_is_a_config_error_naming_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "discovery:\n  images:\n    enabled: true\n")
    message = config_error(path, {**WITH_KEY, "PRIME_TEAM_ID": "a/b"})
    assert message == (
        f"{path}: PRIME_TEAM_ID: 'a/b' is not a team ID (letters, digits, '.', '_' or '-')"
    )


def test_empty_discovery_sections_mean_the_defaults(tmp_path: Path) -> None:
    for text in ("discovery:\n", "discovery:\n  images:\n", "discovery:\n  builds:\n"):
        config = load_config(write(tmp_path / "c.yaml", "builds: [b1]\n" + text), WITH_KEY)
        assert config.file.discovery.images.enabled is False
        assert config.file.discovery.builds == BuildDiscoverySettings()


def test_build_discovery_is_off_by_default_and_reads_a_week_every_thirty_seconds(
    tmp_path: Path,
) -> None:
    config = load_config(write(tmp_path / "c.yaml", "builds: [b1]\n"), WITH_KEY)
    builds = config.file.discovery.builds
    assert (builds.enabled, builds.interval, builds.window, builds.max_pages, builds.team_id) == (
        False,
        30.0,
        7 * 86400.0,
        100,
        "",
    )


def test_build_discovery_takes_its_bounds_inclusive(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        "discovery:\n  builds:\n    enabled: true\n    interval: 10s\n    window: 1h\n"
        "    max_pages: 10000\n    team_id: team-1\n",
    )
    builds = load_config(path, WITH_KEY).file.discovery.builds
    assert (builds.enabled, builds.interval, builds.window, builds.max_pages, builds.team_id) == (
        True,
        10.0,
        3600.0,
        10000,
        "team-1",
    )
    longest = write(
        tmp_path / "d.yaml", "discovery:\n  builds:\n    interval: 1d\n    window: 1y\n"
    )
    builds = load_config(longest, WITH_KEY).file.discovery.builds
    assert (builds.interval, builds.window) == (86400.0, 365 * 86400.0)


def test_prime_team_id_fills_each_discovery_whose_team_the_file_leaves_empty(
    tmp_path: Path,
) -> None:
    environ = {**WITH_KEY, "PRIME_TEAM_ID": "team-env"}
    plain = write(tmp_path / "plain.yaml", "discovery:\n  builds:\n    enabled: true\n")
    discovery = load_config(plain, environ).file.discovery
    assert (discovery.images.team_id, discovery.builds.team_id) == ("team-env", "team-env")
    named = write(
        tmp_path / "named.yaml",
        "discovery:\n  builds:\n    enabled: true\n    team_id: team-file\n",
    )
    discovery = load_config(named, environ).file.discovery
    assert (discovery.images.team_id, discovery.builds.team_id) == ("team-env", "team-file")
    assert load_config(plain, WITH_KEY).file.discovery.builds.team_id == ""


def test_a_config_without_build_ids_but_with_build_discovery_is_not_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "c.yaml", "discovery:\n  builds:\n    enabled: true\n")
    load_config(path, WITH_KEY)
    assert "no builds to watch" not in caplog.text
    load_config(write(tmp_path / "d.yaml", "builds: []\n"), WITH_KEY)
    assert "no builds to watch" in caplog.text
