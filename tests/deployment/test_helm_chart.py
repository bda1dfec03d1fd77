"""The Helm chart, linted and rendered offline by Helm's own engine (helm-python-sdk).

helm-python-sdk binds the official Helm Go library (bundled in its wheel as libhelm_c), so
these tests need neither a ``helm`` binary nor a cluster nor the network.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import subprocess
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml
from pydantic import BaseModel, ValidationError

from exporter import __version__
from exporter.config.schema import ConfigFile
from exporter.config.wording import counted
from exporter.store import QUEUE_DURATION_BUCKETS
from exporter.web.webconfig import _BCRYPT_HASH
from tests.helpers import docs
from tests.helpers.chart import (
    CASES,
    CHART,
    FULLNAME,
    MINIMAL_VALUES,
    NAMESPACE,
    RELEASE,
    Rendered,
    render_case,
    render_chart,
    scraped_services,
    selects,
    values_of,
)
from tests.helpers.pki import bcrypt_hash, make_pki
from tests.helpers.pod import PodVolumes, container_arguments
from tests.helpers.rules import CONSTANT_LEVELS, load_recording_rules
from tests.helpers.support import CANARY_API_KEY, REPOSITORY, SCRIPT, environment

API_KEY_FILE = "/etc/primeintellect-build-exporter/secrets/api-key"
ALERTS = REPOSITORY / "monitoring" / "alerts.yaml"
RECORDING_RULES = REPOSITORY / "monitoring" / "rules.yaml"
DASHBOARD = REPOSITORY / "monitoring" / "dashboard.json"
CORE_KINDS = {
    "Deployment",
    "StatefulSet",
    "Service",
    "ConfigMap",
    "Secret",
    "ServiceAccount",
    "NetworkPolicy",
    "PersistentVolumeClaim",
}


def test_ci_values_files_cover_every_scenario() -> None:
    assert set(CASES) == {
        "minimal",
        "all-features",
        "existing-secret",
        "shards",
        "no-servicemonitor",
        "no-persistence",
        "tls",
        "basic-auth",
        "tls-basic-auth",
    }


@pytest.mark.parametrize("case", CASES)
def test_chart_lints_without_warnings_or_errors(case: str) -> None:
    report = helm.lint(CHART, values_of(case), strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 1 is INFO (only "icon is recommended"); 2 is WARNING, 3 ERROR.
    assert [message for message in report["messages"] if message["severity"] >= 2] == []


# Every install has the config and builds ConfigMaps; the PersistentVolumeClaim unless
# persistence is off or the shards' StatefulSet makes claims itself.
BASE_KINDS = {"Service": 1, "ConfigMap": 2, "ServiceAccount": 1}
EXPECTED_KINDS: dict[str, dict[str, int]] = {
    "minimal": {"Deployment": 1, "Secret": 1, "PersistentVolumeClaim": 1},
    "all-features": {
        "Deployment": 1,
        "PersistentVolumeClaim": 1,
        "ConfigMap": 3,
        "Secret": 1,
        "ServiceMonitor": 1,
        "PrometheusRule": 1,
        "NetworkPolicy": 1,
    },
    "existing-secret": {"Deployment": 1, "PersistentVolumeClaim": 1},
    "shards": {"StatefulSet": 1, "Service": 2, "ServiceMonitor": 1},
    "no-servicemonitor": {
        "Deployment": 1,
        "ConfigMap": 3,
        "Secret": 1,
        "PrometheusRule": 1,
        "PersistentVolumeClaim": 1,
    },
    "no-persistence": {"Deployment": 1},
    # The web config Secret; with basic-auth, the key's Secret too.
    "tls": {"Deployment": 1, "PersistentVolumeClaim": 1, "Secret": 1, "ServiceMonitor": 1},
    "basic-auth": {"Deployment": 1, "PersistentVolumeClaim": 1, "Secret": 2, "ServiceMonitor": 1},
    "tls-basic-auth": {"StatefulSet": 1, "Service": 2, "Secret": 1, "ServiceMonitor": 1},
}


@pytest.mark.parametrize("case", CASES)
def test_chart_renders_exactly_the_objects_each_scenario_needs(case: str) -> None:
    assert render_case(case).kinds() == Counter({**BASE_KINDS, **EXPECTED_KINDS[case]})


def kubernetes_versions() -> list[str]:
    """The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest known."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    match = re.fullmatch(r">=\s*(\d+\.\d+)\.\d+(-0)?", chart["kubeVersion"])
    assert match, chart["kubeVersion"]
    latest = str(kubernetes_validate.latest_version())
    return [match.group(1), ".".join(latest.split(".")[:2])]


@pytest.mark.parametrize("version", kubernetes_versions())
@pytest.mark.parametrize("case", CASES)
def test_core_objects_validate_against_the_kubernetes_schemas(case: str, version: str) -> None:
    core = [obj for obj in render_case(case).objects if obj["kind"] in CORE_KINDS]
    assert core
    for obj in core:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = "/".join(str(part) for part in error.path)
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {where}: {error.message}")


# Pod Security Standards, "restricted" profile: the volume types it allows.
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


