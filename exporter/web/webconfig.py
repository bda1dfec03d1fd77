"""The web config file of ``--web.config.file``: TLS, basic auth, headers and a rate limit.

The format is exporter-toolkit's, so one file serves this exporter and the Go exporters alike.
Every key of that format is recognised; what this exporter cannot honour is an error that says
so, never silently ignored. Where Python's ``ssl`` module differs from Go's ``crypto/tls``:

- ``cipher_suites`` takes Go's names (those of ``tls.CipherSuites()``), which are mapped onto
  OpenSSL's. As in Go, TLS 1.3 suites are accepted and do not restrict TLS 1.3; a list of only
  TLS 1.3 suites leaves no suite for TLS 1.2, so TLS 1.2 clients are refused, as in Go.
- ``curve_preferences``: Python's ``ssl`` module can set one curve, not a list. One curve is
  set as given. With several, OpenSSL's default groups are offered, in OpenSSL's order; they
  include every curve Go knows (X25519, P-256, P-384, P-521). ``WebConfig.notes`` says so, and
  ``WebConfigWatcher`` logs it as a warning.
- ``RequestClientCert`` and ``RequireAnyClientCert``: refused, because the ``ssl`` module cannot
  ask for a client certificate without verifying it. ``TLS10``/``TLS11``: refused, because
  OpenSSL refuses them at its default security level.
- ``http2`` is accepted; this exporter serves HTTP/1.1 only and offers only ``http/1.1`` in ALPN.
- Inline ``cert`` and ``key`` are refused (store them in files); inline ``client_ca`` works.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import re
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from exporter.config.grammar import Duration
from exporter.config.wording import (
    counted,
    format_location,
    generic_problem,
    more_problems,
    unknown_key_hint,
    unreadable,
)
from exporter.web.auth import BasicAuth, RateLimiter

log = logging.getLogger(__name__)

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
# The TLS 1.2 suites of Go's tls.CipherSuites(), by Go name, with their OpenSSL names.
GO_CIPHER_SUITES: Mapping[str, str] = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
# Accepted and, as in Go, not applied: TLS 1.3 suites are not configurable there.
GO_TLS13_CIPHER_SUITES = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
)
# Go's tls.InsecureCipherSuites(): exporter-toolkit does not know them either.
_GO_INSECURE_CIPHER_SUITES = (
    "TLS_RSA_WITH_RC4_128_SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
)
GO_CURVES: Mapping[str, str] = {
    "CurveP256": "prime256v1",
    "CurveP384": "secp384r1",
    "CurveP521": "secp521r1",
    "X25519": "X25519",
}

_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_TLS_VERSION_ORDER = tuple(TLS_VERSIONS)
_CLIENT_VERIFY_MODES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_NULL_TAG = "tag:yaml.org,2002:null"
# Mappings whose values the format declares as strings; Go's decoder takes any scalar there
# as it is written (``X-XSS-Protection: 0`` is the header value "0").
_TEXT_VALUED_MAPPINGS = frozenset({("http_server_config", "headers"), ("basic_auth_users",)})


class WebConfigError(Exception):
    """A mistake in the web config file: the file, the key, then the problem."""


class _KeyProblemError(ValueError):
    """A problem with ``key`` inside the mapping being validated, not with the mapping itself."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key


# --- validation --------------------------------------------------------------------------


def _non_empty_text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _client_auth_type(value: object) -> str:
    if value == "":
        return "NoClientCert"  # as in exporter-toolkit
    if value in UNVERIFIED_CLIENT_AUTH_TYPES:
        raise ValueError(
            f"{value} is not supported by this exporter: it asks for a client certificate "
            "without verifying it, which Python's ssl module cannot do; use "
            "VerifyClientCertIfGiven or RequireAndVerifyClientCert with client_ca_file"
        )
    if not isinstance(value, str) or value not in SUPPORTED_CLIENT_AUTH_TYPES:
        raise ValueError(f"{value!r} is not one of {', '.join(SUPPORTED_CLIENT_AUTH_TYPES)}")
    return value


