"""The simulator's /metrics against the real vLLM 0.32.0 recordings (shared/golden/vllm-0.32.0)."""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shoal.sim.metrics import VllmMetrics, token_buckets, vllm_cache_config
from shoal.sim.types import (
    EngineStats,
    FinishedRequestStats,
    FinishReason,
    RequestOutput,
    StepResult,
)

_REPO = Path(__file__).resolve().parents[2]

# Families that exist on the golden server and here; nothing differs. The parser reports counters
# without "_total" and every "_created" gauge as its own family, as the text format declares them.
_DEFAULT_PREFIXES = ("python_", "process_")


def _golden(name: str) -> str:
    candidates = [Path(p) for p in [os.environ.get("SHOAL_GOLDEN_DIR", "")] if p] + [
        _REPO / "shared/golden/vllm-0.32.0",
        _REPO.parent / "shared/golden/vllm-0.32.0",
    ]
    for c in candidates:
        if (c / name).is_file():
            return (c / name).read_text()
    pytest.skip("golden vLLM recordings not found (set SHOAL_GOLDEN_DIR)")


def _metrics(
    *, live_token_timings: bool = False, gpu_count: int = 1, hostname: str | None = None
) -> VllmMetrics:
    cache = vllm_cache_config(
        block_size=32,
        num_gpu_blocks=160,
        max_model_len=2048,
        num_gpu_blocks_override=160,
        kv_cache_memory_bytes=1073741824,
    )
    return VllmMetrics(
        "tiny",
        cache_config=cache,
        max_loras=2,
        live_token_timings=live_token_timings,
        gpu_count=gpu_count,
        hostname=hostname,
    )


Shape = tuple[str, frozenset[str], tuple[str, ...]]


def _shapes(text: str) -> dict[str, Shape]:
    """family -> (type, label names, bucket boundaries)."""
    out: dict[str, Shape] = {}
    for fam in text_string_to_metric_families(text):
        labels: set[str] = set()
        les: list[str] = []
        for s in fam.samples:
            labels |= set(s.labels)
            le = s.labels.get("le")
            if le is not None and le not in les:
                les.append(le)
        out[fam.name] = (fam.type, frozenset(labels), tuple(les))
    return out


def _finished(
    rid: str,
    *,
    reason: FinishReason = FinishReason.LENGTH,
    prompt: int = 200,
    gen: int = 5,
    cached: int = 192,
    t0: float = 1000.0,
) -> FinishedRequestStats:
    itl = [0.02] * (gen - 1)
    first = t0 + 0.5
    return FinishedRequestStats(
        request_id=rid,
        finish_reason=reason,
        lora_name=None,
        num_prompt_tokens=prompt,
        num_generation_tokens=gen,
        num_cached_tokens=cached,
        max_tokens=gen,
        arrival_time=t0,
        queued_time=t0 + 0.1,
        first_token_time=first,
        finish_time=first + sum(itl),
        num_preemptions=0,
        inter_token_latencies=itl,
    )


def _feed_traffic(m: VllmMetrics) -> None:
    """Enough traffic that every family the golden run shows after traffic has series."""
    m.observe_step(
        StepResult(
            duration=0.01,
            outputs=[RequestOutput("a", [5], "x")],
            finished=[],
            kv_events=[],
            num_prefill_tokens=8,
        )
    )
    m.observe_finished(_finished("a"), max_tokens_param=5, n_param=1)
    m.update(EngineStats(num_running=1, running_loras=("tiny-lora",)), now=1.0)
    m.observe_http("GET", "/v1/models", 200, 0.001, 0, 500)
    m.observe_http("POST", "/v1/completions", 400, 0.002, 30, 200)


def test_before_traffic_matches_golden_text() -> None:
    # Byte for byte, apart from the runtime-specific python_/process_ values and the _created
    # timestamps: same families, order, HELP, TYPE, labels, buckets and values.
    def norm(text: str) -> list[str]:
        out = []
        for line in text.splitlines():
            if re.match(r"(# (HELP|TYPE) )?(python_|process_)", line):
                continue
            if "_created" in line and not line.startswith("#"):
                line = re.sub(r" \S+$", " <created>", line)
            out.append(line)
        return out

    golden = norm(_golden("main/001_metrics_before_traffic.prom"))
    ours = norm(_metrics().render()[0].decode())
    assert ours == golden, "\n".join(difflib.unified_diff(golden, ours, lineterm="", n=1))


