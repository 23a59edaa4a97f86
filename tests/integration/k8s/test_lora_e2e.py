"""LoRA adapters end to end on the local Kubernetes cluster: the operator (a real process) places
20 LoraAdapters with replicas 2 on a Model's 4 engine pods (``shoal sim`` served by the pod
runner), loads them through the engines' API, reports status from their ``/v1/models``, reloads
a deleted pod's adapters on its replacement (kept for it meanwhile, not moved to the survivors),
unloads a deleted adapter everywhere, and reports bad adapters as conditions and Events while
the others are unaffected.

The adapter files are directories under the test's temporary directory, named by ``file://``
sources: the operator and the simulated engines both run on this host, so they see the same
paths (on a real cluster that is the shared adapter cache volume).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from k8s_local_cluster import REPO, Cluster
from test_autoscaler_e2e import router_proc
from test_local_cluster import wait_for
from test_operator import OperatorProcess, get, items

CRDS = [
    REPO / "charts" / "shoal" / "crds" / "models.shoal.dev.yaml",
    REPO / "charts" / "shoal" / "crds" / "loraadapters.shoal.dev.yaml",
    REPO / "operator" / "crds" / "kopf-peering.yaml",
]
ADAPTERS = 20
ROUTER_PORT = 18081
PODS = 4
MAX_LORAS = 12


@pytest.fixture(scope="module")
def lora_crds(k8s_cluster: Cluster) -> None:
    for path in CRDS:
        k8s_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    for name in ("models.shoal.dev", "loraadapters.shoal.dev", "kopfpeerings.kopf.dev"):
        k8s_cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")


@pytest.fixture
def operator(
    k8s_cluster: Cluster, k8s_namespace: str, lora_crds: None, tmp_path: Path
) -> Iterator[OperatorProcess]:
    args = [
        "--namespace", k8s_namespace, "--health-port", "0", "--resync-interval", "3",
        "--standalone", "--lora-resync-interval", "2",
        "--lora-cache-dir", str(tmp_path / "lora-cache"),
    ]  # fmt: skip
    op = OperatorProcess(k8s_cluster, tmp_path / "operator.log", *args)
    yield op
    op.stop()
    print(op.text()[-3000:])


def model(name: str, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "Model",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": name},
            "engine": {"kind": "vllm"},
            "maxModelLen": 4096,
            "pools": [{"name": "h100", "gpuType": "H100", "replicas": replicas, "maxReplicas": 8}],
            "lora": {"enabled": True, "maxLoras": MAX_LORAS, "maxLoraRank": 16},
        },
    }


def adapter(name: str, base: str, source: str, replicas: int | str = 2, rank: int = 8) -> str:
    return json.dumps(
        {
            "apiVersion": "shoal.dev/v1alpha1",
            "kind": "LoraAdapter",
            "metadata": {"name": name},
            "spec": {"baseModel": base, "source": source, "replicas": replicas, "rank": rank},
        }
    )


def engine_pods(cluster: Cluster, ns: str) -> dict[str, str]:
    """Running engine pod name -> ip:port."""
    pods = items(cluster, ns, "pods", "-l", "shoal.dev/model=llama,shoal.dev/component=engine")
    return {
        p["metadata"]["name"]: f"{p['status']['podIP']}:8000"
        for p in pods
        if p["status"].get("podIP") and not p["metadata"].get("deletionTimestamp")
    }


def engines_truth(cluster: Cluster, pods: dict[str, str]) -> dict[str, set[str]]:
    """What each engine's /v1/models lists as adapters."""
    out = {}
    with cluster.netns(), httpx.Client(timeout=5) as http:
        for name, ep in pods.items():
            cards = http.get(f"http://{ep}/v1/models").json()["data"]
            out[name] = {c["id"] for c in cards if c.get("parent")}
    return out


def adapters_status(cluster: Cluster, ns: str) -> dict[str, dict[str, Any]]:
    return {
        a["metadata"]["name"]: a.get("status") or {} for a in items(cluster, ns, "loraadapters")
    }


