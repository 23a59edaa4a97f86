"""The virtual-clock cluster simulator: conservation, determinism, fast-forward equivalence."""

from __future__ import annotations

import dataclasses
import math

import pytest

from shoal.sim.cluster import (
    ROUTERS,
    EngineSpec,
    EngineView,
    SimulationReport,
    least_loaded,
    round_robin,
    simulate,
)
from shoal.sim.engine import EngineCore
from shoal.sim.fastforward import fast_forward
from shoal.sim.trace import TraceRequest, synthetic_workload
from shoal.sim.types import EngineRequest, SamplingParams

SPEC = EngineSpec()


def _workload(seed: int = 1, rate: float = 8.0, duration: float = 15.0) -> list[TraceRequest]:
    return list(
        synthetic_workload(
            rate,
            duration,
            seed=seed,
            prompt_mean=400,
            output_mean=120,
            num_prefix_groups=3,
            prefix_share=0.6,
            prefix_tokens=128,
        )
    )


def _small_kv_fleet() -> list[EngineCore]:
    """Two engines of different GPUs; the second has a KV cache small enough to preempt."""
    roomy = EngineSpec(max_num_seqs=6).engine_config(seed=1)
    cramped = dataclasses.replace(
        EngineSpec(gpu="A100-80GB").engine_config(seed=2), num_gpu_blocks=120, max_model_len=1500
    )
    return [EngineCore(roomy), EngineCore(cramped)]


def _comparable(report: SimulationReport) -> dict[str, object]:
    d = report.to_dict()
    for key in ("wall_s", "speedup", "steps_per_s"):
        d.pop(key)
    return d


def test_every_request_finishes_with_its_trace_length() -> None:
    work = _workload()
    report = simulate(work, [SPEC, SPEC], round_robin())
    assert report.requests == len(work) == report.finished
    assert report.unfinished == 0
    assert report.output_tokens == sum(r.output_tokens for r in work)
    assert report.prompt_tokens == sum(r.prompt_tokens for r in work)
    by_id = {int(f.request_id): f for f in report.finished_requests}
    for i, req in enumerate(work):
        fin = by_id[i]
        assert fin.num_generation_tokens == req.output_tokens
        assert fin.num_prompt_tokens == req.prompt_tokens
        assert fin.arrival_time == req.arrival_s
        assert fin.arrival_time <= fin.queued_time <= fin.first_token_time <= fin.finish_time
        assert len(fin.inter_token_latencies) == req.output_tokens - 1
    assert [e.requests for e in report.engines] == [
        math.ceil(len(work) / 2),
        len(work) // 2,
    ]
    assert report.prefix_cache_hit_rate > 0.0  # the shared system prompts hit
    assert report.simulated_s >= work[-1].arrival_s
    assert 0.0 < report.engines[0].utilization <= 1.0
    assert report.ttft.p50 <= report.ttft.p90 <= report.ttft.p99
    assert report.steps > report.fast_forward_steps > 0
    assert "TTFT" in report.format()


def test_same_inputs_same_report() -> None:
    work = _workload(seed=5)
    a = simulate(work, _small_kv_fleet(), ROUTERS["least-loaded"](), seed=3)
    b = simulate(work, _small_kv_fleet(), ROUTERS["least-loaded"](), seed=3)
    assert _comparable(a) == _comparable(b)
    assert a.finished_requests == b.finished_requests
    assert a.preemptions > 0  # the cramped engine preempted: the hard path was exercised


