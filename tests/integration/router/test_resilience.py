"""Retries, ejection and probe-back, and admission (queue full, shedding) with real engines."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import httpx

from shoal.router.metrics import sample_value


def _post(url: str, priority: str | None = None, max_tokens: int = 2) -> httpx.Response:
    headers = {"x-shoal-priority": priority} if priority else {}
    return httpx.post(
        url + "/v1/completions",
        json={"model": "tiny", "prompt": "retry me please", "max_tokens": max_tokens,
              "min_tokens": max_tokens, "ignore_eos": True},
        headers=headers,
        timeout=60,
    )  # fmt: skip


def test_failing_engine_is_retried_ejected_and_probed_back(spawn: Any) -> None:
    good, bad = spawn.sim(), spawn.sim()
    # A cool-down long enough that a loaded CI machine still reads the ejection before it ends.
    config = {"eject_after_failures": 2, "eject_seconds": 5.0, "max_attempts": 3}
    r = spawn.router([good.url, bad.url], "--strategy", "round-robin", config=config)
    bad.faults(error_rate=1.0)
    served = []
    for _ in range(10):
        resp = _post(r.url)
        assert resp.status_code == 200, resp.text  # no client-visible error
        served.append(resp.headers["x-shoal-endpoint"])
    assert set(served) == {good.url}
    text = r.metrics()
    assert (sample_value(text, "shoal_router_retries_total", {"model": "tiny"}) or 0) >= 2
    assert sample_value(text, "shoal_router_ejections_total", {"endpoint": bad.url}) == 1
    assert sample_value(text, "shoal_router_endpoint_ejected", {"endpoint": bad.url}) == 1
    # Heal it; after the cool-down a probe brings it back into rotation.
    bad.faults(error_rate=0.0)
    time.sleep(5.5)
    served = [_post(r.url).headers["x-shoal-endpoint"] for _ in range(6)]
    assert bad.url in served
    assert sample_value(r.metrics(), "shoal_router_endpoint_ejected", {"endpoint": bad.url}) == 0


def test_killed_engine_is_routed_around(spawn: Any) -> None:
    a, b = spawn.sim(), spawn.sim()
    r = spawn.router([a.url, b.url], "--strategy", "round-robin")
    b.kill()
    for _ in range(6):
        resp = _post(r.url)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-shoal-endpoint"] == a.url


def test_full_queue_sheds_sheddable_first(spawn: Any) -> None:
    sim = spawn.sim()
    config = {
        "queue_size": 2,
        "saturation": {"max_in_flight_per_endpoint": 1},
        "queue_timeouts": {"critical": 30, "standard": 30, "sheddable": 30},
    }
    r = spawn.router([sim.url], config=config)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            sim.faults(stall_seconds=3.0)  # the engine's next step hangs for 3 s
            busy = pool.submit(_post, r.url, "standard", 3)
            time.sleep(0.5)  # occupies the only slot
            shed_a = pool.submit(_post, r.url, "sheddable", 1)
            time.sleep(0.2)
            shed_b = pool.submit(_post, r.url, "sheddable", 1)
            time.sleep(0.2)  # the queue (2) is full of sheddable requests
            std = pool.submit(_post, r.url, "standard", 1)  # displaces the newest sheddable
            time.sleep(0.2)
            late = pool.submit(_post, r.url, "sheddable", 1)  # full of better: refused
            late_resp = late.result()
            assert late_resp.status_code == 429
            assert late_resp.headers["retry-after"]
            assert late_resp.json()["error"]["code"] == "queue_full"
            shed_resp = shed_b.result()
            assert shed_resp.status_code == 429
            assert shed_resp.json()["error"]["code"] == "shed"
            assert busy.result().status_code == 200
            assert std.result().status_code == 200
            assert shed_a.result().status_code == 200
    finally:
        sim.faults(stall_seconds=0.0)
    text = r.metrics()
    assert sample_value(text, "shoal_router_rejections_total", {"reason": "shed"}) == 1
    assert sample_value(text, "shoal_router_queue_depth", {"model": "tiny"}) == 0
