"""Local mode: ``shoal up`` runs a ``Model`` on simulated engines and the Shoal router, on loopback.

The same ``Model`` YAML that the operator turns into Deployments becomes, here, one ``shoal sim``
process per replica per pool (with the pool's GPU type, KV events on, the spec's LoRA limits)
and one ``shoal router`` process in front. Every child is started in its own session, so a
Ctrl-C in the terminal reaches only this process, which then stops the router first (no new
requests reach dying engines) and the engines after it, each by its PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx
import yaml

from shoal.api.model import ModelFileError, ModelResource, load_model_file, parse_model

HOST = "127.0.0.1"

# The fleet `shoal up` runs without -f: small enough for a laptop, two GPU types so that the
# router sees a heterogeneous fleet.
DEFAULT_MODEL_YAML = """
apiVersion: shoal.dev/v1alpha1
kind: Model
metadata:
  name: llama-8b
spec:
  model:
    name: meta-llama/Llama-3.1-8B-Instruct
    servedName: llama-8b
  engine:
    kind: sim
  pools:
    - name: h100
      gpuType: H100
      replicas: 3
    - name: a10g
      gpuType: A10G
      replicas: 1
  routing:
    strategy: kv-aware
  lora:
    enabled: true
    maxLoras: 4
    maxLoraRank: 16
"""


def default_model() -> ModelResource:
    return parse_model(yaml.safe_load(DEFAULT_MODEL_YAML), "<embedded default Model>")


class FleetError(RuntimeError):
    """The fleet could not start or a child died; the message says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_available(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def shoal_executable() -> list[str]:
    """How to start a ``shoal`` subcommand: the console script next to this interpreter."""
    exe = Path(sys.executable).with_name("shoal")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "shoal"]


def router_command() -> list[str]:
    """How to start ``shoal router``: the CLI subcommand, or the router's own entry point when
    this checkout's ``shoal`` CLI does not list it (yet)."""
    from shoal.cli import build_parser

    sub = next(
        (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)), None
    )
    if sub is not None and "router" in sub.choices:
        return [*shoal_executable(), "router"]
    return [sys.executable, "-c", "import sys, shoal.local as m; sys.exit(m.router_main())"]


def router_main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone ``shoal router`` (see :func:`router_command`)."""
    import logging

    from shoal.router.cli import add_router_arguments, run_router

    p = argparse.ArgumentParser(prog="shoal router")
    add_router_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level or "INFO").upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_router(args)


@dataclass
class ManagedProcess:
    """A child process with its log file; stopped by PID, never by name."""

    name: str
    argv: list[str]
    log_path: Path
    url: str = ""
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            # cwd outside the checkout: the repository's `operator/` folder would shadow the
            # standard library for a Python started there.
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=tempfile.gettempdir(),
                env={**os.environ, **(self.env or {})},
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def wait_healthy(self, path: str = "/health", timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                code = self.exited()
                if code is not None:
                    raise FleetError(
                        f"{self.name} exited with status {code} while starting; "
                        f"last lines of {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    if client.get(self.url + path).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise FleetError(
                        f"{self.name} did not become healthy at {self.url}{path} within "
                        f"{timeout_s:.0f} s; last lines of {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.1)

    def stop(self, timeout_s: float = 10.0) -> None:
        self.request_stop()
        self.finish_stop(time.monotonic() + timeout_s)

    def request_stop(self) -> None:
        """SIGTERM, without waiting (``finish_stop`` waits), so that a fleet stops in parallel."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGTERM)

    def finish_stop(self, deadline: float) -> None:
        """Wait for the process until ``deadline`` (monotonic), then SIGKILL it."""
        p = self.proc
        if p is None:
            return
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=10.0)


@dataclass(frozen=True)
class EngineSlot:
    """One simulated replica: which pool it belongs to and where it listens."""

    pool: str
    index: int
    gpu_type: str
    gpus: int
    port: int
    kv_events_port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def kv_events_endpoint(self) -> str:
        return f"tcp://{HOST}:{self.kv_events_port}"


