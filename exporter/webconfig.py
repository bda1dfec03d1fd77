"""The web config file of ``--web.config.file``: TLS, basic auth, headers and a rate limit.

The format is exporter-toolkit's, so one file serves this exporter and the Go exporters alike.
Every key of that format is recognised; the few this exporter cannot honour are errors that
say so, never silently ignored.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt

from exporter.config import ConfigError, load_yaml, parse_duration

log = logging.getLogger(__name__)

AUTH_REALM = "primeintellect-build-exporter"
# How often the file and the certificates it names are checked for changes.
RELOAD_CHECK_INTERVAL = 1.0

SUPPORTED_CLIENT_AUTH_TYPES = (
    "NoClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
)
# Python's ssl module either verifies a client certificate or does not ask for one: it cannot
# ask for one and accept it unverified. ``RequireClientCert`` is the toolkit's old spelling.
UNVERIFIED_CLIENT_AUTH_TYPES = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
# TLS 1.0 and 1.1 are in the format but refused by OpenSSL at its default security level.
TLS_VERSIONS: Mapping[str, ssl.TLSVersion | None] = {
    "TLS10": None,
    "TLS11": None,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# The headers exporter-toolkit lets a web config add, with their allowed values (None: any).
CONFIGURABLE_HEADERS: Mapping[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}

_TOP_KEYS = ("tls_server_config", "http_server_config", "rate_limit", "basic_auth_users")
_TLS_KEYS = (
    "cert_file",
    "key_file",
    "client_ca_file",
    "client_auth_type",
    "min_version",
    "max_version",
    "cipher_suites",
    "curve_preferences",
    "prefer_server_cipher_suites",
    "client_allowed_sans",
    "cert",
    "key",
    "client_ca",
)
_HTTP_KEYS = ("headers", "http2")
_RATE_LIMIT_KEYS = ("interval", "burst")
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# bcrypt reads only the first 72 bytes of a password; Go's bcrypt ignores the rest too.
_BCRYPT_MAX_PASSWORD = 72


class WebConfigError(Exception):
    """A mistake in the web config file: the file, the key, then the problem."""


@dataclass(frozen=True)
class TlsSettings:
    """The ``tls_server_config`` section, with its certificates loaded into a server context."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None
    client_auth_type: str
    min_version: ssl.TLSVersion
    max_version: ssl.TLSVersion
    client_allowed_sans: frozenset[str]
    context: ssl.SSLContext = field(repr=False, compare=False)

    def allows_client(self, peer_certificate: Mapping[str, Any] | None) -> bool:
        """True unless ``client_allowed_sans`` is set and the verified client matches none."""
        if not self.client_allowed_sans:
            return True
        if not peer_certificate:
            return False
        names = {
            _san_value(kind, value) for kind, value in peer_certificate.get("subjectAltName", ())
        }
        return not names.isdisjoint(self.client_allowed_sans)