def test_after_traffic_family_names_types_labels_and_buckets_match_golden() -> None:
    golden = _shapes(_golden("main/096_metrics_after_traffic.prom"))
    m = _metrics()
    _feed_traffic(m)
    ours = _shapes(m.render()[0].decode())
    assert set(ours) == set(golden)
    families = {n for n in golden if not n.endswith("_created")}
    assert len(families) == 55
    for name, (gtype, glabels, gbuckets) in golden.items():
        otype, olabels, obuckets = ours[name]
        assert otype == gtype, name
        assert obuckets == gbuckets, name
        if not name.startswith(_DEFAULT_PREFIXES):
            assert olabels == glabels, name


def test_content_type_is_vllms() -> None:
    exchange = json.loads(_golden("main/096_metrics_after_traffic.json"))
    headers = dict(exchange["response"]["headers"])
    _body, content_type = _metrics().render()
    assert content_type == headers["content-type"]


def test_token_buckets_follow_max_model_len() -> None:
    assert token_buckets(2048) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
    assert token_buckets(8192)[-1] == 5000


def _value(m: VllmMetrics, name: str, **labels: str) -> float:
    # Read through the rendered text so the test covers what Prometheus scrapes.
    for fam in text_string_to_metric_families(m.render()[0].decode()):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name} {labels}")


def test_finished_requests_land_in_the_right_series() -> None:
    m = _metrics()
    m.observe_finished(_finished("a", gen=5), max_tokens_param=8, n_param=1)
    m.observe_finished(
        _finished("b", reason=FinishReason.STOP, gen=1, cached=0), max_tokens_param=16, n_param=1
    )
    m.observe_finished(
        _finished("c", reason=FinishReason.ABORT, gen=0, cached=0), max_tokens_param=0, n_param=1
    )
    ok = {"model_name": "tiny", "engine": "0"}
    assert _value(m, "vllm:request_success_total", finished_reason="length", **ok) == 1
    assert _value(m, "vllm:request_success_total", finished_reason="stop", **ok) == 1
    assert _value(m, "vllm:request_success_total", finished_reason="abort", **ok) == 1
    assert _value(m, "vllm:request_success_total", finished_reason="repetition", **ok) == 0
    assert _value(m, "vllm:request_prompt_tokens_count", **ok) == 3
    assert _value(m, "vllm:request_prompt_tokens_sum", **ok) == 600
    assert _value(m, "vllm:request_generation_tokens_sum", **ok) == 6
    assert _value(m, "vllm:request_prefill_kv_computed_tokens_sum", **ok) == 8 + 200 + 200
    # max_tokens 0 means "not set" and is not observed, as in vLLM.
    assert _value(m, "vllm:request_params_max_tokens_count", **ok) == 2
    assert _value(m, "vllm:request_params_max_tokens_sum", **ok) == 24
    # TTFT for requests that produced a token; ITL once per token after the first.
    assert _value(m, "vllm:time_to_first_token_seconds_count", **ok) == 2
    assert _value(m, "vllm:time_to_first_token_seconds_sum", **ok) == pytest.approx(1.0)
    assert _value(m, "vllm:inter_token_latency_seconds_count", **ok) == 4
    assert _value(m, "vllm:inter_token_latency_seconds_sum", **ok) == pytest.approx(0.08)
    assert _value(m, "vllm:request_decode_time_seconds_sum", **ok) == pytest.approx(0.08)
    assert _value(m, "vllm:request_time_per_output_token_seconds_count", **ok) == 3
    assert _value(m, "vllm:request_time_per_output_token_seconds_sum", **ok) == pytest.approx(0.02)
    assert _value(m, "vllm:request_queue_time_seconds_sum", **ok) == pytest.approx(0.3)
    assert _value(m, "vllm:e2e_request_latency_seconds_count", **ok) == 3
    # e2e: 0.58 s for "a", 0.5 s for "b" and "c" (no decode phase).
    assert _value(m, "vllm:e2e_request_latency_seconds_bucket", le="0.5", **ok) == 2
    assert _value(m, "vllm:e2e_request_latency_seconds_bucket", le="0.8", **ok) == 3
    assert _value(m, "vllm:request_num_preemptions_bucket", le="1.0", **ok) == 3


