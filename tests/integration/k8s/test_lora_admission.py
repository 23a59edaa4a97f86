"""The LoraAdapter CRD's admission rules against the real API server (deploy/local-cluster)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from k8s_local_cluster import REPO, Cluster

CRD = REPO / "charts" / "shoal" / "crds" / "loraadapters.shoal.dev.yaml"
EXAMPLE = REPO / "deploy" / "examples" / "lora" / "lora-adapters.yaml"


@pytest.fixture(scope="module")
def lora_crd(k8s_cluster: Cluster) -> Cluster:
    k8s_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    k8s_cluster.kubectl(
        "wait", "--for=condition=Established", "crd/loraadapters.shoal.dev", "--timeout=60s"
    )
    return k8s_cluster


def _adapter(**spec: Any) -> str:
    body = {"baseModel": "llama", "source": "hf://org/adapter", **spec}
    doc = {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "LoraAdapter",
        "metadata": {"name": "a"},
        "spec": body,
    }
    return json.dumps(doc)


def _apply(cluster: Cluster, text: str, ns: str) -> tuple[int, str]:
    proc = cluster.run("kubectl", "apply", "-n", ns, "-f", "-", input=text, check=False)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"source": "ftp://host/x"}, "spec.source", "source must be hf://org/name[@revision]"),
        ({"source": "hf://no-org"}, "spec.source", "source must be hf://org/name[@revision]"),
        ({"replicas": 0}, "spec.replicas", "replicas must be a number ≥ 1 or 'all'"),
        ({"replicas": "some"}, "spec.replicas", "replicas must be a number ≥ 1 or 'all'"),
        ({"rank": 1024}, "spec.rank", "should be less than or equal to 512"),
        ({"baseModel": "Not_A_Name"}, "spec.baseModel", "should match"),
    ],
    ids=["scheme", "hf-shape", "zero-replicas", "word-replicas", "rank", "base-name"],
)
def test_invalid_adapter_is_rejected_naming_the_field(
    lora_crd: Cluster, k8s_namespace: str, spec: dict[str, Any], field: str, message: str
) -> None:
    rc, out = _apply(lora_crd, _adapter(**spec), k8s_namespace)
    assert rc != 0, out
    assert field in out and message in out, out


def test_example_is_accepted_with_defaults_and_columns(
    lora_crd: Cluster, k8s_namespace: str
) -> None:
    rc, out = _apply(lora_crd, EXAMPLE.read_text(), k8s_namespace)
    assert rc == 0, out
    sent = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    for doc in sent:
        stored = lora_crd.get_json("loraadapter", doc["metadata"]["name"], "-n", k8s_namespace)
        for key, value in doc["spec"].items():
            assert stored["spec"][key] == value, (key, stored["spec"])
    legal = lora_crd.get_json("lora", "legal-summaries", "-n", k8s_namespace)
    assert legal["spec"]["replicas"] == 1  # defaulted
    table = lora_crd.kubectl("get", "loraadapters", "-n", k8s_namespace)
    header = table.splitlines()[0].split()
    assert header[:5] == ["NAME", "BASE", "DESIRED", "LOADED", "PHASE"], table
    assert "llama-8b" in table
