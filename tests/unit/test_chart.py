"""The Helm chart: ``helm lint --strict``, rendering under several value sets, every rendered
manifest against the Kubernetes OpenAPI schemas (``kubernetes-validate``), and the properties the
chart promises (least-privilege RBAC, hardened pods, a router config the router accepts).

Helm comes from the local cluster's cache (``deploy/local-cluster/build`` puts it there; the test
command runs that first). Without it these tests fail rather than skip: the chart is part of what
the tests must check.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from shoal.router.config import RouterConfig
from shoal.router.strategies import SCORER_NAMES, STRATEGIES

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "shoal"
HELM = (
    Path(os.environ.get("SHOAL_CACHE", Path.home() / ".cache" / "shoal"))
    / "k8s-v1.36.3"
    / "bin"
    / "helm"
)
K8S_VERSIONS = ("1.31", "1.36")
NAMESPACE = "shoal-system"
# Kinds whose schema kubernetes-validate does not ship: they belong to CRDs (Prometheus Operator,
# kopf). Their structure is checked by dedicated assertions below instead.
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "KopfPeering", "ClusterKopfPeering"}

VALUE_SETS: dict[str, list[str]] = {
    "default": [],
    "redis-monitoring": [
        "--set",
        "redis.enabled=true,monitoring.serviceMonitor.enabled=true,"
        "monitoring.enginePodMonitor.enabled=true,monitoring.prometheusRule.enabled=true",
    ],
    "all-namespaces": ["--set", "operator.watchAllNamespaces=true,router.replicas=2"],
    "watch-namespaces": [
        "--set",
        "operator.watchNamespaces={team-a,team-b},router.discovery.namespace=team-a",
        "--set-json",
        'router.weights={"queue-depth": 2}',
    ],
    "router-only": [
        "--set",
        "operator.enabled=false,router.redisUrl=redis://r:6379/0,"
        "router.apiKeys.existingSecret=router-keys,router.scrapeIntervalMaxMs=1000,"
        "router.tokenizer=hf,router.scrapeIdleWaitShare=0",
        "--set-json",
        'router.tokenizerDirs={"meta-llama/Llama-3.1-8B-Instruct": "/tokenizers/llama"}',
        "--set-json",
        'router.extraVolumes=[{"name": "tokenizers", "configMap": {"name": "tok"}}]',
        "--set-json",
        'router.extraVolumeMounts=[{"name": "tokenizers", "mountPath": "/tokenizers"}]',
    ],
}


@pytest.fixture(scope="module")
def helm() -> Path:
    if not os.access(HELM, os.X_OK):
        pytest.fail(f"helm not found at {HELM}: run deploy/local-cluster/build (fetches helm)")
    return HELM


def _run(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=120, check=False
    )


def _render(helm: Path, extra: list[str]) -> list[dict[str, Any]]:
    proc = _run(helm, "template", "shoal", str(CHART), "-n", NAMESPACE, "--include-crds", *extra)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest, helm: Path) -> tuple[str, list[dict[str, Any]]]:
    return request.param, _render(helm, VALUE_SETS[request.param])


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_strict(helm: Path, name: str) -> None:
    proc = _run(helm, "lint", "--strict", str(CHART), *VALUE_SETS[name])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_values_schema_rejects_typos_and_bad_strategies(helm: Path) -> None:
    for bad in ("router.strategy=fastest", "router.replicsa=2", "operator.metricsPort=0"):
        proc = _run(helm, "template", "x", str(CHART), "--set", bad)
        assert proc.returncode != 0, bad
        assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr


def test_values_schema_matches_the_router() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    router = schema["properties"]["router"]["properties"]
    assert router["strategy"]["enum"] == list(STRATEGIES)
    assert router["weights"]["propertyNames"]["enum"] == list(SCORER_NAMES)


def test_manifests_pass_kubernetes_validate(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    checked = 0
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {exc}")
        checked += 1
    assert checked >= 3


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    found = [d for d in _by_kind(docs, kind) if d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, [d["metadata"]["name"] for d in _by_kind(docs, kind)]
    return found[0]


def test_pods_are_hardened(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for dep in _by_kind(docs, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert {"app.kubernetes.io/name", "app.kubernetes.io/instance"} <= labels.keys()
        assert "app.kubernetes.io/component" in labels
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert "limits" in c["resources"] and "requests" in c["resources"], c["name"]
            assert "livenessProbe" in c and "readinessProbe" in c, c["name"]


def test_shoal_pods_run_the_shoal_cli(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    for dep in _by_kind(docs, "Deployment"):
        component = dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        if component == "redis":
            continue
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert c["image"] == "ghcr.io/shoal-dev/shoal:0.1.0"
        assert c["command"] == ["shoal"]
        # The local cluster's pod runner finds Shoal's own pods by this label.
        assert dep["spec"]["template"]["metadata"]["labels"]["shoal.dev/component"] == component
    if name != "router-only":
        op = _one(docs, "Deployment", "-operator")
        assert op["spec"]["replicas"] == 2
        args = op["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[:2] == ["--log-level=INFO", "operator"]
        peering = next(a.split("=", 1)[1] for a in args if a.startswith("--peering="))
        peers = _by_kind(docs, "KopfPeering") + _by_kind(docs, "ClusterKopfPeering")
        assert peers and all(p["metadata"]["name"] == peering for p in peers)
        if name == "all-namespaces":
            assert "--all-namespaces" in args and _by_kind(docs, "ClusterKopfPeering")
        else:
            watched = sorted(a.split("=", 1)[1] for a in args if a.startswith("--namespace="))
            assert watched == sorted(p["metadata"]["namespace"] for p in peers)


def _rules(docs: list[dict[str, Any]], kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(d["metadata"]["name"], r) for d in _by_kind(docs, kind) for r in d["rules"]]


def test_rbac_is_least_privilege(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    for _, rule in _rules(docs, "Role") + _rules(docs, "ClusterRole"):
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        assert "*" not in rule["apiGroups"], rule
        assert not {"secrets", "configmaps", "nodes"} & set(rule["resources"]), rule
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
    for binding in _by_kind(docs, "ClusterRoleBinding") + _by_kind(docs, "RoleBinding"):
        assert binding["roleRef"]["name"] not in ("cluster-admin", "admin", "edit")
    # Cluster-wide access only when asked for.
    assert bool(_by_kind(docs, "ClusterRole")) == (name == "all-namespaces")
    if name == "watch-namespaces":
        op_roles = [d for d in _by_kind(docs, "Role") if d["metadata"]["name"].endswith("operator")]
        assert sorted(d["metadata"]["namespace"] for d in op_roles) == ["team-a", "team-b"]
    router = _one(docs, "Role", "-router")
    assert {
        (g, res) for r in router["rules"] for g in r["apiGroups"] for res in r["resources"]
    } == {
        ("discovery.k8s.io", "endpointslices"),
        ("", "pods"),
        ("shoal.dev", "models"),
        ("shoal.dev", "loraadapters"),
    }
    assert all(set(r["verbs"]) == {"get", "list", "watch"} for r in router["rules"])


def test_router_config_is_accepted_by_the_router(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = rendered
    cm = _one(docs, "ConfigMap", "-router")
    config = RouterConfig.from_mapping(yaml.safe_load(cm["data"]["router.yaml"]))
    assert config.kubernetes is not None
    assert config.kubernetes.label_selector == "shoal.dev/component=engine"
    expected_ns = "team-a" if name == "watch-namespaces" else NAMESPACE
    assert config.kubernetes.namespace == expected_ns
    assert _one(docs, "Role", "-router")["metadata"]["namespace"] == expected_ns
    if name == "redis-monitoring":
        assert config.redis_url == f"redis://shoal-redis.{NAMESPACE}.svc:6379/0"
        redis_svc = _one(docs, "Service", "-redis")
        assert redis_svc["spec"]["ports"][0]["port"] == 6379
    elif name == "router-only":
        assert config.redis_url == "redis://r:6379/0"
    else:
        assert config.redis_url is None
    dep = _one(docs, "Deployment", "-router")
    pod = dep["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    if name == "router-only":
        # Keys from the Secret, mounted as a directory so that rotations reach the router.
        assert config.api_keys_file == "/etc/shoal-api-keys/keys.yaml"
        assert mounts["api-keys"]["mountPath"] == "/etc/shoal-api-keys"
        assert "subPath" not in mounts["api-keys"]
        secret = next(v for v in pod["volumes"] if v["name"] == "api-keys")["secret"]
        assert secret["secretName"] == "router-keys"
        assert config.scrape_interval_max_s == 1.0
        assert config.scrape_idle_wait_share == 0.0  # 0 must not fall back to the default
    else:
        assert config.scrape_idle_wait_share == 0.25
    if name == "router-only":
        # Real vLLM engines: the HF tokenizer, its files mounted through extraVolumes.
        assert config.tokenizer == "hf"
        assert config.tokenizer_dirs == {"meta-llama/Llama-3.1-8B-Instruct": "/tokenizers/llama"}
        assert mounts["tokenizers"]["mountPath"] == "/tokenizers"
        assert any(v["name"] == "tokenizers" for v in pod["volumes"])
    else:
        assert config.api_keys_file is None and "api-keys" not in mounts
        assert config.scrape_interval_max_s == 4 * config.scrape_interval_s
    if name == "watch-namespaces":
        assert config.weights == {"queue-depth": 2}
    c = pod["containers"][0]
    assert c["args"][:2] == ["router", "--config=/etc/shoal/router.yaml"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"


def test_monitoring_objects(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    kinds = {d["kind"] for d in docs}
    if name != "redis-monitoring":
        assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
        return
    monitors = _by_kind(docs, "ServiceMonitor")
    services = {d["metadata"]["name"]: d for d in _by_kind(docs, "Service")}
    assert len(monitors) == 2
    for mon in monitors:
        # Each ServiceMonitor selects a Service that has the port it scrapes.
        port = mon["spec"]["endpoints"][0]["port"]
        sel = mon["spec"]["selector"]["matchLabels"]
        matching = [
            s
            for s in services.values()
            if sel.items() <= s["metadata"]["labels"].items()
            and port in {p["name"] for p in s["spec"]["ports"]}
        ]
        assert len(matching) == 1, mon["metadata"]["name"]
    rule = _one(docs, "PrometheusRule", "shoal")  # the alerts (not the autoscaler's records)
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"ShoalRouterDown", "ShoalOperatorDown", "ShoalEngineQueueBacklog"} <= alerts


def test_crds_ship_with_the_chart(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    crds = {d["metadata"]["name"] for d in _by_kind(docs, "CustomResourceDefinition")}
    assert crds == {
        "models.shoal.dev",
        "loraadapters.shoal.dev",
        "kopfpeerings.kopf.dev",
        "clusterkopfpeerings.kopf.dev",
    }
