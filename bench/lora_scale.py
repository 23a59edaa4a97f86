"""LoRA at scale: 1,000 LoraAdapters on a 16-replica Model, on the local Kubernetes cluster.

Starts the local cluster (``deploy/local-cluster/up`` in its own state directory; the fake nodes
in ``deploy/local-cluster/nodes.yaml`` have 4 × 8 H100, room for the 16 one-GPU engine pods, which
the pod runner serves with ``shoal sim``), runs the operator (``shoal.operator.cli``, standalone,
default resync intervals) in the cluster's network namespace, applies a Model with 16 replicas
(``lora.maxLoras`` 128) and, once its 16 engines answer, 1,000 LoraAdapters (replicas 2,
``file://`` sources: directories on this host, which the operator and the simulated engines
share) in one ``kubectl apply``. It then measures:

* the time from the apply until every adapter is loaded on exactly 2 engines, as the engines'
  own ``/v1/models`` say (polled every second), with the time to 25/50/75% on the way;
* the time until every LoraAdapter's status agrees (phase Ready, ``loadedPods`` = the engines'
  truth);
* loads/s (2,000 loads over the convergence time);
* ``kubectl get loraadapters`` with 1,000 objects (table and ``-o json``): median [range] of
  several runs;
* the operator's own metrics (reconciles, their duration, engine calls) and, with
  ``--profile-s``, a py-spy profile of the operator while it converges (where the time goes).

Writes the ``lora-scale`` section of docs/benchmarks.md. Needs root (network namespace) and the
cluster's binaries (``deploy/local-cluster/build``).

    python bench/lora_scale.py                        # full run (~3-5 min)
    python bench/lora_scale.py --adapters 200 --pods 8 --no-write
"""

# ruff: noqa: E501  (report prose and table rows read better unwrapped)
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration" / "k8s"))

from k8s_local_cluster import LOCAL_CLUSTER, REPO, Cluster
from report import command_line, machine_facts, update_section

PYTHON = REPO / ".venv" / "bin" / "python"
PY_SPY = REPO / ".venv" / "bin" / "py-spy"
CRDS = [
    REPO / "charts" / "shoal" / "crds" / "models.shoal.dev.yaml",
    REPO / "charts" / "shoal" / "crds" / "loraadapters.shoal.dev.yaml",
    REPO / "operator" / "crds" / "kopf-peering.yaml",
]
MODEL = "llama"
PROFILE_RATE_HZ = 50
NAMESPACE = "lora-scale"


# -- the cluster and the operator ------------------------------------------------------------------


def cluster_up(state: Path) -> tuple[Cluster, float]:
    env = {**os.environ, "SHOAL_CLUSTER_DIR": str(state)}
    started = time.monotonic()
    with open(state.parent / f"{state.name}-up.log", "w") as out:
        up = subprocess.run(
            [str(LOCAL_CLUSTER / "up")], stdout=out, stderr=subprocess.STDOUT, env=env,
            cwd=str(state.parent), timeout=3300, check=False,
        )  # fmt: skip
    if up.returncode != 0:
        raise RuntimeError(f"deploy/local-cluster/up exited {up.returncode}; see {out.name}")
    holder = int((state / "pids" / "netns-holder").read_text())
    return Cluster(state, state / "kubeconfig", holder, env), time.monotonic() - started


def cluster_down(cluster: Cluster) -> None:
    subprocess.run(
        [str(LOCAL_CLUSTER / "down")],
        env=cluster.env,
        capture_output=True,
        timeout=120,
        check=False,
    )


