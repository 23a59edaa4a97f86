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
* :class:`ShoalPodHandler` claims Shoal's own pods from the Helm chart (``shoal.dev/component``, or
  ``app.kubernetes.io/component`` of an ``app.kubernetes.io/part-of=shoal`` pod, in
  operator/router/autoscaler): it runs the container's command and args (the image's entry point,
  ``shoal``, is the repo's ``.venv/bin/shoal``) with the container's env (downward-API fields
  expanded), the pod's configMap, secret and emptyDir volumes materialised in a per-pod directory
  (mount paths in args/env rewritten to it), and a kubeconfig holding a token requested with the
  TokenRequest API for the pod's service account (``create_namespaced_service_account_token``,
  bound to the pod), so the chart's RBAC applies. The process does not inherit the runner's admin
  kubeconfig. Wildcard binds (``0.0.0.0``) are confined to the pod IP (``--host`` rewritten; a
  ``sitecustomize`` shim for the rest, e.g. kopf's liveness endpoint), since all pods share one
  network namespace.

A handler's ``launch`` may be a coroutine (the Shoal pod handler calls the API server).

Runs inside the cluster's network namespace (``deploy/local-cluster/up`` starts it; or
``deploy/local-cluster/exec python deploy/local-cluster/pod_runner.py``). Logs: one file per pod
under ``<state-dir>/logs/pods/``; PIDs of running processes under ``<state-dir>/pids/sims/`` (so
``down`` can reap stragglers); a summary of what runs in ``<state-dir>/pod-runner.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import inspect
import json
import logging
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Awaitable
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
    # Shoal's own pods: run with only ``env`` (plus PATH/HOME/locale), not the runner's environment
    # (which holds the admin KUBECONFIG), in their own working directory.
    isolated_env: bool = False
    cwd: str | None = None


class Handler(Protocol):
    name: str

    def matches(self, pod: Pod) -> bool: ...

    def launch(self, pod: Pod, node: Node | None) -> Launch | Awaitable[Launch]: ...


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
# Shoal's own pods (operator, router, autoscaler) -> the container's command as a process

SHOAL_COMPONENTS = ("operator", "router", "autoscaler")
_BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM")
TOKEN_EXPIRATION_S = 24 * 3600  # the API server caps it at its maximum

# Imported at start-up by every Python process of a Shoal pod (PYTHONPATH): a bind to the wildcard
# address (0.0.0.0 / "") binds the pod IP instead. Pods share one network namespace here, so two
# replicas binding 0.0.0.0:8081 would collide; in a real pod each has its own.
SITECUSTOMIZE = """\
import os as _os
import socket as _socket

_ip = _os.environ.get("SHOAL_POD_BIND_IP")
if _ip:
    _bind = _socket.socket.bind

    def _pod_bind(self, address):
        if (
            self.family == _socket.AF_INET
            and isinstance(address, tuple)
            and address[0] in ("", "0.0.0.0")
        ):
            address = (_ip, *address[1:])
        return _bind(self, address)

    _socket.socket.bind = _pod_bind
"""

_WILDCARD = ("0.0.0.0", "", "::", "[::]")


def _component(pod: Pod) -> str | None:
    labels = pod.get("metadata", {}).get("labels") or {}
    comp = labels.get(ENGINE_LABEL)
    if comp in SHOAL_COMPONENTS:
        return str(comp)
    comp = labels.get("app.kubernetes.io/component")
    shoal = labels.get("app.kubernetes.io/part-of") == "shoal" or (
        labels.get("app.kubernetes.io/name") == "shoal"
    )
    return str(comp) if shoal and comp in SHOAL_COMPONENTS else None


def _rewrite_paths(text: str, mounts: list[tuple[str, str]]) -> str:
    """Replace container mount paths with their local directories, in one pass (a local directory
    may itself lie under a mount path, e.g. ``/tmp``); the longest mount path wins."""
    if not mounts:
        return text
    local = {m.rstrip("/") or "/": d for m, d in mounts}
    alts = "|".join(re.escape(m) for m in sorted(local, key=len, reverse=True))
    pat = r"(?<![\w./-])(" + alts + r")(?=/|$|[^\w.-])"
    return re.sub(pat, lambda m: local[m.group(1)], text)


