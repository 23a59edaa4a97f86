"""Scorers: each ranks candidates the way its docstring says, in [0, 1]."""

from __future__ import annotations

from shoal.hashing import block_hashes
from shoal.kv_events import BlockStored, EventBatch
from shoal.router.kv_index import KvEventIndex
from shoal.router.prefix_index import ApproxPrefixIndex
from shoal.router.scorers import (
    ApproxPrefixScorer,
    InFlightTokensScorer,
    KvCacheUsageScorer,
    LoraAffinityScorer,
    PreciseKvScorer,
    PrefixHistoryRecorder,
    QueueDepthScorer,
    SessionAffinityScorer,
    SessionTable,
    bound_by_load,
)
from shoal.router.types import (
    Endpoint,
    EndpointState,
    EngineMetrics,
    RoutingDecision,
    RoutingRequest,
)

TOKENS = list(range(64))
HASHES = block_hashes(TOKENS, 16)  # 4 blocks


def state(
    url: str,
    *,
    running: float = 0,
    waiting: float = 0,
    in_flight: int = 0,
    tokens: int = 0,
    kv: float = 0.0,
    stale: bool = False,
    adapters: frozenset[str] = frozenset(),
    active: tuple[str, ...] = (),
    max_loras: int = 0,
) -> EndpointState:
    return EndpointState(
        endpoint=Endpoint(url=url),
        metrics=EngineMetrics(
            num_requests_running=running,
            num_requests_waiting=waiting,
            kv_cache_usage=kv,
            active_loras=active,
            max_loras=max_loras,
        ),
        stale=stale,
        in_flight_requests=in_flight,
        in_flight_tokens=tokens,
        loaded_adapters=adapters,
    )


def request(
    hashes: list[int] | None = None, lora: str | None = None, session: str | None = None
) -> RoutingRequest:
    return RoutingRequest(
        model="m",
        base_model="m",
        lora=lora,
        prompt_token_ids=TOKENS,
        block_hashes=HASHES if hashes is None else hashes,
        session_id=session,
    )


def in_unit_range(scores: list[float]) -> bool:
    return all(0.0 <= s <= 1.0 for s in scores)


def test_queue_depth_counts_engine_queue_and_router_in_flight() -> None:
    cands = [
        state("a", running=2, waiting=8),  # engine says 10
        state("b", in_flight=5),  # router knows 5 the engine has not reported yet
        state("c"),
        state("d", stale=True),
    ]
    scores = QueueDepthScorer().score(request(), cands)
    assert scores == [0.0, 0.5, 1.0, 0.0]
    assert QueueDepthScorer().score(request(), [state("a"), state("b")]) == [1.0, 1.0]


def test_kv_cache_usage_prefers_free_cache_and_zeroes_stale() -> None:
    cands = [state("a", kv=0.9), state("b", kv=0.2), state("c", kv=0.0, stale=True)]
    scores = KvCacheUsageScorer().score(request(), cands)
    assert scores[1] > scores[0] > 0
    assert scores[2] == 0.0
    assert in_unit_range(scores)


def test_in_flight_tokens() -> None:
    cands = [state("a", tokens=30000), state("b", tokens=3000), state("c", tokens=0)]
    scores = InFlightTokensScorer().score(request(), cands)
    assert scores[2] == 1.0 and scores[0] == 0.0
    assert 0.85 < scores[1] < 0.95


def test_bound_by_load_zeroes_endpoints_above_mean_times_factor() -> None:
    cands = [state("a", running=30), state("b", running=10), state("c", running=10)]
    # mean 16.67 × 1.25 = 20.8 (+ slack 0): a is over.
    assert bound_by_load([1.0, 1.0, 0.5], cands, 1.25, 0.0) == [0.0, 1.0, 0.5]
    # A larger factor lets it keep its score.
    assert bound_by_load([1.0, 1.0, 0.5], cands, 2.0, 0.0) == [1.0, 1.0, 0.5]
    # Slack keeps low-load affinity: loads 1, 0, 0 have mean × factor ≈ 0.4.
    low = [state("a", running=1), state("b"), state("c")]
    assert bound_by_load([1.0, 0.0, 0.0], low, 1.25, 2.0) == [1.0, 0.0, 0.0]
    assert bound_by_load([1.0, 0.0, 0.0], low, 1.25, 0.0) == [0.0, 0.0, 0.0]
    assert bound_by_load([1.0], [state("s", stale=True)], 1.25, 2.0) == [0.0]