def start_operator(cluster: Cluster, work: Path, metrics_port: int) -> subprocess.Popen[bytes]:
    argv = [
        str(LOCAL_CLUSTER / "exec"), str(PYTHON), "-m", "shoal.operator.cli",
        "--namespace", NAMESPACE, "--standalone", "--health-port", "0",
        "--metrics-port", str(metrics_port), "--lora-cache-dir", str(work / "lora-cache"),
    ]  # fmt: skip
    log = open(work / "operator.log", "ab")  # noqa: SIM115 (the process owns it until the end)
    # cwd outside the repository: its operator/ folder would shadow the stdlib module
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=cluster.env, cwd=work)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# -- manifests ---------------------------------------------------------------------------------------


def model_manifest(replicas: int, max_loras: int) -> dict[str, Any]:
    return {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "Model",
        "metadata": {"name": MODEL},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": MODEL},
            "engine": {"kind": "vllm"},
            "maxModelLen": 4096,
            "pools": [
                {"name": "h100", "gpuType": "H100", "replicas": replicas, "maxReplicas": replicas}
            ],
            "lora": {"enabled": True, "maxLoras": max_loras, "maxLoraRank": 16},
        },
    }


def adapter_manifest(name: str, source: str, replicas: int) -> str:
    return json.dumps(
        {
            "apiVersion": "shoal.dev/v1alpha1",
            "kind": "LoraAdapter",
            "metadata": {"name": name},
            "spec": {"baseModel": MODEL, "source": source, "replicas": replicas, "rank": 8},
        }
    )


# -- observing ---------------------------------------------------------------------------------------


def engine_pods(cluster: Cluster) -> dict[str, str]:
    """Running engine pod name -> http://ip:port."""
    pods = cluster.get_json(
        "pods", "-n", NAMESPACE, "-l", f"shoal.dev/model={MODEL},shoal.dev/component=engine"
    )
    return {
        p["metadata"]["name"]: f"http://{p['status']['podIP']}:8000"
        for p in pods["items"]
        if p["status"].get("podIP") and not p["metadata"].get("deletionTimestamp")
    }


def engines_truth(http: httpx.Client, pods: dict[str, str]) -> dict[str, set[str]] | None:
    """Adapters each engine lists in /v1/models; None while any engine does not answer."""
    out: dict[str, set[str]] = {}
    for name, url in pods.items():
        try:
            cards = http.get(f"{url}/v1/models").json()["data"]
        except (httpx.HTTPError, ValueError, KeyError):
            return None
        out[name] = {c["id"] for c in cards if c.get("parent")}
    return out


