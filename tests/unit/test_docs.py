"""The documents against the code: the reference in docs/ lists exactly what the code has, every
link leads somewhere, and the README stays a short front door."""

from __future__ import annotations

import errno
import functools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.core import Metric
from pydantic import BaseModel

from exporter.cli import build_parser, listen_error
from exporter.config.loading import check_state_path, load_config
from exporter.config.schema import ConfigFile, ImageDiscoverySettings
from exporter.config.wording import ConfigError
from exporter.demo.cli import build_parser as build_simulator_parser
from exporter.discovery import PAGE_LIMIT as IMAGE_PAGE_LIMIT
from exporter.exposition import ExpositionFormat, render
from exporter.listing import ListingCut
from exporter.metrics import (
    build_list_families,
    exporter_families,
    health_families,
    inventory_families,
    per_build_families,
    summary_families,
)
from exporter.reload import FILES_SETTLE_SECONDS
from exporter.store import Inventory, Snapshot
from exporter.telemetry import Component, TelemetrySnapshot
from exporter.web.webconfig import WebConfigError, load_web_config
from tests.helpers.docs import (
    CONFIGURATION_REFERENCE,
    DEVELOPMENT_REFERENCE,
    DOCS,
    METRICS_REFERENCE,
    README,
    DocumentedFamily,
    anchors,
    broken_links,
    documented_metrics,
    fenced_blocks,
    github_anchor,
    headings,
    relative_links,
    section,
    table_rows,
)
from tests.helpers.support import REPOSITORY

README_LIMIT = 15 * 1024
CHART_README = REPOSITORY / "helm" / "primeintellect-build-exporter" / "README.md"
DOCUMENTS = [README, *sorted(DOCS.glob("*.md")), CHART_README]
REFERENCE_PAGES = {
    "configuration.md",
    "metrics.md",
    "alerts-and-dashboard.md",
    "deployment.md",
    "security-and-limits.md",
    "troubleshooting.md",
    "development.md",
    "benchmarks.md",
    "runbooks.md",
}


# --- the configuration reference ------------------------------------------------------------


def schema_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of the config file's schema as a dotted path; nested models are sections."""
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += schema_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def documented_config_keys() -> dict[str, list[str]]:
    """The rows of the config file's table, by key: type, default, meaning."""
    table = section(CONFIGURATION_REFERENCE.read_text(), "The config file")
    rows = [row for row in table_rows(table) if re.fullmatch(r"`[a-z_.]+`", row[0])]
    keys = [row[0].strip("`") for row in rows]
    assert len(keys) == len(set(keys)), "a key is documented twice"
    return {row[0].strip("`"): row[1:] for row in rows}


def nested(dotted: str, value: object) -> dict[str, Any]:
    """``{"a": {"b": value}}`` for ``a.b``."""
    *parents, leaf = dotted.split(".")
    document: dict[str, Any] = {leaf: value}
    for parent in reversed(parents):
        document = {parent: document}
    return document


def setting(config: ConfigFile, dotted: str) -> object:
    return functools.reduce(getattr, dotted.split("."), config)


def test_configuration_reference_lists_every_key_of_the_schema_and_no_other() -> None:
    keys = schema_keys(ConfigFile)
    assert "discovery.images.team_id" in keys, "nested sections are walked"
    assert sorted(documented_config_keys()) == sorted(keys)


@pytest.mark.parametrize("key", schema_keys(ConfigFile))
def test_configuration_reference_gives_each_keys_default(key: str) -> None:
    documented = documented_config_keys()[key][1]
    default = setting(ConfigFile(), key)
    if documented == "unset":
        assert default is None
        return
    written = re.fullmatch(r"`([^`]*)`", documented)
    assert written, f"{key}: the default is `a YAML value` or unset, not {documented!r}"
    value = yaml.safe_load(written.group(1))
    assert setting(ConfigFile.model_validate(nested(key, value)), key) == default


def test_command_line_reference_lists_every_flag_and_no_other() -> None:
    table = section(CONFIGURATION_REFERENCE.read_text(), "Command line")
    documented = [
        match.group(1) for row in table_rows(table) if (match := re.match(r"`(--[a-z.-]+)", row[0]))
    ]
    flags = [
        option
        for action in build_parser()._actions
        for option in action.option_strings
        if option not in {"-h", "--help"}
    ]
    assert sorted(documented) == sorted(flags)


def test_development_reference_lists_every_make_target_and_no_other() -> None:
    makefile = (REPOSITORY / "Makefile").read_text()
    [phony] = re.findall(r"^\.PHONY: (.+)$", makefile, re.MULTILINE)
    table = section(DEVELOPMENT_REFERENCE.read_text(), "Make targets")
    documented = [
        match.group(1)
        for row in table_rows(table)
        if (match := re.fullmatch(r"`make (\S+)`", row[0]))
    ]
    assert sorted(documented) == sorted(phony.split())