def _tls_version(value: object) -> str:
    if not isinstance(value, str) or value not in TLS_VERSIONS:
        raise ValueError(f"{value!r} is not one of {', '.join(TLS_VERSIONS)}")
    if TLS_VERSIONS[value] is None:
        raise ValueError(
            f"{value} is not supported by this exporter: its OpenSSL refuses TLS 1.0 and 1.1 "
            "at the default security level; use TLS12 or TLS13"
        )
    return value


def _cipher_suite(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a cipher suite name, such as TLS_AES_128_GCM_SHA256")
    if value in _GO_INSECURE_CIPHER_SUITES:
        raise ValueError(
            f"{value} is one of Go's insecure cipher suites, which exporter-toolkit refuses"
        )
    if value not in GO_CIPHER_SUITES and value not in GO_TLS13_CIPHER_SUITES:
        known = (*GO_CIPHER_SUITES, *GO_TLS13_CIPHER_SUITES)
        close = difflib.get_close_matches(value, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ValueError(
            f"{value!r} is not a cipher suite exporter-toolkit knows{hint} (it takes the names "
            "that Go's tls.CipherSuites() gives)"
        )
    return value


def _curve(value: object) -> str:
    if not isinstance(value, str) or value not in GO_CURVES:
        raise ValueError(f"{value!r} is not one of {', '.join(GO_CURVES)}")
    return value


def _headers(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError("must be a mapping of header names to values")
    for name, text in value.items():
        if name not in CONFIGURABLE_HEADERS:
            raise _KeyProblemError(
                str(name),
                f"this header cannot be configured (the ones that can: "
                f"{', '.join(CONFIGURABLE_HEADERS)})",
            )
        if not isinstance(text, str) or not text:
            raise _KeyProblemError(name, "must be a non-empty string")
        allowed = CONFIGURABLE_HEADERS[name]
        if allowed is not None and text not in allowed:
            raise _KeyProblemError(name, f"{text!r} is not one of {', '.join(allowed)}")
        if not text.isprintable() or not text.isascii():
            raise _KeyProblemError(name, "must be printable ASCII on one line")
    return value


def _users(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError("must be a mapping of user names to bcrypt hashes")
    for user, hashed in value.items():
        if not isinstance(user, str) or not user:
            raise ValueError("a user name must be a non-empty string")
        if ":" in user:
            raise _KeyProblemError(
                user, "a user name cannot contain ':', basic auth could never match"
            )
        # The value is never repeated in a message: it may be a password written by mistake.
        if not isinstance(hashed, str) or not _BCRYPT_HASH.fullmatch(hashed):
            raise _KeyProblemError(
                user,
                "not a bcrypt hash: store the hash of the password ($2a$, $2b$ or $2y$, "
                "as `htpasswd -nB USER` prints after the colon), never the password itself",
            )
    return value


_Text = Annotated[str, BeforeValidator(_non_empty_text)]
_TlsVersionName = Annotated[str, BeforeValidator(_tls_version)]
_CipherSuiteName = Annotated[str, BeforeValidator(_cipher_suite)]
_CurveName = Annotated[str, BeforeValidator(_curve)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_values_mean_defaults(cls, data: object) -> object:
        # ``min_version:`` with nothing after it is YAML null: the default, as in Go.
        if isinstance(data, dict):
            return {
                key: value
                for key, value in data.items()
                if value is not None or key not in cls.model_fields
            }
        return data


class TlsServerConfig(_Section):
    """The ``tls_server_config`` section; TLS is on when any key is set."""

    cert_file: _Text | None = None
    key_file: _Text | None = None
    client_ca_file: _Text | None = None
    client_auth_type: Annotated[str, BeforeValidator(_client_auth_type)] = "NoClientCert"
    min_version: _TlsVersionName = "TLS12"
    max_version: _TlsVersionName = "TLS13"
    cipher_suites: list[_CipherSuiteName] = []
    curve_preferences: list[_CurveName] = []
    prefer_server_cipher_suites: bool = Field(default=True, strict=True)
    client_allowed_sans: list[_Text] | None = None
    cert: str | None = None
    key: str | None = None
    client_ca: _Text | None = None

    @field_validator("cert", "key", mode="before")
    @classmethod
    def _refuse_inline_key_pair(cls, value: object, info: ValidationInfo) -> object:
        # The value is never repeated: it may be key material.
        raise ValueError(
            "inline certificates and keys are not supported by this exporter: write it to a "
            f"file and set {info.field_name}_file"
        )

    @property
    def enabled(self) -> bool:
        """Whether the section sets anything; an empty one means plain HTTP, as in the toolkit."""
        return bool(self.model_fields_set)

    @model_validator(mode="after")
    def _consistent(self) -> TlsServerConfig:
        if not self.enabled:
            return self
        for required in ("cert_file", "key_file"):
            if getattr(self, required) is None:
                raise _KeyProblemError(required, "required when tls_server_config is set")
        if self.client_ca_file is not None and self.client_ca is not None:
            raise _KeyProblemError("client_ca", "set client_ca_file or client_ca, not both")
        has_ca = self.client_ca_file is not None or self.client_ca is not None
        if self.client_auth_type == "NoClientCert" and has_ca:
            raise _KeyProblemError(
                "client_auth_type",
                "is NoClientCert, so the client CA would be ignored: set VerifyClientCertIfGiven "
                "or RequireAndVerifyClientCert",
            )
        if self.client_auth_type != "NoClientCert" and not has_ca:
            raise _KeyProblemError(
                "client_ca_file",
                f"required when client_auth_type is {self.client_auth_type}: the CA that signs "
                "client certificates",
            )
        if self.client_allowed_sans is not None:
            if self.client_auth_type != "RequireAndVerifyClientCert":
                raise _KeyProblemError(
                    "client_allowed_sans", "needs client_auth_type RequireAndVerifyClientCert"
                )
            if not self.client_allowed_sans:
                raise _KeyProblemError(
                    "client_allowed_sans",
                    "is empty, which would refuse every client: list the allowed SANs, "
                    "or remove the key",
                )
        order = _TLS_VERSION_ORDER.index
        if order(self.max_version) < order(self.min_version):
            raise _KeyProblemError(
                "max_version", f"{self.max_version} is lower than min_version {self.min_version}"
            )
        if self.max_version == "TLS12" and self.cipher_suites and not self.tls12_cipher_suites:
            raise _KeyProblemError(
                "cipher_suites",
                "lists only TLS 1.3 suites, and max_version is TLS12: no handshake could succeed",
            )
        return self

    @property
    def tls12_cipher_suites(self) -> tuple[str, ...]:
        """The OpenSSL names of the TLS 1.2 suites listed, in order."""
        return tuple(
            GO_CIPHER_SUITES[name] for name in self.cipher_suites if name in GO_CIPHER_SUITES
        )


class HttpServerConfig(_Section):
    """The ``http_server_config`` section."""

    headers: Annotated[dict[str, str], BeforeValidator(_headers)] = {}
    http2: bool = Field(default=True, strict=True)


class RateLimitConfig(_Section):
    """The ``rate_limit`` section: off unless ``interval`` is set and not zero."""

    interval: Duration | None = None
    burst: int | None = Field(default=None, strict=True)

    @field_validator("burst", mode="before")
    @classmethod
    def _whole_number(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be a whole number")
        return value

    @model_validator(mode="after")
    def _burst_with_interval(self) -> RateLimitConfig:
        if self.interval is None:
            if self.burst is not None:
                raise _KeyProblemError("burst", "has no effect without rate_limit.interval")
        elif self.interval > 0 and (self.burst is None or self.burst < 1):
            raise _KeyProblemError(
                "burst",
                "must be a whole number of at least 1 when rate_limit.interval is set "
                "(0 would refuse every request)",
            )
        return self


class WebConfigFile(_Section):
    """The whole web config file, as exporter-toolkit defines it."""

    tls_server_config: TlsServerConfig = TlsServerConfig()
    http_server_config: HttpServerConfig = HttpServerConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    basic_auth_users: Annotated[dict[str, str], BeforeValidator(_users)] = {}


def _describe(error: ValidationError) -> str:
    """The first problem as ``key.path: message``, never repeating the value given."""
    problems = error.errors(include_url=False)
    first = problems[0]
    location = list(first["loc"])
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, _KeyProblemError):
        location.append(cause.key)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"unknown key{unknown_key_hint(WebConfigFile, location)}"
    elif (generic := generic_problem(first["type"])) is not None:
        message = generic
    return f"{format_location(location)}: {message}{more_problems(len(problems))}"


# --- YAML as Go's decoder reads it -------------------------------------------------------


class _GoYamlLoader(yaml.SafeLoader):
    """A safe loader that reads the file as exporter-toolkit's YAML decoder does.

    Mapping keys are text as written (``123:`` is the user "123"), a key given twice is an
    error, and unquoted ``y``/``n`` are booleans, as in Go's YAML 1.1.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.keys_above: list[str] = []


def _key_text(node: yaml.Node) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise yaml.MarkedYAMLError(
            problem="a list or mapping cannot be a key", problem_mark=node.start_mark
        )
    return "" if node.tag == _NULL_TAG else str(node.value)


def _construct_mapping(loader: _GoYamlLoader, node: yaml.MappingNode) -> dict[str, Any]:
    seen: set[str] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys merged from an anchor may be overridden
        key = _key_text(key_node)
        if key in seen:
            raise yaml.MarkedYAMLError(
                problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark
            )
        seen.add(key)
    loader.flatten_mapping(node)
    text_valued = tuple(loader.keys_above) in _TEXT_VALUED_MAPPINGS
    mapping: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = _key_text(key_node)
        if text_valued and isinstance(value_node, yaml.ScalarNode):
            mapping[key] = "" if value_node.tag == _NULL_TAG else str(value_node.value)
            continue
        loader.keys_above.append(key)
        try:
            mapping[key] = loader.construct_object(value_node, deep=True)
        finally:
            loader.keys_above.pop()
    return mapping


def _construct_bool(loader: _GoYamlLoader, node: yaml.ScalarNode) -> bool:
    return str(loader.construct_scalar(node)).lower() in {"y", "yes", "true", "on"}


_GoYamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_GoYamlLoader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)
_GoYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN")
)


def _parse_yaml(text: str, source: Path) -> Any:
    try:
        return yaml.load(text, Loader=_GoYamlLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else str(source)
        raise WebConfigError(f"{where}: {error.problem or error}") from None
    except yaml.YAMLError as error:
        raise WebConfigError(f"{source}: {error}") from None


# --- the loaded config -------------------------------------------------------------------


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


@dataclass(frozen=True)
class WebConfig:
    """A validated web config file, ready to serve with.

    ``http2`` is accepted for compatibility and otherwise unused: this exporter serves
    HTTP/1.1 only, and offers only ``http/1.1`` in TLS's ALPN. ``notes`` are settings applied
    differently from Go's exporters (see the module's docstring), one line each, to log.
    """

    source: Path
    tls: TlsSettings | None = None
    headers: tuple[tuple[str, str], ...] = ()
    http2: bool = True
    rate_limiter: RateLimiter | None = field(default=None, compare=False)
    basic_auth: BasicAuth | None = field(default=None, compare=False)
    notes: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        """What the file turns on, as ``--config.check`` reports it."""
        if self.tls is None:
            tls = "TLS off"
        elif self.tls.client_auth_type == "NoClientCert":
            tls = "TLS on"
        else:
            tls = f"TLS on with client certificates ({self.tls.client_auth_type})"
        users = (
            "basic auth off"
            if self.basic_auth is None
            else f"basic auth for {counted(len(self.basic_auth.users), 'user')}"
        )
        return f"{tls}, {users}"

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
    except FileNotFoundError:
        raise WebConfigError(
            f"{path}: the web config file does not exist: point --web.config.file at yours"
        ) from None
    except OSError as error:
        raise WebConfigError(
            f"{path}: cannot read the web config file: {unreadable(error)}"
        ) from None
    data = _parse_yaml(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise WebConfigError(f"{path}: the web config file must be a YAML mapping of sections")
    try:
        file = WebConfigFile.model_validate(data)
    except ValidationError as error:
        raise WebConfigError(f"{path}: {_describe(error)}") from None
    notes: list[str] = []
    tls = _tls_settings(path, file.tls_server_config, notes)
    http = file.http_server_config
    limit = file.rate_limit
    users = file.basic_auth_users
    return WebConfig(
        source=path,
        tls=tls,
        headers=tuple(http.headers.items()),
        http2=http.http2,
        rate_limiter=(
            RateLimiter(limit.interval, limit.burst)
            if limit.interval and limit.burst is not None
            else None
        ),
        # An empty list of users means no authentication, as in exporter-toolkit.
        basic_auth=(
            BasicAuth({user: hashed.encode("ascii") for user, hashed in users.items()})
            if users
            else None
        ),
        notes=tuple(notes),
    )


class WebConfigWatcher:
    """The current web config, re-read by ``check()`` when the file or a certificate changes.

    Files are compared by inode, modification time and size. A change that does not load keeps
    the last good config and logs one error line; so does one that would switch between HTTP
    and HTTPS, which needs a restart.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        before = _identities(_named_files(path))
        self._config = load_web_config(path)
        self._watched = _identities(self._config.files, before)
        self._lock = threading.Lock()
        self._log_notes(self._config)

    def current(self) -> WebConfig:
        """The config to use now; never touches the disk."""
        return self._config

    def check(self) -> bool:
        """Reload if the files changed since the last check; True when a new config is in use.

        Blocking (it reads files and certificates): call it from a worker thread.
        """
        with self._lock:
            if _identities(tuple(self._watched)) == self._watched:
                return False
            # Taken before reading, so that a change made during the read is seen next time.
            # The files a broken config names are watched too: the fix may be creating one.
            before = _identities((*self._config.files, *_named_files(self._path)))
            try:
                config = self._load_compatible()
            except WebConfigError as error:
                self._watched = before
                log.error(
                    "web config not reloaded; serving with the previous one",
                    extra={"file": str(self._path), "error": str(error)},
                )
                return False
            self._config = config
            self._watched = _identities(config.files, before)
            log.info("web config reloaded", extra={"file": str(self._path)})
            self._log_notes(config)
            return True

    def _load_compatible(self) -> WebConfig:
        config = load_web_config(self._path)
        if (config.tls is None) != (self._config.tls is None):
            raise WebConfigError(
                f"{self._path}: tls_server_config: switching between HTTP and HTTPS needs a restart"
            )
        return config

    def _log_notes(self, config: WebConfig) -> None:
        if config.notes:
            log.warning(
                "web config applied differently from Go's exporters",
                extra={"file": str(self._path), "note": "; ".join(config.notes)},
            )


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
        data = _parse_yaml(path.read_text(encoding="utf-8"), path)
    except (OSError, UnicodeDecodeError, WebConfigError):
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


def _problem(source: Path, key: str, problem: str) -> WebConfigError:
    return WebConfigError(f"{source}: tls_server_config.{key}: {problem}")


class _PassphraseNeededError(Exception):
    pass


def _no_passphrase() -> bytes:
    # Without a callback, OpenSSL would prompt on the terminal for the passphrase.
    raise _PassphraseNeededError


def _tls_settings(source: Path, section: TlsServerConfig, notes: list[str]) -> TlsSettings | None:
    if not section.enabled:
        return None
    # Both checked by the model.
    assert section.cert_file is not None
    assert section.key_file is not None
    cert_file = _relative_to(source, section.cert_file)
    key_file = _relative_to(source, section.key_file)
    client_ca_file = (
        None if section.client_ca_file is None else _relative_to(source, section.client_ca_file)
    )
    min_version = TLS_VERSIONS[section.min_version]
    max_version = TLS_VERSIONS[section.max_version]
    assert min_version is not None
    assert max_version is not None
    tls12_suites = section.tls12_cipher_suites
    if section.cipher_suites and not tls12_suites and min_version < ssl.TLSVersion.TLSv1_3:
        # What Go does too: TLS 1.2 finds no suite to agree on.
        min_version = ssl.TLSVersion.TLSv1_3
        notes.append(
            "tls_server_config.cipher_suites: lists only TLS 1.3 suites, which do not restrict "
            "TLS 1.3, so only TLS 1.3 clients are served, as by Go's exporters"
        )

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = min_version
    context.maximum_version = max_version
    if section.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])
    if tls12_suites:
        try:
            context.set_ciphers(":".join(tls12_suites))
        except ssl.SSLError:
            raise _problem(
                source, "cipher_suites", "this system's OpenSSL offers none of these suites"
            ) from None
    _apply_curves(source, context, section.curve_preferences, notes)
    _load_key_pair(source, context, cert_file, key_file)
    if client_ca_file is not None:
        _readable(source, client_ca_file, "client_ca_file")
        try:
            context.load_verify_locations(cafile=client_ca_file)
        except ssl.SSLError:
            raise _problem(
                source, "client_ca_file", f"{client_ca_file} holds no PEM certificate"
            ) from None
    elif section.client_ca is not None:
        try:
            context.load_verify_locations(cadata=section.client_ca)
        except ssl.SSLError:
            raise _problem(source, "client_ca", "holds no PEM certificate") from None
    context.verify_mode = _CLIENT_VERIFY_MODES[section.client_auth_type]
    return TlsSettings(
        cert_file=cert_file,
        key_file=key_file,
        client_ca_file=client_ca_file,
        client_auth_type=section.client_auth_type,
        min_version=min_version,
        max_version=max_version,
        client_allowed_sans=frozenset(section.client_allowed_sans or ()),
        context=context,
    )


def _apply_curves(
    source: Path, context: ssl.SSLContext, curves: list[str], notes: list[str]
) -> None:
    distinct = tuple(dict.fromkeys(curves))
    if len(distinct) == 1:
        try:
            context.set_ecdh_curve(GO_CURVES[distinct[0]])
        except (ssl.SSLError, ValueError):
            raise _problem(
                source, "curve_preferences", f"this system's OpenSSL lacks {distinct[0]}"
            ) from None
    elif distinct:
        notes.append(
            f"tls_server_config.curve_preferences: Python's ssl module sets one curve, not "
            f"{len(distinct)}; OpenSSL's default groups are offered instead, in its own order "
            "(they include every curve listed)"
        )


def _readable(source: Path, path: Path, key: str) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        raise _problem(source, key, f"cannot read {path}: {error.strerror or error}") from None


def _load_key_pair(source: Path, context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    _readable(source, cert_file, "cert_file")
    _readable(source, key_file, "key_file")
    # Loaded alone first, so that a broken certificate is not reported as a broken key.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert_file)
    except ssl.SSLError:
        raise _problem(source, "cert_file", f"{cert_file} holds no PEM certificate") from None
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except _PassphraseNeededError:
        raise _problem(
            source,
            "key_file",
            f"{key_file} is encrypted, and the web config has no passphrase: store the key "
            "unencrypted, readable only by the exporter",
        ) from None
    except ssl.SSLError as error:
        if error.reason in {"KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"}:
            problem = f"the key in {key_file} does not match the certificate in {cert_file}"
        else:
            problem = f"cannot load a private key from {key_file}: {error.reason or 'not PEM'}"
        raise _problem(source, "key_file", problem) from None


def _san_value(kind: str, value: str) -> str:
    if kind == "IP Address":
        # Python prints IPv6 addresses long and upper case; Go, as the toolkit compares them,
        # short and lower case.
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            return value
    return value
