"""The API key: where it comes from (a key file, ``PRIME_API_KEY`` or ``prime login``), and
the live reader the API client asks before each request."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from pydantic import SecretStr

from exporter.config.wording import ConfigError

# The package's logger: its lines say logger=exporter.config, whichever module writes them.
log = logging.getLogger(__package__)

API_KEY_ENV = "PRIME_API_KEY"
# Where `prime login` (the official CLI) keeps the key, under the user's home directory.
PRIME_LOGIN_FILE = Path(".prime") / "config.json"


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


def api_key_source(
    path: Path,
    api_key_file: Path | None,
    environ: Mapping[str, str],
    *,
    require_api_key: bool,
) -> ApiKeySource | None:
    """The key source of the config file at ``path``: its ``api.api_key_file``, else
    ``PRIME_API_KEY``, else the ``prime login`` file; None if none is set and none is required.
    """
    env_key = environ.get(API_KEY_ENV, "").strip()
    if api_key_file is not None and env_key:
        raise ConfigError(
            f"{path}: api.api_key_file is set and so is {API_KEY_ENV}: keep only one key source"
        )
    if api_key_file is not None:
        key_file = api_key_file
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