def test_approx_prefix_scores_share_of_blocks_and_is_bounded_by_load() -> None:
    index = ApproxPrefixIndex(max_entries=1000)
    index.record(HASHES, "a")
    index.record(HASHES[:2], "b")
    scorer = ApproxPrefixScorer(index, load_factor=1.25, load_slack=0.0)
    cands = [state("a", running=4), state("b", running=4), state("c", running=4)]
    assert scorer.score(request(), cands) == [1.0, 0.5, 0.0]
    # The hot prefix's owner overloaded: it loses its affinity, b keeps its partial one.
    hot = [state("a", running=40), state("b", running=4), state("c", running=4)]
    assert scorer.score(request(), hot) == [0.0, 0.5, 0.0]
    assert scorer.score(request(hashes=[]), cands) == [0.0, 0.0, 0.0]


def test_prefix_history_recorder_records_decisions() -> None:
    index = ApproxPrefixIndex(max_entries=1000)
    rec = PrefixHistoryRecorder(index)
    rec.observe(request(), RoutingDecision(endpoint=state("a"), strategy="x", deciding_scorer="y"))
    assert index.match(HASHES, ["a"]) == {"a": 4}


def test_precise_kv_scores_from_events_and_reports_missing_events() -> None:
    index = KvEventIndex(max_blocks=1000)
    reasons: list[str] = []
    scorer = PreciseKvScorer(index, load_slack=0.0, on_fallback=reasons.append)
    cands = [state("a", running=1), state("b", running=1)]
    assert scorer.score(request(), cands) == [0.0, 0.0]
    assert reasons == ["no_kv_events"]
    ev = BlockStored(
        block_hashes=HASHES[:3], parent_block_hash=None, token_ids=TOKENS[:48], block_size=16
    )
    index.apply("b", 0, EventBatch(0.0, [ev]))
    assert scorer.score(request(), cands) == [0.0, 0.75]
    assert reasons == ["no_kv_events"]  # no new fallback once events flow


def test_lora_affinity_prefers_active_then_resident_then_free_slot() -> None:
    cands = [
        state("active", active=("sql",), adapters=frozenset({"sql"})),
        state("resident", adapters=frozenset({"sql"})),
        state("free-slot", active=("x",), max_loras=2),
        state("full", active=("x", "y"), max_loras=2),
    ]
    scores = LoraAffinityScorer().score(request(lora="sql"), cands)
    assert scores[0] > scores[1] > scores[2] > scores[3] == 0.0
    assert in_unit_range(scores)
    assert LoraAffinityScorer().score(request(), cands) == [1.0] * 4


def test_session_affinity_sticks_bounded_and_reports_missing_session() -> None:
    table = SessionTable(max_sessions=10, ttl_s=60)
    reasons: list[str] = []
    scorer = SessionAffinityScorer(table, load_slack=0.0, on_fallback=reasons.append)
    cands = [state("a", running=2), state("b", running=2)]
    assert scorer.score(request(session="s1"), cands) == [0.0, 0.0]
    scorer.observe(
        request(session="s1"), RoutingDecision(endpoint=cands[1], strategy="s", deciding_scorer="")
    )
    assert scorer.score(request(session="s1"), cands) == [0.0, 1.0]
    overloaded = [state("a", running=2), state("b", running=50)]
    assert scorer.score(request(session="s1"), overloaded) == [0.0, 0.0]
    assert scorer.score(request(), cands) == [0.0, 0.0]
    assert reasons == ["no_session_id"]


def test_session_table_is_bounded_and_expires() -> None:
    now = [0.0]
    table = SessionTable(max_sessions=3, ttl_s=10, clock=lambda: now[0])
    for i in range(5):
        table.remember(f"s{i}", "a")
    assert len(table) == 3
    assert table.get("s0") is None and table.get("s4") == "a"
    table.remember("s2", "b")  # refreshed: now the most recent
    table.remember("s5", "a")
    assert table.get("s2") == "b" and table.get("s3") is None
    now[0] = 11.0
    assert table.get("s2") is None
    table.remember("x", "a")
    table.remember("y", "b")
    table.forget_endpoint("a")
    assert table.get("x") is None and table.get("y") == "b"
