"""A real engine simulator and a real Prometheus scraping it with the autoscaler's rules."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_server import PROMETHEUS, PrometheusServer, write_config

from shoal.local import HOST, ManagedProcess, free_port, shoal_executable

# The labels Prometheus attaches to the engine's series, as relabelling pod labels would.
NAMESPACE, MODEL, POOL, SERVED = "ns1", "tiny-model", "h100", "tiny"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if PROMETHEUS is None and here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.skip(reason="prometheus missing (scripts/test installs)"))


@dataclass
class Stack:
    engine_url: str
    prometheus: PrometheusServer
    held: Gauge  # the router's shoal_router_held_requests, served by a tiny real endpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    url = f"http://{HOST}:{port}"
    proc = ManagedProcess(
        "engine",
        [
            *shoal_executable(),
            "sim",
            "--host",
            HOST,
            "--port",
            str(port),
            "--model",
            "tiny",
            "--served-model-name",
            SERVED,
        ],
        tmp_path_factory.mktemp("engine") / "engine.log",
        url=url,
    )
    proc.start()
    try:
        proc.wait_healthy()
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def router_held() -> tuple[Gauge, int]:
    registry = CollectorRegistry()
    gauge = Gauge("shoal_router_held_requests", "held requests", ["model"], registry=registry)
    port = free_port()
    start_http_server(port, addr=HOST, registry=registry)  # a daemon thread; lives with the test
    return gauge, port


def _start(workdir: Path, engine_url: str, held_port: int) -> PrometheusServer:
    engine_target = engine_url.removeprefix("http://")
    config = write_config(
        workdir,
        [
            {
                "job_name": "engines",
                "static_configs": [
                    {
                        "targets": [engine_target],
                        "labels": {"namespace": NAMESPACE, "model": MODEL, "pool": POOL},
                    }
                ],
            },
            {"job_name": "router", "static_configs": [{"targets": [f"{HOST}:{held_port}"]}]},
        ],
    )
    server = PrometheusServer(workdir, config)
    server.start()
    return server


@pytest.fixture(scope="module")
def stack(
    engine: str, router_held: tuple[Gauge, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    gauge, port = router_held
    server = _start(tmp_path_factory.mktemp("prometheus"), engine, port)
    try:
        yield Stack(engine, server, gauge)
    finally:
        server.stop()


@pytest.fixture
def own_prometheus(
    engine: str, router_held: tuple[Gauge, int], tmp_path: Path
) -> Iterator[PrometheusServer]:
    """A Prometheus only this test uses (it may kill it)."""
    server = _start(tmp_path, engine, router_held[1])
    try:
        yield server
    finally:
        server.stop()
