"""Simulated engines for the router benchmarks: one ``shoal sim`` process each, KV events on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from shoal.local import HOST, ManagedProcess, free_port, shoal_executable


def start_engines(
    n: int,
    log_dir: Path,
    *,
    model: str,
    served_name: str | None = None,
    extra_args: Sequence[str] = (),
    per_engine_args: Sequence[Sequence[str]] = (),
    ready_timeout_s: float = 60.0,
) -> tuple[list[ManagedProcess], list[str]]:
    """Start ``n`` engines on free loopback ports; return them and their KV-event endpoints.

    ``per_engine_args[i]``, when given, is added to engine ``i`` only (for example a seed).
    """
    engines: list[ManagedProcess] = []
    kv: list[str] = []
    for i in range(n):
        port, kv_port = free_port(), free_port()
        kv_ep = f"tcp://{HOST}:{kv_port}"
        cfg = (
            '{"enable_kv_cache_events": true, "publisher": "zmq", '
            f'"endpoint": "{kv_ep}", "topic": "kv"}}'
        )
        argv = [
            *shoal_executable(),
            "--log-level", "WARNING",
            "sim",
            "--host", HOST,
            "--port", str(port),
            "--model", model,
            *(["--served-model-name", served_name] if served_name else []),
            *extra_args,
            *(per_engine_args[i] if i < len(per_engine_args) else ()),
            "--kv-events-config", cfg,
        ]  # fmt: skip
        p = ManagedProcess(
            f"engine-{i}", argv, log_dir / f"engine-{i}.log", url=f"http://{HOST}:{port}"
        )
        p.start()
        engines.append(p)
        kv.append(kv_ep)
    for p in engines:
        p.wait_healthy(timeout_s=ready_timeout_s)
    return engines, kv
