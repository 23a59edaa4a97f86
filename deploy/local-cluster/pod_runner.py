#!/usr/bin/env python3
"""Pod runner: stands in for kubelet on the local cluster's fake (kwok) GPU nodes.

kwok marks pods Running and gives them IPs from their node's podCIDR, but runs nothing. This runner
watches pods and, for each Running pod that a handler claims, starts a local process bound to the
pod's IP, restarts it with back-off if it exits (like ``restartPolicy: Always``), and stops it when
the pod goes away (deleted, terminating, or no longer Running).

Handlers (the extension point):

* :class:`EngineHandler` claims pods labelled ``shoal.dev/component=engine``: it reads the engine
  container's command and args as an operator writes them for vLLM (``vllm serve MODEL ...``,
  ``python -m vllm.entrypoints.openai.api_server ...``, the vLLM image's entrypoint with args only,
  SGLang's ``python -m sglang.launch_server ...``, or ``shoal sim ...``) and runs ``shoal sim`` with
  those arguments on the pod's IP and port, with the GPU type from the node's
  ``nvidia.com/gpu.product`` label.
* Shoal's own pods (operator, router, autoscaler from the Helm chart) are the next handler: add a
  class with ``matches``/``launch`` that runs the container's command/args/env as a process at the
  pod IP with a kubeconfig holding a token requested for the pod's service account
  (``CoreV1Api.create_namespaced_service_account_token``), and append it to ``HANDLERS``.

Runs inside the cluster's network namespace (``deploy/local-cluster/up`` starts it; or
``deploy/local-cluster/exec python deploy/local-cluster/pod_runner.py``). Logs: one file per pod
under ``<state-dir>/logs/pods/``; PIDs of running processes under ``<state-dir>/pids/sims/`` (so
``down`` can reap stragglers); a summary of what runs in ``<state-dir>/pod-runner.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger("pod-runner")

REPO = Path(__file__).resolve().parents[2]
ENGINE_LABEL = "shoal.dev/component"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"

Pod = dict[str, Any]  # a pod in API (camelCase) form
Node = dict[str, Any]


@dataclass
class Launch:
    """What to run for one pod."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    describe: str = ""


class Handler(Protocol):
    name: str

    def matches(self, pod: Pod) -> bool: ...

    def launch(self, pod: Pod, node: Node | None) -> Launch: ...


# --------------------------------------------------------------------------------------------------
# Reading a container spec


def _pick_container(pod: Pod, preferred: tuple[str, ...]) -> dict[str, Any]:
    containers = pod.get("spec", {}).get("containers") or []
    if not containers:
        raise ValueError("pod has no containers")
    for c in containers:
        if c.get("name") in preferred:
            return dict(c)
    for c in containers:
        if c.get("ports"):
            return dict(c)
    return dict(containers[0])


def container_env(pod: Pod, container: dict[str, Any]) -> dict[str, str]:
    """Literal env values and the common downward-API fields (others are skipped)."""
    fields = {
        "status.podIP": pod.get("status", {}).get("podIP", ""),
        "status.hostIP": pod.get("status", {}).get("hostIP", ""),
        "metadata.name": pod["metadata"]["name"],
        "metadata.namespace": pod["metadata"]["namespace"],
        "metadata.uid": pod["metadata"]["uid"],
        "spec.nodeName": pod.get("spec", {}).get("nodeName", ""),
        "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName", ""),
    }
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
        else:
            ref = (item.get("valueFrom") or {}).get("fieldRef") or {}
            if ref.get("fieldPath") in fields:
                env[item["name"]] = str(fields[ref["fieldPath"]])
    return env


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in command/args/env (``$$`` escapes; unknown stays)."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, text)


# --------------------------------------------------------------------------------------------------
# Engine pods -> shoal sim

_SGLANG_FLAGS = {
    "--model-path": "--model",
    "--tp": "--tensor-parallel-size",
    "--tp-size": "--tensor-parallel-size",
    "--context-length": "--max-model-len",
    "--max-running-requests": "--max-num-seqs",
    "--mem-fraction-static": "--gpu-memory-utilization",
    "--max-loras-per-batch": "--max-loras",
}


