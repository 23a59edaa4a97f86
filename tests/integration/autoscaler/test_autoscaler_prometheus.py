"""The autoscaler against a real Prometheus scraping a real ``shoal sim`` engine: queries over the
shipped recording rules, NaN and empty answers as unknown, and holding when Prometheus dies."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
from typing import Any

import httpx
import pytest
from conftest import MODEL, NAMESPACE, POOL, SERVED, Stack
from prometheus_server import PrometheusServer

from shoal.autoscaler.loop import HOLD_MISSING, HOLD_PROMETHEUS, guarded_decision
from shoal.autoscaler.observe import PoolTarget, read_pool
from shoal.autoscaler.policy import Decision, Observation, PoolSpec
from shoal.autoscaler.prometheus import PrometheusClient, PrometheusError
from shoal.local import HOST

TARGET = PoolTarget(NAMESPACE, MODEL, POOL, SERVED, percentile=90.0)
SPEC = PoolSpec(model="tiny", gpu="H100", min_replicas=0, max_replicas=8)
SELECTOR = f'{{namespace="{NAMESPACE}",model="{MODEL}",pool="{POOL}"}}'


class LoadPolicy:
    """One replica per 2 requests in the system (enough to tell decisions apart)."""

    name = "load"

    def decide(self, spec: PoolSpec, obs: Observation) -> Decision:
        load = (obs.running or 0.0) + (obs.waiting or 0.0) + (obs.router_held or 0.0)
        return Decision(max(1, -(-int(load) // 2)), "load")

    def export_state(self) -> dict[str, Any]:
        return {}

    def import_state(self, state: dict[str, Any]) -> None:
        pass


def _send_requests(url: str, n: int) -> list[int]:
    def one(i: int) -> int:
        body = {"model": SERVED, "prompt": f"request {i} " * 20, "max_tokens": 16}
        return httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


async def _read(url: str, *, ready: int = 1, desired: int = 1, target: PoolTarget = TARGET) -> Any:
    prom = PrometheusClient(url, timeout_s=5)
    try:
        return await read_pool(
            prom, target, time_s=0.0, ready_replicas=ready, desired_replicas=desired
        )
    finally:
        await prom.aclose()


def test_observation_from_a_real_engine(stack: Stack) -> None:
    stack.held.labels(SERVED).set(3)
    prom = stack.prometheus
    # Counters must be scraped before the requests: a counter first seen at 16 has no increase.
    prom.wait_for(f"count_over_time(vllm:request_success_total{SELECTOR}[1m]) >= 2")
    assert _send_requests(stack.engine_url, 16) == [200] * 16
    prom.wait_for(f"shoal_pool:request_success:rate30s{SELECTOR} > 0")
    prom.wait_for(f"shoal_pool:request_generation_tokens:mean30s{SELECTOR}")
    prom.wait_for(f'shoal_model:router_held_requests:sum{{model="{SERVED}"}}')
    reading = asyncio.run(_read(prom.url))
    v = reading.values
    assert reading.complete, reading.missing
    assert v["request_rate"] is not None and v["request_rate"] > 0
    assert v["prompt_tokens_mean"] is not None and v["prompt_tokens_mean"] > 20
    # at most max_tokens each (the simulator may stop a request early)
    assert v["output_tokens_mean"] is not None and 1 <= v["output_tokens_mean"] <= 16
    assert v["waiting"] == 0.0 and v["running"] is not None
    assert v["kv_usage"] is not None and 0.0 <= v["kv_usage"] <= 1.0
    assert v["ttft_s"] is not None and v["ttft_s"] > 0
    assert v["tpot_s"] is not None and v["tpot_s"] > 0
    assert v["engines_up"] == 1.0
    assert v["router_held"] == 3.0 and reading.observation.router_held == 3.0


def test_empty_and_nan_answers_are_unknown(stack: Stack) -> None:
    async def go() -> None:
        prom = PrometheusClient(stack.prometheus.url)
        try:
            assert await prom.query_value("0/0") is None  # NaN
            assert await prom.query_value("vector(1)/0") is None  # +Inf
            assert await prom.query_value("no_such_metric_anywhere") is None  # empty
            assert await prom.query_value("vector(2.5)") == 2.5
            with pytest.raises(PrometheusError, match="bad_data"):
                await prom.query("sum(")
            with pytest.raises(PrometheusError, match="expected one series"):
                await prom.query_value('{__name__=~"shoal_pool:.*"}')
        finally:
            await prom.aclose()

    asyncio.run(go())
    # a pool Prometheus has never seen: every load input is unknown, and the guard holds
    ghost = PoolTarget(NAMESPACE, MODEL, "no-such-pool", SERVED)
    reading = asyncio.run(_read(stack.prometheus.url, ready=2, desired=2, target=ghost))
    assert reading.missing == ("request_rate", "waiting", "running")
    decision = guarded_decision(LoadPolicy(), SPEC, reading, current=2)
    assert (decision.replicas, decision.reason) == (2, HOLD_MISSING)


def test_unreachable_and_silent_prometheus_are_errors() -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        closed_port = s.getsockname()[1]
    with pytest.raises(PrometheusError, match="cannot reach"):
        asyncio.run(_read(f"http://{HOST}:{closed_port}"))

    async def silent() -> None:
        # accepts connections and never answers
        server = await asyncio.start_server(lambda r, w: None, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        prom = PrometheusClient(f"http://{HOST}:{port}", timeout_s=0.5)
        try:
            with pytest.raises(PrometheusError, match=r"timed out after 0\.5s"):
                await prom.query("up")
        finally:
            await prom.aclose()
            server.close()

    asyncio.run(silent())


def test_killing_prometheus_holds_the_last_decision(
    stack: Stack, own_prometheus: PrometheusServer
) -> None:
    stack.held.labels(SERVED).set(7)  # the policy wants 4 replicas for 7 held requests
    own_prometheus.wait_for(f'shoal_model:router_held_requests:sum{{model="{SERVED}"}} == 7')
    own_prometheus.wait_for(f"shoal_pool:num_requests_running:sum{SELECTOR}")
    # a fresh Prometheus has no rate until two scrapes: until then the guard holds (see above)
    own_prometheus.wait_for(f"shoal_pool:request_success:rate30s{SELECTOR}")
    reading = asyncio.run(_read(own_prometheus.url, ready=1, desired=1))
    decided = guarded_decision(LoadPolicy(), SPEC, reading, current=1)
    assert (decided.replicas, decided.reason) == (4, "load")

    own_prometheus.stop()
    with pytest.raises(PrometheusError):
        asyncio.run(_read(own_prometheus.url, ready=4, desired=4))
    # the loop turns that error into reading=None: the pool keeps its 4 replicas
    held = guarded_decision(LoadPolicy(), SPEC, None, current=decided.replicas)
    assert (held.replicas, held.reason) == (4, HOLD_PROMETHEUS)