# --- the metric reference -------------------------------------------------------------------


def every_family() -> list[Metric]:
    """Every family the exporter can expose, from the functions that make them, given nothing
    to report (the families are there all the same, without samples)."""
    return [
        *per_build_families(()),
        *summary_families(Snapshot(version=0, records={}, finished={})),
        *health_families({}),
        *exporter_families(
            TelemetrySnapshot(
                api_up=None, rate_limited_until=0.0, config_reload_successful={}, internal_errors={}
            )
        ),
        *inventory_families(Inventory()),
        *build_list_families(
            TelemetrySnapshot(
                api_up=None, rate_limited_until=0.0, config_reload_successful={}, internal_errors={}
            )
        ),
    ]


def exposed_as(family: Metric) -> tuple[str, DocumentedFamily]:
    """The name and type a family has on /metrics (prometheus_client's text format), and its
    label names: those it was declared with, or those of its fixed sample."""
    [(name, kind)] = re.findall(
        r"^# TYPE (\S+) (\S+)$", render([family], ExpositionFormat.TEXT).decode(), re.MULTILINE
    )
    # prometheus_client keeps the declared label names only in this attribute.
    declared: tuple[str, ...] = getattr(family, "_labelnames")  # noqa: B009
    sampled = {label for sample in family.samples for label in sample.labels}
    return name, DocumentedFamily(kind, frozenset({*declared, *sampled} - {"le"}))


def test_metric_reference_lists_every_family_with_its_type_and_labels_and_no_other() -> None:
    exposed = dict(exposed_as(family) for family in every_family())
    assert exposed["primeintellect_exporter_build_info"].labels == {"version"}
    assert exposed["primeintellect_image_builds_finished_total"].type == "counter"
    assert documented_metrics() == exposed


# --- links ----------------------------------------------------------------------------------


def test_github_anchors_drop_punctuation_and_join_words_with_hyphens() -> None:
    assert github_anchor("Discovering a team's images") == "discovering-a-teams-images"
    assert github_anchor("Kubernetes (Helm)") == "kubernetes-helm"
    assert github_anchor("Docker Compose, with basic auth") == "docker-compose-with-basic-auth"
    assert anchors("# Notes\n```sh\n# not a heading\n```\n## Notes\n") == {"notes", "notes-1"}


def test_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](#page) [gone](missing.md) [nowhere](#elsewhere) [web](https://x.y/)\n"
    )
    assert relative_links(page) == ["#page", "missing.md", "#elsewhere"]
    (tmp_path / "outside.md").write_text("# Outside\n")
    inside = tmp_path / "repository"
    inside.mkdir()
    (inside / "here.md").write_text("[out](../outside.md#outside) [in](here.md#here)\n# Here\n")
    assert broken_links(page, root=tmp_path) == [
        "missing.md: no such file",
        "#elsewhere: no such heading",
    ]
    assert broken_links(inside / "here.md", root=inside) == ["../outside.md#outside: no such file"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPOSITORY)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(document: Path) -> None:
    assert broken_links(document) == []


def test_the_reference_has_one_page_per_subject_and_the_readme_links_each() -> None:
    assert {path.name for path in DOCS.glob("*.md")} == REFERENCE_PAGES
    linked = {Path(target.partition("#")[0]).name for target in relative_links(README)}
    assert linked >= REFERENCE_PAGES


# --- the README -----------------------------------------------------------------------------


def test_readme_stays_short() -> None:
    assert len(README.read_bytes()) <= README_LIMIT


def test_readme_contents_list_every_section_in_order() -> None:
    text = README.read_text()
    sections = [title for level, title in headings(text) if level == 2 and title != "Contents"]
    listed = re.findall(r"^- \[[^\]]+\]\(#([^)]+)\)$", section(text, "Contents"), re.MULTILINE)
    assert listed == [github_anchor(title) for title in sections]


def test_readme_begins_with_a_quickstart_of_make_demo_and_make_test() -> None:
    text = README.read_text()
    [(level, _), *rest] = headings(text)
    assert level == 1
    assert rest[0] == (2, "Quickstart"), "the quickstart comes right after the introduction"
    assert "```" not in text.split("\n## ", 1)[0], "the introduction is one paragraph"
    first_block = fenced_blocks(section(text, "Quickstart"))[0]
    commands = [line.split("#", 1)[0].strip() for line in first_block.splitlines()]
    assert commands == ["make demo", "make test"]
    targets = re.findall(r"^([a-z-]+):", (REPOSITORY / "Makefile").read_text(), re.MULTILINE)
    assert {"demo", "test"} <= set(targets)


def test_readme_minimal_config_is_valid_and_lists_only_builds() -> None:
    text = section(README.read_text(), "Running it against the real API")
    [minimal] = [block for block in fenced_blocks(text) if block.startswith("builds:")]
    document = yaml.safe_load(minimal)
    assert list(document) == ["builds"]
    assert ConfigFile.model_validate(document).builds