@pytest.mark.parametrize("router", ["round-robin", "least-loaded"])
def test_fast_forward_matches_plain_stepping(router: str) -> None:
    work = _workload(seed=2, rate=12.0)
    plain = simulate(work, _small_kv_fleet(), ROUTERS[router](), fast_forward=False)
    fast = simulate(work, _small_kv_fleet(), ROUTERS[router](), fast_forward=True)
    assert plain.fast_forward_steps == 0 < fast.fast_forward_steps
    assert plain.preemptions == fast.preemptions > 0
    assert plain.steps == fast.steps
    a = {f.request_id: f for f in plain.finished_requests}
    b = {f.request_id: f for f in fast.finished_requests}
    assert a.keys() == b.keys()
    for rid, x in a.items():
        y = b[rid]
        assert (x.num_generation_tokens, x.num_cached_tokens, x.num_preemptions) == (
            y.num_generation_tokens,
            y.num_cached_tokens,
            y.num_preemptions,
        )
        for field in ("arrival_time", "queued_time", "first_token_time", "finish_time"):
            assert getattr(x, field) == pytest.approx(getattr(y, field), abs=1e-9)
        assert x.inter_token_latencies == pytest.approx(y.inter_token_latencies, abs=1e-9)
    for ex, ey in zip(plain.engines, fast.engines, strict=True):
        assert ex.busy_s == pytest.approx(ey.busy_s, rel=1e-9)
        assert (ex.steps, ex.preemptions, ex.kv_usage_peak) == (
            ey.steps,
            ey.preemptions,
            ey.kv_usage_peak,
        )


def test_fast_forward_leaves_the_core_as_stepping_does() -> None:
    """Token ids, KV blocks, cached hashes and KV events after a window equal k plain steps."""

    def core_with_batch() -> EngineCore:
        core = EngineSpec(block_size=4).build(seed=9)
        for i in range(3):
            params = SamplingParams(max_tokens=40 + i, ignore_eos=i != 1)
            core.add_request(EngineRequest(str(i), list(range(10 + i, 30 + 3 * i)), params))
        core.step(0.0)  # prefill: every request now decodes
        return core

    a, b = core_with_batch(), core_with_batch()
    a.kv.drain_events()
    b.kv.drain_events()
    ff = fast_forward(a, 1.0, math.inf, max_steps=25)
    assert ff is not None and ff.steps == 25
    t, events = 1.0, []
    for _ in range(25):
        res = b.step(t)
        assert not res.finished and res.num_prefill_tokens == 0
        events.extend(res.kv_events)
        t += res.duration
    assert ff.end == t
    assert ff.kv_events == events
    for sa, sb in zip(a._running, b._running, strict=True):
        assert sa.token_ids == sb.token_ids
        assert sa.alloc.blocks == sb.alloc.blocks
        assert sa.alloc.block_hashes == sb.alloc.block_hashes
        assert sa.itls == sb.itls
        assert sa.num_computed == sb.num_computed
    assert a.kv.cached_hashes() == b.kv.cached_hashes()
    assert a.stats == b.stats
    # The horizon cuts the window: steps that start at or after it are left to step().
    c = core_with_batch()
    first = fast_forward(c, 0.0, 1e-9)
    assert first is not None and first.steps == 1
    assert fast_forward(c, 5.0, 5.0) is None


def test_until_stops_admitting() -> None:
    work = _workload(duration=20.0)
    report = simulate(work, [SPEC], until_s=5.0)
    assert report.requests == sum(1 for r in work if r.arrival_s < 5.0)
    assert report.unfinished == 0


def test_truncates_to_max_model_len() -> None:
    spec = EngineSpec(max_model_len=256)
    work = [TraceRequest(0.0, 300, 50), TraceRequest(0.1, 200, 100), TraceRequest(0.2, 10, 10)]
    report = simulate(work, [spec])
    assert report.truncated == 2
    assert report.finished == 3
    assert all(
        f.num_prompt_tokens + f.num_generation_tokens <= 256 for f in report.finished_requests
    )


def test_least_loaded_and_bad_router() -> None:
    cores = [SPEC.build(), SPEC.build()]
    views = [EngineView(i, c) for i, c in enumerate(cores)]
    cores[0].add_request(EngineRequest("x", [5, 6, 7], SamplingParams(max_tokens=3)))
    req = TraceRequest(0.0, 3, 3)
    assert least_loaded(req, views) == 1
    assert views[0].num_waiting == 1 and views[0].num_unfinished == 1
    with pytest.raises(ValueError, match="router returned engine"):
        simulate([req], [SPEC], lambda r, v: 3)
