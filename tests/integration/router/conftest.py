"""Fixtures for the router's integration tests: real ``shoal sim`` engines, ``redis-server`` and
routers on free loopback ports, owned here and stopped by PID (see ``router_procs``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from router_procs import Proc, Redis, Router, Sim, wait_http


@pytest.fixture(scope="session")
def proc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("router-it")


@pytest.fixture(scope="session")
def engines(proc_dir: Path) -> Iterator[list[Sim]]:
    """Three engines publishing KV events; the third also serves LoRA adapter ``tiny-lora``."""
    sims = [
        Sim(proc_dir, kv_events=True),
        Sim(proc_dir, kv_events=True),
        Sim(
            proc_dir,
            "--enable-lora", "--lora-modules", "tiny-lora=/fake/tiny-lora",
            "--lora-path-check", "any",
            kv_events=True,
        ),
    ]  # fmt: skip
    try:
        for s in sims:
            s.wait()
        yield sims
    finally:
        for s in sims:
            s.stop()


@pytest.fixture(scope="session")
def router(proc_dir: Path, engines: list[Sim]) -> Iterator[Router]:
    r = Router(proc_dir, [e.url for e in engines])
    try:
        yield r.wait(models=2)
    finally:
        r.stop()


@pytest.fixture()
def redis_server(proc_dir: Path) -> Iterator[Redis]:
    r = Redis(proc_dir)
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture()
def spawn(proc_dir: Path) -> Iterator[Any]:
    """Start extra processes in a test; all are stopped at its end."""
    started: list[Proc] = []

    class Spawner:
        def sim(self, *extra: str, kv_events: bool = False, port: int | None = None) -> Sim:
            s = Sim(proc_dir, *extra, kv_events=kv_events, port=port)
            started.append(s)
            return s.wait()

        def router(
            self,
            endpoints: Sequence[str],
            *args: str,
            config: dict[str, Any] | None = None,
            models: int = 1,
            wait: bool = True,
        ) -> Router:
            r = Router(proc_dir, endpoints, *args, config=config)
            started.append(r)
            if wait:
                if endpoints:
                    return r.wait(models=models)
                wait_http(r.url + "/health", r)
            return r

    try:
        yield Spawner()
    finally:
        for p in reversed(started):
            p.stop()
