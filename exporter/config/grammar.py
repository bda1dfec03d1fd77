"""The spelling of config values: durations, sizes, build and team IDs, shard indexes,
listen addresses and the API base URL."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator

from exporter.config.wording import (
    BuildIdNotStringError,
    may_repeat,
    quoted,
    quoted_pasted_url,
    quoted_url,
)

DEFAULT_BASE_URL = "https://api.primeintellect.ai"

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


def duration_within(minimum: float, maximum: float | None = None) -> AfterValidator:
    """A check that a duration lies in ``[minimum, maximum]``, worded in durations."""

    def check(seconds: float) -> float:
        if seconds < minimum:
            raise ValueError(f"must be at least {format_duration(minimum)}")
        if maximum is not None and seconds > maximum:
            raise ValueError(f"must be at most {format_duration(maximum)}")
        return seconds

    return AfterValidator(check)


def validate_build_id(value: object) -> str:
    """Check that a build ID is a string that is safe as one URL path segment."""
    if not isinstance(value, str):
        raise BuildIdNotStringError(value)
    if not _is_build_id(value):
        raise ValueError(
            f"build ID {quoted_pasted_url(value) or quoted(value)} is invalid: use 1 to 128 "
            f"letters, digits, '-', '_' or '.', and not '.' or '..'{_meant_build_id(value)}"
        )
    return value


def _is_build_id(value: str) -> bool:
    return _BUILD_ID.fullmatch(value) is not None and value not in {".", ".."}


def _meant_build_id(value: str) -> str:
    """``; did you mean 'ID'?`` for what holds one build ID (a URL or path pasted whole, a
    stray space), or what to do with several; nothing if no ID is to be seen."""
    words = value.split()
    if len(words) > 1 and all(_is_build_id(word) for word in words):
        return "; list each build ID as an item (or a line) of its own"
    segments = [segment for segment in urlsplit(value.strip()).path.split("/") if segment]
    # A dashboard's URL names the build after a "builds" segment, and may go on after it.
    after = [
        segments[index + 1]
        for index, segment in enumerate(segments[:-1])
        if segment.lower() in {"build", "builds"}
    ]
    candidate = after[-1] if after else segments[-1] if segments else ""
    if not _is_build_id(candidate) or candidate == value or not any(c.isdigit() for c in candidate):
        return ""
    if not may_repeat(candidate):
        return (
            f"; did you mean the {len(candidate)}-character ID in it (not repeated: it may be "
            "a secret)?"
        )
    return f"; did you mean {candidate!r}?"


def validate_team_id(value: str) -> str:
    """A team ID: the characters of a build ID, 1 to 128 of them."""
    if not _BUILD_ID.fullmatch(value):
        raise ValueError(f"{quoted(value)} is not a team ID (letters, digits, '.', '_' or '-')")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
BuildId = Annotated[str, BeforeValidator(validate_build_id)]


def parse_shard_index(value: str) -> int:
    """A shard index, given as a number or as a StatefulSet pod name such as ``exporter-2``."""
    match = _SHARD_INDEX.fullmatch(value.strip())
    if match is None:
        raise ValueError(
            f"{quoted(value)} is not a shard index: give a number, "
            "or a pod name ending in -<number>"
        )
    return int(match.group(1))


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