def _rebind_host(args: list[str], ip: str) -> tuple[list[str], bool]:
    """``--host 0.0.0.0`` / ``--host=0.0.0.0`` -> the pod IP; whether a ``--host`` was given."""
    out, seen = list(args), False
    for i, a in enumerate(out):
        if a == "--host" and i + 1 < len(out):
            seen = True
            if out[i + 1] in _WILDCARD:
                out[i + 1] = ip
        elif a.startswith("--host="):
            seen = True
            if a.split("=", 1)[1] in _WILDCARD:
                out[i] = f"--host={ip}"
    return out, seen


class ShoalPodHandler:
    """Shoal's own pods from the Helm chart: the container's command/args/env, as the pod's
    service account, at the pod IP."""

    name = "shoal"

    def __init__(self, shoal: list[str], state_dir: Path, kubeconfig: str | None) -> None:
        self.shoal = shoal
        self.state = state_dir
        self.admin_kubeconfig = kubeconfig
        self._api_client: client.ApiClient | None = None

    def matches(self, pod: Pod) -> bool:
        return _component(pod) is not None

    async def close(self) -> None:
        if self._api_client is not None:
            await self._api_client.close()
            self._api_client = None

    def _core(self) -> client.CoreV1Api:
        if self._api_client is None:
            self._api_client = client.ApiClient()
        return client.CoreV1Api(self._api_client)

    # -- the API server side --

    def _cluster(self) -> dict[str, Any]:
        """Server and CA of the runner's kubeconfig (the pods reach the same API server)."""
        import yaml

        path = self.admin_kubeconfig or os.environ.get("KUBECONFIG") or ""
        cfg = yaml.safe_load(Path(path).read_text())
        ctx_name = cfg.get("current-context")
        ctxs = {c["name"]: c["context"] for c in cfg.get("contexts") or []}
        clusters = {c["name"]: c["cluster"] for c in cfg.get("clusters") or []}
        ctx = ctxs.get(ctx_name) or next(iter(ctxs.values()))
        cluster = dict(clusters[ctx["cluster"]])
        ca = cluster.pop("certificate-authority", None)
        if ca and "certificate-authority-data" not in cluster:
            ca_path = Path(ca) if Path(ca).is_absolute() else Path(path).parent / ca
            cluster["certificate-authority-data"] = base64.b64encode(ca_path.read_bytes()).decode()
        return cluster

    async def _token(self, pod: Pod, sa: str) -> str:
        meta = pod["metadata"]
        body = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=[],  # the API server's own
                expiration_seconds=TOKEN_EXPIRATION_S,
                bound_object_ref=client.V1BoundObjectReference(
                    api_version="v1", kind="Pod", name=meta["name"], uid=meta["uid"]
                ),
            )
        )
        resp = await self._core().create_namespaced_service_account_token(
            sa, meta["namespace"], body
        )
        return str(resp.status.token)

    async def _volumes(self, pod: Pod, root: Path) -> dict[str, Path]:
        """Materialise the pod's configMap, secret and emptyDir volumes under ``root``."""
        ns = pod["metadata"]["namespace"]
        out: dict[str, Path] = {}
        for vol in pod.get("spec", {}).get("volumes") or []:
            name = vol["name"]
            d = root / "volumes" / name
            data: dict[str, bytes] | None = None
            items = None
            if "configMap" in vol:
                src = vol["configMap"]
                try:
                    cm = await self._core().read_namespaced_config_map(src["name"], ns)
                except ApiException as exc:
                    if exc.status == 404 and src.get("optional"):
                        cm = None
                    else:
                        raise
                data = {k: v.encode() for k, v in ((cm.data if cm else None) or {}).items()}
                for k, v in ((cm.binary_data if cm else None) or {}).items():
                    data[k] = base64.b64decode(v)
                items = src.get("items")
            elif "secret" in vol:
                src = vol["secret"]
                try:
                    sec = await self._core().read_namespaced_secret(src["secretName"], ns)
                except ApiException as exc:
                    if exc.status == 404 and src.get("optional"):
                        sec = None
                    else:
                        raise
                raw = (sec.data if sec else None) or {}
                data = {k: base64.b64decode(v) for k, v in raw.items()}
                items = src.get("items")
            elif "emptyDir" in vol:
                d.mkdir(parents=True, exist_ok=True)
                out[name] = d
                continue
            else:
                continue  # hostPath, projected, ...: not materialised
            d.mkdir(parents=True, exist_ok=True)
            files = (
                {it["path"]: data[it["key"]] for it in items if it["key"] in data}
                if items
                else data
            )
            for rel, content in files.items():
                f = d / rel
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(content)
            out[name] = d
        return out

    async def launch(self, pod: Pod, node: Node | None) -> Launch:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        ns, name, ip = meta["namespace"], meta["name"], pod["status"]["podIP"]
        comp = _component(pod) or "shoal"
        c = _pick_container(pod, (comp, "shoal"))
        root = self.state / "pods" / f"{ns}_{name}"
        root.mkdir(parents=True, exist_ok=True)

        # volumes and where the container sees them
        vols = await self._volumes(pod, root)
        mounts: list[tuple[str, str]] = []
        for vm in c.get("volumeMounts") or []:
            local = vols.get(vm["name"])
            if local is None:
                continue
            if vm.get("subPath"):
                local = local / vm["subPath"]
            mounts.append((vm["mountPath"], str(local)))
        mounts.sort(key=lambda m: len(m[0]), reverse=True)

        env = {k: _rewrite_paths(v, mounts) for k, v in container_env(pod, c).items()}
        tokens = [expand(str(t), env) for t in (c.get("command") or []) + (c.get("args") or [])]
        if not c.get("command"):  # the image's entry point is the shoal CLI
            tokens = ["shoal", *tokens]
        tokens = [_rewrite_paths(t, mounts) for t in tokens]
        exe = os.path.basename(tokens[0])
        if exe == "shoal":
            argv = [*self.shoal, *tokens[1:]]
        elif exe in ("python", "python3"):
            argv = [sys.executable, *tokens[1:]]
        else:
            argv = tokens
        argv, has_host = _rebind_host(argv, ip)
        if not has_host and comp == "router":
            argv += ["--host", ip]

        # credentials: a token for the pod's service account, bound to the pod
        sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        kubeconfig = root / "kubeconfig"
        if spec.get("automountServiceAccountToken") is False:
            kubeconfig.unlink(missing_ok=True)
            env.pop("KUBECONFIG", None)
        else:
            token = await self._token(pod, sa)
            user = f"system:serviceaccount:{ns}:{sa}"
            cfg = {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": self._cluster()}],
                "users": [{"name": user, "user": {"token": token}}],
                "contexts": [
                    {"name": "pod", "context": {"cluster": "local", "user": user, "namespace": ns}}
                ],
                "current-context": "pod",
            }
            kubeconfig.write_text(json.dumps(cfg, indent=1))
            kubeconfig.chmod(0o600)
            env["KUBECONFIG"] = str(kubeconfig)

        shim = self.state / "pods" / "_shim"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env.setdefault("HOSTNAME", name)
        env["SHOAL_POD_BIND_IP"] = ip
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), env.get("PYTHONPATH")) if p)
        for mount, local_dir in mounts:
            if mount.rstrip("/") == "/tmp":
                env.setdefault("TMPDIR", local_dir)
        return Launch(
            argv,
            env,
            f"{comp} on {ip} as serviceaccount {ns}/{sa}",
            isolated_env=True,
            cwd=str(root),
        )


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
        self._locks: dict[str, asyncio.Lock] = {}

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
            for h in self.handlers:
                closer = getattr(h, "close", None)
                if closer is not None:
                    with contextlib.suppress(Exception):
                        await closer()
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
        # one sync per pod at a time: starting a pod may await the API server (tokens, configMaps)
        lock = self._locks.setdefault(uid, asyncio.Lock())
        async with lock:
            await self._sync(uid)
        if uid not in self.pods and uid not in self.running and not lock.locked():
            self._locks.pop(uid, None)

    async def _sync(self, uid: str) -> None:
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
            launched = handler.launch(pod, node)
            launch = await launched if inspect.isawaitable(launched) else launched
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
                    base = (
                        {k: v for k, v in os.environ.items() if k in _BASE_ENV}
                        if m.launch.isolated_env
                        else dict(os.environ)
                    )
                    m.proc = await asyncio.create_subprocess_exec(
                        *m.launch.argv,
                        env={**base, **m.launch.env},
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=out,
                        stderr=out,
                        # never the repo root: its folders shadow the stdlib
                        cwd=m.launch.cwd or str(self.state),
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
    handlers: list[Handler] = [
        EngineHandler(sim, shlex.split(a.sim_extra_args)),
        ShoalPodHandler(shlex.split(a.shoal), Path(a.state_dir), a.kubeconfig),
    ]
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
        "--shoal",
        default=os.environ.get("SHOAL_BIN", default_sim()),
        help="what the `shoal` entry point of Shoal's own pods runs (default .venv/bin/shoal)",
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
