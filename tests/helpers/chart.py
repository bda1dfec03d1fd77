"""The Helm chart rendered offline by Helm's own engine (helm-python-sdk), and the Prometheus
Operator's way of choosing the Services a ServiceMonitor scrapes: shared by the chart tests.

helm-python-sdk binds the official Helm Go library (bundled in its wheel as libhelm_c), so
rendering needs neither a ``helm`` binary nor a cluster nor the network.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Any

import helm_python as helm
import yaml

from tests.helpers.support import REPOSITORY

CHART = REPOSITORY / "helm" / "primeintellect-build-exporter"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
# "minimal": the chart's defaults with the one value they lack (without a key it refuses).
CASES = ["minimal", *(path.name.removesuffix("-values.yaml") for path in CI_VALUES)]
MINIMAL_VALUES = {"apiKey": {"value": "pk-minimal-00000000000000000000000"}}
RELEASE = "builds"
NAMESPACE = "monitoring"
FULLNAME = "builds-primeintellect-build-exporter"


@dataclass(frozen=True)
class Rendered:
    """Every object a release would create, and the NOTES text."""

    objects: list[dict[str, Any]]
    notes: str

    def kinds(self) -> Counter[str]:
        return Counter(obj["kind"] for obj in self.objects)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str, name: str = FULLNAME) -> dict[str, Any]:
        matches = [obj for obj in self.all(kind) if obj["metadata"]["name"] == name]
        assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
        return matches[0]

    def workload(self) -> dict[str, Any]:
        """The Deployment or StatefulSet: exactly one of them."""
        workloads = self.all("Deployment") + self.all("StatefulSet")
        assert len(workloads) == 1, [obj["kind"] for obj in workloads]
        return workloads[0]

    def pod_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.workload()["spec"]["template"]["spec"]
        return spec

    def container(self) -> dict[str, Any]:
        containers: list[dict[str, Any]] = self.pod_spec()["containers"]
        assert len(containers) == 1
        return containers[0]

    def config_text(self) -> str:
        configmap = self.one("ConfigMap", self.workload()["metadata"]["name"])
        text: str = configmap["data"]["config.yaml"]
        return text


def values_of(case: str) -> dict[str, Any]:
    if case == "minimal":
        return dict(MINIMAL_VALUES)
    loaded: dict[str, Any] = yaml.safe_load((CHART / "ci" / f"{case}-values.yaml").read_text())
    return loaded


def render_chart(
    values: dict[str, Any], release: str = RELEASE, namespace: str = NAMESPACE
) -> Rendered:
    """The chart rendered by Helm's own engine, as `helm install` would with these values."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=release, namespace=namespace)
    objects: list[dict[str, Any]] = []
    notes = ""
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc is not None)
    return Rendered(objects, notes)


@functools.cache
def render_case(case: str) -> Rendered:
    return render_chart(values_of(case))


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics, as the Operator applies a ServiceMonitor's."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        present = key in labels
        matched = {
            "In": present and labels.get(key) in (values or []),
            "NotIn": not present or labels.get(key) not in (values or []),
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not matched:
            return False
    return True


def scraped_services(rendered: Rendered) -> list[str]:
    """The Services whose endpoints the Operator turns into targets: every one in the
    monitor's namespaces whose labels match its selector and that has the endpoint's port."""
    monitor = rendered.one("ServiceMonitor")
    port_names = {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]}
    namespaces = monitor["spec"]["namespaceSelector"]["matchNames"]
    return sorted(
        service["metadata"]["name"]
        for service in rendered.all("Service")
        if service["metadata"].get("namespace", NAMESPACE) in namespaces
        and selects(monitor["spec"]["selector"], service["metadata"]["labels"])
        and port_names & {port.get("name") for port in service["spec"]["ports"]}
    )
