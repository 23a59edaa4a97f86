"""The Model operator against the local Kubernetes control plane (deploy/local-cluster).

The operator runs as a real process inside the cluster's network namespace (``shoal.operator.cli``
through ``deploy/local-cluster/exec``), with kopf peering; the real scheduler places its engine
pods on the fake GPU nodes and the pod runner serves them with ``shoal sim``. Covered: Deployments
per pool with the right arguments, affinity, GPU requests and owner references; status Ready with
endpoints that answer; a replica change rolls out; a deleted Deployment comes back; a spec that
cannot be realised is Degraded while the operator keeps running; a restart mid-rollout
converges; deleting the Model removes everything; of two peered operators only one acts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from k8s_local_cluster import LOCAL_CLUSTER, REPO, Cluster
from test_local_cluster import wait_for

MODEL_CRD = REPO / "charts" / "shoal" / "crds" / "models.shoal.dev.yaml"
PEERING_CRDS = REPO / "operator" / "crds" / "kopf-peering.yaml"
PYTHON = REPO / ".venv" / "bin" / "python"
H100 = "NVIDIA-H100-80GB-HBM3"
A10G = "NVIDIA-A10G"
PEERED_SHORT_LIFETIME = ("--peering", "shoal", "--priority", "100", "--peering-lifetime", "10")


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def crds(k8s_cluster: Cluster) -> None:
    for path in (MODEL_CRD, PEERING_CRDS):
        k8s_cluster.kubectl("apply", "--server-side", "-f", str(path))
    for name in ("models.shoal.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
        k8s_cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")


class OperatorProcess:
    """``python -m shoal.operator.cli`` inside the cluster's network namespace."""

    def __init__(self, cluster: Cluster, log: Path, *args: str) -> None:
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 (closed in stop)
        argv = [str(LOCAL_CLUSTER / "exec"), str(PYTHON), "-m", "shoal.operator.cli", *args]
        # cwd outside the repository: its operator/ folder would shadow the stdlib module
        self.proc = subprocess.Popen(
            argv,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=cluster.env,
            cwd=str(log.parent),
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._out.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def start_operator(
    k8s_cluster: Cluster, k8s_namespace: str, crds: None, tmp_path: Path
) -> Iterator[Any]:
    started: list[OperatorProcess] = []

    def start(name: str = "op", *extra: str) -> OperatorProcess:
        args = ["--namespace", k8s_namespace, "--health-port", "0", "--resync-interval", "3"]
        args += list(extra) or ["--peering", "shoal", "--priority", "100"]
        op = OperatorProcess(k8s_cluster, tmp_path / f"{name}-{len(started)}.log", *args)
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()
        if os.environ.get("SHOAL_TEST_VERBOSE"):
            print(op.text()[-4000:])


def model_manifest(name: str, h100_replicas: int = 1, a10g_replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "Model",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": name},
            "engine": {"kind": "vllm", "args": ["--max-num-seqs", "64"]},
            "maxModelLen": 4096,
            "pools": [
                {"name": "h100", "gpuType": "H100", "replicas": h100_replicas, "maxReplicas": 4},
                {"name": "a10g", "gpuType": "A10G", "replicas": a10g_replicas, "maxReplicas": 4},
            ],
            "lora": {"enabled": True, "maxLoras": 2, "maxLoraRank": 16},
        },
    }


def get(cluster: Cluster, ns: str, *what: str) -> Any:
    out = cluster.kubectl("get", *what, "-n", ns, "-o", "json", "--ignore-not-found")
    return json.loads(out) if out.strip() else None


def items(cluster: Cluster, ns: str, *what: str) -> list[dict[str, Any]]:
    """A list get; kubectl prints nothing (not an empty list) when --ignore-not-found finds none."""
    return list((get(cluster, ns, *what) or {}).get("items", []))


def conditions(model: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in ((model or {}).get("status") or {}).get("conditions", [])}


def ready_model(cluster: Cluster, ns: str, name: str, endpoints: int) -> dict[str, Any] | None:
    m = get(cluster, ns, "model", name)
    st = (m or {}).get("status") or {}
    ready = conditions(m).get("Ready", {}).get("status") == "True"
    fresh = st.get("observedGeneration") == m["metadata"]["generation"] if m else False
    return m if ready and fresh and len(st.get("endpoints", [])) == endpoints else None


def patch_model(cluster: Cluster, ns: str, name: str, patch: Any, kind: str = "json") -> None:
    cluster.kubectl("patch", "model", name, "-n", ns, "--type", kind, "-p", json.dumps(patch))


def acting(op: OperatorProcess) -> bool:
    """Whether kopf's last peering decision in the log was to act (it starts paused)."""
    states = [ln for ln in op.text().splitlines() if "Resuming operations" in ln or "Pausing" in ln]
    return bool(states) and "Resuming operations" in states[-1]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# --------------------------------------------------------------------------------------------------