@pytest.mark.parametrize("case", CASES)
def test_pods_meet_the_restricted_pod_security_standard(case: str) -> None:
    rendered = render_case(case)
    pod = rendered.pod_spec()
    pod_context = pod["securityContext"]
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(field)
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= RESTRICTED_VOLUME_TYPES, volume
    assert pod_context["runAsNonRoot"] is True
    for key in ("runAsUser", "runAsGroup", "fsGroup"):
        assert isinstance(pod_context[key], int)
        assert pod_context[key] > 0, key
    assert pod_context["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert not context.get("privileged")
        assert context["capabilities"]["drop"] == ["ALL"]
        assert not context["capabilities"].get("add")
        assert context["readOnlyRootFilesystem"] is True
        assert context.get("runAsUser", pod_context["runAsUser"]) != 0
        assert context.get("seccompProfile", pod_context["seccompProfile"])["type"] in {
            "RuntimeDefault",
            "Localhost",
        }
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("case", CASES)
def test_service_account_carries_no_api_token(case: str) -> None:
    account = render_case(case).one("ServiceAccount")
    assert account["automountServiceAccountToken"] is False


def walk_strings(node: object) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from walk_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_strings(item)


@pytest.mark.parametrize("case", CASES)
def test_api_key_reaches_the_pod_only_as_a_mounted_file(case: str) -> None:
    rendered = render_case(case)
    container = rendered.container()
    assert "envFrom" not in container
    for variable in container.get("env", []):
        assert "secretKeyRef" not in variable.get("valueFrom", {}), variable
        assert variable["name"] != "PRIME_API_KEY"
    key = values_of(case).get("apiKey", {}).get("value")
    if key:
        secret = rendered.one("Secret")  # the key's, named after the release
        assert base64.b64decode(secret["data"]["api-key"]).decode() == key
        for obj in rendered.objects:
            assert all(key not in text for text in walk_strings(obj)), obj["kind"]
        assert key not in rendered.notes


@pytest.mark.parametrize("case", CASES)
def test_config_points_at_the_file_the_secret_is_mounted_as(case: str) -> None:
    rendered = render_case(case)
    values = values_of(case).get("apiKey", {})
    config = yaml.safe_load(rendered.config_text())
    assert config["api"]["api_key_file"] == API_KEY_FILE
    secret_volumes = [
        volume for volume in rendered.pod_spec()["volumes"] if volume["name"] == "api-key"
    ]
    assert len(secret_volumes) == 1
    secret = secret_volumes[0]["secret"]
    expected_secret = values.get("existingSecret") or FULLNAME
    assert secret["secretName"] == expected_secret
    expected_key = (
        values.get("existingSecretKey", "api-key") if "existingSecret" in values else "api-key"
    )
    [item] = secret["items"]
    assert item["key"] == expected_key
    [mount] = [
        mount
        for mount in rendered.container()["volumeMounts"]
        if mount["name"] == secret_volumes[0]["name"]
    ]
    assert "subPath" not in mount, "a subPath mount would not see a rotated Secret"
    assert f"{mount['mountPath']}/{item['path']}" == API_KEY_FILE
    if not values.get("existingSecret"):
        assert rendered.one("Secret")["data"].keys() == {"api-key"}


def outside_objects(directory: Path) -> dict[str, dict[str, str]]:
    """The ConfigMaps and Secrets the ci values name but the chart does not make: the key's
    Secret, the TLS Secret (a certificate for localhost), an empty ConfigMap of build files."""
    pki = make_pki(directory)
    return {
        "primeintellect-api-key": {"api-key": CANARY_API_KEY, "token": CANARY_API_KEY},
        "builds-exporter-tls": {
            "tls.crt": pki.server.cert.read_text(),
            "tls.key": pki.server.key.read_text(),
        },
        "primeintellect-builds": {},
    }


@pytest.mark.parametrize("case", CASES)
def test_rendered_config_passes_the_exporters_own_config_check(case: str, tmp_path: Path) -> None:
    rendered = render_case(case)
    assert rendered.config_text().count(API_KEY_FILE) == 1
    volumes = PodVolumes(rendered, tmp_path / "pod", outside_objects(tmp_path))
    # The container's own arguments (the web config file's too), with the pod name of the
    # third StatefulSet pod put in as Kubernetes would.
    arguments = container_arguments(rendered, volumes, f"{FULLNAME}-2")
    result = subprocess.run(
        [SCRIPT, *arguments, "--config.check"],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(),  # no PRIME_API_KEY: the key file is the only key source
        check=False,
    )
    assert result.returncode == 0, result.stderr
    builds = values_of(case).get("config", {}).get("builds", [])
    assert f"OK, {counted(len(builds), 'build')}" in result.stdout
    shards = values_of(case).get("shards", 1)
    if shards > 1:
        assert f"in shard 2 of {shards}" in result.stdout


def test_a_single_exporter_runs_as_a_deployment_without_shard_flags() -> None:
    rendered = render_case("minimal")
    deployment = rendered.one("Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert not [arg for arg in rendered.container()["args"] if arg.startswith("--shard.")]


def test_shards_run_as_a_statefulset_each_pod_passing_its_name_as_shard_index() -> None:
    rendered = render_case("shards")
    statefulset = rendered.one("StatefulSet")
    assert statefulset["spec"]["replicas"] == 3
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    headless = rendered.one("Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    container = rendered.container()
    assert "--shard.count=3" in container["args"]
    assert "--shard.index=$(POD_NAME)" in container["args"]
    [pod_name] = [variable for variable in container["env"] if variable["name"] == "POD_NAME"]
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # The Service that the ServiceMonitor selects reaches every shard.
    service = rendered.one("Service")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_service_monitor_scrapes_the_services_named_port() -> None:
    rendered = render_case("all-features")
    monitor = rendered.one("ServiceMonitor")
    service = rendered.one("Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@pytest.mark.parametrize("case", ["all-features", "shards"])
def test_the_service_monitor_scrapes_each_pod_through_one_service_only(case: str) -> None:
    rendered = render_case(case)
    # With shards, the headless Service has the same labels and port: it must not be picked
    # too, or every pod is scraped twice and the copies differ only in `service`.
    assert scraped_services(rendered) == [FULLNAME]


def test_the_selector_check_follows_kubernetes_semantics() -> None:
    labels = {"app": "x", "tier": "web"}
    assert selects({"matchLabels": {"app": "x"}}, labels)
    assert not selects({"matchLabels": {"app": "y"}}, labels)
    assert selects({"matchExpressions": [{"key": "role", "operator": "DoesNotExist"}]}, labels)
    assert not selects(
        {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["web"]}]}, labels
    )
    assert selects(
        {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["web"]}]}, labels
    )


STATE_DIRECTORY = "/var/lib/primeintellect-build-exporter"


@pytest.mark.parametrize("case", CASES)
def test_state_file_lives_on_the_state_volume(case: str) -> None:
    rendered = render_case(case)
    config = yaml.safe_load(rendered.config_text())
    assert config["state"] == {"path": f"{STATE_DIRECTORY}/state.db"}
    mounts = {mount["name"]: mount for mount in rendered.container()["volumeMounts"]}
    assert mounts["state"]["mountPath"] == STATE_DIRECTORY
    assert "readOnly" not in mounts["state"]


