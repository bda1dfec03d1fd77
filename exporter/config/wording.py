"""How a configuration mistake is told: one readable message, never a secret repeated.

The config file, the command line's overrides and the web config file word their errors
with these functions.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ValidationError

# A run of key-like characters this long is taken for a secret, such as an API key pasted
# into the wrong field; path segments, host names and durations are much shorter.
_SECRET_LOOKING = re.compile(r"[A-Za-z0-9_+-]{24,}")
_LONGEST_QUOTED = 64


class ConfigError(Exception):
    """A configuration mistake, worded for the operator who has to fix it."""


def quoted(value: object) -> str:
    """A config value as an error message may repeat it: short text and numbers as written,
    anything that could be a secret described instead of repeated."""
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if not isinstance(value, str):
        return f"a YAML {type(value).__name__}"
    if not may_repeat(value):
        return f"a {len(value)}-character value (not repeated: it may be a secret)"
    return repr(value)


def may_repeat(text: str) -> bool:
    """Whether a message may show ``text``: short, and nothing in it looks like a key."""
    return len(text) <= _LONGEST_QUOTED and not _SECRET_LOOKING.search(text)


def quoted_pasted_url(value: str) -> str | None:
    """A URL where a name was expected, as ``a URL (https://host/…)``: its scheme and host
    only, the host too if it looks like a secret; None if ``value`` is no URL."""
    parts = urlsplit(value.strip())
    if not parts.scheme or not parts.netloc or "/" in parts.scheme:
        return None
    host = parts.hostname or ""
    shown = f"{parts.scheme}://{host}" if host and may_repeat(host) else f"{parts.scheme}://…"
    return f"a URL ({shown}/…)"


def quoted_url(value: str) -> str:
    """A URL as an error message may repeat it: its query, fragment and credentials never."""
    parts = urlsplit(value.strip())
    if not parts.scheme or not parts.hostname:
        return quoted(value)
    hidden = "?…" if parts.query or parts.fragment else ""
    return quoted(f"{parts.scheme}://{parts.hostname}{parts.path}") + (
        " (with a query, not repeated)" if hidden else ""
    )


def unreadable(error: OSError | UnicodeDecodeError) -> str:
    """Why a file could not be read, in words and without Python's errno text."""
    if isinstance(error, UnicodeDecodeError):
        return "it is not UTF-8 text"
    if isinstance(error, FileNotFoundError):
        return "it does not exist"
    if isinstance(error, IsADirectoryError):
        return "it is a directory: name a file"
    if isinstance(error, PermissionError):
        return "permission denied: give the exporter's user read access to it"
    return (error.strerror or type(error).__name__).lower()


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


def describe_validation_error(
    error: ValidationError, root: type[BaseModel], source: str | None = None
) -> str:
    """The first problem of a pydantic error as ``field.path: message``.

    ``root`` is the model validated, whose keys an unknown key is matched against. With the
    YAML ``source``, a value YAML did not read as text is quoted as it was written.
    """
    problems = error.errors(include_url=False)
    first = problems[0]
    message = first["msg"].removeprefix("Value error, ")
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, BuildIdNotStringError) and source is not None:
        written = written_scalar(source, first["loc"])
        message = str(BuildIdNotStringError(cause.value, written))
    elif first["type"] == "extra_forbidden":
        message = f"unknown key{unknown_key_hint(root, first['loc'])}"
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
    return f" (and {counted(more, 'more problem')})" if more > 0 else ""


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``1 build``, ``2 builds``: a count with its noun in the right number."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


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


def written_scalar(source: str, location: Sequence[int | str]) -> str | None:
    """The text of the scalar at ``location`` exactly as the YAML file spells it."""
    try:
        # Composing builds nodes only: no constructor runs, so the safe loader's nodes are
        # those of any loader built on it.
        node = yaml.compose(source, Loader=yaml.SafeLoader)
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