class RateLimiter:
    """A token bucket over all requests: ``burst`` at once, then one per ``interval``."""

    def __init__(self, interval: float, burst: int) -> None:
        self.interval = interval
        self.burst = burst
        self._tokens = float(burst)
        self._updated = time.monotonic()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Take a token if one is left."""
        with self._lock:
            now = time.monotonic()
            elapsed = now - self._updated
            self._tokens = min(float(self.burst), self._tokens + elapsed / self.interval)
            self._updated = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False


class BasicAuth:
    """Checks ``Authorization: Basic`` credentials against the configured bcrypt hashes."""

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self._users = dict(users)
        cost = max(int(hashed[4:6]) for hashed in self._users.values())
        # Unknown users are checked against this, so they cost as much as a wrong password and
        # timing does not tell which users exist.
        self._dummy_hash = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))
        # Successful checks are remembered as keyed digests, so a scrape every 15 s does not
        # cost a bcrypt each time and memory never holds a password, not even a fast hash of one.
        self._digest_key = secrets.token_bytes(32)
        self._verified: dict[tuple[str, bytes], bytes] = {}
        self._verified_lock = threading.Lock()
        # bcrypt is slow on purpose: one at a time, so a flood of guesses costs one core.
        self._bcrypt_lock = threading.Lock()

    def authorized(self, authorization: str | None) -> bool:
        """True when the ``Authorization`` header names a user with the right password."""
        credentials = _parse_basic_credentials(authorization)
        if credentials is None:
            return False
        user, password = credentials
        stored = self._users.get(user)
        if stored is None:
            self._checkpw(password, self._dummy_hash)
            return False
        digest = hmac.new(self._digest_key, password, hashlib.sha256).digest()
        with self._verified_lock:
            remembered = self._verified.get((user, stored))
        if remembered is not None and hmac.compare_digest(remembered, digest):
            return True
        if not self._checkpw(password, stored):
            return False
        with self._verified_lock:
            self._verified[(user, stored)] = digest
        return True

    def _checkpw(self, password: bytes, hashed: bytes) -> bool:
        with self._bcrypt_lock:
            try:
                return bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD], hashed)
            except ValueError:
                return False


@dataclass(frozen=True)
class WebConfig:
    """A validated web config file, ready to serve with.

    ``http2`` is accepted for compatibility and otherwise unused: this exporter serves
    HTTP/1.1 only, and offers only ``http/1.1`` in TLS's ALPN.
    """

    source: Path
    tls: TlsSettings | None = None
    headers: tuple[tuple[str, str], ...] = ()
    http2: bool = True
    rate_limiter: RateLimiter | None = field(default=None, compare=False)
    basic_auth: BasicAuth | None = field(default=None, compare=False)

    @property
    def files(self) -> tuple[Path, ...]:
        """The file itself and the certificate files it names: what a reload watches."""
        if self.tls is None:
            return (self.source,)
        ca = () if self.tls.client_ca_file is None else (self.tls.client_ca_file,)
        return (self.source, self.tls.cert_file, self.tls.key_file, *ca)


def load_web_config(path: Path) -> WebConfig:
    """Read and validate a web config file; certificates and keys must load and match."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise WebConfigError(f"{path}: the web config file is not UTF-8 text") from None
    except OSError as error:
        raise WebConfigError(
            f"{path}: cannot read the web config file: {error.strerror or error}"
        ) from None
    try:
        data = load_yaml(text, str(path))
    except ConfigError as error:
        raise WebConfigError(str(error)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise WebConfigError(f"{path}: the web config file must be a YAML mapping of sections")
    reader = _Reader(path)
    reader.check_keys(data, "", _TOP_KEYS)
    headers, http2 = _http_settings(reader, data.get("http_server_config"))
    return WebConfig(
        source=path,
        tls=_tls_settings(reader, data.get("tls_server_config")),
        headers=headers,
        http2=http2,
        rate_limiter=_rate_limiter(reader, data.get("rate_limit")),
        basic_auth=_basic_auth(reader, data.get("basic_auth_users")),
    )


class WebConfigWatcher:
    """The current web config: re-read when the file or a certificate it names changes.

    Files are compared by inode, modification time and size, at most once per
    ``check_interval``. A change that does not load keeps the last good config and logs one
    error line; so does one that would switch between HTTP and HTTPS, which needs a restart.
    """

    def __init__(self, path: Path, *, check_interval: float = RELOAD_CHECK_INTERVAL) -> None:
        self._path = path
        self._check_interval = check_interval
        before = _identities(_named_files(path))
        self._config = load_web_config(path)
        self._watched = _identities(self._config.files, before)
        self._next_check = time.monotonic() + check_interval
        self._lock = threading.Lock()

    def current(self) -> WebConfig:
        """The config to use now; checks the files for changes if due."""
        if time.monotonic() < self._next_check:
            return self._config
        with self._lock:
            now = time.monotonic()
            if now >= self._next_check:
                # Set first: other threads keep the current config while this one reloads.
                self._next_check = now + self._check_interval
                self._reload_if_changed()
            return self._config

    def _reload_if_changed(self) -> None:
        if _identities(tuple(self._watched)) == self._watched:
            return
        # Taken before reading, so that a change made during the read is seen next time. The
        # files a broken config names are watched too: the fix may be creating one of them.
        before = _identities((*self._config.files, *_named_files(self._path)))
        try:
            config = self._load_compatible()
        except WebConfigError as error:
            self._watched = before
            log.error(
                "web config not reloaded; serving with the previous one",
                extra={"file": str(self._path), "error": str(error)},
            )
            return
        self._config = config
        self._watched = _identities(config.files, before)
        log.info("web config reloaded", extra={"file": str(self._path)})

    def _load_compatible(self) -> WebConfig:
        config = load_web_config(self._path)
        if (config.tls is None) != (self._config.tls is None):
            raise WebConfigError(
                f"{self._path}: tls_server_config: switching between HTTP and HTTPS needs a restart"
            )
        return config


_Identity = tuple[int, int, int] | None


def _identities(
    files: tuple[Path, ...], known: Mapping[Path, _Identity] | None = None
) -> dict[Path, _Identity]:
    identities: dict[Path, _Identity] = {}
    for file in files:
        if known is not None and file in known:
            identities[file] = known[file]
            continue
        try:
            stat = file.stat()
        except OSError:
            identities[file] = None
        else:
            identities[file] = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    return identities


def _named_files(path: Path) -> tuple[Path, ...]:
    # Best effort, also for a file that does not load: itself and the files it names.
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, ConfigError):
        return (path,)
    tls = data.get("tls_server_config") if isinstance(data, dict) else None
    if not isinstance(tls, dict):
        return (path,)
    names = (tls.get(key) for key in ("cert_file", "key_file", "client_ca_file"))
    return (path, *(_relative_to(path, name) for name in names if isinstance(name, str) and name))