def sim_argv(
    model: ModelResource,
    slot: EngineSlot,
    extra: Sequence[str] = (),
    lora_modules: Sequence[str] = (),
) -> list[str]:
    """``shoal sim`` arguments for one replica of ``model`` (what the operator gives vLLM)."""
    spec = model.spec
    kv_cfg = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": slot.kv_events_endpoint,
        "topic": f"kv@{slot.pool}-{slot.index}",
    }
    argv = [
        *shoal_executable(),
        "sim",
        "--host",
        HOST,
        "--port",
        str(slot.port),
        "--model",
        spec.model.name,
        "--served-model-name",
        spec.model.client_name,
        "--gpu",
        slot.gpu_type,
        "--num-gpus",
        str(slot.gpus),
        "--seed",
        str(slot.port),
        "--kv-events-config",
        json.dumps(kv_cfg),
    ]
    if spec.max_model_len:
        argv += ["--max-model-len", str(spec.max_model_len)]
    argv.append(
        "--enable-prefix-caching"
        if spec.engine.enable_prefix_caching
        else "--no-enable-prefix-caching"
    )
    if spec.lora.enabled:
        argv += [
            "--enable-lora",
            "--max-loras",
            str(spec.lora.max_loras),
            "--max-lora-rank",
            str(spec.lora.max_lora_rank),
            "--lora-path-check",
            "any",
        ]
        if spec.lora.max_cpu_loras:
            argv += ["--max-cpu-loras", str(spec.lora.max_cpu_loras)]
        if lora_modules:
            argv += ["--lora-modules", *lora_modules]
    # The engine's own extra args last, so a spec can override anything above.
    return argv + list(spec.engine.args) + list(extra)


def plan_slots(model: ModelResource, base_port: int = 0) -> list[EngineSlot]:
    """One slot per replica per pool, on consecutive ports from ``base_port`` (0: any free)."""
    slots = []
    n = 0
    for pool in model.spec.pools:
        for i in range(pool.replicas):
            if base_port:
                port, kv = base_port + 2 * n, base_port + 2 * n + 1
            else:
                port, kv = free_port(), free_port()
            slots.append(EngineSlot(pool.name, i, pool.gpu_type, pool.gpus_per_replica, port, kv))
            n += 1
    return slots


class LocalFleet:
    """Simulated engines for a ``Model`` and the Shoal router in front, as child processes."""

    def __init__(
        self,
        model: ModelResource,
        *,
        router_port: int = 8080,
        base_port: int = 0,
        strategy: str | None = None,
        kv_events: bool = True,
        log_dir: Path | None = None,
        sim_extra: Sequence[str] = (),
        router_extra: Sequence[str] = (),
        lora_modules: Sequence[str] = (),
        with_router: bool = True,
    ) -> None:
        if model.spec.total_replicas < 1:
            raise FleetError("the Model has no replicas: set replicas ≥ 1 in at least one pool")
        self.model = model
        self.router_port = router_port or free_port()
        self.strategy = strategy or model.spec.routing.strategy
        self.kv_events = kv_events
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="shoal-up-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.slots = plan_slots(model, base_port)
        self.sim_extra = list(sim_extra)
        self.router_extra = list(router_extra)
        self.lora_modules = list(lora_modules)
        self.with_router = with_router
        self.engines: list[ManagedProcess] = []
        self.router: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.router_port}"

    @property
    def engine_urls(self) -> list[str]:
        return [s.url for s in self.slots]

    def children(self) -> list[ManagedProcess]:
        return ([self.router] if self.router else []) + self.engines

    def _check_ports(self) -> None:
        wanted = [(f"engine {s.pool}-{s.index}", s.port) for s in self.slots]
        wanted += [(f"KV events of {s.pool}-{s.index}", s.kv_events_port) for s in self.slots]
        if self.with_router:
            wanted.append(("router", self.router_port))
        busy = [f"{what} ({port})" for what, port in wanted if not port_available(port)]
        if busy:
            raise FleetError(
                f"port(s) already in use on {HOST}: {', '.join(busy)}; stop what holds them or "
                "choose others (--port for the router, --engine-base-port for the engines)"
            )

    def router_config(self) -> dict[str, object]:
        """The router's YAML config: static endpoints with the KV-event socket of each."""
        spec = self.model.spec
        return {
            "host": HOST,
            "port": self.router_port,
            "endpoints": [
                {
                    "url": s.url,
                    "models": [spec.model.client_name],
                    **({"kv_events_endpoint": s.kv_events_endpoint} if self.kv_events else {}),
                }
                for s in self.slots
            ],
            "kv_events": "auto" if self.kv_events else "off",
            "strategy": self.strategy,
            "weights": dict(spec.routing.weights),
        }

    def router_argv(self) -> list[str]:
        cfg = self.log_dir / "router.yaml"
        cfg.write_text(yaml.safe_dump(self.router_config(), sort_keys=False))
        return [
            *router_command(),
            "--config",
            str(cfg),
            "--host",
            HOST,
            "--port",
            str(self.router_port),
            "--strategy",
            self.strategy,
            "--kv-events",
            "auto" if self.kv_events else "off",
            *self.router_extra,
        ]

    def start(self, timeout_s: float = 90.0) -> None:
        """Start engines, wait until all are healthy, then the router; on failure stop all."""
        self._check_ports()
        try:
            for s in self.slots:
                p = ManagedProcess(
                    f"engine {s.pool}-{s.index} ({s.gpu_type})",
                    sim_argv(self.model, s, self.sim_extra, self.lora_modules),
                    self.log_dir / f"engine-{s.pool}-{s.index}.log",
                    url=s.url,
                )
                p.start()
                self.engines.append(p)
            for p in self.engines:
                p.wait_healthy(timeout_s=timeout_s)
            if self.with_router:
                self.router = ManagedProcess(
                    "router", self.router_argv(), self.log_dir / "router.log", url=self.url
                )
                self.router.start()
                self.router.wait_healthy(timeout_s=timeout_s)
        except BaseException:
            self.stop()
            raise

    def dead_child(self) -> ManagedProcess | None:
        return next((p for p in self.children() if p.exited() is not None), None)

    def stop(self, timeout_s: float = 10.0) -> None:
        # Router first so that nothing is routed to engines that are going away; then every
        # engine at once under one deadline, so that a busy machine's slow exits do not add up.
        if self.router is not None:
            with contextlib.suppress(Exception):
                self.router.stop(timeout_s)
        deadline = time.monotonic() + timeout_s
        for p in self.engines:
            with contextlib.suppress(Exception):
                p.request_stop()
        for p in self.engines:
            with contextlib.suppress(Exception):
                p.finish_stop(deadline)

    def __enter__(self) -> LocalFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so both run the same cleanup.

    SIGINT gets its handler explicitly too: a shell starts background commands with SIGINT
    ignored, Python then installs no KeyboardInterrupt handler, and ``kill -INT`` (or a
    supervisor's interrupt) would leave the fleet running."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, handler)
    old_int = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--file", help="Model YAML (default: a small embedded fleet of 4 engines)")
    p.add_argument("--port", type=int, default=8080, help="router port on 127.0.0.1 (default 8080)")
    p.add_argument(
        "--engine-base-port",
        type=int,
        default=0,
        help="first engine port; engines take consecutive pairs (default: free ports)",
    )
    p.add_argument(
        "--strategy", help="routing strategy (default: the Model's spec.routing.strategy)"
    )
    p.add_argument("--no-kv-events", action="store_true", help="engines publish no KV events")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="adapter to preload on every engine (repeatable; needs spec.lora.enabled)",
    )
    p.add_argument("--log-dir", type=Path, help="child logs (default: a new temporary folder)")
    p.add_argument("--no-router", action="store_true", help="engines only")


