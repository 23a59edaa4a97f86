"""The chart's autoscaler: Deployment, least-privilege RBAC with a Lease, and the recording rules
identical to deploy/prometheus/ (rendered with helm, validated with kubernetes-validate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from test_chart import CHART, HELM, K8S_VERSIONS, NAMESPACE, _render, _run

REPO = Path(__file__).resolve().parents[2]
ON = [
    "--set",
    "autoscaler.enabled=true,autoscaler.prometheusUrl=http://prom.monitoring:9090,"
    "monitoring.prometheusRule.enabled=true,monitoring.enginePodMonitor.enabled=true,"
    "operator.watchNamespaces={team-a,team-b}",
]


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    if not HELM.exists():
        pytest.fail(f"helm not found at {HELM}: run deploy/local-cluster/build (fetches helm)")
    return _render(HELM, ON)


def _named(docs: list[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]


def test_autoscaler_is_off_by_default_and_needs_a_prometheus_url() -> None:
    assert not [d for d in _render(HELM, []) if "autoscaler" in d["metadata"]["name"]]
    proc = _run(HELM, "template", "x", str(CHART), "--set", "autoscaler.enabled=true")
    assert proc.returncode != 0 and "autoscaler.prometheusUrl is required" in proc.stderr
    for bad in ("autoscaler.intervalS=0", "autoscaler.prometheusUrl=prom:9090"):
        proc = _run(HELM, "template", "x", str(CHART), *ON, "--set", bad)
        assert "values don't meet the specifications of the schema" in proc.stderr, bad


def test_deployment_runs_shoal_autoscaler(docs: list[dict[str, Any]]) -> None:
    (dep,) = _named(docs, "Deployment", "shoal-autoscaler")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["shoal"]
    args = c["args"]
    assert args[1] == "autoscaler"
    assert "--prometheus-url=http://prom.monitoring:9090" in args
    assert {"--namespace=team-a", "--namespace=team-b"} <= set(args)
    assert f"--lease-namespace={NAMESPACE}" in args
    assert "--lease-name=shoal-autoscaler" in args
    assert pod["serviceAccountName"] == "shoal-autoscaler"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["shoal.dev/component"] == "autoscaler"  # the local cluster's pod runner runs it
    for version in K8S_VERSIONS:
        for doc in docs:
            if "autoscaler" in doc["metadata"]["name"] and doc["kind"] != "PrometheusRule":
                kubernetes_validate.validate(doc, version, strict=True)


def test_rbac_is_models_events_and_one_lease(docs: list[dict[str, Any]]) -> None:
    roles = _named(docs, "Role", "shoal-autoscaler")
    assert {r["metadata"]["namespace"] for r in roles} == {"team-a", "team-b"}
    for role in roles:
        rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r["verbs"] for r in role["rules"]}
        assert rules[(("shoal.dev",), ("models",))] == ["get", "list", "watch", "patch"]
        assert rules[(("",), ("events",))] == ["create", "patch"]
        assert len(rules) == 2  # nothing else: no Deployments, pods or secrets
    (lease,) = _named(docs, "Role", "shoal-autoscaler-lease")
    assert lease["metadata"]["namespace"] == NAMESPACE
    named = [r for r in lease["rules"] if r.get("resourceNames")]
    assert named == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["shoal-autoscaler"],
            "verbs": ["get", "update"],
        }
    ]
    assert not _named(docs, "ClusterRole", "shoal-autoscaler")


def test_recording_rules_ship_identical_to_deploy(docs: list[dict[str, Any]]) -> None:
    shipped = yaml.safe_load((REPO / "deploy" / "prometheus" / "autoscaler-rules.yaml").read_text())
    copy = yaml.safe_load((CHART / "files" / "autoscaler-rules.yaml").read_text())
    assert copy == shipped, "charts/shoal/files/autoscaler-rules.yaml drifted from deploy/"
    (rule,) = _named(docs, "PrometheusRule", "shoal-autoscaler")
    assert rule["spec"]["groups"] == shipped["groups"]
    (pm,) = [d for d in docs if d["kind"] == "PodMonitor"]
    relabel = pm["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert {r["targetLabel"] for r in relabel} >= {"model", "pool"}
