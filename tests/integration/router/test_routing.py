"""Routing quality signals through real engines: prefix affinity and KV-event awareness."""

from __future__ import annotations

import time

import httpx
from router_procs import Router, Sim

from shoal.router.metrics import sample_value

PREFIX = " ".join(f"shared{i}" for i in range(200))


def _served_by(router: Router, strategy: str, prefix: str, n: int) -> list[str]:
    out = []
    with httpx.Client(timeout=30) as client:
        for i in range(n):
            resp = client.post(
                router.url + "/v1/completions",
                json={"model": "tiny", "prompt": f"{prefix} suffix{i} q{i}", "max_tokens": 2},
                headers={"x-shoal-strategy": strategy},
            )
            assert resp.status_code == 200, resp.text
            out.append(resp.headers["x-shoal-endpoint"])
    return out


def test_prefix_keeps_a_prefix_group_together_round_robin_spreads(router: Router) -> None:
    served = _served_by(router, "prefix", "alpha " + PREFIX, 8)
    assert len(set(served)) == 1, served
    spread = _served_by(router, "round-robin", "beta " + PREFIX, 6)
    assert len(set(spread)) >= 2, spread
    text = router.metrics()
    assert (
        sample_value(
            text, "shoal_router_prefix_blocks_total", {"strategy": "prefix", "kind": "matched"}
        )
        or 0
    ) > 0


def test_kv_aware_follows_kv_events(router: Router) -> None:
    served = _served_by(router, "kv-aware", "gamma " + PREFIX, 1)
    time.sleep(0.3)  # the engine publishes BlockStored; the router's subscriber applies it
    served += _served_by(router, "kv-aware", "gamma " + PREFIX, 5)
    assert len(set(served)) == 1, served
    fallbacks = sample_value(
        router.metrics(),
        "shoal_router_strategy_fallbacks_total",
        {"strategy": "kv-aware", "reason": "no_kv_events"},
    )
    assert not fallbacks


def test_kv_aware_without_events_reports_a_fallback(spawn: object, engines: list[Sim]) -> None:
    r = spawn.router([e.url for e in engines[:2]], "--kv-events", "off")  # type: ignore[attr-defined]
    _served_by(r, "kv-aware", "delta " + PREFIX, 2)
    fallbacks = sample_value(
        r.metrics(),
        "shoal_router_strategy_fallbacks_total",
        {"strategy": "kv-aware", "reason": "no_kv_events"},
    )
    assert fallbacks is not None and fallbacks >= 2