def _print_ready(fleet: LocalFleet) -> None:
    m = fleet.model
    name = m.spec.model.client_name
    pools = ", ".join(f"{p.name}: {p.replicas}× {p.gpu_type}" for p in m.spec.pools)
    print(
        f"Model {m.metadata.name!r} ({m.spec.model.name}) on "
        f"{len(fleet.engines)} simulated engines ({pools})"
    )
    for p in fleet.engines:
        print(f"  {p.name:<28} {p.url}  pid {p.pid}")
    target = fleet.url if fleet.router else fleet.engine_urls[0]
    if fleet.router:
        print(f"  router ({fleet.strategy:<13})       {fleet.url}  pid {fleet.router.pid}")
    print(f"logs in {fleet.log_dir}\n")
    print(f"OpenAI API at {target}/v1 — try:\n")
    body = json.dumps({"model": name, "prompt": "w1 w2 w3 w4", "max_tokens": 16})
    print(f"  curl -s {target}/v1/completions -H 'content-type: application/json' -d '{body}'\n")
    print(f"  shoal bench --url {target} --rate 10 --num-requests 200\n")
    print("Ctrl-C stops everything.", flush=True)


def run_up(args: argparse.Namespace) -> int:
    try:
        model = load_model_file(args.file) if args.file else default_model()
    except ModelFileError as exc:
        print(f"shoal up: {exc}", file=sys.stderr)
        return 2
    if args.lora and not model.spec.lora.enabled:
        print("shoal up: --lora needs spec.lora.enabled: true in the Model", file=sys.stderr)
        return 2
    fleet = LocalFleet(
        model,
        router_port=args.port,
        base_port=args.engine_base_port,
        strategy=args.strategy,
        kv_events=not args.no_kv_events,
        log_dir=args.log_dir,
        lora_modules=args.lora,
        with_router=not args.no_router,
    )
    with _terminate_as_interrupt():
        try:
            fleet.start()
            _print_ready(fleet)
            while True:
                dead = fleet.dead_child()
                if dead is not None:
                    raise FleetError(
                        f"{dead.name} (pid {dead.pid}) exited with status {dead.exited()}; "
                        f"last lines of {dead.log_path}:\n{dead.log_tail()}"
                    )
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("\nshoal up: stopping", file=sys.stderr)
            return 0
        except FleetError as exc:
            print(f"shoal up: {exc}\nshoal up: stopping the rest", file=sys.stderr)
            return 1
        finally:
            fleet.stop()
