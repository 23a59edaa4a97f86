"""Filters: each keeps exactly the endpoints it should, in order."""

from __future__ import annotations

from shoal.router.filters import HealthyFilter, LoraFilter, ModelFilter, NotSaturatedFilter
from shoal.router.types import Endpoint, EndpointState, EngineMetrics, RoutingRequest


def state(
    url: str,
    *,
    models: tuple[str, ...] = ("llama",),
    waiting: float = 0,
    kv: float = 0.0,
    stale: bool = False,
    healthy: bool = True,
    ejected_until: float = 0.0,
    adapters: frozenset[str] = frozenset(),
) -> EndpointState:
    return EndpointState(
        endpoint=Endpoint(url=url, models=models),
        metrics=EngineMetrics(num_requests_waiting=waiting, kv_cache_usage=kv),
        stale=stale,
        healthy=healthy,
        ejected_until=ejected_until,
        loaded_adapters=adapters,
    )


def request(model: str = "llama", lora: str | None = None) -> RoutingRequest:
    return RoutingRequest(
        model=lora or model, base_model=model, lora=lora, prompt_token_ids=[], block_hashes=[]
    )


def urls(states: list[EndpointState]) -> list[str]:
    return [s.url for s in states]


def test_healthy_filter_drops_unhealthy_and_currently_ejected() -> None:
    now = 100.0
    f = HealthyFilter(clock=lambda: now)
    cands = [
        state("a"),
        state("b", healthy=False),
        state("c", ejected_until=150.0),  # still ejected
        state("d", ejected_until=99.0),  # ejection over: back in
    ]
    assert urls(f.filter(request(), cands)) == ["a", "d"]


def test_model_filter_by_base_model_or_alias() -> None:
    f = ModelFilter()
    cands = [state("a"), state("b", models=("qwen",)), state("c", models=())]
    assert urls(f.filter(request("llama"), cands)) == ["a", "c"]
    assert urls(f.filter(request("qwen"), cands)) == ["b", "c"]
    alias = RoutingRequest(
        model="alias", base_model="x", lora=None, prompt_token_ids=[], block_hashes=[]
    )
    assert urls(f.filter(alias, [state("a", models=("alias",))])) == ["a"]


def test_lora_filter_needs_adapter_loaded_and_may_return_empty() -> None:
    f = LoraFilter()
    cands = [state("a", adapters=frozenset({"sql"})), state("b")]
    assert urls(f.filter(request(lora="sql"), cands)) == ["a"]
    assert urls(f.filter(request(), cands)) == ["a", "b"]
    # Nobody has it: empty, and the caller decides (load it, wait, or 404).
    assert f.filter(request(lora="chat"), cands) == []


def test_not_saturated_filter_drops_long_queues_full_kv_and_stale() -> None:
    f = NotSaturatedFilter(max_waiting=4, max_kv_cache_usage=0.95)
    cands = [
        state("a", waiting=4),
        state("b", waiting=5),
        state("c", stale=True),
        state("d", kv=0.99),
    ]
    assert urls(f.filter(request(), cands)) == ["a"]
    assert f.all_saturated == 0


def test_not_saturated_filter_passes_all_through_when_all_saturated() -> None:
    f = NotSaturatedFilter(max_waiting=4)
    cands = [state("a", waiting=9), state("b", stale=True)]
    assert urls(f.filter(request(), cands)) == ["a", "b"]
    assert f.all_saturated == 1
    assert f.filter(request(), []) == []
