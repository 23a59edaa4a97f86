"""The scrape cadence against a real engine: slow while the engine is calm, fast when load the
router did not send shows up, and never stale in between."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from shoal.router.metrics import sample_value

FASTEST_S, SLOWEST_S = 0.1, 0.8


def _interval_and_stale(router: Any, engine_url: str) -> tuple[float | None, float | None]:
    text = router.metrics()
    labels = {"endpoint": engine_url}
    return (
        sample_value(text, "shoal_router_scrape_interval_seconds", labels),
        sample_value(text, "shoal_router_endpoint_stale", labels),
    )


def _wait_for_interval(router: Any, engine_url: str, want: float, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        seen, stale = _interval_and_stale(router, engine_url)
        assert stale == 0, "a calm engine scraped less often must not read as stale"
        if seen == want:
            return
        time.sleep(0.05)
    raise AssertionError(f"scrape interval stayed {seen}, wanted {want}\n{router.tail()}")


async def _direct_load_until(router: Any, engine_url: str) -> None:
    """Long requests sent to the engine itself (another router, a batch job), held open until
    the router's cadence is back to the fastest; closing them aborts them in the engine."""
    body = {"model": "tiny", "prompt": "busy", "max_tokens": 1500, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=60) as client:
        tasks = [
            asyncio.create_task(client.post(engine_url + "/v1/completions", json=body))
            for _ in range(12)
        ]
        try:
            await asyncio.to_thread(_wait_for_interval, router, engine_url, FASTEST_S, 5.0)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def test_cadence_slows_while_calm_and_speeds_up_for_load_from_elsewhere(spawn: Any) -> None:
    engine = spawn.sim()
    router = spawn.router(
        [engine.url],
        "--scrape-interval-ms", str(int(FASTEST_S * 1000)),
        "--scrape-interval-max-ms", str(int(SLOWEST_S * 1000)),
    )  # fmt: skip
    # Idle engine, nothing in flight: calm, so the interval doubles up to the slowest.
    _wait_for_interval(router, engine.url, SLOWEST_S, 5.0)
    time.sleep(1.5)  # several slow intervals: still fresh (staleness counts in the slow one)
    assert _interval_and_stale(router, engine.url) == (SLOWEST_S, 0)
    # Requests the router did not send: its accounting no longer explains the engine's load.
    engine.faults(slowdown=20.0)  # so that they stay running while the router notices
    asyncio.run(_direct_load_until(router, engine.url))
    # And served traffic through the router still works at either cadence.
    resp = httpx.post(
        router.url + "/v1/completions",
        json={"model": "tiny", "prompt": "hello", "max_tokens": 2},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
