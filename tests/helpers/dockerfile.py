"""The Dockerfile read and its install recipe replayed on the host, without a container engine.

``install_image`` does what the image build does, from the Dockerfile's own lines: it copies
what the build stage COPYs (minus .dockerignore), runs the build stage's RUN lines (the wheel
build), runs the final stage's install RUN line into a fresh virtualenv, and returns the
installed ENTRYPOINT with only the ENV the image sets.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.support import REPOSITORY

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


def install_image(dockerfile: Dockerfile, root: Path) -> InstalledImage:
    """The final stage's install laid out under ``root``, built as the Dockerfile says."""
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