def _relative_to(source: Path, name: str) -> Path:
    # Relative paths start at the web config file's directory, as in exporter-toolkit.
    path = Path(name)
    return path if path.is_absolute() else source.parent / path


class _Reader:
    # Typed access to the parsed YAML, raising errors that name the file and the key.

    def __init__(self, source: Path) -> None:
        self.source = source

    def error(self, where: str, problem: str) -> WebConfigError:
        return WebConfigError(f"{self.source}: {where}: {problem}")

    def check_keys(self, data: dict[Any, Any], where: str, known: tuple[str, ...]) -> None:
        for key in data:
            if key not in known:
                name = str(key)
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise self.error(
                    f"{where}.{name}" if where else name,
                    f"unknown key{hint} (known keys here: {', '.join(known)})",
                )

    def section(self, data: object, where: str, known: tuple[str, ...]) -> dict[str, Any]:
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise self.error(where, "must be a mapping of keys to values")
        self.check_keys(data, where, known)
        return data

    def string(self, value: object, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(where, "must be a non-empty string")
        return value

    def boolean(self, value: object, where: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(where, "must be true or false")
        return value

    def strings(self, value: object, where: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(where, "must be a list of strings")
        return [self.string(item, f"{where}[{index}]") for index, item in enumerate(value)]

    def path(self, value: object, where: str) -> Path:
        return _relative_to(self.source, self.string(value, where))

    def readable(self, path: Path, where: str) -> None:
        try:
            with path.open("rb"):
                pass
        except OSError as error:
            raise self.error(where, f"cannot read {path}: {error.strerror or error}") from None


class _PassphraseNeededError(Exception):
    pass


def _no_passphrase() -> bytes:
    # Without a callback, OpenSSL would prompt on the terminal for the passphrase.
    raise _PassphraseNeededError


def _tls_settings(reader: _Reader, data: object) -> TlsSettings | None:
    where = "tls_server_config"
    section = reader.section(data, where, _TLS_KEYS)
    if not section:
        # An empty section means plain HTTP, as in exporter-toolkit.
        return None
    for inline, instead in (("cert", "cert_file"), ("key", "key_file")):
        if inline in section:
            raise reader.error(
                f"{where}.{inline}",
                f"inline certificates and keys are not supported by this exporter: "
                f"write it to a file and set {instead}",
            )
    for unsupported, reason in (
        ("cipher_suites", "it cannot map Go's cipher suite names onto OpenSSL's"),
        ("curve_preferences", "Python's ssl module cannot set a list of curves"),
    ):
        if section.get(unsupported):
            raise reader.error(
                f"{where}.{unsupported}",
                f"not supported by this exporter ({reason}); remove it to use the defaults "
                "of the system's OpenSSL",
            )
    for required in ("cert_file", "key_file"):
        if section.get(required) is None:
            raise reader.error(f"{where}.{required}", f"required when {where} is set")
    cert_file = reader.path(section["cert_file"], f"{where}.cert_file")
    key_file = reader.path(section["key_file"], f"{where}.key_file")

    client_auth_type = section.get("client_auth_type") or "NoClientCert"
    if client_auth_type in UNVERIFIED_CLIENT_AUTH_TYPES:
        raise reader.error(
            f"{where}.client_auth_type",
            f"{client_auth_type} is not supported by this exporter: it asks for a client "
            "certificate without verifying it, which Python's ssl module cannot do; use "
            "VerifyClientCertIfGiven or RequireAndVerifyClientCert with client_ca_file",
        )
    if client_auth_type not in SUPPORTED_CLIENT_AUTH_TYPES:
        raise reader.error(
            f"{where}.client_auth_type",
            f"{client_auth_type!r} is not one of {', '.join(SUPPORTED_CLIENT_AUTH_TYPES)}",
        )

    client_ca_file = None
    client_ca_text = None
    if section.get("client_ca_file") is not None:
        if section.get("client_ca") is not None:
            raise reader.error(f"{where}.client_ca", "set client_ca_file or client_ca, not both")
        client_ca_file = reader.path(section["client_ca_file"], f"{where}.client_ca_file")
    elif section.get("client_ca") is not None:
        client_ca_text = reader.string(section["client_ca"], f"{where}.client_ca")
    has_ca = client_ca_file is not None or client_ca_text is not None
    if client_auth_type == "NoClientCert" and has_ca:
        raise reader.error(
            f"{where}.client_auth_type",
            "is NoClientCert, so the client CA would be ignored: set VerifyClientCertIfGiven "
            "or RequireAndVerifyClientCert",
        )
    if client_auth_type != "NoClientCert" and not has_ca:
        raise reader.error(
            f"{where}.client_ca_file",
            f"required when client_auth_type is {client_auth_type}: the CA that signs "
            "client certificates",
        )

    allowed_sans = reader.strings(
        section.get("client_allowed_sans"), f"{where}.client_allowed_sans"
    )
    if section.get("client_allowed_sans") is not None:
        if client_auth_type != "RequireAndVerifyClientCert":
            raise reader.error(
                f"{where}.client_allowed_sans",
                "needs client_auth_type RequireAndVerifyClientCert",
            )
        if not allowed_sans:
            raise reader.error(
                f"{where}.client_allowed_sans",
                "is empty, which would refuse every client: list the allowed SANs, "
                "or remove the key",
            )

    min_version = _tls_version(reader, section.get("min_version", "TLS12"), f"{where}.min_version")
    max_version = _tls_version(reader, section.get("max_version", "TLS13"), f"{where}.max_version")
    if max_version < min_version:
        raise reader.error(
            f"{where}.max_version",
            f"{section.get('max_version')} is lower than min_version "
            f"{section.get('min_version', 'TLS12')}",
        )
    prefer_server = reader.boolean(
        section.get("prefer_server_cipher_suites"), f"{where}.prefer_server_cipher_suites", True
    )

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = min_version
    context.maximum_version = max_version
    if prefer_server:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])
    _load_key_pair(reader, context, cert_file, key_file)
    if client_ca_file is not None:
        reader.readable(client_ca_file, f"{where}.client_ca_file")
        try:
            context.load_verify_locations(cafile=client_ca_file)
        except ssl.SSLError:
            raise reader.error(
                f"{where}.client_ca_file", f"{client_ca_file} holds no PEM certificate"
            ) from None
    elif client_ca_text is not None:
        try:
            context.load_verify_locations(cadata=client_ca_text)
        except ssl.SSLError:
            raise reader.error(f"{where}.client_ca", "holds no PEM certificate") from None
    context.verify_mode = {
        "NoClientCert": ssl.CERT_NONE,
        "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
        "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
    }[client_auth_type]
    return TlsSettings(
        cert_file=cert_file,
        key_file=key_file,
        client_ca_file=client_ca_file,
        client_auth_type=client_auth_type,
        min_version=min_version,
        max_version=max_version,
        client_allowed_sans=frozenset(allowed_sans),
        context=context,
    )


def _tls_version(reader: _Reader, value: object, where: str) -> ssl.TLSVersion:
    if not isinstance(value, str) or value not in TLS_VERSIONS:
        raise reader.error(where, f"{value!r} is not one of {', '.join(TLS_VERSIONS)}")
    version = TLS_VERSIONS[value]
    if version is None:
        raise reader.error(
            where,
            f"{value} is not supported by this exporter: its OpenSSL refuses TLS 1.0 and 1.1 "
            "at the default security level; use TLS12 or TLS13",
        )
    return version


def _load_key_pair(
    reader: _Reader, context: ssl.SSLContext, cert_file: Path, key_file: Path
) -> None:
    where = "tls_server_config"
    reader.readable(cert_file, f"{where}.cert_file")
    reader.readable(key_file, f"{where}.key_file")
    # Loaded alone first, so that a broken certificate is not reported as a broken key.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert_file)
    except ssl.SSLError:
        raise reader.error(f"{where}.cert_file", f"{cert_file} holds no PEM certificate") from None
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except _PassphraseNeededError:
        raise reader.error(
            f"{where}.key_file",
            f"{key_file} is encrypted, and the web config has no passphrase: store the key "
            "unencrypted, readable only by the exporter",
        ) from None
    except ssl.SSLError as error:
        if error.reason in {"KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"}:
            problem = f"the key in {key_file} does not match the certificate in {cert_file}"
        else:
            problem = f"cannot load a private key from {key_file}: {error.reason or 'not PEM'}"
        raise reader.error(f"{where}.key_file", problem) from None


def _http_settings(reader: _Reader, data: object) -> tuple[tuple[tuple[str, str], ...], bool]:
    where = "http_server_config"
    section = reader.section(data, where, _HTTP_KEYS)
    http2 = reader.boolean(section.get("http2"), f"{where}.http2", True)
    raw_headers = section.get("headers")
    if raw_headers is None:
        return (), http2
    if not isinstance(raw_headers, dict):
        raise reader.error(f"{where}.headers", "must be a mapping of header names to values")
    headers = []
    for name, value in raw_headers.items():
        key = f"{where}.headers.{name}"
        if name not in CONFIGURABLE_HEADERS:
            raise reader.error(
                key,
                f"this header cannot be configured (the ones that can: "
                f"{', '.join(CONFIGURABLE_HEADERS)})",
            )
        # YAML reads ``X-XSS-Protection: 0`` as a number; Go's YAML decoder takes it as text.
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        text = reader.string(text, key)
        allowed = CONFIGURABLE_HEADERS[name]
        if allowed is not None and text not in allowed:
            raise reader.error(key, f"{text!r} is not one of {', '.join(allowed)}")
        if not text.isprintable() or not text.isascii():
            raise reader.error(key, "must be printable ASCII on one line")
        headers.append((name, text))
    return tuple(headers), http2


def _rate_limiter(reader: _Reader, data: object) -> RateLimiter | None:
    where = "rate_limit"
    section = reader.section(data, where, _RATE_LIMIT_KEYS)
    if section.get("interval") is None:
        if section.get("burst") is not None:
            raise reader.error(f"{where}.burst", "has no effect without rate_limit.interval")
        return None
    try:
        interval = parse_duration(section["interval"])
    except ValueError as error:
        raise reader.error(f"{where}.interval", str(error)) from None
    if interval == 0:
        # exporter-toolkit's way of switching the limit off.
        return None
    burst = section.get("burst")
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise reader.error(
            f"{where}.burst",
            "must be a whole number of at least 1 when rate_limit.interval is set "
            "(0 would refuse every request)",
        )
    return RateLimiter(interval, burst)


def _basic_auth(reader: _Reader, data: object) -> BasicAuth | None:
    where = "basic_auth_users"
    if data is None:
        return None
    if not isinstance(data, dict):
        raise reader.error(where, "must be a mapping of user names to bcrypt hashes")
    if not data:
        # An empty list of users means no authentication, as in exporter-toolkit.
        return None
    users: dict[str, bytes] = {}
    for user, hashed in data.items():
        if not isinstance(user, str) or not user:
            raise reader.error(where, f"user name {user!r} must be a non-empty string: quote it")
        if ":" in user:
            raise reader.error(
                f"{where}.{user}", "a user name cannot contain ':', basic auth could never match"
            )
        # The value is never repeated in a message: it may be a password written by mistake.
        if not isinstance(hashed, str) or not _BCRYPT_HASH.fullmatch(hashed):
            raise reader.error(
                f"{where}.{user}",
                "not a bcrypt hash: store the hash of the password ($2a$, $2b$ or $2y$, "
                "as `htpasswd -nB USER` prints after the colon), never the password itself",
            )
        users[user] = hashed.encode("ascii")
    return BasicAuth(users)


def _parse_basic_credentials(authorization: str | None) -> tuple[str, bytes] | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    # Undecodable bytes cannot name a configured user; they still cost a bcrypt check.
    return user.decode("utf-8", errors="surrogateescape"), password


def _san_value(kind: str, value: str) -> str:
    if kind == "IP Address":
        # Python prints IPv6 addresses long and upper case; Go, as the toolkit compares them,
        # short and lower case.
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            return value
    return value
