"""What the Prometheus Operator makes of a rendered chart: the pods its workload runs, the
scrape targets its ServiceMonitor generates, and the rules file its PrometheusRule becomes.

The target generation follows the Operator's own for a ServiceMonitor endpoint with a named
port: every Service in the monitor's namespaces whose labels match its selector and that has
a port of that name, every ready pod behind that Service (its selector), and the labels the
Operator's relabeling gives each target: ``job`` from the Service's label named by
``jobLabel`` (else the Service's name), ``namespace``, ``service``, ``pod``, ``container``,
``endpoint`` (the port name) and ``instance`` (the pod's address).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tests.helpers.chart import NAMESPACE, Rendered, selects

# The Operator's relabeling fields, camelCase in the CRD, and Prometheus's names for them.
RELABEL_FIELDS = {
    "sourceLabels": "source_labels",
    "separator": "separator",
    "targetLabel": "target_label",
    "regex": "regex",
    "modulus": "modulus",
    "replacement": "replacement",
    "action": "action",
}


@dataclass(frozen=True)
class Pod:
    """A pod of the chart's workload: its name, labels and its one container's spec."""

    name: str
    labels: dict[str, str]
    container: dict[str, Any]

    def environment(self) -> dict[str, str]:
        """The container's environment as the kubelet sets it (literal values and the pod's
        name through the downward API; nothing else is used by the chart)."""
        values: dict[str, str] = {}
        for variable in self.container.get("env", []):
            if "value" in variable:
                values[variable["name"]] = expand(variable["value"], values)
            elif variable["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
                values[variable["name"]] = self.name
            else:
                raise AssertionError(f"unsupported env source: {variable}")
        return values

    def arguments(self) -> list[str]:
        """The container's args with $(VAR) references expanded, as the kubelet does."""
        environment = self.environment()
        return [expand(argument, environment) for argument in self.container.get("args", [])]


def expand(text: str, environment: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known names replaced, $$ an escaped $, others kept."""

    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return environment.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", value, text)


def pods(rendered: Rendered) -> list[Pod]:
    """The pods the workload runs: a Deployment's replicas, or a StatefulSet's ordinals."""
    workload = rendered.workload()
    name = workload["metadata"]["name"]
    replicas = int(workload["spec"].get("replicas", 1))
    template = workload["spec"]["template"]
    [container] = template["spec"]["containers"]
    if workload["kind"] == "StatefulSet":
        names = [f"{name}-{ordinal}" for ordinal in range(replicas)]
    else:
        names = [f"{name}-6f9c8d7b5-{suffix}" for suffix in ("x2kqj", "p8wzn", "m4rtc")[:replicas]]
    return [Pod(pod_name, dict(template["metadata"]["labels"]), container) for pod_name in names]


@dataclass(frozen=True)
class Target:
    """One scrape target: the pod behind it and the labels Prometheus stores with its series."""

    pod: Pod
    port_name: str
    labels: dict[str, str]


@dataclass(frozen=True)
class ScrapeJob:
    """One ServiceMonitor endpoint as the Operator writes it into prometheus.yml."""

    name: str
    endpoint: dict[str, Any]
    targets: list[Target]

    def scrape_config(self, addresses: dict[str, str], interval: str) -> dict[str, Any]:
        """The scrape config, each pod at its address in ``addresses``; ``interval`` replaces
        the monitor's own so a test scrapes every second."""
        config: dict[str, Any] = {
            "job_name": self.name,
            "honor_labels": bool(self.endpoint.get("honorLabels", False)),
            "metrics_path": self.endpoint.get("path", "/metrics"),
            "scheme": self.endpoint.get("scheme", "http"),
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "static_configs": [
                {
                    "targets": [addresses[target.pod.name]],
                    "labels": {**target.labels, "instance": addresses[target.pod.name]},
                }
                for target in self.targets
            ],
        }
        if relabelings := self.endpoint.get("relabelings"):
            config["relabel_configs"] = [prometheus_relabeling(rule) for rule in relabelings]
        if metric_relabelings := self.endpoint.get("metricRelabelings"):
            config["metric_relabel_configs"] = [
                prometheus_relabeling(rule) for rule in metric_relabelings
            ]
        return config


def prometheus_relabeling(rule: dict[str, Any]) -> dict[str, Any]:
    """A RelabelConfig of the CRD as Prometheus's relabel_config (the Operator lowercases the
    action)."""
    unknown = set(rule) - set(RELABEL_FIELDS)
    assert not unknown, f"relabeling fields this emulation does not know: {unknown}"
    converted = {RELABEL_FIELDS[key]: value for key, value in rule.items()}
    if "action" in converted:
        converted["action"] = str(converted["action"]).lower()
    return converted


def scrape_jobs(rendered: Rendered, monitor: dict[str, Any]) -> list[ScrapeJob]:
    """The scrape jobs the Operator generates for ``monitor``, one per endpoint."""
    spec = monitor["spec"]
    monitor_namespace = monitor["metadata"].get("namespace", NAMESPACE)
    namespaces = spec.get("namespaceSelector", {}).get("matchNames", [monitor_namespace])
    services = [
        service
        for service in rendered.all("Service")
        if service["metadata"].get("namespace", NAMESPACE) in namespaces
        and selects(spec["selector"], service["metadata"]["labels"])
    ]
    running = pods(rendered)
    jobs = []
    for index, endpoint in enumerate(spec["endpoints"]):
        assert "port" in endpoint, "this emulation follows named endpoint ports only"
        targets = []
        for service in services:
            ports = [
                port for port in service["spec"]["ports"] if port.get("name") == endpoint["port"]
            ]
            if not ports:
                continue
            service_labels = service["metadata"]["labels"]
            job = service_labels.get(spec.get("jobLabel", ""), "") or service["metadata"]["name"]
            for pod in running:
                if not service["spec"]["selector"].items() <= pod.labels.items():
                    continue
                targets.append(
                    Target(
                        pod,
                        endpoint["port"],
                        {
                            "job": job,
                            "namespace": service["metadata"].get("namespace", NAMESPACE),
                            "service": service["metadata"]["name"],
                            "pod": pod.name,
                            "container": pod.container["name"],
                            "endpoint": endpoint["port"],
                        },
                    )
                )
        name = f"serviceMonitor/{monitor_namespace}/{monitor['metadata']['name']}/{index}"
        jobs.append(ScrapeJob(name, endpoint, targets))
    return jobs


def rules_file(rendered: Rendered) -> dict[str, Any]:
    """The rules file the Operator writes for the chart's PrometheusRule: its spec as is."""
    [rule] = rendered.all("PrometheusRule")
    spec: dict[str, Any] = rule["spec"]
    return spec