def all_ready(cluster: Cluster, ns: str, names: list[str], pods: int) -> dict[str, Any]:
    """The adapters' status once every one is Ready on 2 pods of ``pods``; until then raises
    what is missing, which ``wait_for`` reports if it never comes."""
    st = adapters_status(cluster, ns)
    running = len(engine_pods(cluster, ns))
    behind = {
        n: (st.get(n, {}).get("phase"), st.get(n, {}).get("loadedReplicas"))
        for n in names
        if st.get(n, {}).get("phase") != "Ready" or st[n].get("loadedReplicas") != 2
    }
    if behind or running != pods:
        shown = dict(list(behind.items())[:5])
        raise AssertionError(
            f"{running}/{pods} engine pods; {len(behind)} adapters not Ready on 2 pods "
            f"(phase, loadedReplicas): {shown}"
        )
    return st


def two_each(truth: dict[str, set[str]], names: list[str]) -> dict[str, set[str]] | None:
    ok = all(sum(n in loaded for loaded in truth.values()) == 2 for n in names)
    return truth if ok else None


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def requests_land_only_where_loaded(
    cluster: Cluster,
    ns: str,
    tmp_path: Path,
    names: list[str],
    pods: dict[str, str],
    truth: dict[str, set[str]],
) -> None:
    """Through the Shoal router (Kubernetes discovery, inside the cluster's namespace): every
    adapter's requests succeed and are served only by pods that have it loaded; `/v1/models`
    lists each adapter with its parent; an undeclared name gets 404."""
    config = {
        "host": "127.0.0.1",
        "port": ROUTER_PORT,
        "strategy": "prefix",
        "kubernetes": {
            "namespace": ns,
            "label_selector": "shoal.dev/model=llama",
            "port_name": "http",
        },
        "models_refresh_s": 0.5,
        "log_level": "INFO",
    }
    router = router_proc(cluster, tmp_path, config)
    url = f"http://127.0.0.1:{ROUTER_PORT}"
    try:
        with cluster.netns(), httpx.Client(timeout=60) as http:

            def listed() -> dict[str, Any] | None:
                cards = {m["id"]: m for m in http.get(url + "/v1/models").json()["data"]}
                return cards if set(names) <= set(cards) else None

            cards = wait_for("the router listing every adapter", listed, 60)
            assert all(cards[n]["parent"] == "llama" for n in names)
            for n in names:
                holders = {pods[p].split(":")[0] for p, loaded in truth.items() if n in loaded}
                for i in range(3):
                    r = http.post(
                        url + "/v1/completions",
                        json={"model": n, "prompt": f"request {i} for {n}", "max_tokens": 4},
                    )
                    assert r.status_code == 200, (n, r.text)
                    served_by = r.headers["x-shoal-endpoint"].split("//")[1].split(":")[0]
                    assert served_by in holders, (n, served_by, holders)
            r = http.post(url + "/v1/completions", json={"model": "never-declared", "prompt": "x"})
            assert r.status_code == 404, r.text
    finally:
        router.stop()
        print(router.text()[-2000:])