def engine_args(tokens: list[str]) -> tuple[str, list[str]]:
    """(engine kind, engine arguments) from a container's command + args."""
    toks = list(tokens)
    # shell form: sh -c "vllm serve ..."
    if len(toks) >= 3 and os.path.basename(toks[0]) in ("sh", "bash", "dash") and toks[1] == "-c":
        script = toks[2].split("&&")[-1].strip()
        script = re.sub(r"^exec\s+", "", script)
        return engine_args(shlex.split(script))
    for i, t in enumerate(toks):
        base = os.path.basename(t)
        if base == "vllm" and i + 1 < len(toks) and toks[i + 1] == "serve":
            return "vllm", toks[i + 2 :]
        if t in ("vllm.entrypoints.openai.api_server", "vllm.entrypoints.api_server"):
            return "vllm", toks[i + 1 :]
        if t == "sglang.launch_server" or (
            base == "sglang" and i + 1 < len(toks) and toks[i + 1] == "serve"
        ):
            rest = toks[i + 1 :] if t == "sglang.launch_server" else toks[i + 2 :]
            out: list[str] = []
            for a in rest:
                flag, eq, val = a.partition("=")
                flag = _SGLANG_FLAGS.get(flag, flag)
                out.append(f"{flag}={val}" if eq else flag)
            return "sglang", out
        if base == "shoal" and i + 1 < len(toks) and toks[i + 1] == "sim":
            return "sim", toks[i + 2 :]
    # an image entrypoint (the vLLM image's is `vllm serve`) with args only
    return "vllm", toks


def _flag_value(args: list[str], *names: str) -> str | None:
    """The last value of a flag (``--x v`` or ``--x=v``)."""
    value = None
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                value = args[i + 1]
            elif a.startswith(n + "="):
                value = a[len(n) + 1 :]
    return value


def _rebind_kv_events(args: list[str], ip: str) -> list[str]:
    """KV-event ZMQ endpoints that bind every address (tcp://*:P) bind the pod IP instead: all pods
    share one network namespace, so two engines binding *:5557 would collide."""
    out = list(args)
    for i, a in enumerate(out):
        raw = None
        if a == "--kv-events-config" and i + 1 < len(out):
            raw, idx, prefix = out[i + 1], i + 1, ""
        elif a.startswith("--kv-events-config="):
            raw, idx, prefix = a.split("=", 1)[1], i, "--kv-events-config="
        if raw is None:
            continue
        try:
            cfg = json.loads(raw)
        except ValueError:
            continue
        for key in ("endpoint", "replay_endpoint"):
            ep = cfg.get(key)
            if isinstance(ep, str):
                cfg[key] = re.sub(r"^tcp://(\*|0\.0\.0\.0|\[::\]):", f"tcp://{ip}:", ep)
        out[idx] = prefix + json.dumps(cfg)
    return out


def gpu_type(node: Node | None) -> str | None:
    """The simulator's GPU name for the node's ``nvidia.com/gpu.product`` label, if it knows it."""
    label = ((node or {}).get("metadata", {}).get("labels") or {}).get(GPU_PRODUCT_LABEL)
    if not label:
        return None
    try:
        from shoal.sim.catalog import get_gpu
    except ImportError:  # runner started with a python without shoal: let the sim decide
        return label
    try:
        return get_gpu(label).name
    except KeyError as exc:
        log.warning("node GPU %r: %s; the simulator uses its default", label, exc.args[0])
        return None


class EngineHandler:
    """``shoal.dev/component=engine`` pods: ``shoal sim`` with the pod's vLLM arguments."""

    name = "engine"

    def __init__(self, sim: list[str], extra: list[str] | None = None) -> None:
        self.sim = sim
        self.extra = extra or []

    def matches(self, pod: Pod) -> bool:
        labels = pod.get("metadata", {}).get("labels") or {}
        return labels.get(ENGINE_LABEL) == "engine"

    def launch(self, pod: Pod, node: Node | None) -> Launch:
        ip = pod["status"]["podIP"]
        c = _pick_container(pod, ("engine", "vllm", "sglang", "server", "sim"))
        env = container_env(pod, c)
        tokens = [expand(str(t), env) for t in (c.get("command") or []) + (c.get("args") or [])]
        kind, args = engine_args(tokens)
        port_s = _flag_value(args, "--port")
        if port_s is None:
            ports = c.get("ports") or []
            named = [p for p in ports if p.get("name") in ("http", "api", "openai")]
            port_s = str((named or ports or [{"containerPort": 8000}])[0]["containerPort"])
        args = _rebind_kv_events(args, ip)
        argv = [*self.sim, "sim", *args, "--host", ip, "--port", port_s]
        gpu = gpu_type(node)
        if gpu and _flag_value(args, "--gpu") is None:
            argv += ["--gpu", gpu]
        argv += self.extra
        return Launch(argv, env, f"{kind} engine on {ip}:{port_s} ({gpu or 'default GPU'})")


