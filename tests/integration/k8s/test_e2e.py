"""End to end on the local Kubernetes cluster: ``helm install`` the chart, then serve a Model.

Local cluster up (session fixture) → ``helm install charts/shoal`` into a fresh namespace → the
operator (two replicas, kopf peering) and the router run as processes started by the pod runner
from the chart's pod specs, each under its own service account (a TokenRequest token: the chart's
RBAC applies) → the example Model with an H100 and an A10G pool
(``deploy/examples/model-two-pools.yaml``) → the operator makes its Deployments, the scheduler puts
the engine pods on matching fake GPU nodes, the pod runner serves them with ``shoal sim`` → the
router, discovering engines from EndpointSlices, serves a streamed ``openai`` request →
``kubectl scale`` adds a replica and the router sends to it within seconds → deleting the Model
removes its Deployments and the router stops sending to them.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from k8s_local_cluster import REPO, Cluster
from test_local_cluster import wait_for

CHART = REPO / "charts" / "shoal"
EXAMPLE = REPO / "deploy" / "examples" / "model-two-pools.yaml"
RELEASE = "shoal"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
PRODUCTS = {"h100": "NVIDIA-H100-80GB-HBM3", "a10g": "NVIDIA-A10G"}
ROUTER_PORT = 8080


def _json(cluster: Cluster, ns: str, *what: str) -> Any:
    out = cluster.kubectl("get", *what, "-n", ns, "-o", "json", "--ignore-not-found")
    return json.loads(out) if out.strip() else None


def _items(cluster: Cluster, ns: str, *what: str) -> list[dict[str, Any]]:
    return list((_json(cluster, ns, *what) or {}).get("items", []))


def _served(cluster: Cluster, ns: str, selector: str, count: int) -> list[dict[str, Any]] | None:
    """The pods matching ``selector`` if exactly ``count`` are Running, have an IP, and the pod
    runner has a live process for each; else None."""
    pods = [
        p
        for p in _items(cluster, ns, "pods", "-l", selector)
        if not p["metadata"].get("deletionTimestamp")
    ]
    if len(pods) != count:
        return None
    state = cluster.pod_runner_state()
    for p in pods:
        if p.get("status", {}).get("phase") != "Running" or not p["status"].get("podIP"):
            return None
        entry = state.get(p["metadata"]["uid"])
        if not entry or not entry.get("pid"):
            return None
    return pods


def _runner_log(cluster: Cluster, ns: str, pod: str, n: int = 40) -> str:
    path = cluster.state_dir / "logs" / "pods" / f"{ns}_{pod}.log"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return f"(no {path})"


def _chat(client: httpx.Client, url: str, model: str) -> httpx.Response:
    body = {
        "model": model,
        # distinct prompts: no prefix affinity pins every request to one engine
        "messages": [{"role": "user", "content": f"hello {uuid.uuid4().hex} " * 4}],
        "max_tokens": 4,
    }
    return client.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def _endpoints_hit(url: str, model: str, n: int = 16) -> tuple[set[str], list[int]]:
    """Send ``n`` concurrent requests; the endpoints that served them and the status codes."""
    with httpx.Client() as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        resps = list(pool.map(lambda _: _chat(client, url, model), range(n)))
    hit = {r.headers["x-shoal-endpoint"] for r in resps if r.status_code == 200}
    return hit, [r.status_code for r in resps]


@pytest.fixture
def release(k8s_cluster: Cluster, k8s_namespace: str, tmp_path: Path) -> str:
    values = {
        "operator": {"tolerations": [GPU_TOLERATION]},
        # The chart's default discovery (shoal.dev/component=engine slices, port "http") is
        # what the operator's engine Services provide: no override.
        "router": {"tolerations": [GPU_TOLERATION]},
        "redis": {"enabled": False, "tolerations": [GPU_TOLERATION]},
    }
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    k8s_cluster.run(
        "helm",
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        k8s_namespace,
        "--values",
        str(path),
        timeout=180,
    )
    return k8s_namespace


def test_helm_install_serves_a_model(k8s_cluster: Cluster, release: str) -> None:
    cluster, ns = k8s_cluster, release
    t0 = time.monotonic()

    # -- Shoal's own pods run (pod runner) under their service accounts --------------------------
    operators = wait_for(
        "2 operator pods served by the pod runner",
        lambda: _served(cluster, ns, "app.kubernetes.io/component=operator", 2),
        timeout=90,
    )
    (router,) = wait_for(
        "the router pod served by the pod runner",
        lambda: _served(cluster, ns, "app.kubernetes.io/component=router", 1),
        timeout=90,
    )
    state = cluster.pod_runner_state()
    for pod, sa in [(p, f"{RELEASE}-operator") for p in operators] + [
        (router, f"{RELEASE}-router")
    ]:
        assert pod["spec"]["serviceAccountName"] == sa
        entry = state[pod["metadata"]["uid"]]
        kubeconfig = json.loads(
            (
                cluster.state_dir / "pods" / f"{ns}_{pod['metadata']['name']}" / "kubeconfig"
            ).read_text()
        )
        (user,) = kubeconfig["users"]
        assert user["name"] == f"system:serviceaccount:{ns}:{sa}", user["name"]
        assert user["user"].get("token"), "no service-account token in the pod's kubeconfig"
        assert entry["argv"][0].endswith("shoal"), entry["argv"]
    router_ip = router["status"]["podIP"]
    url = f"http://{router_ip}:{ROUTER_PORT}"
    router_argv = state[router["metadata"]["uid"]]["argv"]
    assert f"--host={router_ip}" in router_argv, router_argv
    assert not any(a.startswith("--config=/etc/shoal") for a in router_argv), router_argv

    with cluster.netns():
        wait_for(
            "the router's /health",
            lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200,
            timeout=60,
        )
    # the operator's service account may do what the chart grants, not more
    can = cluster.kubectl(
        "auth", "can-i", "create", "deployments", "-n", ns,
        f"--as=system:serviceaccount:{ns}:{RELEASE}-operator", check=False,
    ).strip()  # fmt: skip
    assert can == "yes", can
    cannot = cluster.kubectl(
        "auth", "can-i", "create", "deployments", "-n", ns,
        f"--as=system:serviceaccount:{ns}:{RELEASE}-router", check=False,
    ).strip()  # fmt: skip
    assert cannot == "no", cannot
    print(f"chart up (operator x2 + router served) in {time.monotonic() - t0:.1f}s")

    # -- the example Model: an H100 pool and an A10G pool -----------------------------------------
    model = yaml.safe_load(EXAMPLE.read_text())
    name = model["metadata"]["name"]
    # Clients ask for the served name; the router learns it from the engines' /v1/models.
    served = model["spec"]["model"]["servedName"]
    pools = {p["name"]: p["replicas"] for p in model["spec"]["pools"]}
    total = sum(pools.values())
    cluster.apply(model, ns)
    t_model = time.monotonic()
    engines = wait_for(
        f"{total} engine pods of {name} served by the pod runner",
        lambda: _served(cluster, ns, f"shoal.dev/model={name}", total),
        timeout=150,
    )
    nodes = {n["metadata"]["name"]: n for n in cluster.get_json("nodes")["items"]}
    by_pool: dict[str, int] = {}
    for p in engines:
        pool = p["metadata"]["labels"]["shoal.dev/pool"]
        by_pool[pool] = by_pool.get(pool, 0) + 1
        product = nodes[p["spec"]["nodeName"]]["metadata"]["labels"]["nvidia.com/gpu.product"]
        assert product == PRODUCTS[pool], f"{p['metadata']['name']} on a {product} node"
    assert by_pool == pools, by_pool
    deployments = {d["metadata"]["name"] for d in _items(cluster, ns, "deployments")}
    assert {f"{name}-h100", f"{name}-a10g"} <= deployments, deployments

    # -- a streamed openai request through the router --------------------------------------------
    with cluster.netns():
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)

        def streamed() -> str | None:
            chunks = oai.chat.completions.create(
                model=served,
                messages=[{"role": "user", "content": "Say hello."}],
                max_tokens=8,
                stream=True,
            )
            text = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
            return text or None

        text = wait_for("a streamed completion through the router", streamed, timeout=60)
        print(
            f"Model {name}: {total} engines served and a streamed reply "
            f"{time.monotonic() - t_model:.1f}s after apply: {text!r}"
        )
        before, _ = _endpoints_hit(url, served)
        engine_ips = {p["status"]["podIP"] for p in engines}
        assert {e.split("//")[1].split(":")[0] for e in before} <= engine_ips, before

    # -- kubectl scale adds a replica; the router uses it within seconds -------------------------
    cluster.kubectl("scale", f"model/{name}", "-n", ns, f"--replicas={total + 1}")
    scaled = wait_for(
        f"{total + 1} engine pods after kubectl scale",
        lambda: _served(cluster, ns, f"shoal.dev/model={name}", total + 1),
        timeout=90,
    )
    (new,) = [p for p in scaled if p["status"]["podIP"] not in engine_ips]
    new_ip = new["status"]["podIP"]
    t_new = time.monotonic()
    with cluster.netns():
        seen: set[str] = set()

        def routed_to_new() -> bool:
            hit, _ = _endpoints_hit(url, served)
            seen.update(hit)
            return any(f"//{new_ip}:" in e for e in hit)

        wait_for(f"the router to send to the new replica {new_ip}", routed_to_new, timeout=30)
    print(f"router sent to the new replica {time.monotonic() - t_new:.1f}s after it was served")

    # -- deleting the Model removes its Deployments; the router stops sending to them ------------
    cluster.kubectl("delete", f"model/{name}", "-n", ns, "--wait=true", "--timeout=60s")
    wait_for(
        f"the Deployments of {name} to go",
        lambda: not _items(cluster, ns, "deployments", "-l", f"shoal.dev/model={name}"),
        timeout=60,
    )
    with cluster.netns():

        def refused() -> list[int] | None:
            hit, codes = _endpoints_hit(url, served, n=4)
            return codes if not hit and all(c in (404, 503) for c in codes) else None

        codes = wait_for("the router to stop sending to the deleted Model", refused, timeout=30)
    assert set(codes) <= {404, 503}, codes
    # Shoal's own pods are still served; the deleted engines are not
    assert _served(cluster, ns, "app.kubernetes.io/component=router", 1), _runner_log(
        cluster, ns, router["metadata"]["name"]
    )
    wait_for(
        "the pod runner to stop the deleted engines",
        lambda: (
            not any(
                e["pod"].startswith(f"{ns}/{name}-") for e in cluster.pod_runner_state().values()
            )
        ),
        timeout=60,
    )
