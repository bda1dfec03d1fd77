"""A pod of the rendered Helm chart on this machine: its volumes as the kubelet lays them out
and updates them, under a directory instead of ``/``."""

from __future__ import annotations

import base64
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.helpers.chart import Rendered
from tests.helpers.kubelet import KubeletVolume

# The chart's in-container directories, each with the volumes mounted below it.
CONTAINER_ROOTS = ("/etc/primeintellect-build-exporter", "/var/lib/primeintellect-build-exporter")


class PodVolumes:
    """A rendered pod's volumes laid out as the kubelet does, under ``root`` instead of ``/``.

    ConfigMaps and Secrets come from the rendered objects, or from ``external`` (name to key
    to text) for those made outside the chart; the chart's absolute in-container paths in their
    files are rewritten to the same places under ``root``.
    """

    def __init__(
        self, rendered: Rendered, root: Path, external: Mapping[str, Mapping[str, str]] = {}
    ) -> None:
        self.root = root
        self._external = external
        self.volumes: dict[str, KubeletVolume] = {}
        self._files: dict[str, dict[str, str]] = {}
        volumes = {volume["name"]: volume for volume in rendered.pod_spec()["volumes"]}
        for mount in rendered.container()["volumeMounts"]:
            directory = self.local(mount["mountPath"])
            files = self._payload(rendered, volumes.get(mount["name"], {}))
            if files is None:
                directory.mkdir(parents=True, exist_ok=True)  # emptyDir or a claim
                continue
            self.volumes[mount["name"]] = KubeletVolume(directory, files)
            self._files[mount["name"]] = files

    def local(self, path: str) -> Path:
        """Where an in-container path is on this machine."""
        return self.root / path.lstrip("/")

    def relocate(self, text: str) -> str:
        """Text with the chart's in-container paths made paths under ``root``."""
        for directory in CONTAINER_ROOTS:
            text = text.replace(directory, str(self.local(directory)))
        return text

    def update(self, rendered: Rendered) -> list[str]:
        """Publish what changed in a new rendering, as the kubelet does after an upgrade;
        the names of the volumes updated."""
        volumes = {volume["name"]: volume for volume in rendered.pod_spec()["volumes"]}
        updated = []
        for name, volume in self.volumes.items():
            files = self._payload(rendered, volumes[name])
            assert files is not None
            if files != self._files[name]:
                volume.update(files)
                self._files[name] = files
                updated.append(name)
        return updated

    def _payload(self, rendered: Rendered, volume: Mapping[str, Any]) -> dict[str, str] | None:
        if "configMap" in volume:
            source = volume["configMap"]
            name = source["name"]
            made = [
                obj["data"] for obj in rendered.all("ConfigMap") if obj["metadata"]["name"] == name
            ]
        elif "secret" in volume:
            source = volume["secret"]
            name = source["secretName"]
            made = [
                {key: base64.b64decode(value).decode() for key, value in obj["data"].items()}
                for obj in rendered.all("Secret")
                if obj["metadata"]["name"] == name
            ]
        else:
            return None
        data = dict(made[0]) if made else dict(self._external[name])
        if "items" in source:
            data = {item["path"]: data[item["key"]] for item in source["items"]}
        return {key: self.relocate(text) for key, text in data.items()}


# The image's Python, which the chart's exec probe runs.
IMAGE_PYTHON = "/opt/venv/bin/python"


def container_arguments(rendered: Rendered, volumes: PodVolumes, pod_name: str) -> list[str]:
    """The container's args as the kubelet passes them ($(POD_NAME) expanded), with the
    in-container paths relocated, listening on a free loopback port."""
    arguments = [
        volumes.relocate(argument.replace("$(POD_NAME)", pod_name))
        for argument in rendered.container()["args"]
        if not argument.startswith("--web.listen-address=")
    ]
    return [*arguments, "--web.listen-address=127.0.0.1:0"]


def probe_command(probe: Mapping[str, Any], volumes: PodVolumes, url: str) -> list[str]:
    """A rendered exec probe's command for this machine: this Python, the relocated paths,
    and the exporter's address for the pod's own loopback one."""
    host = url.split("://", 1)[1]
    command: list[str] = []
    for word in probe["exec"]["command"]:
        if word == IMAGE_PYTHON:
            word = sys.executable
        command.append(re.sub(r"127\.0\.0\.1:\d+", host, volumes.relocate(word)))
    return command
