"""The TTFT floor that routing-quality targets are judged by: is it really a floor, and of what."""

from __future__ import annotations

import pytest

from shoal.bench.ttft_floor import prefill_alone_s, shared_prefix_floor
from shoal.bench.workloads import arrival_times, shared_prefix
from shoal.sim.catalog import get_gpu, get_model
from shoal.sim.engine import EngineCore, sized_engine_config
from shoal.sim.perf import PerfModel
from shoal.sim.types import EngineRequest, SamplingParams

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"


def llama_on_h100() -> PerfModel:
    return PerfModel(get_model(LLAMA_8B), get_gpu("H100"))


def test_the_floor_is_what_a_lone_engine_measures() -> None:
    # One engine, one request at a time: nothing queues, nothing shares the step, so the engine's
    # own TTFT is the best any router could arrange, and the floor must not exceed it.
    core = EngineCore(sized_engine_config(model=LLAMA_8B, gpu="H100"))
    prefix = list(range(1000, 5000))  # 4,000 tokens: 250 full blocks of 16
    measured = []
    t = 0.0
    for i, suffix_start in enumerate((10_000, 20_000)):  # cold, then warm on the same prefix
        prompt = prefix + list(range(suffix_start, suffix_start + 256))
        params = SamplingParams(max_tokens=1, ignore_eos=True)
        core.add_request(EngineRequest(f"r{i}", prompt, params, arrival_time=t))
        while core.has_unfinished():
            step = core.step(t)
            t += step.duration
            for fin in step.finished:
                measured.append((fin.ttft, fin.num_cached_tokens))
    (cold_ttft, cold_hits), (warm_ttft, warm_hits) = measured
    assert (cold_hits, warm_hits) == (0, 4000)

    perf = llama_on_h100()
    cold_floor, warm_floor = prefill_alone_s(perf, 0, 4256), prefill_alone_s(perf, 4000, 256)
    # Equal up to float rounding: the floor prices the step exactly as the engine does.
    assert cold_ttft == pytest.approx(cold_floor, rel=1e-9)
    assert warm_ttft == pytest.approx(warm_floor, rel=1e-9)
    # The gap routing can close is large: a warm prefill is a small fraction of a cold one.
    assert warm_floor < cold_floor / 5


def test_first_visits_of_each_group_are_cold_and_decide_a_short_streams_p90() -> None:
    # The routing-quality benchmark's stream: 32 equally popular groups, 4,000 + 256 tokens,
    # 192 requests. Each group's first request is cold whatever the router does; with more than
    # 10% of requests cold the p90 floor is the cold prefill, and a longer stream brings it down.
    perf = llama_on_h100()

    def stream(n: int) -> list:  # type: ignore[type-arg]
        return shared_prefix(
            arrival_times(3.2, n, seed=0),
            num_groups=32,
            prefix_tokens=4000,
            suffix_tokens=256,
            output_tokens=128,
        )

    short = shared_prefix_floor(stream(192), perf, prefix_tokens=4000)
    assert short.cold_requests == 32
    assert short.cold_s == pytest.approx(prefill_alone_s(perf, 0, 4256))
    assert short.percentile_s(90) == pytest.approx(short.cold_s)
    assert short.percentile_s(50) == pytest.approx(short.warm_s)

    long = shared_prefix_floor(stream(640), perf, prefix_tokens=4000)
    assert long.cold_requests == 32  # 5% of the stream
    assert long.percentile_s(90) == pytest.approx(long.warm_s)


def test_requests_without_a_group_are_refused_not_guessed() -> None:
    from shoal.bench.workloads import BenchRequest

    with pytest.raises(ValueError, match="prefix group"):
        shared_prefix_floor(
            [BenchRequest(arrival_s=0.0, output_tokens=1, prompt_tokens=10)],
            llama_on_h100(),
            prefix_tokens=4,
        )
    with pytest.raises(ValueError, match="at least one token"):
        prefill_alone_s(llama_on_h100(), 100, 0)
