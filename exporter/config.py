"""The configuration file: strict models, loading, and one readable error per mistake."""

from __future__ import annotations

import difflib
import glob
import hashlib
import ipaddress
import json
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.primeintellect.ai"
DEFAULT_LISTEN_ADDRESS = ":9862"
DEFAULT_MAX_INTERVAL = 600.0
API_KEY_ENV = "PRIME_API_KEY"
BASE_URL_ENV = "PRIME_API_BASE_URL"
BASE_URL_ENV_ALIASES = ("PRIME_BASE_URL",)
# The team whose images discovery lists when the file names none, as for the official CLI.
TEAM_ID_ENV = "PRIME_TEAM_ID"
# Where `prime login` (the official CLI) keeps the key, under the user's home directory.
PRIME_LOGIN_FILE = Path(".prime") / "config.json"

_BUILD_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_DURATION = re.compile(
    r"(?:([0-9]+)y)?(?:([0-9]+)w)?(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m(?!s))?"
    r"(?:([0-9]+)s)?(?:([0-9]+)ms)?"
)
_DURATION_UNITS = (
    ("y", 31536000.0),
    ("w", 604800.0),
    ("d", 86400.0),
    ("h", 3600.0),
    ("m", 60.0),
    ("s", 1.0),
    ("ms", 0.001),
)
_PORT = re.compile(r"[0-9]{1,5}")
_SHARD_INDEX = re.compile(r"(?:.*-)?([0-9]{1,4})")
_SIZE = re.compile(r"([0-9]+)\s*(B|KB|MB|GB|KiB|MiB|GiB)")
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
}


class ConfigError(Exception):
    """A configuration mistake, worded for the operator who has to fix it."""


# A run of key-like characters this long is taken for a secret, such as an API key pasted
# into the wrong field; path segments, host names and durations are much shorter.
_SECRET_LOOKING = re.compile(r"[A-Za-z0-9_+-]{24,}")
_LONGEST_QUOTED = 64


def quoted(value: object) -> str:
    """A config value as an error message may repeat it: short text and numbers as written,
    anything that could be a secret described instead of repeated."""
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if not isinstance(value, str):
        return f"a YAML {type(value).__name__}"
    if len(value) > _LONGEST_QUOTED or _SECRET_LOOKING.search(value):
        return f"a {len(value)}-character value (not repeated: it may be a secret)"
    return repr(value)


def quoted_url(value: str) -> str:
    """A URL as an error message may repeat it: its query, fragment and credentials never."""
    parts = urlsplit(value.strip())
    if not parts.scheme or not parts.hostname:
        return quoted(value)
    hidden = "?…" if parts.query or parts.fragment else ""
    return quoted(f"{parts.scheme}://{parts.hostname}{parts.path}") + (
        " (with a query, not repeated)" if hidden else ""
    )


def parse_duration(value: object) -> float:
    """Parse a Prometheus-style duration such as ``30s``, ``5m`` or ``1h30m`` into seconds."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(
            f"{quoted(value)} is not a duration: write a number with a unit, such as 30s, 5m or 1h"
        )
    match = _DURATION.fullmatch(value.strip())
    if not value.strip() or match is None:
        raise ValueError(
            f"{quoted(value)} is not a duration: write a number with a unit "
            "(ms, s, m, h, d, w, y), such as 30s, 5m or 1h30m"
        )
    return sum(
        int(part) * seconds
        for part, (_, seconds) in zip(match.groups(), _DURATION_UNITS, strict=True)
        if part
    )


def parse_size(value: object) -> int:
    """Parse a size such as ``1MiB``, ``512KiB`` or a plain number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(
            f"{quoted(value)} is not a size: write bytes with a unit "
            "(B, KB, MB, GB, KiB, MiB, GiB), such as 1MiB"
        )
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def format_duration(seconds: float) -> str:
    """The shortest Prometheus-style spelling of a duration, such as ``1h30m`` or ``500ms``."""
    milliseconds = round(seconds * 1000)
    if milliseconds == 0:
        return "0s"
    parts = []
    for unit, unit_seconds in _DURATION_UNITS:
        unit_milliseconds = round(unit_seconds * 1000)
        count, milliseconds = divmod(milliseconds, unit_milliseconds)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _duration_within(minimum: float, maximum: float | None = None) -> AfterValidator:
    def check(seconds: float) -> float:
        if seconds < minimum:
            raise ValueError(f"must be at least {format_duration(minimum)}")
        if maximum is not None and seconds > maximum:
            raise ValueError(f"must be at most {format_duration(maximum)}")
        return seconds

    return AfterValidator(check)