# Tests


def test_model_lifecycle(k8s_cluster: Cluster, k8s_namespace: str, start_operator: Any) -> None:
    cluster, ns = k8s_cluster, k8s_namespace
    op = start_operator()
    cluster.apply(model_manifest("llama"), ns)
    model = wait_for("the Model", lambda: get(cluster, ns, "model", "llama"))
    uid = model["metadata"]["uid"]

    # one Deployment per pool, as the operator writes them
    deps = wait_for(
        "two Deployments",
        lambda: (
            d
            if len(d := items(cluster, ns, "deployments", "-l", "shoal.dev/model=llama")) == 2
            else None
        ),
        timeout=60,
    )
    by_pool = {d["metadata"]["labels"]["shoal.dev/pool"]: d for d in deps}
    assert set(by_pool) == {"h100", "a10g"}
    for pool, product in (("h100", H100), ("a10g", A10G)):
        d = by_pool[pool]
        assert d["metadata"]["name"] == f"llama-{pool}"
        (owner,) = d["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("Model", "llama", uid)
        assert owner["controller"] is True
        pod = d["spec"]["template"]["spec"]
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert product in terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"]
        (c,) = pod["containers"]
        assert c["command"] == ["vllm", "serve"]
        assert flag(c["args"], "--served-model-name") == "llama"
        assert flag(c["args"], "--tensor-parallel-size") == "1"
        assert "--enable-lora" in c["args"] and "--enable-prefix-caching" in c["args"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    svc = get(cluster, ns, "service", "llama")
    assert svc["metadata"]["ownerReferences"][0]["uid"] == uid

    # pods land on matching nodes, the pod runner serves them, the Model becomes Ready
    model = wait_for(
        "Model Ready with 2 endpoints", lambda: ready_model(cluster, ns, "llama", 2), 120
    )
    nodes = {n["metadata"]["name"]: n for n in cluster.get_json("nodes")["items"]}
    pods = items(cluster, ns, "pods", "-l", "shoal.dev/model=llama")
    for p in pods:
        product = nodes[p["spec"]["nodeName"]]["metadata"]["labels"]["nvidia.com/gpu.product"]
        want = H100 if p["metadata"]["labels"]["shoal.dev/pool"] == "h100" else A10G
        assert product == want
    assert model["status"]["replicas"] == 2
    assert model["status"]["selector"] == "shoal.dev/component=engine,shoal.dev/model=llama"
    pools = {p["name"]: p for p in model["status"]["pools"]}
    assert pools["h100"]["readyReplicas"] == 1 and pools["a10g"]["desiredReplicas"] == 1

    def served() -> bool:
        with cluster.netns(), httpx.Client(timeout=5) as http:
            for ep in model["status"]["endpoints"]:
                r = http.get(f"http://{ep}/v1/models")
                if r.status_code != 200 or r.json()["data"][0]["id"] != "llama":
                    return False
        return True

    wait_for("the engines to answer on the status endpoints", served, timeout=90)
    events = cluster.kubectl(
        "get", "events", "-n", ns, "--field-selector", "involvedObject.name=llama"
    )
    assert "Created" in events

    # a replica change rolls out
    patch_model(
        cluster, ns, "llama", [{"op": "replace", "path": "/spec/pools/0/replicas", "value": 2}]
    )
    wait_for(
        "3 endpoints after scaling h100 to 2", lambda: ready_model(cluster, ns, "llama", 3), 120
    )
    assert get(cluster, ns, "deployment", "llama-h100")["spec"]["replicas"] == 2

    # a deleted Deployment is recreated
    old_uid = get(cluster, ns, "deployment", "llama-a10g")["metadata"]["uid"]
    cluster.kubectl("delete", "deployment", "llama-a10g", "-n", ns, "--wait=false")
    wait_for(
        "llama-a10g recreated",
        lambda: (
            (d := get(cluster, ns, "deployment", "llama-a10g")) is not None
            and d["metadata"]["uid"] != old_uid
        ),
        timeout=60,
    )
    wait_for("Ready again", lambda: ready_model(cluster, ns, "llama", 3), 120)

    # a spec that passed admission but cannot be realised: Degraded, and the operator stays up
    patch_model(
        cluster,
        ns,
        "llama",
        {"spec": {"engine": {"args": ["--tensor-parallel-size", "4"]}}},
        kind="merge",
    )

    def degraded() -> dict[str, Any] | None:
        c = conditions(get(cluster, ns, "model", "llama")).get("Degraded", {})
        return c if c.get("status") == "True" and c.get("reason") == "InvalidEngineArgs" else None

    cond = wait_for("Degraded InvalidEngineArgs", degraded, timeout=60)
    assert "--tensor-parallel-size" in cond["message"]
    time.sleep(4)  # a resync or two later it is still running, not crash-looping
    assert op.alive()
    # the engines of the last good spec keep serving
    assert get(cluster, ns, "deployment", "llama-h100")["spec"]["replicas"] == 2
    patch_model(
        cluster, ns, "llama", {"spec": {"engine": {"args": ["--max-num-seqs", "64"]}}}, "merge"
    )
    wait_for(
        "Degraded cleared",
        lambda: (
            conditions(get(cluster, ns, "model", "llama")).get("Degraded", {}).get("status")
            == "False"
        ),
        timeout=60,
    )

    # deleting the Model removes everything it owns (owner references + garbage collector)
    cluster.kubectl("delete", "model", "llama", "-n", ns, "--wait=false")
    wait_for(
        "Deployments and Service gone",
        lambda: (
            not items(cluster, ns, "deployments", "-l", "shoal.dev/model=llama")
            and get(cluster, ns, "service", "llama") is None
        ),
        timeout=90,
    )
    assert op.alive()


def test_restart_mid_rollout_converges(
    k8s_cluster: Cluster, k8s_namespace: str, start_operator: Any
) -> None:
    cluster, ns = k8s_cluster, k8s_namespace
    op = start_operator("op", *PEERED_SHORT_LIFETIME)
    cluster.apply(model_manifest("qwen", h100_replicas=1, a10g_replicas=0), ns)
    wait_for("Ready with 1 endpoint", lambda: ready_model(cluster, ns, "qwen", 1), 120)

    # change the spec, let the operator start the rollout, kill it hard mid-way
    patch_model(
        cluster,
        ns,
        "qwen",
        [
            {"op": "replace", "path": "/spec/pools/0/replicas", "value": 3},
            {"op": "replace", "path": "/spec/pools/1/replicas", "value": 1},
        ],
    )
    wait_for(
        "the rollout to start",
        lambda: (
            (get(cluster, ns, "deployment", "qwen-h100") or {}).get("spec", {}).get("replicas") == 3
        ),
        timeout=30,
        every=0.1,
    )
    op.stop(signal.SIGKILL)
    # while it is down: a Deployment vanishes and the spec changes again
    cluster.kubectl("delete", "deployment", "qwen-a10g", "-n", ns, "--ignore-not-found")
    patch_model(
        cluster, ns, "qwen", [{"op": "replace", "path": "/spec/pools/1/replicas", "value": 2}]
    )

    # Same priority as the killed one: kopf pauses until the dead peer's record expires
    # (--peering-lifetime), then resumes; the reconciles queued meanwhile must not wedge.
    op2 = start_operator("op2", *PEERED_SHORT_LIFETIME)
    m = wait_for("converged: 5 endpoints", lambda: ready_model(cluster, ns, "qwen", 5), 150)
    pools = {p["name"]: (p["desiredReplicas"], p["readyReplicas"]) for p in m["status"]["pools"]}
    assert pools == {"h100": (3, 3), "a10g": (2, 2)}
    assert get(cluster, ns, "deployment", "qwen-a10g")["spec"]["replicas"] == 2
    assert op2.alive()


def test_peered_operators_only_one_acts(
    k8s_cluster: Cluster, k8s_namespace: str, start_operator: Any
) -> None:
    cluster, ns = k8s_cluster, k8s_namespace
    high = start_operator("high", "--peering", "shoal", "--priority", "200")
    low = start_operator("low", "--peering", "shoal", "--priority", "100")

    def both_peered() -> bool:
        peering = get(cluster, ns, "kopfpeering", "shoal")
        return peering is not None and len(peering.get("status") or {}) == 2

    wait_for("both operators in the KopfPeering", both_peered, timeout=60)
    # kopf starts paused and resumes only when no live peer outranks it: the high one resumes,
    # the low one stays paused (it logs "Pausing" only if it had been acting before)
    wait_for("the high-priority operator to act", lambda: acting(high), timeout=30)
    wait_for("the low-priority operator to be paused", lambda: not acting(low), timeout=30)

    cluster.apply(model_manifest("mistral", h100_replicas=1, a10g_replicas=0), ns)
    wait_for("Ready", lambda: ready_model(cluster, ns, "mistral", 1), 120)
    assert "created Deployment" in high.text()
    assert "created Deployment" not in low.text()

    # the acting one goes away (it removes itself from the peering): the other takes over
    high.stop()
    wait_for("the low-priority operator to resume", lambda: "Resuming" in low.text(), timeout=60)
    cluster.apply(model_manifest("phi", h100_replicas=1, a10g_replicas=0), ns)
    wait_for("the second Model Ready", lambda: ready_model(cluster, ns, "phi", 1), 120)
    assert "created Deployment" in low.text()
