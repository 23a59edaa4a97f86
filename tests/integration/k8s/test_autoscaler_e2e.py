"""The autoscaler end to end on the local Kubernetes cluster, with a real Prometheus.

Inside the cluster's network namespace: the operator (a process, as in test_operator.py), a real
Prometheus scraping the engine pods (found from the API server, with their ``shoal.dev/model`` and
``shoal.dev/pool`` labels as ``model``/``pool``: see :class:`EngineTargets`) and evaluating the
shipped recording rules, and ``shoal autoscaler`` (the CLI, with the production ``kpa`` policy
from ``build_policy``). A Model with autoscaling on gets a load burst: the autoscaler raises the
pool's replicas, posts ScaledUp Events, and the new engines serve. The autoscaler is restarted
mid-scale-up: it resumes from the state annotation and scales nothing down while load lasts.
Prometheus is killed: the autoscaler holds (metric + Warning Event) even though the load stopped.
Prometheus comes back, the pool is idle: it scales down to minReplicas.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from k8s_local_cluster import LOCAL_CLUSTER, REPO, Cluster
from test_local_cluster import wait_for

MODEL_CRD = REPO / "charts" / "shoal" / "crds" / "models.shoal.dev.yaml"
RULES = REPO / "deploy" / "prometheus" / "autoscaler-rules.yaml"
PYTHON = REPO / ".venv" / "bin" / "python"
SHOAL = REPO / ".venv" / "bin" / "shoal"
PROM_PORT = 19090
METRICS_PORT = 19191
NAME = "auto"


class Proc:
    """A process inside the cluster's network namespace (``deploy/local-cluster/exec``), with
    its log; stopped by PID."""

    def __init__(self, cluster: Cluster, log: Path, *argv: str) -> None:
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [str(LOCAL_CLUSTER / "exec"), *argv],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=cluster.env,
            cwd=str(log.parent),  # never the repo root: its operator/ shadows the stdlib
            start_new_session=True,
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            # exec runs the command under nsenter; signal the whole group it leads
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if not self._out.closed:
            self._out.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def router_proc(cluster: Cluster, tmp_path: Path, config: dict[str, Any]) -> Proc:
    """``shoal router`` with ``config`` inside the cluster's network namespace (Kubernetes
    discovery reads the cluster's kubeconfig there)."""
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config))
    return Proc(cluster, tmp_path / "router.log", str(SHOAL), "router", "--config", str(path))


class EngineTargets:
    """Keeps a Prometheus ``file_sd`` file listing the namespace's engine pods, with the labels
    relabelling gives on a real cluster (deploy/prometheus/prometheus.yml). Debian's prometheus
    2.42 is built without ``kubernetes_sd_configs`` (the field is unknown), so the test does the
    pod discovery itself from the API server, once a second."""

    def __init__(self, cluster: Cluster, ns: str, path: Path) -> None:
        self.cluster, self.ns, self.path = cluster, ns, path
        self.stop_event = threading.Event()
        self.write()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def write(self) -> None:
        pods = self.cluster.get_json("pods", "-n", self.ns, "-l", "shoal.dev/component=engine")
        groups = []
        for pod in pods.get("items", []):
            meta, status = pod["metadata"], pod.get("status") or {}
            if meta.get("deletionTimestamp") or not status.get("podIP"):
                continue
            ports = [p for c in pod["spec"]["containers"] for p in c.get("ports") or []]
            port = next((p["containerPort"] for p in ports if p.get("name") == "http"), None)
            if port is None:
                continue
            labels = meta.get("labels") or {}
            groups.append(
                {
                    "targets": [f"{status['podIP']}:{port}"],
                    "labels": {
                        "namespace": self.ns,
                        "pod": meta["name"],
                        "model": labels.get("shoal.dev/model", ""),
                        "pool": labels.get("shoal.dev/pool", ""),
                    },
                }
            )
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.path)  # atomic: Prometheus never reads half a file

    def _run(self) -> None:
        while not self.stop_event.wait(1.0):
            try:
                self.write()
            except (AssertionError, ValueError, OSError, subprocess.SubprocessError):
                continue  # the next round retries

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)