def _file_path(value: object, otherwise: str) -> object:
    """A path from a string, ``~`` expanded; a blank string is refused with what to do instead."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"must be a file path, or leave it out {otherwise}")
        return Path(value).expanduser()
    return value


class BuildIdNotStringError(ValueError):
    """YAML read a build ID as a number, boolean, date or null."""

    def __init__(self, value: object, written: str | None = None) -> None:
        if value is None:
            message = "build ID is empty: remove the empty list item, or quote the ID"
        else:
            written = str(value) if written is None else written
            kind = {bool: "a boolean", int: "a number", float: "a number"}.get(
                type(value), "a date"
            )
            message = (
                f"build ID {written} is not a string (YAML reads it as {kind}): "
                f"quote it in YAML ('{written}')"
            )
        super().__init__(message)
        self.value = value


def validate_build_id(value: object) -> str:
    """Check that a build ID is a string that is safe as one URL path segment."""
    if not isinstance(value, str):
        raise BuildIdNotStringError(value)
    if not _BUILD_ID.fullmatch(value) or value in {".", ".."}:
        raise ValueError(
            f"build ID {quoted(value)} is invalid: use 1 to 128 letters, digits, '-', '_' or '.', "
            "and not '.' or '..'"
        )
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
BuildId = Annotated[str, BeforeValidator(validate_build_id)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiSettings(_Strict):
    """The ``api`` section."""

    base_url: str = DEFAULT_BASE_URL
    api_key_file: Path | None = None
    timeout: Annotated[Duration, _duration_within(0.001, 300)] = 10.0
    max_concurrency: int = Field(default=4, ge=1, le=256, strict=True)
    requests_per_second: float = Field(default=2.0, gt=0, le=10_000, strict=True)
    max_response_size: Size = Field(default=2**20, ge=2**10, le=2**30)

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        return normalize_base_url(value)

    @field_validator("api_key_file", mode="before")
    @classmethod
    def _check_api_key_file(cls, value: object) -> object:
        return _file_path(value, "to use PRIME_API_KEY")


class PollingSettings(_Strict):
    """The ``polling`` section."""

    interval: Annotated[Duration, _duration_within(1)] = 30.0
    stale_after: Annotated[Duration, _duration_within(1)] = 900.0
    max_interval: Annotated[Duration, _duration_within(1)] = DEFAULT_MAX_INTERVAL
    build_files_refresh_interval: Annotated[Duration, _duration_within(0.1)] = 5.0

    @model_validator(mode="after")
    def _max_interval_not_below_interval(self) -> PollingSettings:
        if self.max_interval < self.interval:
            if "max_interval" in self.model_fields_set:
                raise ValueError(
                    f"max_interval ({format_duration(self.max_interval)}) must not be shorter "
                    f"than interval ({format_duration(self.interval)})"
                )
            # Left out: the default never shortens a long interval.
            return self.model_copy(update={"max_interval": self.interval})
        return self

    @model_validator(mode="after")
    def _stale_after_longer_than_interval(self) -> PollingSettings:
        # Otherwise a healthy unfinished build's values would be dropped between two polls.
        if self.stale_after <= self.interval:
            raise ValueError(
                f"stale_after ({format_duration(self.stale_after)}) must be longer than "
                f"interval ({format_duration(self.interval)}), or healthy builds blink out "
                "of /metrics between polls"
            )
        return self


class MetricsSettings(_Strict):
    """The ``metrics`` section."""

    max_artifacts_per_build: int = Field(default=64, ge=0, le=10_000, strict=True)
    finished_build_retention: Annotated[Duration, _duration_within(0)] = 0.0


class StateSettings(_Strict):
    """The ``state`` section: where the durable state lives; unset keeps it in memory."""

    path: Path | None = None

    @field_validator("path", mode="before")
    @classmethod
    def _check_path(cls, value: object) -> object:
        return _file_path(value, "to keep the state in memory")


class ShardSettings(_Strict):
    """The ``shard`` section: this replica polls the builds whose hash falls to ``index``."""

    count: int = Field(default=1, ge=1, le=1000, strict=True)
    index: int = Field(default=0, ge=0, strict=True)

    @model_validator(mode="after")
    def _index_below_count(self) -> ShardSettings:
        if self.index >= self.count:
            raise ValueError(f"index {self.index} must be below count {self.count}")
        return self

    def owns(self, build_id: str) -> bool:
        """Whether this shard polls ``build_id``; the same answer in every process."""
        if self.count == 1:
            return True
        # A stable hash: Python's own hash() is salted per process.
        digest = hashlib.blake2b(build_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index


def parse_shard_index(value: str) -> int:
    """A shard index, given as a number or as a StatefulSet pod name such as ``exporter-2``."""
    match = _SHARD_INDEX.fullmatch(value.strip())
    if match is None:
        raise ValueError(
            f"{quoted(value)} is not a shard index: give a number, "
            "or a pod name ending in -<number>"
        )
    return int(match.group(1))


class WebSettings(_Strict):
    """The ``web`` section."""

    listen_address: str = DEFAULT_LISTEN_ADDRESS

    @field_validator("listen_address")
    @classmethod
    def _check_listen_address(cls, value: str) -> str:
        parse_listen_address(value)
        return value


def _valid_team_id(value: str) -> str:
    """A team ID: the characters of a build ID, 1 to 128 of them."""
    if not _BUILD_ID.fullmatch(value):
        raise ValueError(f"{quoted(value)} is not a team ID (letters, digits, '.', '_' or '-')")
    return value


class ImageDiscoverySettings(_Strict):
    """``discovery.images``: every image of the key's scope (a team's), no build IDs needed."""

    enabled: bool = Field(default=False, strict=True)
    # One full listing, every page, per interval.
    interval: Annotated[Duration, _duration_within(30, 86400)] = 300.0
    # The API's own filter: a case-insensitive substring of the name, tag or reference.
    search: str = Field(default="", max_length=256)
    team_id: str = ""

    @field_validator("team_id")
    @classmethod
    def _check_team_id(cls, value: str) -> str:
        return _valid_team_id(value) if value else value


class DiscoverySettings(_Strict):
    """The ``discovery`` section."""

    images: ImageDiscoverySettings = ImageDiscoverySettings()

    @model_validator(mode="before")
    @classmethod
    def _empty_images_means_defaults(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("images", {}) is None:
            return {**data, "images": {}}
        return data


class ConfigFile(_Strict):
    """The whole YAML file, exactly as the contract in the README describes it."""

    api: ApiSettings = ApiSettings()
    polling: PollingSettings = PollingSettings()
    builds: list[BuildId] = []
    build_files: list[str] = []
    metrics: MetricsSettings = MetricsSettings()
    shard: ShardSettings = ShardSettings()
    web: WebSettings = WebSettings()
    state: StateSettings = StateSettings()
    discovery: DiscoverySettings = DiscoverySettings()

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_mean_defaults(cls, data: object) -> object:
        # "api:" with nothing under it is YAML null; treat it as an empty section.
        if isinstance(data, dict):
            defaults: dict[str, object] = {
                "api": {},
                "polling": {},
                "metrics": {},
                "shard": {},
                "web": {},
                "state": {},
                "discovery": {},
                "builds": [],
                "build_files": [],
            }
            return {
                key: defaults.get(key) if value is None else value for key, value in data.items()
            }
        return data


class ApiKeySource:
    """The API key, from ``PRIME_API_KEY`` or from a file re-read whenever it changes."""

    def __init__(
        self,
        *,
        file: Path | None = None,
        value: SecretStr | None = None,
        origin: str = API_KEY_ENV,
    ) -> None:
        if (file is None) == (value is None):
            raise ValueError("exactly one of file and value is required")
        self.file = file
        # Where a value came from, for the start-up log line (never the key itself).
        self.origin = f"api.api_key_file {file}" if file is not None else origin
        self._value = value
        self._file_identity: tuple[int, int, int] | None = None
        # The file version and error last warned about.
        self._unusable: tuple[object, str] | None = None
        self.generation = 0
        if file is not None:
            self._value = self._read_file(file)

    def current(self) -> SecretStr:
        """The key to send now; a changed file is read again, a broken one keeps the last key."""
        if self.file is not None:
            identity = None
            try:
                stat = self.file.stat()
                identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
                if identity != self._file_identity:
                    key = self._read_file(self.file)
                    if key != self._value:
                        self._value = key
                        self.generation += 1
            except (OSError, ValueError, ConfigError) as error:
                # Keep the last good key; the API answers 401 if it is really gone. Said once
                # per version of the file, not at every request.
                unusable = (identity, _key_error_text(error))
                if unusable != self._unusable:
                    self._unusable = unusable
                    log.warning(
                        "the API key file is unusable; the last good key stays in use",
                        extra={"error": unusable[1]},
                    )
        assert self._value is not None
        return self._value

    def same_source(self, other: ApiKeySource | None) -> bool:
        """Whether ``other`` reads the key from the same place (file or value)."""
        if other is None:
            return False
        if self.file is not None or other.file is not None:
            return self.file == other.file
        return self._value == other._value

    def _read_file(self, file: Path) -> SecretStr:
        stat = file.stat()
        identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        try:
            # utf-8-sig: editors on Windows start the file with a byte-order mark.
            text = file.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise ConfigError(f"api.api_key_file: cannot read {file}: not UTF-8 text") from None
        key = _usable_key(text, f"api.api_key_file: {file}")
        self._file_identity = identity
        return SecretStr(key)


@dataclass(frozen=True)
class Config:
    """A validated configuration, with the environment applied and build files read."""

    source: Path
    file: ConfigFile
    api_key: ApiKeySource | None
    build_ids: tuple[str, ...]

    @property
    def api(self) -> ApiSettings:
        return self.file.api

    @property
    def polling(self) -> PollingSettings:
        return self.file.polling

    @property
    def metrics(self) -> MetricsSettings:
        return self.file.metrics

    @property
    def shard(self) -> ShardSettings:
        return self.file.shard

    @property
    def web(self) -> WebSettings:
        return self.file.web

    @property
    def state_path(self) -> Path | None:
        """The state file, relative paths taken from the config file's directory."""
        path = self.file.state.path
        if path is None or path.is_absolute():
            return path
        return self.source.parent / path

    @property
    def owned_build_ids(self) -> tuple[str, ...]:
        """The builds this replica polls: all of them, or its shard's share."""
        return tuple(build_id for build_id in self.build_ids if self.shard.owns(build_id))


