"""Router replicas sharing state through a real ``redis-server``."""

from __future__ import annotations

import time
from typing import Any

import httpx

from shoal.router.metrics import sample_value

PREFIX = " ".join(f"replica{i}" for i in range(160))


def _served(url: str, prompt: str) -> str:
    resp = httpx.post(
        url + "/v1/completions",
        json={"model": "tiny", "prompt": prompt, "max_tokens": 1},
        headers={"x-shoal-strategy": "prefix"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    return resp.headers["x-shoal-endpoint"]


def _wait_metric(router: Any, name: str, value: float, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sample_value(router.metrics(), name) != value:
        assert time.monotonic() < deadline, f"{name} never became {value}"
        time.sleep(0.1)


def test_replicas_share_affinity_and_survive_redis_loss(
    spawn: Any, engines: list[Any], redis_server: Any
) -> None:
    urls = [e.url for e in engines]
    a = spawn.router(urls, "--redis-url", redis_server.url, models=2)
    b = spawn.router(urls, "--redis-url", redis_server.url, models=2)
    _wait_metric(a, "shoal_router_shared_state_up", 1.0)
    _wait_metric(b, "shoal_router_shared_state_up", 1.0)
    for group in range(3):
        prompt = f"group{group} {PREFIX}"
        home = _served(a.url, prompt + " first")
        time.sleep(0.3)  # replica b tails the shared stream
        for i in range(4):
            assert _served(b.url, f"{prompt} b{i}") == home
            assert _served(a.url, f"{prompt} a{i}") == home

    redis_server.kill()
    _wait_metric(a, "shoal_router_shared_state_up", 0.0)
    for i in range(5):  # still serving, on local state
        _served(a.url, f"after redis {i} {PREFIX}")
        _served(b.url, f"after redis {i} {PREFIX}")
