"""Routers on the virtual-clock fleet: what they may read, the clairvoyant reference, and Shoal's
production routing pipeline run there unchanged."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from shoal.bench.clairvoyant import EarliestFirstToken, cached_prefix_tokens, predicted_ttft_s
from shoal.bench.virtual_routing import PipelineRouter, engine_url
from shoal.bench.workloads import arrival_times, prefix_groups, shared_prefix, shared_prefix_trace
from shoal.kv_events import KvEvent
from shoal.sim.cluster import ClusterSimulator, EngineSpec, EngineView, round_robin
from shoal.sim.trace import TraceRequest
from shoal.sim.types import EngineRequest, SamplingParams

SPEC = EngineSpec()  # Llama-3.1-8B on H100


def prefix_stream(n: int) -> list[TraceRequest]:
    return shared_prefix_trace(32.0, n)  # 32 groups, 4,000 + 256 tokens in, 128 out


def test_prefix_groups_are_the_groups_of_the_shared_prefix_workload() -> None:
    arrivals = arrival_times(10.0, 50, seed=3)
    for skew in (0.0, 1.5):
        reqs = shared_prefix(
            arrivals, num_groups=8, prefix_tokens=4, suffix_tokens=2, output_tokens=1, seed=3,
            skew=skew,
        )  # fmt: skip
        assert [r.group for r in reqs] == prefix_groups(50, 8, seed=3, skew=skew)


def test_backlog_counts_decodes_and_uncomputed_prompt_tokens() -> None:
    core = SPEC.build()
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    core.add_request(EngineRequest("a", list(range(100, 400)), params))
    assert core.backlog().prefill_tokens == 300 and core.backlog().decode_seqs == 0
    core.step(0.0)  # a's prompt computed, first token sampled: a decodes from now on
    core.add_request(EngineRequest("b", list(range(1000, 1050)), params))
    backlog = core.backlog()
    # Its next decode attends over the 300 prompt tokens and the one sampled token.
    assert (backlog.decode_seqs, backlog.decode_context_tokens) == (1, 301)
    assert (backlog.prefill_tokens, backlog.prefill_context_tokens) == (50, 50)


class Recorder:
    """A PromptRouter and KvEventSink that records what the simulator hands it."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []
        self.step_ends: list[list[float]] = []
        self.events: dict[int, int] = {}

    def route_prompt(
        self, request: TraceRequest, prompt_ids: Sequence[int], engines: Sequence[EngineView]
    ) -> int:
        self.prompts.append(list(prompt_ids))
        self.step_ends.append([v.step_ends_s for v in engines])
        return len(self.prompts) % len(engines)

    def on_kv_events(self, engine: int, at_s: float, events: list[KvEvent]) -> None:
        self.events[engine] = self.events.get(engine, 0) + len(events)


@pytest.mark.parametrize("fast_forward", [True, False])
def test_prompt_routers_see_the_prompt_the_engine_gets_and_every_kv_event(
    fast_forward: bool,
) -> None:
    rec = Recorder()
    report = ClusterSimulator([SPEC, SPEC], rec, fast_forward=fast_forward).run(prefix_stream(20))
    assert report.finished == 20
    # The same group's prompts share their 4,000-token prefix, as the engines see them: the
    # engines' prefix-cache hits need exactly that.
    assert all(len(p) == 4256 for p in rec.prompts)
    assert report.prefix_cache_hit_rate > 0
    # Step ends move forward with the fleet; an engine never reports a step ending in the past
    # of an earlier decision.
    for e in range(2):
        ends = [s[e] for s in rec.step_ends]
        assert ends == sorted(ends)
    assert max(rec.step_ends[-1]) > 0
    # Every engine published BlockStored events for the blocks it computed.
    assert set(rec.events) == {0, 1} and all(n > 0 for n in rec.events.values())


def test_prediction_is_the_measured_ttft_for_a_lone_request() -> None:
    # One engine already decoding a request, then a prompt whose prefix it holds: the clairvoyant
    # prediction at arrival must equal what the engine then measures.
    first = TraceRequest(0.0, 4256, 64, 0, 4000)
    second = TraceRequest(0.05, 4256, 4, 0, 4000)
    predictions: list[float] = []
    inner = EarliestFirstToken()

    class Spy:
        def route_prompt(
            self, request: TraceRequest, prompt_ids: Sequence[int], engines: Sequence[EngineView]
        ) -> int:
            cached = cached_prefix_tokens(engines[0], prompt_ids)
            predictions.append(
                predicted_ttft_s(engines[0], request.arrival_s, len(prompt_ids), cached)
            )
            return inner.route_prompt(request, prompt_ids, engines)

    sim = ClusterSimulator([SPEC], Spy(), fast_forward=False)
    report = sim.run([first, second])
    measured = sorted(report.finished_requests, key=lambda f: f.arrival_time)
    assert measured[1].num_cached_tokens == 4000
    for predicted, fin in zip(predictions, measured, strict=True):
        assert predicted == pytest.approx(fin.ttft, rel=1e-6)


def test_clairvoyant_router_beats_round_robin_and_keeps_prefixes() -> None:
    reqs = prefix_stream(200)
    rr = ClusterSimulator([SPEC] * 4, round_robin()).run(reqs)
    eft = ClusterSimulator([SPEC] * 4, EarliestFirstToken()).run(reqs)
    assert eft.prefix_cache_hit_rate > rr.prefix_cache_hit_rate + 0.2
    assert eft.ttft.p50 < rr.ttft.p50 / 2


def test_shoal_pipeline_runs_on_the_virtual_fleet_with_kv_events() -> None:
    reqs = prefix_stream(200)
    rr = ClusterSimulator([SPEC] * 4, PipelineRouter("round-robin")).run(reqs)
    router = PipelineRouter("kv-aware")
    kv = ClusterSimulator([SPEC] * 4, router).run(reqs)
    assert kv.finished == rr.finished == 200
    # KV events reached the precise index, from every engine, and routing used them: the only
    # fallback is the very first request, before any engine had published anything.
    assert all(router.kv_index.has_events(engine_url(i)) for i in range(4))
    assert dict(router.fallbacks.counts) == {("kv-aware", "no_kv_events"): 1}
    assert kv.prefix_cache_hit_rate > rr.prefix_cache_hit_rate + 0.2
    # The approximate index recorded the decisions too (every pipeline with it does).
    assert len(router.approx_index) > 0


def test_a_scorer_the_virtual_fleet_cannot_feed_is_refused() -> None:
    with pytest.raises(ValueError, match="in-flight-tokens"):
        PipelineRouter("prefix", {"in-flight-tokens": 1.0})
