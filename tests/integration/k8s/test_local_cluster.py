"""The local Kubernetes cluster (deploy/local-cluster): control plane, fake GPU nodes, pod runner.

A Deployment written the way the operator writes an engine (vLLM command line, GPU request, node
affinity on the GPU product, toleration of the GPU taint) is placed by the real scheduler on a
matching kwok node, marked Running with an IP from that node's podCIDR, and served by ``shoal sim``
through the pod runner; deleting the pod stops the simulator.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
from k8s_local_cluster import Cluster

T = TypeVar("T")

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
EXPECTED_POOLS = {  # product label -> (nodes, GPUs per node)
    "NVIDIA-H100-80GB-HBM3": (4, 8),
    "NVIDIA-A10G": (4, 4),
    "NVIDIA-L4": (2, 8),
}


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 60, every: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = fn()
        except Exception as exc:  # keep polling; report the last error on timeout
            value, last = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(every)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie no longer runs
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def engine_deployment(name: str, product: str, replicas: int = 1) -> dict[str, Any]:
    """An engine Deployment as the operator writes one for vLLM."""
    kv_events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:5557",
        "topic": "kv-events",
    }
    labels = {"app.kubernetes.io/name": name, "shoal.dev/component": "engine"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "tolerations": [{**GPU_TAINT, "operator": "Equal"}],
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchExpressions": [
                                            {
                                                "key": "nvidia.com/gpu.product",
                                                "operator": "In",
                                                "values": [product],
                                            }
                                        ]
                                    }
                                ]
                            }
                        }
                    },
                    "containers": [
                        {
                            "name": "engine",
                            "image": "vllm/vllm-openai:v0.32.0",
                            "command": ["vllm", "serve"],
                            "args": [
                                "meta-llama/Llama-3.1-8B-Instruct",
                                "--served-model-name",
                                "llama-8b",
                                "--tensor-parallel-size",
                                "1",
                                "--max-model-len",
                                "8192",
                                "--enable-prefix-caching",
                                "--enable-lora",
                                "--max-loras",
                                "2",
                                "--kv-events-config",
                                json.dumps(kv_events),
                                "--host",
                                "0.0.0.0",
                                "--port",
                                "8000",
                                "--disable-log-requests",
                            ],
                            "ports": [{"name": "http", "containerPort": 8000}],
                            "resources": {
                                "requests": {"nvidia.com/gpu": "1", "cpu": "4", "memory": "32Gi"},
                                "limits": {"nvidia.com/gpu": "1"},
                            },
                            "readinessProbe": {"httpGet": {"path": "/health", "port": 8000}},
                        }
                    ],
                },
            },
        },
    }


def test_fake_gpu_nodes(k8s_cluster: Cluster) -> None:
    nodes = k8s_cluster.get_json("nodes", "-l", "type=kwok")["items"]
    by_product = Counter(n["metadata"]["labels"]["nvidia.com/gpu.product"] for n in nodes)
    assert by_product == {p: count for p, (count, _) in EXPECTED_POOLS.items()}
    cidrs = []
    for n in nodes:
        meta, spec, status = n["metadata"], n["spec"], n["status"]
        product = meta["labels"]["nvidia.com/gpu.product"]
        gpus = str(EXPECTED_POOLS[product][1])
        assert meta["annotations"]["kwok.x-k8s.io/node"] == "fake"
        assert status["capacity"]["nvidia.com/gpu"] == gpus
        assert status["allocatable"]["nvidia.com/gpu"] == gpus
        for res in ("cpu", "memory", "pods"):
            assert res in status["allocatable"]
        assert {k: spec["taints"][0][k] for k in ("key", "value", "effect")} == GPU_TAINT
        ready = {c["type"]: c["status"] for c in status["conditions"]}
        assert ready.get("Ready") == "True", n["metadata"]["name"]
        cidr = ipaddress.ip_network(spec["podCIDR"])
        assert cidr.subnet_of(ipaddress.ip_network("10.244.0.0/16"))
        cidrs.append(cidr)
    assert len(set(cidrs)) == len(cidrs)


def test_untolerated_pod_is_not_scheduled(k8s_cluster: Cluster, k8s_namespace: str) -> None:
    """The real scheduler honours the GPU taint: a pod that does not tolerate it stays Pending."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "no-toleration"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }
    k8s_cluster.apply(pod, k8s_namespace)

    def unschedulable() -> bool:
        p = k8s_cluster.get_json("pod", "no-toleration", "-n", k8s_namespace)
        conds = {c["type"]: c for c in p["status"].get("conditions", [])}
        sched = conds.get("PodScheduled", {})
        return sched.get("status") == "False" and sched.get("reason") == "Unschedulable"

    wait_for("the scheduler to report the pod Unschedulable", unschedulable, timeout=60)
    p = k8s_cluster.get_json("pod", "no-toleration", "-n", k8s_namespace)
    assert not p["spec"].get("nodeName")


