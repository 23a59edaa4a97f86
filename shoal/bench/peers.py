"""Start the routers that the benchmarks compare: Shoal's and its peers (PyPI Rust routers).

* ``shoal router --endpoints ... --strategy NAME`` (plus a YAML config with each engine's KV-event
  socket, so ``kv-aware`` sees real engine events);
* ``sglang-router`` (``python -m sglang_router.launch_router --worker-urls ... --policy P``);
* ``vllm-router`` (``vllm-router --worker-urls ... --policy P``; ``kv_aware`` takes one
  ``--kv-event-source WORKER_URL=tcp://...`` per engine).

Both peers open a Prometheus listener on a fixed default port, so each one started here gets a
free port of its own (two peers side by side otherwise fail with "Address already in use").
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from shoal.local import HOST, ManagedProcess, free_port, router_command

PEER_PACKAGES = {"sglang": "sglang-router", "vllm": "vllm-router"}


@dataclass(frozen=True)
class RouterUnderTest:
    """One router configuration of a benchmark: which implementation and which policy."""

    impl: str  # "shoal", "sglang" or "vllm"
    policy: str
    # Extra Shoal router settings (config keys), e.g. (("scrape_interval_ms", "1000"),).
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> RouterUnderTest:
        """``impl:policy`` or, for Shoal, ``shoal:policy?key=value&key=value``."""
        head, _, query = spec.partition("?")
        impl, _, policy = head.partition(":")
        options = tuple(
            (k, v) for k, _, v in (item.partition("=") for item in query.split("&") if item)
        )
        if options and impl != "shoal":
            raise ValueError(f"{spec!r}: options apply to Shoal only")
        return cls(impl, policy, options)

    @property
    def label(self) -> str:
        name = {"shoal": "Shoal", "sglang": "sglang-router", "vllm": "vllm-router"}[self.impl]
        extra = "".join(f" ({k} {v})" for k, v in self.options)
        return f"{name} {self.policy}{extra}"


def peer_installed(impl: str) -> bool:
    if impl == "sglang":
        return importlib.util.find_spec("sglang_router") is not None
    if impl == "vllm":
        return importlib.util.find_spec("vllm_router") is not None
    return True


def ensure_peers(impls: Sequence[str]) -> dict[str, str]:
    """Install missing peer routers into this interpreter's environment, on demand.

    Returns {impl: error} for the ones that still cannot be imported (the caller records the
    error in the report instead of failing the whole benchmark).
    """
    missing = [i for i in impls if i in PEER_PACKAGES and not peer_installed(i)]
    errors: dict[str, str] = {}
    if missing:
        pkgs = [PEER_PACKAGES[i] for i in missing]
        print(
            f"installing benchmark peers {', '.join(pkgs)} (the 'bench' extra) with pip ...",
            file=sys.stderr,
        )
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", *pkgs],
            capture_output=True,
            text=True,
            check=False,
        )
        importlib.invalidate_caches()
        for i in missing:
            if not peer_installed(i):
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                errors[i] = f"pip install {PEER_PACKAGES[i]} failed: {' | '.join(tail)}"
    return errors


def router_process(
    rut: RouterUnderTest,
    engine_urls: Sequence[str],
    kv_endpoints: Sequence[str],
    *,
    port: int,
    log_dir: Path,
    served_model: str,
    block_size: int = 16,
) -> ManagedProcess:
    """A not-yet-started router process for ``rut`` in front of ``engine_urls``."""
    url = f"http://{HOST}:{port}"
    log = log_dir / f"router-{rut.impl}-{rut.policy}-{port}.log"
    if rut.impl == "shoal":
        cfg = {
            "host": HOST,
            "port": port,
            "endpoints": [
                {"url": u, "models": [served_model], "kv_events_endpoint": k}
                for u, k in zip(engine_urls, kv_endpoints, strict=True)
            ],
            "strategy": rut.policy,
            # As vllm-router is given event sources only for kv_aware, Shoal subscribes to the
            # engines' KV events only for the strategy that reads them; otherwise it would be
            # charged for decoding a stream its policy ignores.
            "kv_events": "auto" if rut.policy == "kv-aware" else "off",
            "log_level": "WARNING",
            **{k: yaml.safe_load(v) for k, v in rut.options},
        }
        cfg_path = log_dir / f"router-shoal-{rut.policy}-{port}.yaml"  # port: unique per router
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        argv = [
            *router_command(),
            "--config",
            str(cfg_path),
            "--host",
            HOST,
            "--port",
            str(port),
            "--strategy",
            rut.policy,
            "--log-level",
            "WARNING",
        ]
        return ManagedProcess(rut.label, argv, log, url=url)
    common = [
        "--host",
        HOST,
        "--port",
        str(port),
        "--worker-urls",
        *engine_urls,
        "--policy",
        rut.policy,
        "--prometheus-port",
        str(free_port()),
        "--prometheus-host",
        HOST,
        "--log-level",
        "warn" if rut.impl == "sglang" else "warning",
    ]
    if rut.impl == "sglang":
        argv = [sys.executable, "-m", "sglang_router.launch_router", *common]
    elif rut.impl == "vllm":
        exe = shutil.which("vllm-router", path=str(Path(sys.executable).parent)) or "vllm-router"
        argv = [exe, *common]
        if rut.policy == "kv_aware":
            for u, k in zip(engine_urls, kv_endpoints, strict=True):
                argv += ["--kv-event-source", f"{u}={k}"]
            argv += ["--kv-event-block-size", str(block_size), "--kv-event-model", served_model]
    else:
        raise ValueError(f"unknown router implementation {rut.impl!r}")
    return ManagedProcess(rut.label, argv, log, url=url)