def test_state_is_kept_on_a_claim_by_default_so_a_new_pod_starts_from_it() -> None:
    rendered = render_case("minimal")
    claim = rendered.one("PersistentVolumeClaim", f"{FULLNAME}-state")
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "1Gi"}},
    }
    volumes = {volume["name"]: volume for volume in rendered.pod_spec()["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"] == {"claimName": f"{FULLNAME}-state"}
    assert rendered.workload()["spec"]["strategy"] == {"type": "Recreate"}


def test_without_persistence_the_state_is_an_empty_dir_which_survives_container_restarts() -> None:
    rendered = render_case("no-persistence")
    volumes = {volume["name"]: volume for volume in rendered.pod_spec()["volumes"]}
    assert volumes["state"] == {"name": "state", "emptyDir": {"sizeLimit": "256Mi"}}
    assert "strategy" not in rendered.workload()["spec"]
    assert rendered.all("PersistentVolumeClaim") == []
    assert "a new pod polls every build again" in rendered.notes


def test_persistent_state_of_one_exporter_is_a_claim_and_pods_never_overlap() -> None:
    rendered = render_case("all-features")
    claim = rendered.one("PersistentVolumeClaim", f"{FULLNAME}-state")
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "fast-ssd",
        "resources": {"requests": {"storage": "2Gi"}},
    }
    volumes = {volume["name"]: volume for volume in rendered.pod_spec()["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"] == {"claimName": f"{FULLNAME}-state"}
    # Two pods must not share one state file: the old one stops before the new one starts.
    assert rendered.workload()["spec"]["strategy"] == {"type": "Recreate"}


def test_persistent_state_of_shards_is_a_claim_per_pod() -> None:
    rendered = render_case("shards")
    templates = rendered.workload()["spec"]["volumeClaimTemplates"]
    assert [template["metadata"]["name"] for template in templates] == ["state"]
    assert templates[0]["spec"]["resources"] == {"requests": {"storage": "1Gi"}}
    assert "state" not in {volume["name"] for volume in rendered.pod_spec()["volumes"]}
    assert rendered.all("PersistentVolumeClaim") == []


def test_probes_use_the_exporters_health_and_readiness_endpoints() -> None:
    container = render_case("minimal").container()
    assert container["livenessProbe"]["httpGet"] == {"path": "/-/healthy", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/-/ready", "port": "http"}
    assert [port["name"] for port in container["ports"]] == ["http"]
    assert container["ports"][0]["containerPort"] == 9862


RULES_FILE_JOB_SELECTOR = 'job=~".*primeintellect-build.*"'
EXPORTER_JOB_RULES = {"PrimeIntellectExporterDown", "PrimeIntellectExporterAbsent"}


def rules_by_name(rendered: Rendered) -> dict[str, dict[str, Any]]:
    rule = rendered.one("PrometheusRule", rendered.workload()["metadata"]["name"])
    return {
        entry["alert"]: entry
        for group in rule["spec"]["groups"]
        for entry in group["rules"]
        if "alert" in entry
    }


def service_monitor_job(rendered: Rendered) -> str:
    """The job the Operator gives the targets: the Service's label named by jobLabel."""
    [monitor] = rendered.all("ServiceMonitor")
    [service] = [
        service for service in rendered.all("Service") if not service["spec"].get("clusterIP")
    ]
    job: str = service["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    return job


def test_prometheus_rule_carries_the_repository_rules_with_only_the_job_selector_replaced() -> None:
    rendered = render_case("all-features")
    selector = f'job="{service_monitor_job(rendered)}"'
    expected = ALERTS.read_text().replace(RULES_FILE_JOB_SELECTOR, selector)
    rule = rendered.one("PrometheusRule")
    recording = yaml.safe_load(RECORDING_RULES.read_text())["groups"]
    assert recording, "monitoring/rules.yaml has no rule groups"
    assert rule["spec"] == {"groups": recording + yaml.safe_load(expected)["groups"]}
    assert rule["spec"]["groups"], "monitoring/alerts.yaml has no rule groups"
    assert expected != ALERTS.read_text(), (
        f"the rules file no longer holds {RULES_FILE_JOB_SELECTOR}"
    )


WITH_MONITORING = {
    **MINIMAL_VALUES,
    "serviceMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
}


@pytest.mark.parametrize(
    ("values", "job"),
    [
        ({}, "primeintellect-build-exporter"),
        ({"nameOverride": "build-exporter"}, "build-exporter"),
        # fullnameOverride renames the objects, not the app.kubernetes.io/name label.
        ({"fullnameOverride": "team-builds"}, "primeintellect-build-exporter"),
        ({"nameOverride": "build-exporter", "shards": 2}, "build-exporter"),
    ],
)
def test_exporter_health_alerts_select_the_job_the_service_monitor_produces(
    values: dict[str, Any], job: str
) -> None:
    rendered = render_chart({**WITH_MONITORING, **values})
    assert service_monitor_job(rendered) == job
    rules = rules_by_name(rendered)
    for name in EXPORTER_JOB_RULES:
        assert f'up{{job="{job}"}}' in rules[name]["expr"], name
        assert RULES_FILE_JOB_SELECTOR not in str(rules[name]), name
    description = rules["PrimeIntellectExporterAbsent"]["annotations"]["description"]
    assert f'up{{job="{job}"}}' in description


def test_exporter_job_selector_value_wins_and_without_a_monitor_the_rules_file_selector_stays() -> (
    None
):
    chosen = 'job=~"builds-.*", namespace="ci"'
    values = {**WITH_MONITORING, "prometheusRule": {"enabled": True, "exporterJobSelector": chosen}}
    rules = rules_by_name(render_chart(values))
    assert all(f"up{{{chosen}}}" in rules[name]["expr"] for name in EXPORTER_JOB_RULES)
    unmonitored = rules_by_name(render_case("no-servicemonitor"))
    kept = f"up{{{RULES_FILE_JOB_SELECTOR}}}"
    assert all(kept in unmonitored[name]["expr"] for name in EXPORTER_JOB_RULES)


RULES_FILE_RUNBOOKS = (
    "https://github.com/primeintellect/primeintellect-build-exporter/blob/main/docs/runbooks.md"
)


def test_runbook_links_point_to_the_runbook_base_url_value_else_to_the_projects_page() -> None:
    wiki = "https://wiki.example.com/platform/build-exporter-runbooks"
    values = {**WITH_MONITORING, "prometheusRule": {"enabled": True, "runbookBaseUrl": wiki}}
    for base, rules in (
        (wiki, rules_by_name(render_chart(values))),
        (RULES_FILE_RUNBOOKS, rules_by_name(render_chart(WITH_MONITORING))),
    ):
        assert rules
        for name, rule in rules.items():
            assert rule["annotations"]["runbook_url"] == f"{base}#{name.lower()}"


SLO_TARGETS = {
    "objective": "slo:primeintellect_image_builds_success:objective_ratio",
    "minBuilds": "slo:primeintellect_image_builds_finished:min_count",
}
# The values under prometheusRule that set a constant of the rules file, by the constant.
RULE_CONSTANTS = {
    "slo:primeintellect_image_builds_success:objective_ratio": ("slo", "buildSuccess", "objective"),
    "slo:primeintellect_image_builds_finished:min_count": ("slo", "buildSuccess", "minBuilds"),
    "slo:primeintellect_image_builds_queue:objective_ratio": ("slo", "queueTime", "objective"),
    "slo:primeintellect_image_builds_queue:threshold_seconds": (
        "slo",
        "queueTime",
        "thresholdSeconds",
    ),
    "slo:primeintellect_image_builds_started:min_count": ("slo", "queueTime", "minBuilds"),
    "threshold:primeintellect_image_builds_consecutive_failures:count": (
        "imageHealth",
        "consecutiveFailures",
    ),
    "threshold:primeintellect_image_builds_failing:seconds": ("imageHealth", "failingForSeconds"),
}
QUEUE_SLOW_RATIO = "job_image_name:primeintellect_image_builds_queue_slow:ratio_rate"


def recorded_expressions(rendered: Rendered) -> dict[str, str]:
    rule = rendered.one("PrometheusRule")
    return {
        entry["record"]: entry["expr"]
        for group in rule["spec"]["groups"]
        for entry in group["rules"]
        if "record" in entry
    }


def test_slo_target_values_replace_the_rules_files_constants_and_empty_ones_keep_them() -> None:
    recording = yaml.safe_load(RECORDING_RULES.read_text())["groups"]
    in_file = {entry["record"]: entry["expr"] for group in recording for entry in group["rules"]}
    kept = recorded_expressions(render_chart(WITH_MONITORING))
    assert all(kept[name] == in_file[name] for name in SLO_TARGETS.values())
    targets = {"objective": 0.99, "minBuilds": 10}
    values = {
        **WITH_MONITORING,
        "prometheusRule": {"enabled": True, "slo": {"buildSuccess": targets}},
    }
    chosen = recorded_expressions(render_chart(values))
    assert chosen[SLO_TARGETS["objective"]] == "vector(0.99)"
    assert chosen[SLO_TARGETS["minBuilds"]] == "vector(10)"
    others = set(in_file) - set(SLO_TARGETS.values())
    assert all(chosen[name] == in_file[name] for name in others)


def nested(path: tuple[str, ...], value: object) -> dict[str, Any]:
    """``{"a": {"b": value}}`` for the path ``("a", "b")``."""
    tree: dict[str, Any] = {path[-1]: value}
    for key in reversed(path[:-1]):
        tree = {key: tree}
    return tree


def test_every_constant_of_the_rules_file_has_a_value_of_the_chart() -> None:
    constants = {
        rule["record"]
        for rule in load_recording_rules()
        if rule["record"].split(":")[0] in CONSTANT_LEVELS
    }
    assert constants == set(RULE_CONSTANTS)


@pytest.mark.parametrize("constant", sorted(RULE_CONSTANTS))
def test_each_target_value_replaces_its_constant_alone(constant: str) -> None:
    recording = yaml.safe_load(RECORDING_RULES.read_text())["groups"]
    in_file = {entry["record"]: entry["expr"] for group in recording for entry in group["rules"]}
    # A valid value of each: objectives are ratios; 600 is also a bucket bound.
    value = 0.9 if constant.endswith(":objective_ratio") else 600
    rule = {"enabled": True, **nested(RULE_CONSTANTS[constant], value)}
    chosen = recorded_expressions(render_chart({**WITH_MONITORING, "prometheusRule": rule}))
    assert chosen[constant] == f"vector({value})"
    changed = {name for name in in_file if chosen[name] != in_file[name]} - {constant}
    if constant.endswith(":threshold_seconds"):
        assert changed == {name for name in in_file if name.startswith(QUEUE_SLOW_RATIO)}
    else:
        assert changed == set()


def test_queue_threshold_value_moves_the_bucket_every_slow_start_ratio_reads() -> None:
    values = {
        **WITH_MONITORING,
        "prometheusRule": {
            "enabled": True,
            "slo": {"queueTime": {"objective": 0.95, "thresholdSeconds": 1200, "minBuilds": 10}},
            "imageHealth": {"consecutiveFailures": 5, "failingForSeconds": 43200},
        },
    }
    chosen = recorded_expressions(render_chart(values))
    assert chosen["slo:primeintellect_image_builds_queue:objective_ratio"] == "vector(0.95)"
    assert chosen["slo:primeintellect_image_builds_queue:threshold_seconds"] == "vector(1200)"
    assert chosen["slo:primeintellect_image_builds_started:min_count"] == "vector(10)"
    assert chosen["threshold:primeintellect_image_builds_consecutive_failures:count"] == "vector(5)"
    assert chosen["threshold:primeintellect_image_builds_failing:seconds"] == "vector(43200)"
    ratios = [expr for name, expr in chosen.items() if name.startswith(QUEUE_SLOW_RATIO)]
    assert len(ratios) == 8
    assert all(re.findall(r'le="[^"]*"', expr) == ['le="1200.0"'] for expr in ratios)
    kept = recorded_expressions(render_chart(WITH_MONITORING))
    ratios = [expr for name, expr in kept.items() if name.startswith(QUEUE_SLOW_RATIO)]
    assert all(re.findall(r'le="[^"]*"', expr) == ['le="300.0"'] for expr in ratios)


def test_a_queue_threshold_that_is_no_bucket_bound_fails_with_the_bounds() -> None:
    values = {
        **WITH_MONITORING,
        "prometheusRule": {"enabled": True, "slo": {"queueTime": {"thresholdSeconds": 250}}},
    }
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError) as failure:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    message = str(failure.value)
    assert "prometheusRule.slo.queueTime.thresholdSeconds must be a bucket bound" in message
    listed = re.search(r"one of ([0-9., ]+); got 250", message)
    assert listed, message
    assert tuple(float(bound) for bound in listed[1].split(", ")) == QUEUE_DURATION_BUCKETS


def test_dashboard_configmap_carries_exactly_the_repository_dashboard() -> None:
    for case in ("all-features", "no-servicemonitor"):
        configmap = render_case(case).one("ConfigMap", f"{FULLNAME}-dashboard")
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        [(name, text)] = configmap["data"].items()
        assert name.endswith(".json")
        assert text == DASHBOARD.read_text()
        assert json.loads(text) == json.loads(DASHBOARD.read_text())
    dashboard = render_case("no-servicemonitor").one("ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["namespace"] == "grafana"


def test_chart_reaches_the_rules_and_dashboard_through_symlinks_to_one_source() -> None:
    for linked, source in (
        ("alerts.yaml", ALERTS),
        ("rules.yaml", RECORDING_RULES),
        ("dashboard.json", DASHBOARD),
    ):
        path = CHART / "files" / linked
        assert path.is_symlink(), f"{path} must link to {source}, not copy it"
        assert path.resolve() == source.resolve()


def test_packaged_chart_holds_the_linked_files_as_regular_files(tmp_path: Path) -> None:
    archive = helm.package(CHART, destination=tmp_path)
    with tarfile.open(archive) as tar:
        member = tar.getmember("primeintellect-build-exporter/files/alerts.yaml")
        assert member.isfile()
        extracted = tar.extractfile(member)
        assert extracted is not None
        assert extracted.read().decode() == ALERTS.read_text()
        recording = tar.extractfile("primeintellect-build-exporter/files/rules.yaml")
        assert recording is not None
        assert recording.read().decode() == RECORDING_RULES.read_text()
        assert not [name for name in tar.getnames() if "/ci/" in name]
    with helm.Chart.load(archive) as chart:
        manifests = chart.render(
            {**MINIMAL_VALUES, "prometheusRule": {"enabled": True}}, name=RELEASE
        )
    [rule] = [text for name, text in manifests.items() if name.endswith("prometheusrule.yaml")]
    assert yaml.safe_load(rule)["spec"]["groups"] == (
        yaml.safe_load(RECORDING_RULES.read_text())["groups"]
        + yaml.safe_load(ALERTS.read_text())["groups"]
    )


def pod_template(values: dict[str, Any]) -> str:
    """The workload's pod template as Kubernetes compares it: any change replaces the pods."""
    return yaml.safe_dump(render_chart(values).workload()["spec"]["template"])


UPGRADE_BASE: dict[str, Any] = {
    "apiKey": {"value": "pk-one"},
    "config": {"builds": ["b1"], "polling": {"interval": "30s"}},
}


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"config": {"builds": ["b1", "b2"]}}, id="a-build-added"),
        pytest.param({"config": {"builds": []}}, id="every-build-removed"),
        pytest.param({"config": {"polling": {"interval": "1m"}}}, id="polling-interval"),
        pytest.param({"config": {"api": {"requests_per_second": 0.5}}}, id="request-budget"),
        pytest.param({"config": {"discovery": {"builds": {"enabled": True}}}}, id="discovery"),
        pytest.param({"apiKey": {"value": "pk-two"}}, id="the-key"),
        pytest.param(
            {"webConfig": {"basicAuthUsers": {"other": bcrypt_hash()}}},
            id="basic-auth-users-changed",
        ),
    ],
)
def test_an_upgrade_changing_what_the_exporter_rereads_keeps_the_pod(
    change: dict[str, Any],
) -> None:
    base = merged(UPGRADE_BASE, {"webConfig": {"basicAuthUsers": {"one": bcrypt_hash()}}})
    assert pod_template(merged(base, change)) == pod_template(base)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"containerPort": 9999}, id="listen-port"),
        pytest.param({"log": {"level": "debug"}}, id="log-level"),
        pytest.param({"extraArgs": ["--web.enable-lifecycle"]}, id="flags"),
        pytest.param({"webConfig": {"tls": {"secretName": "tls"}}}, id="tls-on"),
        pytest.param({"webConfig": {"basicAuthUsers": {"one": bcrypt_hash()}}}, id="basic-auth-on"),
        pytest.param({"persistence": {"enabled": False}}, id="state-volume"),
    ],
)
def test_an_upgrade_changing_what_needs_a_restart_replaces_the_pod(change: dict[str, Any]) -> None:
    assert pod_template(merged(UPGRADE_BASE, change)) != pod_template(UPGRADE_BASE)


