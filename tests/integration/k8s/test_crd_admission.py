"""The generated ``Model`` CRD on a real API server: CEL admission messages, printer columns,
``kubectl explain`` docs, defaulting, and the scale subresource.

The CRD file is the checked-in one from the Helm chart, so this exercises exactly what users get.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_local_cluster import REPO, Cluster

CRD = REPO / "charts" / "shoal" / "crds" / "models.shoal.dev.yaml"
EXAMPLES = REPO / "deploy" / "examples"


@pytest.fixture(scope="module")
def model_crd(k8s_cluster: Cluster) -> Cluster:
    k8s_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    k8s_cluster.kubectl(
        "wait", "--for=condition=Established", "crd/models.shoal.dev", "--timeout=60s"
    )
    return k8s_cluster


def _model(name: str = "m", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": "llama"},
        "pools": [{"name": "h100", "gpuType": "H100", "replicas": 1, "maxReplicas": 4}],
    }
    body.update(copy.deepcopy(spec))
    return {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "Model",
        "metadata": {"name": name},
        "spec": body,
    }


def _apply(cluster: Cluster, doc: dict[str, Any] | str, ns: str) -> tuple[int, str]:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    proc = cluster.run("kubectl", "apply", "-n", ns, "-f", "-", input=text, check=False)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (
            {"pools": [{"name": "a", "gpuType": "H100", "minReplicas": 3, "maxReplicas": 1}]},
            "spec.pools[0].minReplicas",
            "minReplicas is greater than maxReplicas: lower minReplicas or raise maxReplicas",
        ),
        (
            {"pools": [{"name": "a", "gpuType": "H100"}, {"name": "a", "gpuType": "L4"}]},
            "spec.pools",
            "pool name a appears more than once: give every entry of pools its own name",
        ),
        (
            {"pools": [{"name": "a", "gpuType": "TPUv9"}]},
            "spec.pools[0].gpuType",
            "unknown gpuType TPUv9: use one of the catalog GPU types A100-40GB",
        ),
        (
            {"pools": [{"name": "a", "gpuType": "H100", "replicas": 9, "maxReplicas": 4}]},
            "spec.pools[0].replicas",
            "replicas must lie within minReplicas..maxReplicas: change replicas or the bounds",
        ),
        (
            {"replicas": 20, "pools": [{"name": "a", "gpuType": "H100", "maxReplicas": 4}]},
            "spec.replicas",
            "replicas exceeds the pools' total maxReplicas: lower replicas or raise maxReplicas",
        ),
        (
            {"pools": [{"name": "a", "gpuType": "H100", "gpusPerReplica": 0}]},
            "spec.pools[0].gpusPerReplica",
            "should be greater than or equal to 1",
        ),
        ({"engine": {"kind": "tgi"}}, "spec.engine.kind", 'supported values: "vllm", "sglang"'),
    ],
    ids=[
        "min-gt-max",
        "duplicate-pools",
        "unknown-gpu",
        "replicas-out-of-range",
        "total-over-max",
        "zero-gpus",
        "unknown-engine",
    ],
)
def test_invalid_model_is_rejected_with_a_message_naming_the_field(
    model_crd: Cluster, k8s_namespace: str, spec: dict[str, Any], field: str, message: str
) -> None:
    rc, out = _apply(model_crd, _model("bad", **spec), k8s_namespace)
    assert rc != 0, out
    assert field in out and message in out, out


def _example_models() -> list[Path]:
    return sorted(p for p in EXAMPLES.glob("*.yaml") if "kind: Model" in p.read_text())


@pytest.mark.parametrize("path", _example_models(), ids=lambda p: p.name)
def test_examples_are_accepted(model_crd: Cluster, k8s_namespace: str, path: Path) -> None:
    rc, out = _apply(model_crd, path.read_text(), k8s_namespace)
    assert rc == 0, out
    # kubectl's strict field validation would have failed on an unknown field; check nothing was
    # pruned either: what was applied is what is stored (plus defaults).
    sent = yaml.safe_load(path.read_text())
    stored = model_crd.get_json("model", sent["metadata"]["name"], "-n", k8s_namespace)
    assert _subset(sent["spec"], stored["spec"]), (sent["spec"], stored["spec"])


def _subset(want: Any, have: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(have, dict) and all(
            k in have and _subset(v, have[k]) for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(want) == len(have)
            and all(_subset(a, b) for a, b in zip(want, have, strict=True))
        )
    return bool(want == have)


def test_defaults_printer_columns_and_short_name(model_crd: Cluster, k8s_namespace: str) -> None:
    doc = _model(
        "two",
        pools=[
            {"name": "h100", "gpuType": "H100", "replicas": 2},
            {"name": "a10g", "gpuType": "A10G"},
        ],
    )
    rc, out = _apply(model_crd, doc, k8s_namespace)
    assert rc == 0, out
    stored = model_crd.get_json("mdl", "two", "-n", k8s_namespace)
    # Nested defaults filled in by the API server from the pydantic defaults.
    assert stored["spec"]["routing"]["strategy"] == "kv-aware"
    assert stored["spec"]["engine"]["kind"] == "vllm"
    assert stored["spec"]["pools"][1]["replicas"] == 1
    assert stored["spec"]["pools"][1]["minReplicas"] == 0
    table = model_crd.kubectl("get", "models", "-n", k8s_namespace)
    header, row = table.splitlines()[0].split(), table.splitlines()[1]
    assert header == ["NAME", "READY", "REPLICAS", "GPUS", "STRATEGY", "AGE"], table
    assert row.split()[0] == "two" and "kv-aware" in row, table
    wide = model_crd.kubectl("get", "shoal", "-n", k8s_namespace, "-o", "wide")
    assert "meta-llama/Llama-3.1-8B-Instruct" in wide and "DESIRED" in wide, wide


def test_explain_shows_field_docs(model_crd: Cluster) -> None:
    # The API server publishes a new CRD's OpenAPI document a moment after it is established.
    deadline = time.monotonic() + 30
    while True:
        proc = model_crd.run("kubectl", "explain", "model.spec.pools", check=False)
        if proc.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "GPU pools: one Deployment of the engine per pool" in out, out
    assert "gpuType" in out and "GPU type of the pool's nodes" in out, out
    leaf = model_crd.kubectl("explain", "model.spec.replicas")
    assert "Total replicas over all pools" in leaf, leaf


def test_scale_subresource_sets_spec_replicas(model_crd: Cluster, k8s_namespace: str) -> None:
    doc = _model("scaled", pools=[{"name": "h100", "gpuType": "H100", "maxReplicas": 4}])
    rc, out = _apply(model_crd, doc, k8s_namespace)
    assert rc == 0, out
    model_crd.kubectl("scale", "-n", k8s_namespace, "model/scaled", "--replicas=3")
    stored = model_crd.get_json("model", "scaled", "-n", k8s_namespace)
    assert stored["spec"]["replicas"] == 3
    scale = json.loads(
        model_crd.kubectl(
            "get",
            "--raw",
            f"/apis/shoal.dev/v1alpha1/namespaces/{k8s_namespace}/models/scaled/scale",
        )
    )
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3
    # The CEL bounds hold for writes through the scale subresource too.
    proc = model_crd.run(
        "kubectl", "scale", "-n", k8s_namespace, "model/scaled", "--replicas=9", check=False
    )
    assert proc.returncode != 0
    assert (
        "spec.replicas" in proc.stderr and "exceeds the pools' total maxReplicas" in proc.stderr
    ), proc.stderr


def test_status_subresource_carries_the_selector(model_crd: Cluster, k8s_namespace: str) -> None:
    rc, out = _apply(model_crd, _model("st", replicas=1), k8s_namespace)
    assert rc == 0, out
    status = {
        "status": {
            "observedGeneration": 1,
            "replicas": 1,
            "readyReplicas": 1,
            "desiredReplicas": 1,
            "selector": "shoal.dev/model=st,shoal.dev/component=engine",
            "gpus": "1xH100",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "AllReplicasReady",
                    "lastTransitionTime": "2025-01-01T00:00:00Z",
                }
            ],
        }
    }
    model_crd.kubectl(
        "patch",
        "-n",
        k8s_namespace,
        "model/st",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    scale = json.loads(
        model_crd.kubectl(
            "get", "--raw", f"/apis/shoal.dev/v1alpha1/namespaces/{k8s_namespace}/models/st/scale"
        )
    )
    assert scale["status"] == {
        "replicas": 1,
        "selector": "shoal.dev/model=st,shoal.dev/component=engine",
    }
    table = model_crd.kubectl("get", "model", "st", "-n", k8s_namespace)
    assert table.splitlines()[1].split()[1:5] == ["True", "1", "1xH100", "kv-aware"], table