def test_lora_adapters_end_to_end(
    k8s_cluster: Cluster, k8s_namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    cluster, ns = k8s_cluster, k8s_namespace
    names = [f"adapter-{i:02d}" for i in range(ADAPTERS)]
    for n in names:
        (tmp_path / "adapters" / n).mkdir(parents=True)
        (tmp_path / "adapters" / n / "adapter_config.json").write_text('{"r": 8}')
    cluster.apply(model("llama", PODS), ns)
    docs = [adapter(n, "llama", f"file://{tmp_path}/adapters/{n}") for n in names]
    # bad input next to good: rank above the Model's limit, an unknown base, a missing source
    docs += [
        adapter("too-big", "llama", f"file://{tmp_path}/adapters/{names[0]}", rank=64),
        adapter("orphan", "no-such-model", f"file://{tmp_path}/adapters/{names[0]}"),
        adapter("missing", "llama", f"file://{tmp_path}/adapters/not-there"),
        # declared rank 8 (admitted), but its files say r=32: the engine refuses the load
        adapter("refused", "llama", f"file://{tmp_path}/adapters/refused"),
    ]
    (tmp_path / "adapters" / "refused").mkdir(parents=True)
    (tmp_path / "adapters" / "refused" / "adapter_config.json").write_text('{"r": 32}')
    cluster.kubectl("apply", "-n", ns, "-f", "-", input="\n---\n".join(docs))

    # every adapter on exactly 2 pods within maxLoras, as the engines themselves report
    status = wait_for("20 adapters Ready on 2 pods", lambda: all_ready(cluster, ns, names, 4), 240)
    pods = engine_pods(cluster, ns)
    truth = engines_truth(cluster, pods)
    for n in names:
        holders = {p for p, loaded in truth.items() if n in loaded}
        assert len(holders) == 2, (n, holders)
        assert set(status[n]["loadedPods"]) == holders
        assert status[n]["desiredReplicas"] == 2
    for pod, loaded in truth.items():
        assert len(loaded) <= MAX_LORAS, (pod, loaded)
        assert loaded <= set(names)  # nothing bad was loaded anywhere
    assert sum(len(v) for v in truth.values()) == 2 * ADAPTERS
    requests_land_only_where_loaded(cluster, ns, tmp_path, names, pods, truth)

    # bad input: a condition with a reason and an Event; no crash
    expected = {
        "too-big": "RankTooLarge",
        "orphan": "UnknownBaseModel",
        "missing": "SourceUnavailable",
        "refused": "LoadFailed",
    }

    def degraded_with(n: str, reason: str) -> dict[str, Any] | None:
        st = adapters_status(cluster, ns).get(n, {})
        conds = st.get("conditions") or []
        hit = any(c.get("type") == "Degraded" and c.get("reason") == reason for c in conds)
        return st if hit else None

    for n, reason in expected.items():
        st = wait_for(f"{n} Degraded with {reason}", lambda n=n, r=reason: degraded_with(n, r), 60)
        assert condition(st, "Ready")["status"] == "False"
        # Bad specs fail for good; an engine refusing a load is retried (it may be transient),
        # so that adapter stays Pending with the engine's message in its condition.
        assert st["phase"] == ("Pending" if n == "refused" else "Failed"), st
    refused = adapters_status(cluster, ns)["refused"]
    assert "greater than max_lora_rank" in condition(refused, "Degraded")["message"], refused
    events = cluster.kubectl("get", "events", "-n", ns, "-o", "json")
    reasons = {(e["involvedObject"]["name"], e["reason"]) for e in json.loads(events)["items"]}
    for n, reason in expected.items():
        assert (n, reason) in reasons, reasons
    assert operator.alive()
    table = cluster.kubectl("get", "loraadapters", "-n", ns)
    assert "BASE" in table and "LOADED" in table and "PHASE" in table
    assert "too-big" in table and "Failed" in table

    # delete an engine pod: its replacement reloads what it held
    victim = sorted(pods)[0]
    held, before = truth[victim], set(pods)
    survivors_before = {p: loaded for p, loaded in truth.items() if p != victim}
    cluster.kubectl("delete", "pod", victim, "-n", ns, "--wait=false")
    wait_for(
        "the replacement pod",
        lambda: len(p := engine_pods(cluster, ns)) == PODS and victim not in p,
        120,
    )
    status = wait_for("all Ready again", lambda: all_ready(cluster, ns, names, 4), 180)
    pods = engine_pods(cluster, ns)
    truth = wait_for(
        "engines agree after the restart", lambda: two_each(engines_truth(cluster, pods), names), 60
    )
    (new_pod,) = set(pods) - before
    # The vanished pod's adapters were kept for its replacement (each still served by its other
    # replica meanwhile): the replacement's /v1/models lists exactly what its predecessor held,
    # and nothing moved on the survivors.
    assert truth[new_pod] == held, (truth[new_pod], held)
    for pod in set(pods) - {new_pod}:
        assert truth[pod] == survivors_before[pod], pod
    assert all(len(loaded) <= MAX_LORAS for loaded in truth.values())
    assert sum(len(v) for v in truth.values()) == 2 * ADAPTERS
    assert f"pod {new_pod} takes over {victim}'s adapters" in operator.text()

    # delete an adapter: unloaded everywhere, then the resource is gone (finalizer released)
    gone = names[5]
    cluster.kubectl("delete", "loraadapter", gone, "-n", ns, "--wait=false")
    wait_for(
        "the deleted adapter's resource gone",
        lambda: get(cluster, ns, "loraadapter", gone) is None,
        90,
    )
    truth = engines_truth(cluster, engine_pods(cluster, ns))
    assert all(gone not in loaded for loaded in truth.values()), truth
    assert sum(len(v) for v in truth.values()) == 2 * (ADAPTERS - 1)
    assert operator.alive()