def test_pod_template_carries_no_checksum_of_the_configmaps_or_secrets() -> None:
    for case in CASES:
        annotations = render_case(case).workload()["spec"]["template"]["metadata"]
        assert not [key for key in annotations.get("annotations", {}) if "checksum" in key], case


def test_build_ids_have_a_configmap_of_their_own_read_as_a_build_file() -> None:
    rendered = render_case("all-features")
    config = yaml.safe_load(rendered.config_text())
    assert "builds" not in config
    assert config["build_files"] == [
        "/etc/primeintellect-build-exporter/builds.d/*.txt",
        "/etc/primeintellect-build-exporter/builds/builds.txt",
    ]
    text = rendered.one("ConfigMap", f"{FULLNAME}-builds")["data"]["builds.txt"]
    ids = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert ids == ["cmf3k2x0c0001", "012345"]
    mounts = {mount["name"]: mount for mount in rendered.container()["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in rendered.pod_spec()["volumes"]}
    assert volumes["build-ids"]["configMap"] == {"name": f"{FULLNAME}-builds"}
    assert mounts["build-ids"]["mountPath"] == "/etc/primeintellect-build-exporter/builds"
    # Every mount is a directory: the kubelet never updates a subPath mount.
    assert all("subPath" not in mount for mount in mounts.values())
    assert mounts["config"]["mountPath"] == "/etc/primeintellect-build-exporter/config"
    assert (
        "--config.file=/etc/primeintellect-build-exporter/config/config.yaml"
        in (rendered.container()["args"])
    )


def test_relative_build_files_still_start_where_the_config_file_used_to_be() -> None:
    values = {**MINIMAL_VALUES, "config": {"build_files": ["builds.d/*.txt", "/abs/*.txt"]}}
    config = yaml.safe_load(render_chart(values).config_text())
    assert config["build_files"] == [
        "/etc/primeintellect-build-exporter/builds.d/*.txt",
        "/abs/*.txt",
        "/etc/primeintellect-build-exporter/builds/builds.txt",
    ]


def test_chart_refuses_to_render_without_an_api_key_and_says_which_value_to_set() -> None:
    for values in ({}, {"apiKey": {"value": "", "existingSecret": ""}}):
        with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError) as refused:
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
        assert "no Prime Intellect API key" in str(refused.value)
        assert "apiKey.existingSecret" in str(refused.value)
        assert "apiKey.value" in str(refused.value)


def web_config_of(rendered: Rendered) -> dict[str, Any]:
    secret = rendered.one("Secret", f"{FULLNAME}-web")
    loaded: dict[str, Any] = yaml.safe_load(base64.b64decode(secret["data"]["web-config.yml"]))
    return loaded


def test_without_web_config_the_exporter_serves_plain_http_with_http_probes() -> None:
    rendered = render_case("minimal")
    assert not [arg for arg in rendered.container()["args"] if arg.startswith("--web.config")]
    assert not rendered.all("Secret")[1:]
    container = rendered.container()
    assert "scheme" not in container["livenessProbe"]["httpGet"]


def test_tls_serves_https_from_the_tls_secret_with_https_probes_and_scrapes() -> None:
    rendered = render_case("tls")
    container = rendered.container()
    assert (
        "--web.config.file=/etc/primeintellect-build-exporter/web/web-config.yml"
        in (container["args"])
    )
    assert web_config_of(rendered) == {
        "tls_server_config": {
            "cert_file": "/etc/primeintellect-build-exporter/tls/tls.crt",
            "key_file": "/etc/primeintellect-build-exporter/tls/tls.key",
        }
    }
    assert "probe-password" not in rendered.one("Secret", f"{FULLNAME}-web")["data"]
    volumes = {volume["name"]: volume for volume in rendered.pod_spec()["volumes"]}
    assert volumes["web-tls"]["secret"]["secretName"] == "builds-exporter-tls"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
    [endpoint] = rendered.one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"]["ca"]["secret"] == {"name": "builds-exporter-tls", "key": "ca.crt"}


@pytest.mark.parametrize("case", ["basic-auth", "tls-basic-auth"])
def test_basic_auth_probes_log_in_from_a_mounted_file_with_no_password_in_the_pod_spec(
    case: str,
) -> None:
    rendered = render_case(case)
    secret = rendered.one("Secret", f"{FULLNAME}-web")
    password = base64.b64decode(secret["data"]["probe-password"]).decode()
    assert len(password) == 32
    users = web_config_of(rendered)["basic_auth_users"]
    assert set(users) == {"prometheus", "kubernetes-probe"}
    assert bcrypt.checkpw(password.encode(), users["kubernetes-probe"].encode())
    scheme = "https" if "tls" in case else "http"
    container = rendered.container()
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for probe, path in (("livenessProbe", "/-/healthy"), ("readinessProbe", "/-/ready")):
        assert "httpGet" not in container[probe]
        assert container[probe]["exec"]["command"] == [
            "/opt/venv/bin/python",
            "-m",
            "exporter.probe",
            f"{scheme}://127.0.0.1:9862{path}",
            "--user",
            "kubernetes-probe",
            "--password-file",
            "/etc/primeintellect-build-exporter/web/probe-password",
        ]
        timing = {key: value for key, value in defaults[probe].items() if key != "httpGet"}
        assert {key: container[probe][key] for key in timing} == timing
    for obj in rendered.objects:
        if obj["kind"] != "Secret":
            assert all(password not in text for text in walk_strings(obj)), obj["kind"]
    [endpoint] = rendered.one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == scheme
    assert endpoint["basicAuth"]["password"] == {"name": "prometheus-scrape", "key": "password"}


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        (
            {"webConfig": {"basicAuthUsers": {"kubernetes-probe": bcrypt_hash()}}},
            "kubernetes-probe is the chart's own probe user",
        ),
        (
            {
                "webConfig": {"basicAuthUsers": {"prometheus": bcrypt_hash()}},
                "serviceMonitor": {"enabled": True},
            },
            "set serviceMonitor.basicAuth",
        ),
    ],
)
def test_chart_refuses_basic_auth_it_could_not_serve(
    values: dict[str, Any], complaint: str
) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError, match=complaint):
        chart.render({**MINIMAL_VALUES, **values}, name=RELEASE, namespace=NAMESPACE)


