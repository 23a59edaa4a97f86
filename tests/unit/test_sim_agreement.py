"""bench/sim_agreement.py sends the real engines exactly the requests the virtual clock runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_scripts import load_bench_script

from shoal.bench.client import request_body
from shoal.sim.cluster import ClusterSimulator, EngineSpec, round_robin
from shoal.sim.engine import EngineCore
from shoal.sim.tokenizer import SimTokenizer
from shoal.sim.types import EngineRequest

agreement = load_bench_script("sim_agreement")


class RecordingCore(EngineCore):
    """An engine core that remembers every request the cluster simulator gives it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.received: list[EngineRequest] = []

    def add_request(self, req: EngineRequest) -> None:
        self.received.append(req)
        super().add_request(req)


def _trace(path: Path) -> Path:
    rows = [
        ("2023-11-16 18:15:46.6805900", 300, 20),
        ("2023-11-16 18:15:46.9951690", 2000, 700),  # longer than max_model_len below: clamped
        ("2023-11-16 18:15:47.3000000", 40, 1),
        ("2023-11-16 18:15:48.1000000", 128, 64),
        ("2023-11-16 18:15:50.0000000", 10, 5),
    ]
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(f"{t},{p},{o}\n" for t, p, o in rows)
    )
    return path


def test_prompt_text_round_trips_through_the_simulator_tokenizer() -> None:
    tok = SimTokenizer(128256)
    ids = [4, 5, 1000, 65535, 4, 77]
    assert tok.encode(agreement.prompt_text(ids)) == ids


def test_both_sides_get_the_same_requests(tmp_path: Path) -> None:
    spec = EngineSpec(max_model_len=1024)
    config = spec.engine_config()
    workload = agreement.load_workload(
        _trace(tmp_path / "trace.csv"),
        start_s=0.0,
        duration_s=10.0,
        rate_scale=2.0,
        max_model_len=config.max_model_len,
    )
    assert [r.prompt_tokens for r in workload] == [300, 1023, 40, 128, 10]
    assert [r.output_tokens for r in workload] == [20, 1, 1, 64, 5]
    assert workload[-1].arrival_s == pytest.approx((50.0 - 46.68059) / 2.0)

    seed = 7
    reqs = agreement.bench_requests(workload, seed=seed, vocab_size=config.model.vocab_size)
    cores = [RecordingCore(spec.engine_config(seed=i)) for i in range(2)]
    report = ClusterSimulator(cores, round_robin(), seed=seed).run(workload)
    assert report.finished == len(workload) and report.truncated == 0

    received = {r.request_id: r for core in cores for r in core.received}
    assert sorted(received) == [str(i) for i in range(len(workload))]
    tok = SimTokenizer(config.model.vocab_size)
    for i, req in enumerate(reqs):
        virtual = received[str(i)]
        assert req.arrival_s == virtual.arrival_time
        assert tok.encode(req.prompt) == virtual.prompt_token_ids
        assert req.prompt_tokens == len(virtual.prompt_token_ids)
        assert req.output_tokens == virtual.params.max_tokens and virtual.params.ignore_eos
        _, body = request_body(req, model="m", stream=True)
        sent = json.loads(body)
        assert sent["max_tokens"] == req.output_tokens and sent["ignore_eos"] is True
    # Different requests get different prompts (no accidental prefix-cache sharing).
    assert len({r.prompt for r in reqs}) == len(reqs)


def test_real_latencies_scale_to_simulated_time_and_reject_mismatches() -> None:
    from shoal.bench.client import RequestResult, RunResult
    from shoal.bench.workloads import BenchRequest

    reqs = [
        BenchRequest(0.0, 11, prompt="w1 w2", prompt_tokens=2),
        BenchRequest(1.0, 11, prompt="w3", prompt_tokens=1),
    ]
    good = RequestResult(0, 0.0, 200, ttft_s=0.2, e2e_s=1.2, output_tokens=11, prompt_tokens=2)
    short = RequestResult(1, 1.0, 200, ttft_s=0.2, e2e_s=1.2, output_tokens=10, prompt_tokens=1)
    side = agreement.real_latencies(RunResult([good, short], 2.0), reqs, 0.5)
    assert side.errors == 1
    assert side.ttft.count == 1 and abs(side.ttft.p50 - 0.1) < 1e-12
    assert abs(side.e2e.p50 - 0.6) < 1e-12
    assert abs(side.tpot.p50 - 0.05) < 1e-12