def normalize_base_url(value: str) -> str:
    """Validate the API base URL and strip a trailing ``/api/v1`` as the official client does."""
    parts = urlsplit(value.strip())
    # Checked first, so that no later message repeats a password.
    if "@" in parts.netloc:
        raise ValueError("credentials do not belong in the URL: use api_key_file or PRIME_API_KEY")
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"{quoted_url(value)} is not an http(s) URL such as {DEFAULT_BASE_URL}")
    try:
        parts.port  # noqa: B018 (reading it validates it)
    except ValueError:
        raise ValueError(f"{quoted_url(value)} has an invalid port") from None
    if parts.query or parts.fragment:
        raise ValueError(f"{quoted_url(value)} must not have a query or fragment")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(
            f"{quoted_url(value)} uses plain http: the API key is only sent over https, "
            "or over http to a loopback address such as 127.0.0.1"
        )
    path = parts.path.rstrip("/")
    path = path.removesuffix("/api/v1")
    return f"{parts.scheme}://{parts.netloc}{path}"


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses."""
    if host.lower() in {"localhost", "localhost."}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_listen_address(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``:9862``, ``0.0.0.0:9862``, ``[::1]:9862``) into host and port."""
    host, separator, port_text = value.rpartition(":")
    if not separator or not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"{quoted(value)} is not a listen address such as :9862 or 127.0.0.1:9862")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{quoted(value)} has an invalid IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{quoted(value)}: write IPv6 addresses in brackets, such as [::1]:9862")
    return host, int(port_text)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys instead of keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys merged from an anchor may be overridden
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.MarkedYAMLError(
                problem="unhashable key (a list or mapping cannot be a key)",
                problem_mark=key_node.start_mark,
            ) from None
        if duplicate:
            raise yaml.MarkedYAMLError(
                problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML safely, naming the file and line of a syntax error or duplicate key."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: {error.problem or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: {error}") from None