def test_values_schema_takes_the_bcrypt_hashes_the_exporter_takes() -> None:
    pattern = load_schema()["properties"]["webConfig"]["properties"]["basicAuthUsers"][
        "additionalProperties"
    ]["pattern"]
    assert pattern == f"^{_BCRYPT_HASH.pattern}$"


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"serviceMonitr": {"enabled": True}}, "'serviceMonitr' not allowed"),
        ({"config": {"polling": {"intervall": "1m"}}}, "'intervall' not allowed"),
        ({"config": {"api": {"api_key_file": "/key"}}}, "'api_key_file' not allowed"),
        ({"config": {"web": {"listen_address": ":1"}}}, "'web' not allowed"),
        ({"config": {"shard": {"count": 2}}}, "'shard' not allowed"),
        ({"config": {"builds": ["a/b"]}}, "does not match pattern"),
        ({"config": {"polling": {"interval": "5 minutes"}}}, "does not match pattern"),
        ({"shards": 0}, "minimum"),
        ({"log": {"level": "verbose"}}, "/log/level"),
        ({"image": {"tag": 1}}, "/image/tag"),
        ({"prometheusRule": {"exporterJobSelector": "builds"}}, "does not match pattern"),
        ({"prometheusRule": {"runbookBaseUrl": "wiki/runbooks#top"}}, "does not match pattern"),
        ({"prometheusRule": {"slo": {"buildSuccess": {"objective": 99}}}}, "objective"),
        ({"prometheusRule": {"slo": {"buildSuccess": {"minBuilds": 0}}}}, "minBuilds"),
        ({"prometheusRule": {"slo": {"queueTime": {"objective": 1}}}}, "objective"),
        ({"prometheusRule": {"slo": {"queueTime": {"thresholdSeconds": 0}}}}, "thresholdSeconds"),
        ({"prometheusRule": {"slo": {"queueTime": {"minBuilds": 2.5}}}}, "minBuilds"),
        ({"prometheusRule": {"imageHealth": {"consecutiveFailures": 0}}}, "consecutiveFailures"),
        ({"prometheusRule": {"imageHealth": {"failingForSecond": 60}}}, "'failingForSecond' not"),
        # A selector that would smuggle PromQL into the rule.
        ({"prometheusRule": {"exporterJobSelector": 'job="a"}) or vector(1'}}, "does not match"),
    ],
)
def test_values_schema_rejects_typos_and_bad_values(values: dict[str, Any], complaint: str) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError, match=re.escape(complaint)):
            chart.validate_schema(values)
        with pytest.raises(helm.HelmValuesError):
            chart.render(values, name=RELEASE)


