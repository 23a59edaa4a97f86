"""Declared names with no engine yet: the router holds requests until an engine serves them.

A static endpoint whose port has no engine behind it stands for a Model at zero replicas: the
router cannot reach it, so nothing serves ``tiny``. Starting an engine on that port is the
scale-up; the held request must then be served, not fail.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import httpx
from router_procs import free_port, wait_http

from shoal.router.metrics import sample_value


def _held(router: Any, model: str) -> float:
    return sample_value(router.metrics(), "shoal_router_held_requests", {"model": model}) or 0.0


def _wait_for(predicate: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def _post(url: str, model: str, timeout: float = 60.0) -> httpx.Response:
    return httpx.post(
        url + "/v1/completions",
        json={"model": model, "prompt": "a b c", "max_tokens": 2},
        timeout=timeout,
    )


def test_request_for_a_model_at_zero_is_held_until_an_engine_serves_it(spawn: Any) -> None:
    port = free_port()
    engine_url = f"http://127.0.0.1:{port}"
    router = spawn.router(
        [engine_url], config={"hold": {"models": ["tiny"], "timeout_s": 60}}, wait=False
    )
    wait_http(router.url + "/health", router)
    listed = httpx.get(router.url + "/v1/models", timeout=5).json()["data"]
    assert [m["id"] for m in listed] == ["tiny"]  # declared, so listed before any engine
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, router.url, "tiny")
        _wait_for(lambda: _held(router, "tiny") == 1.0)
        assert not pending.done()
        spawn.sim(port=port)  # the scale-up
        resp = pending.result(timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-shoal-endpoint"] == engine_url
    text = router.metrics()
    assert _held(router, "tiny") == 0.0
    assert sample_value(text, "shoal_router_hold_outcomes_total", {"outcome": "served"}) == 1.0


def test_declared_adapter_waits_for_its_load_and_undeclared_names_get_404(
    spawn: Any, tmp_path: Path
) -> None:
    sim = spawn.sim("--enable-lora", "--max-loras", "2", "--max-lora-rank", "8")
    router = spawn.router(
        [sim.url],
        config={"models_refresh_s": 0.2, "hold": {"adapters": {"late-lora": "tiny"}}},
    )
    by_id = {m["id"]: m for m in httpx.get(router.url + "/v1/models", timeout=5).json()["data"]}
    assert by_id["late-lora"]["parent"] == "tiny"
    assert _post(router.url, "nobody-declared-this").status_code == 404
    adapter = tmp_path / "late-lora"
    adapter.mkdir()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, router.url, "late-lora")
        _wait_for(lambda: _held(router, "tiny") == 1.0)
        loaded = httpx.post(
            sim.url + "/v1/load_lora_adapter",
            json={"lora_name": "late-lora", "lora_path": str(adapter)},
            timeout=10,
        )
        assert loaded.status_code == 200, loaded.text
        resp = pending.result(timeout=60)
    assert resp.status_code == 200, resp.text


def test_hold_times_out_with_503_and_retry_after(spawn: Any) -> None:
    router = spawn.router(
        [f"http://127.0.0.1:{free_port()}"],
        config={"hold": {"models": ["tiny"], "timeout_s": 0.5, "max_per_model": 4}},
        wait=False,
    )
    wait_http(router.url + "/health", router)
    started = time.monotonic()
    resp = _post(router.url, "tiny")
    assert time.monotonic() - started >= 0.5
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "not_ready"
    assert int(resp.headers["retry-after"]) >= 1
    assert sample_value(router.metrics(), "shoal_router_hold_outcomes_total",
                        {"outcome": "timeout"}) == 1.0  # fmt: skip