def load_config(path: Path, environ: Mapping[str, str], *, require_api_key: bool = True) -> Config:
    """Read and validate the config file, apply the environment and read the build files."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the config file: {error}") from None
    data = load_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config file must be a YAML mapping of sections")
    # As the official client reads them: PRIME_API_BASE_URL, else PRIME_BASE_URL.
    base_url_env = next(
        (name for name in (BASE_URL_ENV, *BASE_URL_ENV_ALIASES) if environ.get(name, "").strip()),
        BASE_URL_ENV,
    )
    base_url_override = environ.get(base_url_env, "").strip()
    if base_url_override:
        try:
            normalize_base_url(base_url_override)
        except ValueError as error:
            raise ConfigError(f"{path}: {base_url_env}: {error}") from None
        api_section = data.get("api") or {}
        if isinstance(api_section, dict):
            data["api"] = {**api_section, "base_url": base_url_override}
    try:
        file = ConfigFile.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{path}: {describe_validation_error(error, text)}") from None
    file = _with_team_from_environment(path, file, environ)

    api_key = _api_key_source(path, file.api, environ, require_api_key=require_api_key)
    return Config(
        source=path, file=file, api_key=api_key, build_ids=collect_build_ids(file, path.parent)
    )


def _with_team_from_environment(
    path: Path, file: ConfigFile, environ: Mapping[str, str]
) -> ConfigFile:
    """The file's discovery.images.team_id, else PRIME_TEAM_ID's, checked as the file's is."""
    images = file.discovery.images
    team_id = environ.get(TEAM_ID_ENV, "").strip()
    if images.team_id or not team_id:
        return file
    try:
        _valid_team_id(team_id)
    except ValueError as error:
        raise ConfigError(f"{path}: {TEAM_ID_ENV}: {error}") from None
    discovery = file.discovery.model_copy(
        update={"images": images.model_copy(update={"team_id": team_id})}
    )
    return file.model_copy(update={"discovery": discovery})