# --------------------------------------------------------------------------------------------------
# Supervision


@dataclass
class Managed:
    key: str
    pod: Pod
    launch: Launch
    log_path: Path
    pid_path: Path
    proc: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None
    stopping: bool = False
    restarts: int = 0
    started_at: float = 0.0


def _open_log(m: Managed) -> BinaryIO:
    out = open(m.log_path, "ab")  # noqa: SIM115 (closed by the caller's with-block)
    out.write(f"--- {time.strftime('%F %T')} {shlex.join(m.launch.argv)}\n".encode())
    out.flush()
    return out


class PodRunner:
    def __init__(
        self,
        handlers: list[Handler],
        state_dir: Path,
        label_selector: str = ENGINE_LABEL,
        resync_s: float = 30.0,
        stop_grace_s: float = 5.0,
    ) -> None:
        self.handlers = handlers
        self.state = state_dir
        self.selector = label_selector
        self.resync_s = resync_s
        self.grace = stop_grace_s
        self.pods: dict[str, Pod] = {}
        self.running: dict[str, Managed] = {}
        self.nodes: dict[str, Node] = {}
        (state_dir / "logs" / "pods").mkdir(parents=True, exist_ok=True)
        (state_dir / "pids" / "sims").mkdir(parents=True, exist_ok=True)
        self.api: client.CoreV1Api | None = None
        self.api_client: client.ApiClient | None = None

    # -- Kubernetes side --

    def _to_dict(self, obj: Any) -> dict[str, Any]:
        assert self.api_client is not None
        return dict(self.api_client.sanitize_for_serialization(obj))

    async def _node(self, name: str | None) -> Node | None:
        if not name:
            return None
        if name not in self.nodes:
            assert self.api is not None
            try:
                self.nodes[name] = self._to_dict(await self.api.read_node(name))
            except ApiException as exc:
                log.warning("cannot read node %s: %s", name, exc.reason)
                return None
        return self.nodes[name]

    async def run(self) -> None:
        self.api_client = client.ApiClient()
        self.api = client.CoreV1Api(self.api_client)
        try:
            await asyncio.gather(self._watch_loop(), self._resync_loop())
        finally:
            await self.stop_all()
            await self.api_client.close()

    async def _list(self) -> str:
        assert self.api is not None
        resp = await self.api.list_pod_for_all_namespaces(label_selector=self.selector)
        seen = {}
        for item in resp.items:
            pod = self._to_dict(item)
            seen[pod["metadata"]["uid"]] = pod
        for uid in set(self.pods) - set(seen):
            self.pods.pop(uid, None)
        self.pods.update(seen)
        for uid in set(self.pods) | set(self.running):
            await self.sync(uid)
        return str(resp.metadata.resource_version)

    async def _watch_loop(self) -> None:
        assert self.api is not None
        while True:
            try:
                rv = await self._list()
                w = watch.Watch()
                async with w.stream(
                    self.api.list_pod_for_all_namespaces,
                    label_selector=self.selector,
                    resource_version=rv,
                    timeout_seconds=300,
                    allow_watch_bookmarks=True,
                ) as stream:
                    async for event in stream:
                        kind, obj = event["type"], event["object"]
                        if kind == "ERROR" or kind == "BOOKMARK":
                            continue
                        pod = self._to_dict(obj)
                        uid = pod["metadata"]["uid"]
                        if kind == "DELETED":
                            self.pods.pop(uid, None)
                        else:
                            self.pods[uid] = pod
                        await self.sync(uid)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # 410 Gone, connection reset, API server restart: relist
                log.warning("watch interrupted (%s: %s); relisting", type(exc).__name__, exc)
                await asyncio.sleep(1.0)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resync_s)
            try:
                await self._list()
            except Exception as exc:
                log.warning("resync failed: %s", exc)

    # -- processes --

    def _handler(self, pod: Pod) -> Handler | None:
        return next((h for h in self.handlers if h.matches(pod)), None)

    @staticmethod
    def _wanted(pod: Pod | None) -> bool:
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return False
        status = pod.get("status") or {}
        return status.get("phase") == "Running" and bool(status.get("podIP"))

    async def sync(self, uid: str) -> None:
        pod = self.pods.get(uid)
        managed = self.running.get(uid)
        want = self._wanted(pod) and pod is not None and self._handler(pod) is not None
        if managed and (not want or managed.pod["status"]["podIP"] != pod["status"]["podIP"]):  # type: ignore[index]
            await self.stop(uid)
            managed = None
        if want and managed is None:
            assert pod is not None
            await self.start(uid, pod)
        self._write_summary()

    async def start(self, uid: str, pod: Pod) -> None:
        handler = self._handler(pod)
        assert handler is not None
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        node = await self._node(pod.get("spec", {}).get("nodeName"))
        try:
            launch = handler.launch(pod, node)
        except Exception as exc:
            log.error("%s/%s: cannot build a command: %s", ns, name, exc)
            return
        m = Managed(
            key=f"{ns}/{name}",
            pod=pod,
            launch=launch,
            log_path=self.state / "logs" / "pods" / f"{ns}_{name}.log",
            pid_path=self.state / "pids" / "sims" / uid,
        )
        self.running[uid] = m
        m.task = asyncio.create_task(self._supervise(m))
        log.info("%s: starting %s", m.key, launch.describe)

    async def _supervise(self, m: Managed) -> None:
        backoff = 1.0
        while not m.stopping:
            with _open_log(m) as out:
                try:
                    m.proc = await asyncio.create_subprocess_exec(
                        *m.launch.argv,
                        env={**os.environ, **m.launch.env},
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=out,
                        stderr=out,
                        cwd=str(self.state),  # never the repo root: its folders shadow the stdlib
                        start_new_session=True,
                    )
                except OSError as exc:
                    log.error("%s: cannot start %s: %s", m.key, m.launch.argv[0], exc)
                    m.proc = None
            if m.proc is not None:
                m.started_at = time.monotonic()
                m.pid_path.write_text(str(m.proc.pid))
                self._write_summary()
                code = await m.proc.wait()
                m.pid_path.unlink(missing_ok=True)
                if m.stopping:
                    break
                ran = time.monotonic() - m.started_at
                log.warning("%s: exited with %s after %.1fs (log %s)", m.key, code, ran, m.log_path)
                if ran > 60:
                    backoff = 1.0
            m.restarts += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 60.0)

    async def stop(self, uid: str) -> None:
        m = self.running.pop(uid, None)
        if m is None:
            return
        m.stopping = True
        proc = m.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if m.task is not None:
            m.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await m.task
        m.pid_path.unlink(missing_ok=True)
        log.info("%s: stopped", m.key)
        self._write_summary()

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(uid) for uid in list(self.running)))

    def _write_summary(self) -> None:
        summary = {
            uid: {
                "pod": m.key,
                "podIP": m.pod["status"]["podIP"],
                "node": m.pod.get("spec", {}).get("nodeName"),
                "pid": m.proc.pid if m.proc is not None and m.proc.returncode is None else None,
                "restarts": m.restarts,
                "argv": m.launch.argv,
                "log": str(m.log_path),
            }
            for uid, m in self.running.items()
        }
        tmp = self.state / "pod-runner.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(self.state / "pod-runner.json")


