"""A helm upgrade as a cluster applies it, against the real exporter.

The chart is rendered by Helm's own engine; its pod's ConfigMaps and Secrets are laid out
as the kubelet does (a timestamped directory per version, the ``..data`` link, a link per
key), under a temporary directory instead of ``/``; the exporter's console script runs with
the pod's own arguments against the simulator. Then an upgrade is rendered, its pod template
compared with the running one (equal: Kubernetes keeps the pod), and its ConfigMaps published
by moving ``..data`` as the kubelet does. Only what ties a pod to a cluster is replaced: the
API (the simulator), the in-container paths, the listen address.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from exporter.demo.simulator import BuildPlan, Simulator
from tests.helpers.chart import render_chart
from tests.helpers.pki import PASSWORD, Pki, bcrypt_hash, client_context
from tests.helpers.pod import PodVolumes, container_arguments, probe_command
from tests.helpers.support import (
    CANARY_API_KEY,
    EPOCH,
    Daemon,
    environment,
    forever_building,
    polls,
    wait_until,
)

FINISHED = BuildPlan("done", "app", "v0", EPOCH, 1, 1, 1)
TLS_SECRET = "exporter-tls"
VARIANTS: dict[str, dict[str, Any]] = {
    "http": {},
    "tls-and-basic-auth": {
        "webConfig": {
            "tls": {"secretName": TLS_SECRET},
            "basicAuthUsers": {"prometheus": bcrypt_hash()},
        }
    },
}


def release_values(
    base_url: str, builds: list[str], max_artifacts: int, variant: str
) -> dict[str, Any]:
    return {
        "apiKey": {"value": CANARY_API_KEY},
        "config": {
            "api": {"base_url": base_url, "requests_per_second": 50},
            "polling": {"interval": "1s", "build_files_refresh_interval": "100ms"},
            "metrics": {"max_artifacts_per_build": max_artifacts},
            "builds": builds,
        },
        **VARIANTS[variant],
    }


def pod_template(values: dict[str, Any]) -> str:
    return yaml.safe_dump(render_chart(values).workload()["spec"]["template"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_helm_upgrade_adding_a_build_and_changing_config_applies_in_the_running_pod(
    variant: str, tmp_path: Path, daemons: list[Daemon], pki: Pki
) -> None:
    plans = [FINISHED, forever_building("running"), forever_building("added")]
    tls = {"tls.crt": pki.server.cert.read_text(), "tls.key": pki.server.key.read_text()}
    with Simulator(CANARY_API_KEY, plans) as simulator:
        first = release_values(simulator.base_url, ["done", "running"], 64, variant)
        installed = render_chart(first)
        volumes = PodVolumes(installed, tmp_path / "pod", {TLS_SECRET: tls})
        daemon = Daemon(*container_arguments(installed, volumes, "pod"), env=environment())
        daemons.append(daemon)
        url = daemon.wait_for_url()
        basic_auth = bool(VARIANTS[variant])
        client = httpx.Client(
            verify=client_context(pki) if url.startswith("https") else True,
            auth=("prometheus", PASSWORD) if basic_auth else None,
            timeout=10,
        )

        def metrics() -> str:
            response = client.get(url + "/metrics")
            response.raise_for_status()
            return response.text

        def polled(*build_ids: str) -> bool:
            text = metrics()
            return all(f'last_poll_success{{build_id="{b}"}} 1.0' in text for b in build_ids)

        with client:
            wait_until(lambda: polled("done", "running"), message="the builds to be polled")
            assert "primeintellect_image_build_artifact_info{" in metrics()
            assert polls(simulator, "done") == 1

            # The upgrade: one build more, and a reloadable config value changed.
            second = release_values(simulator.base_url, ["done", "running", "added"], 0, variant)
            assert pod_template(second) == pod_template(first), "the upgrade would replace the pod"
            # Under helm template the probe's password is made anew (lookup finds no cluster):
            # its Secret changes too, the hash and the password together.
            updated = ["build-ids", "config", *(["web-config"] if basic_auth else [])]
            assert sorted(volumes.update(render_chart(second))) == updated

            wait_until(lambda: polled("added"), message="the added build to be polled")
            wait_until(
                lambda: "primeintellect_image_build_artifact_info{" not in metrics(),
                message="the changed config to apply",
            )
            reloads = metrics()
            assert 'config_last_reload_successful{source="config"} 1.0' in reloads
            assert daemon.process.poll() is None, "the exporter restarted"
            # A finished build is never requested again.
            assert polls(simulator, "done") == 1

            if basic_auth:
                assert client.get(url + "/-/healthy", auth=None).status_code == 401
                check_probes(installed.container(), volumes, url, tmp_path)
        returncode, _, log = daemon.stop()
    assert returncode == 0
    assert log.count("msg=listening") == 1, "one start, no restart"


def check_probes(container: dict[str, Any], volumes: PodVolumes, url: str, tmp_path: Path) -> None:
    """The chart's exec probes, run as the kubelet runs them, pass; with a wrong password
    they fail and say why."""
    for probe in ("livenessProbe", "readinessProbe"):
        command = probe_command(container[probe], volumes, url)
        passed = subprocess.run(
            command, capture_output=True, text=True, timeout=30, env=environment(), check=False
        )
        assert passed.returncode == 0, passed.stderr
        wrong = tmp_path / "wrong-password"
        wrong.write_text("not the password\n")
        where = command.index("--password-file") + 1
        refused = subprocess.run(
            [*command[:where], str(wrong), *command[where + 1 :]],
            capture_output=True,
            text=True,
            timeout=30,
            env=environment(),
            check=False,
        )
        assert refused.returncode == 1
        assert "HTTP 401" in refused.stderr