def prometheus_config(targets: Path, workdir: Path) -> Path:
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    (workdir / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config = {
        # A loaded 2-core test machine answers /metrics slowly: a scrape that times out marks
        # the engine's series stale, and the autoscaler (rightly) holds.
        "global": {"scrape_interval": "3s", "evaluation_interval": "1s", "scrape_timeout": "3s"},
        "rule_files": [str(workdir / "rules.yaml")],
        "scrape_configs": [
            {
                "job_name": "shoal-engines",
                "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
            }
        ],
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def model_manifest(
    *, replicas: int = 1, min_replicas: int = 1, max_replicas: int = 3, stable_window_s: int = 12
) -> dict[str, Any]:
    return {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "Model",
        "metadata": {"name": NAME},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": NAME},
            "engine": {"kind": "vllm", "args": ["--max-num-seqs", "64"]},
            "maxModelLen": 4096,
            "pools": [
                {
                    "name": "h100",
                    "gpuType": "H100",
                    "replicas": replicas,
                    "minReplicas": min_replicas,
                    "maxReplicas": max_replicas,
                }
            ],
            # Knative-style windows, short enough for a test: 1 request in flight per replica.
            "autoscaling": {
                "enabled": True,
                "policy": "kpa",
                "targetConcurrency": 1,
                "stableWindowS": stable_window_s,
                "panicWindowS": 4,
                "scaleDownDelayS": 6,
            },
        },
    }


class Load:
    """Closed-loop clients in the cluster's namespace, spread over the Model's ready endpoints."""

    def __init__(self, cluster: Cluster, ns: str, clients: int = 5) -> None:
        self.cluster, self.ns = cluster, ns
        self.stop_event = threading.Event()
        self.by_endpoint: Counter[str] = Counter()
        self.errors: Counter[int] = Counter()
        self.endpoints: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def refresh(self) -> None:
        model = self.cluster.get_json("model", NAME, "-n", self.ns)
        self.endpoints = list((model.get("status") or {}).get("endpoints") or [])

    def _run(self, i: int) -> None:
        n = 0
        with self.cluster.netns(), httpx.Client(timeout=60) as http:
            while not self.stop_event.is_set():
                eps = self.endpoints
                if not eps:
                    time.sleep(0.2)
                    continue
                ep = eps[(i + n) % len(eps)]
                n += 1
                body = {"model": NAME, "prompt": f"{uuid.uuid4().hex} " * 8, "max_tokens": 512}
                try:
                    r = http.post(f"http://{ep}/v1/completions", json=body)
                except httpx.HTTPError:
                    self.errors[0] += 1
                    continue
                if r.status_code == 200:
                    self.by_endpoint[ep] += 1
                else:
                    self.errors[r.status_code] += 1

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=90)