def default_sim() -> str:
    venv = REPO / ".venv" / "bin" / "shoal"
    return str(venv) if venv.exists() else "shoal"


async def amain(a: argparse.Namespace) -> None:
    await config.load_kube_config(config_file=a.kubeconfig)
    sim = shlex.split(a.sim)
    handlers: list[Handler] = [EngineHandler(sim, shlex.split(a.sim_extra_args))]
    runner = PodRunner(handlers, Path(a.state_dir), a.label_selector, a.resync)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    log.info("pod runner: watching pods with %s (sim: %s)", a.label_selector, a.sim)
    try:
        await runner.run()
    except asyncio.CancelledError:
        log.info("pod runner: stopping")


def main() -> int:
    state = os.environ.get("SHOAL_CLUSTER_DIR", "/tmp/shoal-cluster")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--state-dir", default=state)
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG", f"{state}/kubeconfig"))
    p.add_argument(
        "--sim",
        default=os.environ.get("SHOAL_SIM", default_sim()),
        help="engine simulator command (default the repo's .venv/bin/shoal)",
    )
    p.add_argument(
        "--sim-extra-args",
        default=os.environ.get("SHOAL_SIM_EXTRA_ARGS", ""),
        help="appended to every `shoal sim` command line (shell-quoted)",
    )
    p.add_argument(
        "--label-selector",
        default=ENGINE_LABEL,
        help="pods to watch (handlers then decide which to run)",
    )
    p.add_argument("--resync", type=float, default=30.0, help="seconds between full relists")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args()
    logging.basicConfig(level=a.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(amain(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