def collect_build_ids(file: ConfigFile, base_directory: Path) -> tuple[str, ...]:
    """``builds`` then the build files' IDs, in order, each once (repeats logged)."""
    listed = [*file.builds, *read_build_files(file.build_files, base_directory)]
    counts = Counter(listed)
    unique = tuple(counts)
    if len(unique) < len(listed):
        repeated = sorted(build_id for build_id, count in counts.items() if count > 1)
        log.warning(
            "duplicate build IDs ignored",
            extra={"count": len(listed) - len(unique), "build_ids": ",".join(repeated[:10])},
        )
    if not unique and not file.discovery.images.enabled:
        # Healthy and ready, yet watching nothing: worth a word at every load.
        log.warning(
            "no builds to watch: list build IDs under builds or in the files build_files names",
            extra={"build_files": ",".join(file.build_files)},
        )
    return unique


def build_files_fingerprint(patterns: list[str], base_directory: Path) -> tuple[object, ...]:
    """What the build files look like now; a different value means they changed."""
    fingerprint: list[object] = []
    for pattern in patterns:
        for name in _glob_build_files(pattern, base_directory):
            try:
                stat = Path(name).stat()
            except OSError:
                continue
            fingerprint.append((name, stat.st_ino, stat.st_mtime_ns, stat.st_size))
    return tuple(fingerprint)