# --- the messages troubleshooting.md quotes ------------------------------------------------------


def start_messages(directory: Path) -> list[str]:
    """What the exporter says, after ``error: ``, for each mistake that stops its start."""
    environ = {"PRIME_API_KEY": "k"}
    configs = {
        "build_file": "build_files: [teams.txt]\n",
        "build_glob": "build_files: ['builds.d/*.txt']\n",
        "state_path": "builds: [b1]\nstate:\n  path: typo/state.db\n",
        "pasted_url": "builds: ['https://app.primeintellect.ai/builds/cmf3k2x0c0001']\n",
    }
    messages = []
    for name, text in configs.items():
        path = directory / f"{name}.yaml"
        path.write_text(text)
        try:
            check_state_path(load_config(path, environ, starting=True))
        except ConfigError as error:
            messages.append(str(error))
    with pytest.raises(ConfigError) as missing:
        load_config(directory / "absent.yaml", environ, starting=True)
    with pytest.raises(WebConfigError) as missing_web:
        load_web_config(directory / "absent.yml")
    in_use = OSError(errno.EADDRINUSE, "Address already in use")
    return [
        str(missing.value),
        listen_error(":9862", in_use, demo=False),
        *messages,
        str(missing_web.value),
    ]


def test_troubleshooting_quotes_every_start_message_as_the_exporter_words_it(
    tmp_path: Path,
) -> None:
    table = section((DOCS / "troubleshooting.md").read_text(), "At start")
    quoted = [row[0].strip("`") for row in table_rows(table)[1:]]
    # <...> stands for a path, an address or a number of the reader's setup.
    patterns = [re.sub(r"<[^<>]+>", ".+?", re.escape(text)) for text in quoted]
    messages = start_messages(tmp_path)
    assert len(messages) == len(patterns)
    for pattern, message in zip(patterns, messages, strict=True):
        assert re.fullmatch(pattern, message), (pattern, message)


def test_metric_reference_explains_every_internal_error_component_and_no_other() -> None:
    table = section(METRICS_REFERENCE.read_text(), "Internal error components")
    _header, *rows = table_rows(table)
    documented = [row[0].strip("`") for row in rows]
    assert documented == [component.value for component in Component]


def test_development_reference_describes_every_module_and_no_other() -> None:
    table = section(DEVELOPMENT_REFERENCE.read_text(), "Modules")
    documented = {row[0].strip("`") for row in table_rows(table)[1:]}
    modules = {
        path.relative_to(REPOSITORY).as_posix()
        for path in (REPOSITORY / "exporter").rglob("*.py")
        if path.name != "__init__.py"
    }
    assert documented == modules


def test_configuration_reference_says_how_long_changed_files_must_settle() -> None:
    text = section(
        CONFIGURATION_REFERENCE.read_text(), "Changing the tracked builds without a restart"
    )
    stated = re.search(r"looked the same for (\d+(?:\.\d+)?)s", " ".join(text.split()))
    assert stated, "the settle time is not stated"
    assert float(stated.group(1)) == FILES_SETTLE_SECONDS


def test_simulator_reference_lists_every_option_and_no_other() -> None:
    table = section(DEVELOPMENT_REFERENCE.read_text(), "The simulator on its own")
    documented = [
        match.group(1) for row in table_rows(table) if (match := re.match(r"`(--[a-z-]+)", row[0]))
    ]
    options = [
        option
        for action in build_simulator_parser()._actions
        for option in action.option_strings
        if option not in {"-h", "--help"}
    ]
    assert sorted(documented) == sorted(options)


# --- listings cut short ----------------------------------------------------------------------


@pytest.mark.parametrize("listing", ["image", "build"])
def test_every_reason_a_listing_is_cut_with_is_explained_in_the_references(listing: str) -> None:
    family = f"primeintellect_exporter_{listing}_list_last_error"
    [row] = [row for row in table_rows(METRICS_REFERENCE.read_text()) if row[0] == f"`{family}`"]
    symptoms = section((DOCS / "troubleshooting.md").read_text(), "Symptoms")
    for cut in ListingCut:
        assert f"`{cut.value}`" in row[-1], f"{family}: {cut.value}"
        assert f'`{listing}_list_last_error{{reason="{cut.value}"}}`' in symptoms


def test_the_image_listings_default_page_cap_is_stated_as_the_images_it_reaches() -> None:
    text = section(CONFIGURATION_REFERENCE.read_text(), "Discovering a team's images")
    stated = re.search(
        r"`discovery\.images\.max_pages` pages were read \((\d+) by default: ([\d,]+) images\)",
        " ".join(text.split()),
    )
    assert stated, "the default page cap is not stated"
    cap = ImageDiscoverySettings().max_pages
    assert int(stated.group(1)) == cap
    assert int(stated.group(2).replace(",", "")) == cap * IMAGE_PAGE_LIMIT