def schema_leaves(schema: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted paths of the values the schema describes, down to free-form objects."""
    leaves: set[str] = set()
    for key, node in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        if "properties" in node:
            leaves |= schema_leaves(node, f"{path}.")
        else:
            leaves.add(path)
    return leaves


def values_paths(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> set[str]:
    """The same paths, as values.yaml spells them out."""
    paths: set[str] = set()
    for key, value in values.items():
        node = schema.get("properties", {}).get(key, {})
        if isinstance(value, dict) and "properties" in node:
            paths |= values_paths(value, node, f"{prefix}{key}.")
        else:
            paths.add(f"{prefix}{key}")
    return paths


def load_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return schema


def test_values_yaml_and_the_schema_describe_the_same_values() -> None:
    schema = load_schema()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values_paths(values, schema) == schema_leaves(schema) - {"global"}


def test_schema_config_section_mirrors_the_exporters_config_file() -> None:
    """Every exporter config key is settable, except those the chart sets itself."""
    config_schema = load_schema()["properties"]["config"]["properties"]
    chart_owned = {"web", "shard", "state"}
    assert set(config_schema) == set(ConfigFile.model_fields) - chart_owned
    for section, node in config_schema.items():
        annotation = ConfigFile.model_fields[section].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            expected = set(annotation.model_fields) - {"api_key_file"}
            assert set(node["properties"]) == expected, section


def test_chart_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.MULTILINE))
    assert schema_leaves(load_schema()) - {"global"} == documented


def leaf_values(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Each documented value of values.yaml (the schema's leaves) with its default."""
    leaves: dict[str, Any] = {}
    for key, value in values.items():
        node = schema.get("properties", {}).get(key, {})
        if isinstance(value, dict) and "properties" in node:
            leaves |= leaf_values(value, node, f"{prefix}{key}.")
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def test_chart_readme_gives_each_values_default_as_values_yaml_sets_it() -> None:
    readme = (CHART / "README.md").read_text()
    cells = dict(re.findall(r"^\| `([^`]+)` \| (.*?) \|", readme, flags=re.MULTILINE))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    wrong = []
    for key, value in leaf_values(values, load_schema()).items():
        code = re.fullmatch(r"`([^`]*)`", cells[key])
        if code is None:
            # Prose, for a default too long for the table: only for non-empty structures.
            assert isinstance(value, dict | list), f"{key}: {cells[key]}"
            assert value, f"{key}: {cells[key]}"
            continue
        text = code.group(1)
        documented = (
            ("" if text == '""' else text) if isinstance(value, str) else yaml.safe_load(text)
        )
        if documented != value:
            wrong.append(f"{key}: README {cells[key]}, values.yaml {value!r}")
    assert wrong == []


def test_chart_app_version_is_the_exporters_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == __version__
    assert render_case("minimal").container()["image"].endswith(f":{__version__}")


def test_image_digest_wins_over_the_tag() -> None:
    image = render_case("all-features").container()["image"]
    assert image == (
        "registry.example.com/primeintellect-build-exporter@sha256:"
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )


def test_network_policy_admits_scrapes_and_lets_out_only_dns_and_the_api() -> None:
    policy = render_case("all-features").one("NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    [ingress] = policy["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert ingress["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    egress_ports = [
        (port["port"], port["protocol"]) for rule in policy["egress"] for port in rule["ports"]
    ]
    assert sorted(egress_ports) == [(53, "TCP"), (53, "UDP"), (443, "TCP")]


# The Prometheus Operator's objects: checked against the Operator's own schemas, its CRDs as
# pydantic models (cloudcoil-models-prometheus-operator, pinned in pyproject.toml to the
# Operator v0.80.1 release).
OPERATOR_API_VERSION = "monitoring.coreos.com/v1"
OPERATOR_KINDS = ("ServiceMonitor", "PrometheusRule")
OPERATOR_OBJECTS_ON: dict[str, Any] = {
    "serviceMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
}
# The values that change what the Operator reads, applied over each case with both objects on.
OPERATOR_VARIANTS: dict[str, dict[str, Any]] = {
    "as-given": {},
    "two-shards": {"shards": 2},
    "name-override": {"nameOverride": "build-exporter"},
    "fullname-override": {"fullnameOverride": "team-builds"},
    "every-monitoring-value": {
        "serviceMonitor": {
            "namespace": "prometheus",
            "labels": {"release": "kube-prometheus-stack"},
            "annotations": {"example.com/owner": "platform"},
            "interval": "15s",
            "scrapeTimeout": "5s",
            "honorLabels": True,
            "relabelings": [
                {
                    "sourceLabels": ["__meta_kubernetes_pod_node_name"],
                    "targetLabel": "node",
                    "action": "replace",
                }
            ],
            "metricRelabelings": [
                {"sourceLabels": ["__name__"], "regex": "python_.*", "action": "drop"}
            ],
        },
        "prometheusRule": {
            "namespace": "prometheus",
            "labels": {"role": "alert-rules"},
            "annotations": {"example.com/owner": "platform"},
            "exporterJobSelector": 'job=~"builds-.*", namespace="ci"',
        },
    },
}


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Values as Helm merges a second values file over a first: maps key by key."""
    result = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def operator_schema(kind: str) -> type[BaseModel]:
    """The Prometheus Operator's schema of one kind: the model generated from its CRD."""
    # 58,000 lines, so imported on first use (once), not whenever pytest collects this file.
    from cloudcoil.models.prometheus_operator import v1

    schemas: dict[str, type[BaseModel]] = {
        "ServiceMonitor": v1.ServiceMonitor,
        "PrometheusRule": v1.PrometheusRule,
    }
    return schemas[kind]


def unknown_or_converted(given: object, kept: object, path: str = "") -> Iterator[str]:
    """Where the model's reading of an object differs from the object: a field the schema does
    not know (pydantic drops it silently, or takes a Python field name for the JSON one) or a
    value it converted (such as the string "5" for an integer), both of which the API server's
    strict field validation refuses."""
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            where = f"{path}.{key}" if path else str(key)
            if key in kept:
                yield from unknown_or_converted(value, kept[key], where)
            else:
                yield f"{where}: not in the Operator's schema"
    elif isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        for index, (item, kept_item) in enumerate(zip(given, kept, strict=True)):
            yield from unknown_or_converted(item, kept_item, f"{path}.{index}")
    elif type(given) is not type(kept) or given != kept:
        yield f"{path}: {given!r} read as {kept!r}"


def operator_schema_errors(obj: dict[str, Any]) -> list[str]:
    """What the Operator's schema of the object's kind, applied as strictly as the API server
    applies a CRD's, finds wrong with it, each with its path: none for a valid object."""
    try:
        model = operator_schema(obj["kind"]).model_validate(obj)
    except ValidationError as error:
        return [
            f"{'.'.join(str(part) for part in detail['loc'])}: {detail['msg']}"
            for detail in error.errors()
        ]
    kept = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return list(unknown_or_converted(obj, kept))


@pytest.mark.parametrize("variant", OPERATOR_VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_operator_objects_validate_strictly_against_the_operators_own_schemas(
    case: str, variant: str
) -> None:
    values = merged(merged(values_of(case), OPERATOR_OBJECTS_ON), OPERATOR_VARIANTS[variant])
    rendered = render_chart(values)
    operator_objects = [
        obj for obj in rendered.objects if obj["apiVersion"].startswith("monitoring.coreos.com/")
    ]
    # Every object the Operator reads is of a kind checked here, and both are there.
    assert Counter(obj["kind"] for obj in operator_objects) == Counter(OPERATOR_KINDS)
    for obj in operator_objects:
        assert obj["apiVersion"] == OPERATOR_API_VERSION, obj["kind"]
        errors = operator_schema_errors(obj)
        assert not errors, f"{obj['kind']} {obj['metadata']['name']}: {'; '.join(errors)}"


def edited(
    obj: dict[str, Any], where: tuple[str | int, ...], drop: str | None, add: dict[str, Any]
) -> dict[str, Any]:
    """A copy of the object with one key dropped from the map at `where` and others added."""
    result = copy.deepcopy(obj)
    node: Any = result
    for step in where:
        node = node[step]
    if drop is not None:
        del node[drop]
    node.update(add)
    return result


ENDPOINT = ("spec", "endpoints", 0)
FIRST_RULE = ("spec", "groups", 0, "rules", 0)


@pytest.mark.parametrize(
    ("kind", "where", "drop", "add", "complaint"),
    [
        pytest.param(
            "ServiceMonitor",
            ENDPOINT,
            "scrapeTimeout",
            {"scrapeTimout": "10s"},
            "spec.endpoints.0.scrapeTimout: not in the Operator's schema",
            id="misspelt-endpoint-field",
        ),
        pytest.param(
            "ServiceMonitor",
            ENDPOINT,
            "honorLabels",
            {"honor_labels": True},  # pydantic's populate_by_name alone would take it
            "spec.endpoints.0.honor_labels: not in the Operator's schema",
            id="python-name-for-the-json-one",
        ),
        pytest.param(
            "ServiceMonitor",
            ("metadata",),
            None,
            {"label": {"team": "platform"}},
            "metadata.label: not in the Operator's schema",
            id="misspelt-metadata-field",
        ),
        pytest.param(
            "ServiceMonitor",
            ENDPOINT,
            None,
            {"interval": "1 minute"},
            "spec.endpoints.0.interval: String should match pattern",
            id="endpoint-interval-not-a-duration",
        ),
        pytest.param(
            "ServiceMonitor",
            ENDPOINT,
            None,
            {"scheme": "HTTP"},
            "spec.endpoints.0.scheme: Input should be 'http' or 'https'",
            id="scheme-outside-the-enum",
        ),
        pytest.param(
            "ServiceMonitor",
            ("spec",),
            None,
            {"sampleLimit": "5000"},
            "spec.sampleLimit: '5000' read as 5000",
            id="string-for-an-integer",
        ),
        pytest.param(
            "PrometheusRule",
            FIRST_RULE,
            None,
            {"for": "5 minutes"},
            "spec.groups.0.rules.0.for: String should match pattern",
            id="rule-for-not-a-duration",
        ),
        pytest.param(
            "PrometheusRule",
            FIRST_RULE,
            None,
            {"summary": "an annotation put beside the rule"},
            "spec.groups.0.rules.0.summary: not in the Operator's schema",
            id="unknown-rule-key",
        ),
        pytest.param(
            "PrometheusRule",
            ("spec", "groups", 0),
            "name",
            {},
            "spec.groups.0.name: Field required",
            id="group-without-a-name",
        ),
        pytest.param(
            "PrometheusRule",
            (),
            None,
            {"apiVersion": "monitoring.coreos.com/v1alpha1"},
            "apiVersion: Input should be 'monitoring.coreos.com/v1'",
            id="other-api-version",
        ),
    ],
)
def test_operator_schema_check_refuses_what_the_api_server_would(
    kind: str, where: tuple[str | int, ...], drop: str | None, add: dict[str, Any], complaint: str
) -> None:
    [valid] = render_case("all-features").all(kind)
    assert operator_schema_errors(valid) == []
    errors = operator_schema_errors(edited(valid, where, drop, add))
    assert len(errors) == 1, errors
    assert errors[0].startswith(complaint), errors


def kubernetes_section() -> str:
    """The Kubernetes section of docs/deployment.md."""
    return docs.section(docs.DEPLOYMENT_REFERENCE.read_text(), "Kubernetes (Helm)")


def set_value(values: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        values = values.setdefault(key, {})
    values[leaf] = value


def helm_set_value(text: str) -> Any:
    """``--set``'s typing of a value: booleans, integers and ``{a,b}`` lists, else a string."""
    if text.startswith("{") and text.endswith("}"):
        return [helm_set_value(item) for item in text[1:-1].split(",")]
    if text in {"true", "false"}:
        return text == "true"
    return int(text) if text.isdigit() else text


def helm_commands(section: str) -> list[tuple[str, dict[str, Any]]]:
    """Each `helm install`/`helm upgrade` of a document's Kubernetes section, with the values
    it gives the chart: my-values.yaml, then its --set flags."""
    heredoc = re.search(r"cat > my-values.yaml <<'YAML'\n(.*?)\nYAML\n", section, re.DOTALL)
    assert heredoc, "the section's my-values.yaml was not found"
    commands = []
    for command in re.findall(r"^helm (?:install|upgrade) .*?(?<!\\)$", section, re.M | re.S):
        words = command.replace("\\\n", " ").split()
        assert words[2:8] == [
            RELEASE,
            "./helm/primeintellect-build-exporter",
            "-n",
            NAMESPACE,
            "-f",
            "my-values.yaml",
        ]
        values: dict[str, Any] = yaml.safe_load(heredoc.group(1))
        for flag, assignment in zip(words[8::2], words[9::2], strict=True):
            key, _, text = assignment.strip("'").partition("=")
            assert flag in {"--set", "--set-string"}, flag
            set_value(values, key, text if flag == "--set-string" else helm_set_value(text))
        commands.append((" ".join(words), values))
    return commands


def test_deployment_kubernetes_section_says_what_the_chart_renders() -> None:
    commands = helm_commands(kubernetes_section())
    assert [command.split()[1] for command, _ in commands] == ["install", "upgrade", "upgrade"]
    installed, monitored, sharded = (render_chart(values) for _, values in commands)
    assert installed.kinds()["Deployment"] == 1
    assert not installed.all("ServiceMonitor")

    assert {obj["kind"] for obj in monitored.objects} >= {"ServiceMonitor", "PrometheusRule"}
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert monitored.one(kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitored.one("ConfigMap", f"{FULLNAME}-dashboard")
    section = kubernetes_section()
    job = service_monitor_job(monitored)
    assert f'`job="{job}"`' in section
    rules = rules_by_name(monitored)
    assert all(f'up{{job="{job}"}}' in rules[name]["expr"] for name in EXPORTER_JOB_RULES)

    statefulset = sharded.one("StatefulSet")
    assert statefulset["spec"]["replicas"] == 3
    assert {"--shard.count=3", "--shard.index=$(POD_NAME)"} <= set(sharded.container()["args"])
    assert scraped_services(render_chart({**commands[2][1], **WITH_MONITORING})) == [FULLNAME]

    state_path = yaml.safe_load(installed.config_text())["state"]["path"]
    assert f"`{state_path}`" in section
    volumes = {volume["name"]: volume for volume in installed.pod_spec()["volumes"]}
    assert "persistentVolumeClaim" in volumes["state"]
    assert installed.kinds()["PersistentVolumeClaim"] == 1
    assert "--set persistence.enabled=false" in section
    ephemeral = render_chart({**commands[0][1], "persistence": {"enabled": False}})
    volumes = {volume["name"]: volume for volume in ephemeral.pod_spec()["volumes"]}
    assert "emptyDir" in volumes["state"]


def test_readme_kubernetes_section_is_the_deployment_pages_install() -> None:
    """The README's short Kubernetes section runs the first command of docs/deployment.md,
    with the same values, so what that page's test renders is what the README installs."""
    readme = docs.section(docs.README.read_text(), "Kubernetes")
    assert helm_commands(readme)[:1] == helm_commands(kubernetes_section())[:1]


def test_readme_upgrade_adds_a_build_without_replacing_the_pod() -> None:
    readme = docs.section(docs.README.read_text(), "Kubernetes")
    (_, installed), (upgrade, upgraded) = helm_commands(readme)
    assert upgrade.split()[1] == "upgrade"
    before, after = render_chart(installed), render_chart(upgraded)
    added = set(upgraded["config"]["builds"]) - set(installed["config"]["builds"])
    assert len(added) == 1
    assert set(installed["config"]["builds"]) < set(upgraded["config"]["builds"])
    assert yaml.safe_dump(before.workload()["spec"]["template"]) == yaml.safe_dump(
        after.workload()["spec"]["template"]
    )
    changed = [obj["metadata"]["name"] for obj in after.objects if obj not in before.objects]
    assert changed == [f"{FULLNAME}-builds"]
    assert added <= set(after.one("ConfigMap", f"{FULLNAME}-builds")["data"]["builds.txt"].split())


def test_notes_say_which_builds_are_watched_and_ask_for_some_only_when_there_are_none() -> None:
    nothing = {"apiKey": {"existingSecret": "key"}, "config": {"builds": []}}
    assert "none yet" in render_chart(nothing).notes
    listed = render_chart({**nothing, "config": {"builds": ["a", "b"]}}).notes
    assert f"2 build ID(s) from config.builds (ConfigMap {FULLNAME}-builds)" in listed
    assert "none yet" not in listed
    for discovery, said in (("builds", "every build of the API key"), ("images", "the images")):
        values = {**nothing, "config": {"builds": [], "discovery": {discovery: {"enabled": True}}}}
        notes = render_chart(values).notes
        assert "none yet" not in notes, discovery
        assert said in notes, discovery