def test_n_param_is_recorded_once_per_parent() -> None:
    m = _metrics()
    m.observe_finished(_finished("p-0", gen=3), max_tokens_param=8, n_param=2, parent_id="p")
    ok = {"model_name": "tiny", "engine": "0"}
    assert _value(m, "vllm:request_params_n_count", **ok) == 0
    m.observe_finished(_finished("p-1", gen=7), max_tokens_param=8, n_param=2, parent_id="p")
    m.observe_finished(_finished("q", gen=4), max_tokens_param=8, n_param=1)
    # Golden run: request_params_n counts client calls (39) while the per-choice histograms
    # count choices (43).
    assert _value(m, "vllm:request_params_n_count", **ok) == 2
    assert _value(m, "vllm:request_params_n_sum", **ok) == 3
    assert _value(m, "vllm:request_max_num_generation_tokens_sum", **ok) == 7 + 4
    assert _value(m, "vllm:request_params_max_tokens_count", **ok) == 3
    # Without parent_id, "<call>-<index>" request ids name the parent.
    m.observe_finished(_finished("cmpl-1-0", gen=2), max_tokens_param=8, n_param=2)
    assert _value(m, "vllm:request_params_n_count", **ok) == 2
    m.observe_finished(_finished("cmpl-1-1", gen=9), max_tokens_param=8, n_param=2)
    assert _value(m, "vllm:request_params_n_count", **ok) == 3
    assert _value(m, "vllm:request_max_num_generation_tokens_sum", **ok) == 7 + 4 + 9


def test_live_token_timings_leave_ttft_to_the_server() -> None:
    m = _metrics(live_token_timings=True)
    m.observe_first_token(0.25)
    m.observe_inter_token_latency(0.01)
    m.observe_finished(_finished("a", gen=5), max_tokens_param=8, n_param=1)
    ok = {"model_name": "tiny", "engine": "0"}
    assert _value(m, "vllm:time_to_first_token_seconds_count", **ok) == 1
    assert _value(m, "vllm:inter_token_latency_seconds_count", **ok) == 1


def test_iteration_tokens_count_computed_prompt_and_generated_tokens() -> None:
    m = _metrics()
    outputs = [RequestOutput("a", [1], "x"), RequestOutput("b", [2], "y")]
    m.observe_step(StepResult(0.01, outputs, [], [], num_prefill_tokens=100))
    m.observe_step(StepResult(0.0, [], [], []))  # idle: not a step vLLM would log
    ok = {"model_name": "tiny", "engine": "0"}
    assert _value(m, "vllm:iteration_tokens_total_count", **ok) == 1
    assert _value(m, "vllm:iteration_tokens_total_sum", **ok) == 102
    assert _value(m, "vllm:iteration_tokens_total_bucket", le="128.0", **ok) == 1


