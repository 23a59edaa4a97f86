"""Named strategies are presets of the one pipeline; weights per model; no silent fallbacks."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from shoal.hashing import block_hashes
from shoal.kv_events import BlockStored, EventBatch
from shoal.router.kv_index import KvEventIndex
from shoal.router.pipeline import FallbackRecorder
from shoal.router.prefix_index import ApproxPrefixIndex
from shoal.router.scorers import DEFAULT_LOAD_FACTOR, DEFAULT_LOAD_SLACK, SessionTable
from shoal.router.strategies import (
    STRATEGIES,
    ModelRouting,
    PipelineSet,
    build_pipeline,
    merged_weights,
)
from shoal.router.types import Endpoint, EndpointState, EngineMetrics, RoutingRequest

URLS = [f"http://e{i}:8000" for i in range(4)]


def fleet(running: list[float] | None = None) -> list[EndpointState]:
    running = running or [0.0] * len(URLS)
    return [
        EndpointState(
            endpoint=Endpoint(url=u, models=("m",)),
            metrics=EngineMetrics(num_requests_running=r),
            stale=False,
        )
        for u, r in zip(URLS, running, strict=True)
    ]


def request(tokens: list[int], session: str | None = None) -> RoutingRequest:
    return RoutingRequest(
        model="m",
        base_model="m",
        lora=None,
        prompt_token_ids=tokens,
        block_hashes=block_hashes(tokens, 16),
        session_id=session,
    )


def all_deps() -> dict[str, object]:
    return {
        "approx_index": ApproxPrefixIndex(max_entries=10_000),
        "kv_index": KvEventIndex(max_blocks=10_000),
        "sessions": SessionTable(),
    }


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_builds_and_decides(strategy: str) -> None:
    p = build_pipeline(strategy, rng=random.Random(0), **all_deps())  # type: ignore[arg-type]
    assert p.name == strategy
    d = p.decide(request(list(range(64))), fleet())
    assert d is not None and d.strategy == strategy
    assert d.endpoint.url in URLS


def test_unknown_strategy_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        build_pipeline("cache_aware")
    for name in STRATEGIES:
        assert name in str(err.value)


def test_weight_overrides_and_validation() -> None:
    w = merged_weights("prefix", {"queue-depth": 3.0, "kv-cache-usage": 0, "in-flight-tokens": 1})
    assert w == {
        "approx-prefix": 2.0,
        "queue-depth": 3.0,
        "lora-affinity": 0.5,
        "in-flight-tokens": 1,
    }
    with pytest.raises(ValueError, match="unknown scorer"):
        merged_weights("prefix", {"magic": 1.0})
    with pytest.raises(ValueError, match="negative"):
        merged_weights("prefix", {"queue-depth": -1.0})
    with pytest.raises(ValueError, match="approx_index"):
        build_pipeline("prefix")
    with pytest.raises(ValueError, match="kv_index"):
        build_pipeline("least-request", {"precise-kv": 1.0})


def test_least_request_and_least_kv_pick_the_least_loaded() -> None:
    p = build_pipeline("least-request", rng=random.Random(0))
    d = p.decide(request([1] * 16), fleet([5, 3, 9, 4]))
    assert d is not None and d.endpoint.url == URLS[1]
    states = fleet()
    for s, kv in zip(states, [0.9, 0.5, 0.1, 0.7], strict=True):
        s.metrics.kv_cache_usage = kv
    d = build_pipeline("least-kv", rng=random.Random(0)).decide(request([1] * 16), states)
    assert d is not None and d.endpoint.url == URLS[2]


def test_prefix_sticks_to_the_prefix_owner_then_spreads_under_load() -> None:
    deps = all_deps()
    p = build_pipeline("prefix", rng=random.Random(0), **deps)  # type: ignore[arg-type]
    states = fleet()
    shared = list(range(4000))
    first = p.decide(request([*shared, 1, 2, 3]), states)
    assert first is not None
    owner = first.endpoint.url
    # Same prefix, light load: stays on the owner, and the prefix decided it.
    states[URLS.index(owner)].metrics.num_requests_running = 1
    again = p.decide(request([*shared, 7, 8, 9]), states)
    assert again is not None and again.endpoint.url == owner
    assert again.deciding_scorer == "approx-prefix"
    # A hot prefix: every request stays in flight. Bounded load must spread it.
    sent: Counter[str] = Counter()
    for i in range(200):
        d = p.decide(request([*shared, 10_000 + i]), states)
        assert d is not None
        d.endpoint.in_flight_requests += 1
        sent[d.endpoint.url] += 1
    loads = [s.load for s in states]
    # No endpoint may exceed mean × factor, so the prefix spreads over at least n / factor of
    # them (3 of 4 at the default 1.5).
    assert len(sent) >= math.ceil(len(URLS) / DEFAULT_LOAD_FACTOR)
    mean = sum(loads) / len(loads)
    # The bound, plus the request that crossed it.
    assert max(loads) <= mean * DEFAULT_LOAD_FACTOR + DEFAULT_LOAD_SLACK + 1


def test_kv_aware_routes_by_events_and_reports_missing_events() -> None:
    deps = all_deps()
    kv = deps["kv_index"]
    assert isinstance(kv, KvEventIndex)
    p = build_pipeline("kv-aware", rng=random.Random(0), **deps)  # type: ignore[arg-type]
    tokens = list(range(64))
    d = p.decide(request(tokens), fleet())
    assert d is not None
    assert p.fallbacks.counts[("kv-aware", "no_kv_events")] == 1
    ev = BlockStored(
        block_hashes=block_hashes(tokens, 16),
        parent_block_hash=None,
        token_ids=tokens,
        block_size=16,
    )
    kv.apply(URLS[2], 0, EventBatch(0.0, [ev]))
    d = p.decide(request(tokens), fleet([1, 1, 1, 1]))
    assert d is not None and d.endpoint.url == URLS[2]
    assert d.deciding_scorer == "precise-kv"
    assert p.fallbacks.counts[("kv-aware", "no_kv_events")] == 1


def test_session_strategy_pins_sessions() -> None:
    p = build_pipeline("session", rng=random.Random(0), **all_deps())  # type: ignore[arg-type]
    states = fleet([1, 1, 1, 1])
    first = p.decide(request([1] * 16, session="chat-1"), states)
    assert first is not None
    for _ in range(10):
        d = p.decide(request([2] * 16, session="chat-1"), states)
        assert d is not None and d.endpoint.url == first.endpoint.url
    p.decide(request([1] * 16), states)
    assert p.fallbacks.counts[("session", "no_session_id")] == 1


def test_random_and_round_robin_are_plain() -> None:
    rr = build_pipeline("round-robin")
    states = fleet([100, 0, 0, 0])
    seq = []
    for _ in range(8):
        d = rr.decide(request([1] * 16), states)
        assert d is not None
        seq.append(d.endpoint.url)
    assert seq == URLS + URLS  # load is ignored: it is the baseline


def test_pipeline_set_per_model_and_per_request_override() -> None:
    shared = FallbackRecorder()
    ps = PipelineSet(
        ModelRouting("least-request"),
        {"big": ModelRouting("prefix", {"queue-depth": 5.0})},
        fallbacks=shared,
        rng=random.Random(0),
        **all_deps(),  # type: ignore[arg-type]
    )
    assert ps.for_model("other").name == "least-request"
    big = ps.for_model("big")
    assert big.name == "prefix"
    weights = {s.name: w for s, w in big.weighted_scorers}
    assert weights["queue-depth"] == 5.0
    assert ps.for_model("big") is big  # cached
    override = ps.for_model("big", "kv-aware")
    assert override.name == "kv-aware"
    assert {s.name: w for s, w in override.weighted_scorers}["queue-depth"] == 1.0
    assert override.fallbacks is shared
    with pytest.raises(ValueError, match="unknown routing strategy"):
        ps.for_model("big", "nope")
    with pytest.raises(ValueError):
        PipelineSet(ModelRouting("nope"))