def _api_key_source(
    path: Path, api: ApiSettings, environ: Mapping[str, str], *, require_api_key: bool
) -> ApiKeySource | None:
    env_key = environ.get(API_KEY_ENV, "").strip()
    if api.api_key_file is not None and env_key:
        raise ConfigError(
            f"{path}: api.api_key_file is set and so is {API_KEY_ENV}: keep only one key source"
        )
    if api.api_key_file is not None:
        key_file = api.api_key_file
        if not key_file.is_absolute():
            key_file = path.parent / key_file
        try:
            return ApiKeySource(file=key_file)
        except IsADirectoryError:
            raise ConfigError(f"{path}: api.api_key_file: {key_file} is a directory") from None
        except OSError as error:
            raise ConfigError(
                f"{path}: api.api_key_file: cannot read {key_file}: {error.strerror}"
            ) from None
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
    if env_key:
        return ApiKeySource(value=SecretStr(_usable_key(env_key, API_KEY_ENV)))
    if not require_api_key:
        return None
    login_file = _prime_login_file(environ)
    login_key = _prime_login_key(path, login_file) if login_file is not None else None
    if login_key is not None:
        return ApiKeySource(value=login_key, origin=f"{login_file} (prime login)")
    raise ConfigError(
        f"{path}: no API key: set api.api_key_file in the file "
        f"or {API_KEY_ENV} in the environment"
        + (f", or run prime login, which saves it in {login_file}" if login_file else "")
    )


def _prime_login_file(environ: Mapping[str, str]) -> Path | None:
    """``~/.prime/config.json`` of the user in ``environ``; None without a home directory."""
    home = environ.get("HOME", "").strip()
    return Path(home) / PRIME_LOGIN_FILE if home else None


def _prime_login_key(path: Path, login_file: Path) -> SecretStr | None:
    """The ``api_key`` that ``prime login`` saved, None if there is no such file or key."""
    try:
        text = login_file.read_text(encoding="utf-8-sig")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ConfigError(f"{path}: no API key set; cannot read {login_file}: {reason}") from None
    try:
        saved = json.loads(text)
    except ValueError:
        raise ConfigError(f"{path}: no API key set; {login_file} is not JSON") from None
    value = saved.get("api_key") if isinstance(saved, dict) else None
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {login_file}: api_key must be a string")
    try:
        return SecretStr(_usable_key(value, f"{login_file}: api_key"))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def _usable_key(text: str, where: str) -> str:
    """The key in ``text``, or a ConfigError that says what is wrong and never shows it."""
    key = text.strip()
    if key[:7].lower() == "bearer ":
        # A whole Authorization header value pasted in: the exporter adds "Bearer " itself.
        key = key[7:].strip()
    if not key:
        raise ConfigError(f"{where} is empty")
    if any(char in key for char in "\r\n"):
        raise ConfigError(f"{where} must hold the key on one line")
    if not key.isascii() or not key.isprintable() or " " in key:
        # An HTTP header cannot carry it: no request would ever be sent.
        raise ConfigError(f"{where}: the key holds spaces or characters an API key cannot have")
    return key


def _key_error_text(error: Exception) -> str:
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    return str(error)


def read_build_files(patterns: list[str], base_directory: Path) -> list[str]:
    """Read build IDs from files matching the globs: one ID per line, or a YAML list."""
    build_ids: list[str] = []
    for pattern in patterns:
        names = _glob_build_files(pattern, base_directory)
        if not names and not glob.has_magic(pattern):
            log.warning("build file not found", extra={"build_file": pattern})
        for name in names:
            build_ids.extend(read_build_file(Path(name)))
    return build_ids


