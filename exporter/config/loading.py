"""Reading the configuration: the YAML file, the environment on top, the build files it
names, and the command line's overrides, at start and at every reload."""

from __future__ import annotations

import glob
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from exporter.config.credentials import api_key_source
from exporter.config.grammar import normalize_base_url, validate_build_id, validate_team_id
from exporter.config.schema import Config, ConfigFile
from exporter.config.wording import (
    BuildIdNotStringError,
    ConfigError,
    describe_validation_error,
    unreadable,
    written_scalar,
)

# The package's logger: its lines say logger=exporter.config, whichever module writes them.
log = logging.getLogger(__package__)

BASE_URL_ENV = "PRIME_API_BASE_URL"
BASE_URL_ENV_ALIASES = ("PRIME_BASE_URL",)
# The team whose images (and builds) discovery lists when the file names none, as for the
# official CLI.
TEAM_ID_ENV = "PRIME_TEAM_ID"


@dataclass(frozen=True)
class ConfigLoader:
    """Makes the configuration at start and at every reload: the file at ``source`` read
    again with ``environ`` applied, or a configuration made once (the demo's, which has no
    file), then the command line's overrides."""

    source: Path | Config
    environ: Mapping[str, str] = field(default_factory=dict)
    listen_address: str | None = None
    shard_count: int | None = None
    shard_index: str | None = None

    def __call__(self, *, starting: bool = False) -> Config:
        """The configuration as it stands now; a ConfigError says what is wrong.

        ``starting`` is for the start and ``--config.check`` (see ``load_config``); a reload
        calls it without.
        """
        if isinstance(self.source, Config):
            config = self.source
        else:
            config = load_config(self.source, self.environ, starting=starting)
        return config.with_overrides(
            listen_address=self.listen_address,
            shard_count=self.shard_count,
            shard_index=self.shard_index,
        )


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


def load_config(
    path: Path,
    environ: Mapping[str, str],
    *,
    require_api_key: bool = True,
    starting: bool = False,
) -> Config:
    """Read and validate the config file, apply the environment and read the build files.

    ``starting``: the exporter is starting, or checking the config, so a file that
    ``build_files`` names without wildcards must exist (on a reload a vanished one is a
    warning: its builds are dropped), and a missing config file gets the first run's advice.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        advice = (
            ": point --config.file at yours, or try the exporter without one with --demo"
            if starting
            else ""
        )
        raise ConfigError(f"{path}: the config file does not exist{advice}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the config file: {unreadable(error)}") from None
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
        raise ConfigError(f"{path}: {describe_validation_error(error, ConfigFile, text)}") from None
    file = _with_team_from_environment(path, file, environ)

    api_key = api_key_source(path, file.api.api_key_file, environ, require_api_key=require_api_key)
    try:
        build_ids = collect_build_ids(file, path.parent, starting=starting)
    except _BuildFilesEntryError as error:
        raise ConfigError(f"{path}: {error}") from None
    return Config(source=path, file=file, api_key=api_key, build_ids=build_ids)


def check_state_path(config: Config) -> None:
    """Refuse a ``state.path`` whose directory is missing, before the state file is opened.

    The directory is never created: a typo in the path would otherwise start an empty state,
    every finished build requested again, and no one told.
    """
    path = config.state_path
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(
            f"{config.source}: state.path: {path} is a directory: name a file in it, "
            f"such as {path / 'state.db'}"
        )
    directory = path.parent
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        raise ConfigError(
            f"{config.source}: state.path: the directory {directory} {problem}: create it, "
            "or correct the path (the exporter does not create it, so that a typo cannot "
            "start an empty state)"
        )


def _with_team_from_environment(
    path: Path, file: ConfigFile, environ: Mapping[str, str]
) -> ConfigFile:
    """PRIME_TEAM_ID, checked as the file's values are, as the team of each discovery
    (discovery.images, discovery.builds) whose team_id the file leaves empty."""
    team_id = environ.get(TEAM_ID_ENV, "").strip()
    discovery = file.discovery
    unset = {
        name: section
        for name, section in (("images", discovery.images), ("builds", discovery.builds))
        if not section.team_id
    }
    if not team_id or not unset:
        return file
    try:
        validate_team_id(team_id)
    except ValueError as error:
        raise ConfigError(f"{path}: {TEAM_ID_ENV}: {error}") from None
    discovery = discovery.model_copy(
        update={
            name: section.model_copy(update={"team_id": team_id}) for name, section in unset.items()
        }
    )
    return file.model_copy(update={"discovery": discovery})


def collect_build_ids(
    file: ConfigFile, base_directory: Path, *, starting: bool = False
) -> tuple[str, ...]:
    """``builds`` then the build files' IDs, in order, each once (repeats logged)."""
    listed = [*file.builds, *read_build_files(file.build_files, base_directory, starting=starting)]
    counts = Counter(listed)
    unique = tuple(counts)
    if len(unique) < len(listed):
        repeated = sorted(build_id for build_id, count in counts.items() if count > 1)
        log.warning(
            "duplicate build IDs ignored",
            extra={"count": len(listed) - len(unique), "build_ids": ",".join(repeated[:10])},
        )
    if not unique and not (file.discovery.images.enabled or file.discovery.builds.enabled):
        # Healthy and ready, yet watching nothing: worth a word at every load.
        log.warning(
            "no builds to watch: list build IDs under builds or in the files build_files names",
            extra={"build_files": ",".join(file.build_files)},
        )
    return unique


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """The file's inode, modification time and size, through symlinks; None if unreadable.

    A file replaced by a rename, as a Kubernetes volume's ``..data`` link is, has a new inode.
    """
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def build_files_fingerprint(patterns: list[str], base_directory: Path) -> tuple[object, ...]:
    """What the build files look like now; a different value means they changed."""
    fingerprint: list[object] = []
    for pattern in patterns:
        for name in _glob_build_files(pattern, base_directory):
            identity = file_identity(Path(name))
            if identity is not None:
                fingerprint.append((name, *identity))
    return tuple(fingerprint)


