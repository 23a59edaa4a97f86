"""Scale from zero and back, end to end on the local Kubernetes cluster.

A Model with ``minReplicas: 0`` sits at zero replicas: no engine serves its name. Inside the
cluster's network namespace run the operator, the Shoal router (Kubernetes discovery; it learns
that the Model exists from the API server), a real Prometheus scraping the router and the engine
pods, and ``shoal autoscaler``. A request through the router is held (not 404, not 503); the router
exports ``shoal_router_held_requests``; Prometheus records it; the autoscaler scales the pool
from 0 to 1; the operator makes the pod; the router discovers the engine and the held request is
served. With no more load, the autoscaler scales the pool back to zero.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from k8s_local_cluster import Cluster
from test_autoscaler_e2e import (  # noqa: F401 (stack is a fixture)
    PROM_PORT,
    Proc,
    _events,
    _metric,
    _replicas,
    model_manifest,
    prometheus_config,
    router_proc,
    stack,
)
from test_local_cluster import wait_for

NAME = "auto"  # the Model name that test_autoscaler_e2e's helpers look up
ROUTER_PORT = 18080


def zero_model() -> dict[str, Any]:
    """The autoscaler e2e's Model, at zero replicas and allowed to stay there."""
    return model_manifest(replicas=0, min_replicas=0, max_replicas=2, stable_window_s=10)


def add_router_scrape(config_path: Path) -> None:
    """Prometheus also scrapes the router, whose held-request gauge can wake a pool at zero."""
    config = yaml.safe_load(config_path.read_text())
    config["scrape_configs"].append(
        {"job_name": "shoal-router", "static_configs": [{"targets": [f"127.0.0.1:{ROUTER_PORT}"]}]}
    )
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def start_router(cluster: Cluster, ns: str, tmp_path: Path) -> Proc:
    config = {
        "host": "127.0.0.1",
        "port": ROUTER_PORT,
        "strategy": "least-request",
        "kubernetes": {
            "namespace": ns,
            "label_selector": f"shoal.dev/model={NAME}",
            "port_name": "http",
        },
        "hold": {"timeout_s": 300, "resync_s": 1},
        "scrape_interval_ms": 500,
        "log_level": "INFO",
    }
    return router_proc(cluster, tmp_path, config)


def _router_metrics(cluster: Cluster) -> str:
    with cluster.netns(), httpx.Client(timeout=5) as http:
        return http.get(f"http://127.0.0.1:{ROUTER_PORT}/metrics").text


def test_a_request_to_a_model_at_zero_is_held_scaled_up_served_and_scaled_back_to_zero(
    k8s_cluster: Cluster,
    k8s_namespace: str,
    stack: dict[str, Any],  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    cluster, ns = k8s_cluster, k8s_namespace
    # The stack's Prometheus scrapes engines only; this one also scrapes the router.
    config = prometheus_config(tmp_path / "engines.json", tmp_path)
    add_router_scrape(config)
    prom = Proc(
        cluster,
        tmp_path / "prometheus-with-router.log",
        "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb-router'}",
        f"--web.listen-address=127.0.0.1:{PROM_PORT}",
        "--log.level=warn",
    )
    router = start_router(cluster, ns, tmp_path)
    try:
        stack["autoscaler"]()
        cluster.apply(zero_model(), ns)
        wait_for(
            "the router up and knowing the Model",
            lambda: any(m["id"] == NAME for m in _models(cluster)),
            timeout=60,
        )
        assert _replicas(cluster, ns) == 0

        def ask() -> httpx.Response:
            with cluster.netns(), httpx.Client(timeout=300) as http:
                return http.post(
                    f"http://127.0.0.1:{ROUTER_PORT}/v1/completions",
                    json={"model": NAME, "prompt": "hello from zero", "max_tokens": 8},
                )

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(ask)
            wait_for(
                "the request held at the router",
                lambda: (
                    _metric(_router_metrics(cluster), "shoal_router_held_requests", model=NAME)
                    == 1.0
                ),
                timeout=30,
            )
            wait_for("a scale-up from zero", lambda: _replicas(cluster, ns) >= 1, timeout=120)
            resp = pending.result(timeout=300)
        waited = time.monotonic() - started
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 8
        (up,) = _events(cluster, ns, "ScaledUp")[:1]
        assert "pool h100: 0 -> " in up["message"], up
        text = _router_metrics(cluster)
        assert _metric(text, "shoal_router_hold_outcomes_total", model=NAME, outcome="served") == 1
        print(f"held request served after {waited:.1f}s (scale from zero)")

        # -- idle: back to zero ----------------------------------------------------------------
        wait_for("a scale-down to zero", lambda: _replicas(cluster, ns) == 0, timeout=180)
        down = _events(cluster, ns, "ScaledDown")
        assert down and "-> 0" in down[0]["message"], down
        wait_for(
            "no engine pods left",
            lambda: (
                not cluster.get_json("pods", "-n", ns, "-l", "shoal.dev/component=engine")["items"]
            ),
            timeout=120,
        )
        assert router.proc.poll() is None, router.text()[-3000:]
    finally:
        router.stop()
        prom.stop()
        print(f"--- router.log\n{router.text()[-3000:]}")


def _models(cluster: Cluster) -> list[dict[str, Any]]:
    with cluster.netns(), httpx.Client(timeout=5) as http:
        data = http.get(f"http://127.0.0.1:{ROUTER_PORT}/v1/models").json()["data"]
    return list(data)