def _glob_build_files(pattern: str, base_directory: Path) -> list[str]:
    expanded = str(Path(pattern).expanduser())
    if not Path(expanded).is_absolute():
        # The directory is a literal path, even if its name holds glob characters.
        expanded = str(Path(glob.escape(str(base_directory))) / expanded)
    return sorted(glob.glob(expanded))  # noqa: PTH207 (patterns may be absolute)


def read_build_file(path: Path) -> list[str]:
    """Build IDs of one file; blank lines and ``#`` comments are ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the build file: {error}") from None
    content_lines = [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.strip().startswith("#")
    ]
    # IDs hold no spaces or brackets, so "- id", "[...]" and a "---" marker can only be YAML.
    first = content_lines[0][1] if content_lines else ""
    if first in {"-", "---"} or first.startswith(("- ", "[", "--- ")):
        items = load_yaml(text, str(path))
        if not isinstance(items, list):
            raise ConfigError(f"{path}: expected a YAML list of build IDs")
        located = [(f"{path}: item {index}", item) for index, item in enumerate(items, start=1)]
    else:
        located = [(f"{path}:{number}", line) for number, line in content_lines]
    build_ids = []
    for index, (where, item) in enumerate(located):
        try:
            build_ids.append(validate_build_id(item))
        except BuildIdNotStringError as error:
            written = _written_scalar(text, (index,))
            raise ConfigError(f"{where}: {BuildIdNotStringError(error.value, written)}") from None
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
    return build_ids


def describe_validation_error(error: ValidationError, source: str | None = None) -> str:
    """The first problem of a pydantic error as ``field.path: message``.

    With the YAML ``source``, a value YAML did not read as text is quoted as it was written.
    """
    problems = error.errors(include_url=False)
    first = problems[0]
    message = first["msg"].removeprefix("Value error, ")
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, BuildIdNotStringError) and source is not None:
        written = _written_scalar(source, first["loc"])
        message = str(BuildIdNotStringError(cause.value, written))
    elif first["type"] == "extra_forbidden":
        message = f"unknown key{unknown_key_hint(ConfigFile, first['loc'])}"
    elif (generic := generic_problem(first["type"])) is not None:
        message = generic
    elif "input" in first and first["type"] not in {"value_error", "assertion_error"}:
        message = f"{message} (got {quoted(first['input'])})"
    return f"{format_location(first['loc'])}: {message}{more_problems(len(problems))}"


def generic_problem(error_type: str) -> str | None:
    """The wording of a pydantic error type that says the same in every file, or None."""
    return {
        "missing": "required",
        "model_type": "must be a mapping of keys to values",
        "dict_type": "must be a mapping of keys to values",
        "list_type": "must be a list",
        "bool_type": "must be true or false",
    }.get(error_type)


def more_problems(count: int) -> str:
    """`` (and N more problems)`` after the first of ``count``, or nothing."""
    more = count - 1
    return f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else ""


def unknown_key_hint(root: type[BaseModel], location: Sequence[int | str]) -> str:
    """A close match for an unknown key, if any, and the keys allowed where it stands."""
    model = root
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(location[-1]), allowed, n=1) if location else []
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{hint} (allowed: {', '.join(allowed)})"


def _written_scalar(source: str, location: tuple[int | str, ...]) -> str | None:
    """The text of the scalar at ``location`` exactly as the YAML file spells it."""
    try:
        node = yaml.compose(source, Loader=_UniqueKeyLoader)
    except yaml.YAMLError:
        return None
    for part in location:
        if isinstance(node, yaml.MappingNode):
            node = next((value for key, value in node.value if key.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if part < len(node.value) else None
        else:
            return None
    return node.value if isinstance(node, yaml.ScalarNode) else None


def format_location(location: Sequence[int | str]) -> str:
    """A pydantic error location as a key path, such as ``api.timeout`` or ``builds[3]``."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(top level)"