def wait_engines_serving(cluster: Cluster, replicas: int, timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    with cluster.netns(), httpx.Client(timeout=2) as http:
        while time.monotonic() < deadline:
            pods = engine_pods(cluster)
            if len(pods) == replicas and engines_truth(http, pods) is not None:
                return pods
            time.sleep(1)
    raise RuntimeError(f"{replicas} engine pods not serving after {timeout_s}s")


def holders(truth: dict[str, set[str]]) -> dict[str, int]:
    count: dict[str, int] = {}
    for loaded in truth.values():
        for a in loaded:
            count[a] = count.get(a, 0) + 1
    return count


def status_agrees(
    cluster: Cluster, names: list[str], truth: dict[str, set[str]], replicas: int
) -> bool:
    objs = {
        a["metadata"]["name"]: a.get("status") or {}
        for a in cluster.get_json("loraadapters", "-n", NAMESPACE)["items"]
    }
    for n in names:
        st = objs.get(n, {})
        expect = {p for p, loaded in truth.items() if n in loaded}
        if st.get("phase") != "Ready" or st.get("loadedReplicas") != replicas:
            return False
        if set(st.get("loadedPods") or []) != expect:
            return False
    return True


def scrape(http: httpx.Client, port: int) -> dict[str, float]:
    """The operator's shoal_operator_lora_* samples, name{labels} -> value."""
    out: dict[str, float] = {}
    for line in http.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        if line.startswith("shoal_operator_lora_") and " " in line:
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def metric_sum(samples: dict[str, float], prefix: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        v for k, v in samples.items() if k.split("{")[0] == prefix and all(w in k for w in want)
    )


def timed(cluster: Cluster, runs: int, *argv: str) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.monotonic()
        cluster.run(*argv, timeout=300)
        out.append(time.monotonic() - t)
    return out


def profile(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy on the operator for ``seconds`` (raw folded stacks), in the background."""
    if not PY_SPY.exists():
        return None
    return subprocess.Popen(
        [str(PY_SPY), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(PROFILE_RATE_HZ),
         "--format", "raw", "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip


# Areas of the operator's work, by a function on the stack: (label, function, file).
AREAS = (
    ("engine load calls (`EngineLoraClient.load`)", "EngineLoraClient.load", "lora_loader.py"),
    ("… of which httpx's connection-pool scan (`_assign_requests_to_connections`)",
     "AsyncConnectionPool._assign_requests_to_connections", "connection_pool.py"),
    ("asking engines what is loaded (`_observe`)", "_observe.<locals>.one", "lora_handlers.py"),
    ("status writes (`reconcile_model_adapters.write`)", "reconcile_model_adapters.<locals>.write",
     "lora_handlers.py"),
    ("placement (`place`)", "place", "lora_placement.py"),
    ("kopf's per-object event handling (`process_resource_event`)", "process_resource_event",
     "processing.py"),
    ("… of which kopf's own patches (finalizer, progress annotations)", "patch_obj", "patching.py"),
    ("JSON decoding (`json.loads`)", "loads", "__init__.py"),
)  # fmt: skip


def top_frames(folded: Path) -> tuple[int, list[tuple[str, float]]]:
    """Samples, and the share of them whose stack contains each function (file, no line)."""
    total = 0
    inclusive: dict[str, int] = {}
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        total += c
        seen = set()
        for frame in stack.split(";"):
            name, _, where = frame.partition(" (")
            key = f"{name.strip()} ({where.split(':')[0].split('/')[-1]})" if where else name
            if key not in seen:
                seen.add(key)
                inclusive[key] = inclusive.get(key, 0) + c
    if not total:
        return 0, []
    ranked = sorted(((k, v / total) for k, v in inclusive.items()), key=lambda kv: -kv[1])
    return total, ranked


# -- the run ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    res: dict[str, Any] = {}
    state = work / "cluster"
    state.mkdir(parents=True)
    cluster, res["up_s"] = cluster_up(state)
    print(f"cluster up in {res['up_s']:.1f}s ({state})", file=sys.stderr)
    op: subprocess.Popen[bytes] | None = None
    try:
        for path in CRDS:
            cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
        for crd in ("models.shoal.dev", "loraadapters.shoal.dev", "kopfpeerings.kopf.dev"):
            cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        cluster.kubectl("create", "namespace", NAMESPACE)
        deadline = time.monotonic() + 30
        while not cluster.kubectl("get", "serviceaccount", "default", "-n", NAMESPACE, check=False):
            if time.monotonic() > deadline:
                raise RuntimeError("no default service account")
            time.sleep(0.2)
        metrics_port = 19090
        op = start_operator(cluster, work, metrics_port)
        cluster.apply(model_manifest(args.pods, args.max_loras), NAMESPACE)
        t = time.monotonic()
        pods = wait_engines_serving(cluster, args.pods, 300)
        res["engines_s"] = time.monotonic() - t
        print(f"{len(pods)} engines serving after {res['engines_s']:.1f}s", file=sys.stderr)

        names = [f"adapter-{i:04d}" for i in range(args.adapters)]
        for n in names:
            (work / "adapters" / n).mkdir(parents=True)
            (work / "adapters" / n / "adapter_config.json").write_text('{"r": 8}')
        docs = "\n---\n".join(
            adapter_manifest(n, f"file://{work}/adapters/{n}", args.replicas) for n in names
        )
        spy = profile(op.pid, args.profile_s, work / "operator.folded") if args.profile_s else None

        # apply in a thread: the operator starts on the first adapters while the rest arrive
        t0 = time.monotonic()
        applied: dict[str, float] = {}

        def apply() -> None:
            cluster.run("kubectl", "apply", "-n", NAMESPACE, "-f", "-", input=docs, timeout=900)
            applied["s"] = time.monotonic() - t0

        applier = threading.Thread(target=apply)
        applier.start()
        marks: dict[int, float] = {}
        truth: dict[str, set[str]] = {}
        with cluster.netns(), httpx.Client(timeout=10) as http:
            while True:
                now = time.monotonic() - t0
                if now > args.timeout_s:
                    res["timeout"] = True
                    break
                got = engines_truth(http, pods)
                if got is not None:
                    truth = got
                    count = holders(truth)
                    done = sum(1 for n in names if count.get(n) == args.replicas)
                    for q in (25, 50, 75, 100):
                        if q not in marks and done * 100 >= q * len(names):
                            marks[q] = now
                            print(
                                f"{q}% of adapters on {args.replicas} engines at {now:.1f}s",
                                file=sys.stderr,
                            )
                    if 100 in marks and sum(count.values()) == args.replicas * len(names):
                        break
                time.sleep(1)
            res["converged_s"] = marks.get(100)
            res["marks"] = marks
            applier.join()
            res["apply_s"] = applied.get("s")
            if res.get("converged_s"):
                while time.monotonic() - t0 < args.timeout_s:
                    if status_agrees(cluster, names, truth, args.replicas):
                        res["status_s"] = time.monotonic() - t0
                        break
                    time.sleep(2)
            res["max_per_engine"] = max((len(v) for v in truth.values()), default=0)
            res["loaded_pairs"] = sum(len(v) for v in truth.values())
            res["metrics"] = scrape(http, metrics_port)
        if spy is not None:
            spy.wait(timeout=args.profile_s + 60)
            folded = work / "operator.folded"
            res["samples"], res["profile"] = top_frames(folded) if folded.exists() else (0, [])
        res["get_table"] = timed(
            cluster, args.get_runs, "kubectl", "get", "loraadapters", "-n", NAMESPACE
        )
        res["get_json"] = timed(
            cluster, args.get_runs, "kubectl", "get", "loraadapters", "-n", NAMESPACE, "-o", "json"
        )
        res["operator_alive"] = op.poll() is None
        return res
    finally:
        if op is not None:
            stop(op)
        if not args.keep:
            cluster_down(cluster)


def _med(xs: list[float], fmt: str = "{:.2f}") -> str:
    xs = sorted(xs)
    return f"{fmt.format(statistics.median(xs))} [{fmt.format(xs[0])}–{fmt.format(xs[-1])}]"


def render(args: argparse.Namespace, res: dict[str, Any], work: Path) -> str:
    loads = args.adapters * args.replicas
    conv = res.get("converged_s")
    m = res.get("metrics", {})
    reconciles = metric_sum(m, "shoal_operator_lora_reconciles_total")
    dur_sum = metric_sum(m, "shoal_operator_lora_reconcile_duration_seconds_sum")
    dur_count = metric_sum(m, "shoal_operator_lora_reconcile_duration_seconds_count")
    load_calls = metric_sum(m, "shoal_operator_lora_engine_calls_total", operation="load")
    marks = res.get("marks", {})
    lines = [
        "## LoRA at scale (local Kubernetes cluster)",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine_facts()}",
        "",
        f"The local cluster (`deploy/local-cluster`, real kube-apiserver/etcd, kwok nodes; up in "
        f"{res['up_s']:.0f} s), the operator as a process in its namespace (standalone, default "
        f"resync intervals), a Model with {args.pods} replicas (`lora.maxLoras` {args.max_loras}; "
        f"{args.pods} `shoal sim` engines served by the pod runner, all serving "
        f"{res['engines_s']:.0f} s after the apply), then {args.adapters:,} LoraAdapters "
        f"(replicas {args.replicas}, `file://` sources) in one `kubectl apply`. Times are from the "
        'start of that apply. "Loaded" is what the engines\' `/v1/models` list (polled every '
        "second), not what the status says; the status is checked separately against it.",
        "",
        "| what | result |",
        "| --- | ---: |",
        f"| `kubectl apply` of {args.adapters:,} LoraAdapters | {res['apply_s']:.1f} s |"
        if res.get("apply_s")
        else "| `kubectl apply` | did not finish |",
    ]
    for q in (25, 50, 75):
        if q in marks:
            lines.append(
                f"| {q}% of adapters on {args.replicas} engines (engines' `/v1/models`) | {marks[q]:.1f} s |"
            )
    if conv:
        lines += [
            f"| **every adapter on exactly {args.replicas} engines** ({res['loaded_pairs']:,} loads, at most {res['max_per_engine']} per engine) | **{conv:.1f} s** |",
            f"| loads/s over that time | **{loads / conv:.0f}** |",
        ]
    else:
        lines.append(
            f"| every adapter on {args.replicas} engines | not within {args.timeout_s:.0f} s |"
        )
    if res.get("status_s"):
        lines.append(
            f"| every status Ready with `loadedPods` = the engines' truth | {res['status_s']:.1f} s |"
        )
    elif conv:
        lines.append(
            f"| every status agreeing with the engines | not within {args.timeout_s:.0f} s |"
        )
    lines += [
        f"| `kubectl get loraadapters` ({args.adapters:,} objects, table), {args.get_runs} runs | {_med(res['get_table'])} s |",
        f"| `kubectl get loraadapters -o json`, {args.get_runs} runs | {_med(res['get_json'])} s |",
        f"| operator reconciles of the Model's adapters (metric) | {reconciles:.0f}, mean {dur_sum / dur_count:.2f} s each |"
        if dur_count
        else "| operator reconciles | (no metrics scraped) |",
        f"| engine load calls (metric, all results) | {load_calls:.0f} |",
        f"| operator still running at the end | {'yes' if res.get('operator_alive') else 'NO'} |",
    ]
    prof = res.get("profile") or []
    if prof:
        busy = res["samples"] / PROFILE_RATE_HZ
        lines += [
            "",
            f"Where the operator's time goes: py-spy for the first {args.profile_s} s after the apply "
            f"sampled it busy (not idle) for {busy:.0f} s of CPU, i.e. {busy / args.profile_s:.0%} "
            "of one core. Share of those samples whose stack contains the function (areas overlap "
            "where one calls the other):",
            "",
            "| area (a function on the stack) | share |",
            "| --- | ---: |",
        ]
        shares = dict(prof)
        lines += [
            f"| {label} | {shares.get(f'{fn} ({file})', 0.0):.0%} |" for label, fn, file in AREAS
        ]
    lines += [
        "",
        f"(`kubectl` runs through `deploy/local-cluster/exec`, i.e. `nsenter`; logs in `{work}`.)",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--pods", type=int, default=16, help="Model replicas (engine pods)")
    ap.add_argument("--max-loras", type=int, default=128)
    ap.add_argument("--replicas", type=int, default=2, help="each LoraAdapter's replicas")
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument("--get-runs", type=int, default=7)
    ap.add_argument(
        "--profile-s", type=int, default=0, help="py-spy the operator this long (0: no)"
    )
    ap.add_argument("--keep", action="store_true", help="leave the cluster running")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.adapters * args.replicas > args.pods * args.max_loras:
        ap.error("adapters × replicas must fit in pods × max-loras")
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-lora-scale-"))
    res = run(args, work)
    body = render(args, res, work)
    print(body)
    if not args.no_write:
        update_section("lora-scale", body)
    return 0 if res.get("converged_s") and res.get("status_s") else 1


if __name__ == "__main__":
    sys.exit(main())