@pytest.fixture
def stack(k8s_cluster: Cluster, k8s_namespace: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    cluster, ns = k8s_cluster, k8s_namespace
    cluster.kubectl("apply", "--server-side", "-f", str(MODEL_CRD))
    cluster.kubectl("wait", "--for=condition=Established", "crd/models.shoal.dev", "--timeout=60s")
    procs: list[Proc] = []
    targets = EngineTargets(cluster, ns, tmp_path / "engines.json")

    def start(kind: str, *argv: str) -> Proc:
        p = Proc(cluster, tmp_path / f"{kind}-{len(procs)}.log", *argv)
        procs.append(p)
        return p

    def prometheus() -> Proc:
        return start(
            "prometheus",
            "prometheus",
            f"--config.file={prometheus_config(targets.path, tmp_path)}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{PROM_PORT}",
            "--log.level=warn",
        )

    def autoscaler() -> Proc:
        return start(
            "autoscaler",
            str(SHOAL),
            "autoscaler",
            *("--prometheus-url", f"http://127.0.0.1:{PROM_PORT}"),
            *("--namespace", ns, "--interval-s", "2", "--kubeconfig", str(cluster.kubeconfig)),
            *("--metrics-port", str(METRICS_PORT), "--lease-name", "shoal-autoscaler"),
        )

    operator = start(
        "operator",
        str(PYTHON),
        *("-m", "shoal.operator.cli", "--namespace", ns, "--health-port", "0"),
        *("--resync-interval", "3", "--standalone"),
    )
    try:
        yield {"prometheus": prometheus, "autoscaler": autoscaler, "operator": operator}
    finally:
        targets.stop()
        for p in reversed(procs):
            p.stop()
        if os.environ.get("SHOAL_TEST_VERBOSE"):
            for p in procs:
                print(f"--- {p.log.name}\n{p.text()[-4000:]}")


def _replicas(cluster: Cluster, ns: str) -> int:
    model = cluster.get_json("model", NAME, "-n", ns)
    return int(model["spec"]["pools"][0].get("replicas", 1))


def _events(cluster: Cluster, ns: str, reason: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "events", "-n", ns, "-o", "json",
        "--field-selector", f"involvedObject.name={NAME},reason={reason}",
    )  # fmt: skip
    return list(json.loads(out).get("items", []))


def _metrics(cluster: Cluster) -> str:
    with cluster.netns(), httpx.Client(timeout=5) as http:
        return http.get(f"http://127.0.0.1:{METRICS_PORT}/metrics").text


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        wanted = all(f'{k}="{v}"' in line for k, v in labels.items())
        if line.startswith((name + "{", name + " ")) and wanted:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _ready(cluster: Cluster, ns: str, n: int) -> list[str] | None:
    model = cluster.get_json("model", NAME, "-n", ns)
    st = model.get("status") or {}
    eps = list(st.get("endpoints") or [])
    ready = sum(int(p.get("readyReplicas", 0)) for p in st.get("pools") or [])
    return eps if len(eps) >= n and ready >= n else None


def test_autoscaler_scales_a_model_on_load_and_holds_without_data(
    k8s_cluster: Cluster, k8s_namespace: str, stack: dict[str, Any]
) -> None:
    cluster, ns = k8s_cluster, k8s_namespace
    prom = stack["prometheus"]()
    auto = stack["autoscaler"]()
    cluster.apply(model_manifest(), ns)
    wait_for("one ready engine", lambda: _ready(cluster, ns, 1), timeout=120)

    # -- a burst: 5 clients against 1 in flight per replica -> the pool grows -------------------
    load = Load(cluster, ns)
    load.refresh()
    load.start()
    try:
        wait_for("a scale-up", lambda: _replicas(cluster, ns) > 1, timeout=120)
        (up,) = _events(cluster, ns, "ScaledUp")[:1]
        assert "pool h100: 1 -> " in up["message"] and "policy kpa" in up["message"], up
        assert up["source"]["component"] == "shoal-autoscaler"
        model = cluster.get_json("model", NAME, "-n", ns)
        state = json.loads(model["metadata"]["annotations"]["shoal.dev/autoscaler-state"])
        assert state["pools"]["h100"]["policy"] == "kpa"
        assert state["pools"]["h100"]["replicas"] == _replicas(cluster, ns)

        # -- restart mid-scale-up: the new process resumes, nothing scales down under load ----
        scaled = _replicas(cluster, ns)
        auto.stop()
        auto = stack["autoscaler"]()
        wait_for(
            "the restarted autoscaler leading",
            lambda: _metric(_metrics(cluster), "shoal_autoscaler_leader") == 1.0,
            timeout=60,
        )
        seen = []
        deadline = time.monotonic() + 16  # several ticks of the new leader
        while time.monotonic() < deadline:
            seen.append(_replicas(cluster, ns))
            load.refresh()
            time.sleep(1)
        assert min(seen) >= scaled, f"scaled down after restart: {scaled} -> {seen}"
        assert not _events(cluster, ns, "ScaledDown")

        # -- the new replicas serve --------------------------------------------------------------
        eps = wait_for("the new engines ready", lambda: _ready(cluster, ns, 2), timeout=120)
        load.refresh()
        wait_for(
            "requests served by a second engine",
            lambda: len([e for e in eps if load.by_endpoint[e] > 0]) >= 2,
            timeout=60,
        )

        # -- Prometheus dies, then the load stops: the autoscaler must not scale down ----------
        held_at = _replicas(cluster, ns)
        prom.stop()
    finally:
        load.stop()
    text = wait_for(
        "a data-missing hold",
        lambda: (
            t
            if _metric(t := _metrics(cluster), "shoal_autoscaler_data_missing_holds_total") >= 3
            else None
        ),
        timeout=60,
    )
    assert _metric(text, "shoal_autoscaler_errors_total", stage="prometheus") > 0
    assert _metric(text, "shoal_autoscaler_decision_reason", reason="hold-prometheus-unavailable")
    assert _replicas(cluster, ns) == held_at
    (held,) = _events(cluster, ns, "AutoscalingHeld")[:1]
    assert held["type"] == "Warning"
    assert not _events(cluster, ns, "ScaledDown")

    # -- Prometheus is back, the pool is idle: down to minReplicas -------------------------------
    stack["prometheus"]()
    wait_for("a scale-down to minReplicas", lambda: _replicas(cluster, ns) == 1, timeout=180)
    down = _events(cluster, ns, "ScaledDown")
    assert down and "policy kpa" in down[0]["message"]
    assert _events(cluster, ns, "AutoscalingResumed")
    assert sum(load.by_endpoint.values()) > 0
    wait_for("one engine left", lambda: _ready(cluster, ns, 1) and not _ready(cluster, ns, 2), 120)
    assert auto.proc.poll() is None, auto.text()[-3000:]