def test_update_mirrors_engine_totals_like_the_golden_run() -> None:
    m = _metrics()
    # Totals of the golden main/ run at 096_metrics_after_traffic.
    stats = EngineStats(
        num_running=0,
        num_waiting=0,
        kv_cache_usage=0.0,
        prefix_cache_queries=9504,
        prefix_cache_hits=512,
        prompt_tokens=9504,
        prompt_tokens_cached=512,
        generation_tokens=581,
    )
    m.update(stats, now=1.0)
    m.update(stats, now=2.0)  # idempotent
    golden = {
        (f.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(_golden("main/096_metrics_after_traffic.prom"))
        for s in f.samples
        if s.name.startswith(("vllm:prompt_tokens", "vllm:prefix_cache", "vllm:generation"))
        and not s.name.endswith("_created")
    }
    ours = {
        (f.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(m.render()[0].decode())
        for s in f.samples
        if s.name.startswith(("vllm:prompt_tokens", "vllm:prefix_cache", "vllm:generation"))
        and not s.name.endswith("_created")
    }
    assert ours == golden
    # Counters never go backwards, even if the engine's totals do.
    m.update(EngineStats(prompt_tokens=10), now=3.0)
    assert _value(m, "vllm:prompt_tokens_total", model_name="tiny") == 9504
    m.update(EngineStats(prompt_tokens=15), now=4.0)
    assert _value(m, "vllm:prompt_tokens_total", model_name="tiny") == 9509


def test_gauges() -> None:
    m = _metrics()
    m.update(EngineStats(num_running=3, num_waiting=2, kv_cache_usage=0.5), now=1.0)
    ok = {"model_name": "tiny", "engine": "0"}
    assert _value(m, "vllm:num_requests_running", **ok) == 3
    assert _value(m, "vllm:num_requests_waiting", **ok) == 2
    assert _value(m, "vllm:num_requests_waiting_by_reason", reason="capacity", **ok) == 2
    assert _value(m, "vllm:num_requests_waiting_by_reason", reason="deferred", **ok) == 0
    assert _value(m, "vllm:kv_cache_usage_perc", **ok) == 0.5
    assert _value(m, "vllm:engine_sleep_state", sleep_state="awake", **ok) == 1
    m.set_sleep_level(1)
    assert _value(m, "vllm:engine_sleep_state", sleep_state="awake", **ok) == 0
    assert _value(m, "vllm:engine_sleep_state", sleep_state="weights_offloaded", **ok) == 1
    m.observe_admission_rejection("max_num_queued_reqs")
    assert _value(m, "vllm:admission_rejections_total", reason="max_num_queued_reqs") == 1


def _lora_series(m: VllmMetrics) -> dict[tuple[str, str], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render()[0].decode()):
        if fam.name == "vllm:lora_requests_info":
            for s in fam.samples:
                assert s.labels["max_lora"] == "2"
                key = (s.labels["running_lora_adapters"], s.labels["waiting_lora_adapters"])
                out[key] = s.value
    return out


def test_lora_requests_info_series_persist_per_label_combination() -> None:
    m = _metrics()
    m.update(EngineStats(), now=100.0)
    assert _lora_series(m) == {}  # no sample before any traffic
    m.update(EngineStats(num_running=1, running_loras=("a",), waiting_loras=("a",)), now=101.0)
    m.update(EngineStats(num_running=2, running_loras=("a", "b")), now=102.0)
    m.observe_step(StepResult(0.01, [RequestOutput("x", [1], "x")], [], []))
    m.update(EngineStats(), now=103.0)  # the step that finished everything
    m.update(EngineStats(), now=104.0)  # idle: vLLM logs nothing, the timestamp stays
    assert _lora_series(m) == {("a", "a"): 101.0, ("a,b", ""): 102.0, ("", ""): 103.0}


def test_http_metrics_follow_the_instrumentator() -> None:
    m = _metrics()
    m.observe_http("POST", "/v1/completions", 200, 0.05, 120, 300)
    m.observe_http("POST", "/v1/completions", 200, 2.0, 80, 0)
    m.observe_http("GET", "none", 404, 0.001, 0, 22, path="/v1/nope")
    # Excluded by vLLM's patterns, which search the raw path.
    for path in ("/metrics", "/health", "/v1/health", "/ping", "/version", "/v1/load_lora_adapter"):
        m.observe_http("GET", path, 200, 0.001, 0, 0, path=path)
    m.observe_http("GET", "none", 404, 0.001, 0, 22, path="/server_info")
    h = {"handler": "/v1/completions"}
    assert _value(m, "http_requests_total", method="POST", status="2xx", **h) == 2
    assert _value(m, "http_requests_total", method="GET", status="4xx", handler="none") == 1
    assert _value(m, "http_request_size_bytes_sum", **h) == 200
    assert _value(m, "http_response_size_bytes_count", **h) == 2
    assert _value(m, "http_request_duration_seconds_bucket", le="0.1", method="POST", **h) == 1
    assert _value(m, "http_request_duration_highr_seconds_count") == 3
    text = m.render()[0].decode()
    assert 'handler="/metrics"' not in text and "load_lora" not in text


def test_dcgm_gauges_appear_only_once_observed() -> None:
    m = _metrics(gpu_count=2, hostname="node-1")
    assert b"DCGM_FI_DEV" not in m.render()[0]
    m.observe_gpu(1, power_watts=350.0, sm_clock_mhz=1980.0, utilization_pct=87.0)
    assert _value(m, "DCGM_FI_DEV_POWER_USAGE", gpu="1", Hostname="node-1") == 350.0
    assert _value(m, "DCGM_FI_DEV_SM_CLOCK", gpu="1") == 1980.0
    assert _value(m, "DCGM_FI_DEV_GPU_UTIL", gpu="1", device="nvidia1") == 87.0
    # Pre-bound GPU 0 exists too (value 0 until observed), and the vLLM families are untouched.
    assert _value(m, "DCGM_FI_DEV_POWER_USAGE", gpu="0") == 0.0
    dcgm = m.render_dcgm()[0].decode()
    assert "vllm:" not in dcgm and "DCGM_FI_DEV_GPU_UTIL" in dcgm


def test_two_instances_do_not_share_state() -> None:
    a, b = _metrics(), _metrics()
    a.observe_finished(_finished("x"), max_tokens_param=8, n_param=1)
    ok = {"model_name": "tiny", "engine": "0"}
    assert _value(a, "vllm:request_prompt_tokens_count", **ok) == 1
    assert _value(b, "vllm:request_prompt_tokens_count", **ok) == 0
