"""The configuration's shape: the strict models of the YAML file and the validated ``Config``
the exporter runs on, with the command line's overrides."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from exporter.config.credentials import ApiKeySource
from exporter.config.grammar import (
    DEFAULT_BASE_URL,
    BuildId,
    Duration,
    Size,
    duration_within,
    format_duration,
    normalize_base_url,
    parse_listen_address,
    parse_shard_index,
    validate_team_id,
)
from exporter.config.wording import ConfigError, describe_validation_error

DEFAULT_LISTEN_ADDRESS = ":9862"
DEFAULT_MAX_INTERVAL = 600.0


def _file_path(value: object, otherwise: str) -> object:
    """A path from a string, ``~`` expanded; a blank string is refused with what to do instead."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"must be a file path, or leave it out {otherwise}")
        return Path(value).expanduser()
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiSettings(_Strict):
    """The ``api`` section."""

    base_url: str = DEFAULT_BASE_URL
    api_key_file: Path | None = None
    timeout: Annotated[Duration, duration_within(0.001, 300)] = 10.0
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

    interval: Annotated[Duration, duration_within(1)] = 30.0
    stale_after: Annotated[Duration, duration_within(1)] = 900.0
    max_interval: Annotated[Duration, duration_within(1)] = DEFAULT_MAX_INTERVAL
    build_files_refresh_interval: Annotated[Duration, duration_within(0.1)] = 5.0

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
    finished_build_retention: Annotated[Duration, duration_within(0)] = 0.0


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


class WebSettings(_Strict):
    """The ``web`` section."""

    listen_address: str = DEFAULT_LISTEN_ADDRESS

    @field_validator("listen_address")
    @classmethod
    def _check_listen_address(cls, value: str) -> str:
        parse_listen_address(value)
        return value


def _check_team_id(value: str) -> str:
    return validate_team_id(value) if value else value


# Pages a listing pass reads at most, for either listing: a pass that would read more is cut
# there and reported (reason "truncated"), never taken for the whole listing.
MaxPages = Annotated[int, Field(ge=1, le=10_000, strict=True)]


class ImageDiscoverySettings(_Strict):
    """``discovery.images``: every image of the key's scope (a team's), no build IDs needed."""

    enabled: bool = Field(default=False, strict=True)
    # One full listing, every page, per interval.
    interval: Annotated[Duration, duration_within(30, 86400)] = 300.0
    # The API's own filter: a case-insensitive substring of the name, tag or reference.
    search: str = Field(default="", max_length=256)
    team_id: str = ""
    # Pages of 250 images read per listing at most (400: 100,000 images, the cap from before
    # it could be set); a listing cut there fails as "truncated", the last complete one stays.
    max_pages: MaxPages = 400

    _team_id = field_validator("team_id")(_check_team_id)


class BuildDiscoverySettings(_Strict):
    """``discovery.builds``: every build of the key from the build listing, no build IDs
    needed (tests/contract/BUILDS_LIST.md)."""

    enabled: bool = Field(default=False, strict=True)
    # One listing pass per interval, counted from the end of the previous one.
    interval: Annotated[Duration, duration_within(10, 86400)] = 30.0
    # Builds created within this window are tracked; a pass reads back this far.
    window: Annotated[Duration, duration_within(3600, 365 * 86400)] = 7 * 86400.0
    # Pages of 100 builds read per pass at most; a pass cut there is flagged "truncated".
    max_pages: MaxPages = 100
    # Sent as teamId when set; the spec does not publish it (ignored, honoured or refused).
    team_id: str = ""

    _team_id = field_validator("team_id")(_check_team_id)


class DiscoverySettings(_Strict):
    """The ``discovery`` section."""

    images: ImageDiscoverySettings = ImageDiscoverySettings()
    builds: BuildDiscoverySettings = BuildDiscoverySettings()

    @model_validator(mode="before")
    @classmethod
    def _empty_subsections_mean_defaults(cls, data: object) -> object:
        # "images:" with nothing under it is YAML null, as an empty top-level section is.
        if isinstance(data, dict):
            return {
                key: {} if key in {"images", "builds"} and value is None else value
                for key, value in data.items()
            }
        return data


class ConfigFile(_Strict):
    """The whole YAML file, exactly as docs/configuration.md describes it."""

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

    def with_overrides(
        self,
        *,
        listen_address: str | None = None,
        shard_count: int | None = None,
        shard_index: str | None = None,
    ) -> Config:
        """The config with the command line's ``--web.listen-address``, ``--shard.count`` and
        ``--shard.index`` applied; None leaves the file's value. A ConfigError names the flag.
        """
        config = self
        if listen_address is not None:
            config = config._with_listen_address(listen_address)
        if shard_count is not None or shard_index is not None:
            config = config._with_shard(shard_count, shard_index)
        return config

    def _with_listen_address(self, listen_address: str) -> Config:
        try:
            web = WebSettings(listen_address=listen_address)
        except ValidationError as error:
            message = describe_validation_error(error, WebSettings).removeprefix("listen_address: ")
            raise ConfigError(f"--web.listen-address: {message}") from None
        return dataclasses.replace(self, file=self.file.model_copy(update={"web": web}))

    def _with_shard(self, count: int | None, index: str | None) -> Config:
        try:
            shard = ShardSettings(
                count=self.shard.count if count is None else count,
                index=self.shard.index if index is None else parse_shard_index(index),
            )
        except ValueError as error:
            message = (
                describe_validation_error(error, ShardSettings).removeprefix("(top level): ")
                if isinstance(error, ValidationError)
                else str(error)
            )
            raise ConfigError(f"--shard.count/--shard.index: {message}") from None
        return dataclasses.replace(self, file=self.file.model_copy(update={"shard": shard}))
