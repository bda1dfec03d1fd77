"""Reading the Markdown documents: headings, sections, tables, links, and the metric reference
(docs/metrics.md), for the tests that hold the documents to the code."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.support import REPOSITORY

README = REPOSITORY / "README.md"
DOCS = REPOSITORY / "docs"
METRICS_REFERENCE = DOCS / "metrics.md"
CONFIGURATION_REFERENCE = DOCS / "configuration.md"
ALERTS_REFERENCE = DOCS / "alerts-and-dashboard.md"
DEPLOYMENT_REFERENCE = DOCS / "deployment.md"
DEVELOPMENT_REFERENCE = DOCS / "development.md"
RUNBOOKS = DOCS / "runbooks.md"

_FENCE = re.compile(r"^(```|~~~)")
_HEADING = re.compile(r"^(#{1,6}) +(.+?) *#*$")
# [text](target) and ![alt](target), with an optional "title".
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?: +\"[^\"]*\")?\)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> list[str]:
    """The lines of ``text`` outside fenced code blocks (those are blanked, keeping line
    numbers), where a ``#`` starts a heading rather than a shell or YAML comment."""
    lines = []
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return lines


def headings(text: str) -> list[tuple[int, str]]:
    """Every heading outside code blocks, as (level, title)."""
    return [
        (len(match.group(1)), match.group(2))
        for line in prose_lines(text)
        if (match := _HEADING.match(line))
    ]


def github_anchor(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of every heading of a document; repeated titles get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _, title in headings(text):
        anchor = github_anchor(title)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def section(text: str, title: str) -> str:
    """The text under the heading ``title`` up to the next heading of the same or a higher
    level, code blocks included."""
    lines = text.splitlines(keepends=True)
    prose = prose_lines(text)
    start = level = None
    for number, line in enumerate(prose):
        match = _HEADING.match(line)
        if match is None:
            continue
        if start is None:
            if match.group(2) == title:
                start, level = number + 1, len(match.group(1))
        elif level is not None and len(match.group(1)) <= level:
            return "".join(lines[start:number])
    assert start is not None, f"no heading {title!r}"
    return "".join(lines[start:])


def fenced_blocks(text: str) -> list[str]:
    """The contents of each fenced code block, in order."""
    return re.findall(r"^```[a-z]*\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def _cells(row: str) -> list[str]:
    """A table row's cells; a ``|`` inside a code span does not end a cell."""
    cells = []
    current = ""
    in_code = False
    for char in row.strip().removeprefix("|").removesuffix("|"):
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            cells.append(current.strip())
            current = ""
        else:
            current += char
    cells.append(current.strip())
    return cells


def table_rows(text: str) -> list[list[str]]:
    """The cells of every table row in ``text`` (header rows included, separator rows not)."""
    return [
        _cells(line)
        for line in prose_lines(text)
        if line.startswith("|") and not re.fullmatch(r"[|:\- ]+", line.strip())
    ]


def relative_links(path: Path) -> list[str]:
    """Every link target of a Markdown file that is not a URL: a path, an anchor, or both."""
    text = "\n".join(prose_lines(path.read_text()))
    return [target for target in _LINK.findall(text) if not _SCHEME.match(target)]


def broken_links(path: Path, root: Path = REPOSITORY) -> list[str]:
    """The relative links of a Markdown file whose file (within ``root``, the repository that
    GitHub shows), or heading in that file, is missing."""
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.is_relative_to(root) or not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(f"{target}: no such heading")
    return broken


@dataclass(frozen=True)
class DocumentedFamily:
    type: str
    labels: frozenset[str]


def _label_shorthands(text: str) -> dict[str, frozenset[str]]:
    """The reference's shorthands for label sets, such as L for build_id, image_name, image_tag."""
    return {
        row[0]: frozenset(re.findall(r"`([a-z_]+)`", row[1]))
        for row in table_rows(text)
        if re.fullmatch(r"[A-Z]", row[0])
    }


def _labels(cell: str, shorthands: dict[str, frozenset[str]]) -> frozenset[str]:
    if cell == "—":
        return frozenset()
    labels: set[str] = set()
    for part in (part.strip() for part in cell.split(",")):
        if part in shorthands:
            labels |= shorthands[part]
        else:
            match = re.fullmatch(r"`([a-z_]+)`", part)
            assert match, f"not a label, nor a shorthand: {part!r}"
            labels.add(match.group(1))
    return frozenset(labels)


def documented_metrics() -> dict[str, DocumentedFamily]:
    """Every metric family of the reference's tables, by the name it is exposed under."""
    text = METRICS_REFERENCE.read_text()
    shorthands = _label_shorthands(text)
    assert shorthands, "the label shorthands table was not found"
    families: dict[str, DocumentedFamily] = {}
    for row in table_rows(text):
        match = re.fullmatch(r"`(primeintellect_[a-z_]+)`", row[0])
        if match is None:
            continue
        name = match.group(1)
        assert name not in families, f"{name} is documented twice"
        families[name] = DocumentedFamily(row[1], _labels(row[2], shorthands))
    assert len(families) > 20, "the metric tables were not found"
    return families


def documented_metric_names() -> set[str]:
    """The metric names of the reference: the exporter's documented contract."""
    return set(documented_metrics())