def test_engine_pod_scheduled_and_served(k8s_cluster: Cluster, k8s_namespace: str) -> None:
    ns = k8s_namespace
    product = "NVIDIA-H100-80GB-HBM3"
    k8s_cluster.apply(engine_deployment("llama", product, replicas=2), ns)

    def running_pods() -> list[dict[str, Any]] | None:
        pods = k8s_cluster.get_json("pods", "-n", ns, "-l", "app.kubernetes.io/name=llama")
        items = [
            p
            for p in pods["items"]
            if p["status"].get("phase") == "Running" and p["status"].get("podIP")
        ]
        return items if len(items) == 2 else None

    pods = wait_for("2 Running engine pods with IPs", running_pods, timeout=90)
    nodes = {n["metadata"]["name"]: n for n in k8s_cluster.get_json("nodes")["items"]}
    for pod in pods:
        node = nodes[pod["spec"]["nodeName"]]
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == product
        ip = ipaddress.ip_address(pod["status"]["podIP"])
        assert ip in ipaddress.ip_network(node["spec"]["podCIDR"]), (ip, node["spec"]["podCIDR"])

    # The pod runner serves `shoal sim` at each pod's IP and port (both share tcp://*:5557 for KV
    # events in their specs; the runner binds each to its pod IP).
    with k8s_cluster.netns(), httpx.Client(timeout=5) as http:
        for pod in pods:
            url = f"http://{pod['status']['podIP']}:8000/v1/models"

            def models(url: str = url) -> dict[str, Any] | None:
                r = http.get(url)
                return r.json() if r.status_code == 200 else None

            body = wait_for(f"{url} to answer", models, timeout=120)
            assert [m["id"] for m in body["data"]] == ["llama-8b"]
            metrics = http.get(f"http://{pod['status']['podIP']}:8000/metrics").text
            assert "H100" in metrics

    state = k8s_cluster.pod_runner_state()
    by_pod = {v["pod"]: v for v in state.values()}
    victim = pods[0]
    entry = by_pod[f"{ns}/{victim['metadata']['name']}"]
    assert entry["podIP"] == victim["status"]["podIP"]
    assert entry["argv"][entry["argv"].index("--gpu") + 1] == "H100"
    pid = entry["pid"]
    assert pid and _alive(pid)

    # Deleting the pod stops its simulator; the Deployment's replacement is served in turn.
    k8s_cluster.kubectl("delete", "pod", "-n", ns, victim["metadata"]["name"], "--wait=false")
    wait_for("the deleted pod's simulator to stop", lambda: not _alive(pid), timeout=60)
    wait_for(
        "the pod runner to forget the deleted pod",
        lambda: (
            f"{ns}/{victim['metadata']['name']}"
            not in {v["pod"] for v in k8s_cluster.pod_runner_state().values()}
        ),
        timeout=30,
    )
    replacement = wait_for(
        "a replacement pod",
        lambda: [
            p for p in (running_pods() or []) if p["metadata"]["name"] != victim["metadata"]["name"]
        ],
        timeout=90,
    )
    assert len(replacement) == 2
    with k8s_cluster.netns(), httpx.Client(timeout=5) as http:
        for pod in replacement:
            url = f"http://{pod['status']['podIP']}:8000/v1/models"
            wait_for(f"{url} to answer", lambda url=url: http.get(url).status_code == 200, 120)

    # Scaling to zero stops every simulator of the Deployment.
    pids = [v["pid"] for v in k8s_cluster.pod_runner_state().values() if v["pod"].startswith(ns)]
    k8s_cluster.kubectl("scale", "deployment/llama", "-n", ns, "--replicas=0")
    wait_for("all simulators to stop", lambda: not any(p and _alive(p) for p in pids), 60)