class _BuildFilesEntryError(ConfigError):
    """An entry of ``build_files`` names what is not there; said of the config file."""


def read_build_files(
    patterns: list[str], base_directory: Path, *, starting: bool = False
) -> list[str]:
    """Read build IDs from files matching the globs: one ID per line, or a YAML list.

    A glob whose directory does not exist is an error: a typo must not read as "no builds",
    while an existing directory without a match (an empty ``builds.d``) is fine. A file named
    without wildcards must exist when ``starting``; later it may have gone (a warning).
    """
    build_ids: list[str] = []
    for index, pattern in enumerate(patterns):
        names = _glob_build_files(pattern, base_directory)
        if not names:
            _check_nothing_matched(f"build_files[{index}]", pattern, base_directory, starting)
        for name in names:
            build_ids.extend(read_build_file(Path(name)))
    return build_ids


def _check_nothing_matched(key: str, pattern: str, base_directory: Path, starting: bool) -> None:
    if not glob.has_magic(pattern):
        path = _from_config_directory(Path(pattern).expanduser(), base_directory)
        if starting:
            raise _BuildFilesEntryError(
                f"{key}: {path} does not exist: create it, or correct or remove the entry"
            )
        log.warning("build file not found", extra={"build_file": pattern, "path": str(path)})
        return
    # The directory the glob looks in: its path up to the first part with a wildcard.
    parts = Path(pattern).expanduser().parts
    literal = parts[: next(index for index, part in enumerate(parts) if glob.has_magic(part))]
    directory = _from_config_directory(Path(*literal), base_directory)
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        raise _BuildFilesEntryError(
            f"{key}: {pattern} looks in {directory}, which {problem}: create the directory "
            "(an empty one is fine), or correct the pattern"
        )


def _from_config_directory(path: Path, base_directory: Path) -> Path:
    return path if path.is_absolute() else base_directory / path


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
        raise ConfigError(f"{path}: cannot read the build file: {unreadable(error)}") from None
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
            written = written_scalar(text, (index,))
            raise ConfigError(f"{where}: {BuildIdNotStringError(error.value, written)}") from None
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
    return build_ids
