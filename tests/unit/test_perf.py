"""The performance model: calibration against published vLLM figures, and roofline sanity."""

from __future__ import annotations

import pytest
from bench_scripts import load_bench_script

from shoal.sim.catalog import GPUS, MODELS, get_gpu, get_model
from shoal.sim.perf import BatchShape, PerfModel

calibrate = load_bench_script("calibrate")


# --- calibration --------------------------------------------------------------------------------


@pytest.mark.parametrize("point", calibrate.REFERENCE_POINTS, ids=lambda p: p.name)
def test_reference_point_within_tolerance(point: object) -> None:
    for metric, error in calibrate.errors(point).items():
        if calibrate.is_known_miss(point, metric):
            # A recorded miss must still be one: once the model reproduces it, drop the record.
            assert abs(error) > calibrate.TOLERANCE, f"{metric} now within tolerance ({error:+.1%})"
        else:
            assert abs(error) <= calibrate.TOLERANCE, f"{metric} error {error:+.1%}"


def test_known_misses_publish_the_missed_metric_and_a_reason() -> None:
    for point in calibrate.REFERENCE_POINTS:
        if point.known_miss is not None:
            assert point.known_miss.metric in calibrate.errors(point)
            assert point.known_miss.reason


def test_at_least_three_model_gpu_pairs_reproduce_both_ttft_and_per_token_latency() -> None:
    # Acceptance: >= 3 distinct (model, GPU) pairs within tolerance on both published metrics.
    assert len(calibrate.pairs_within_tolerance()) >= 3


def test_calibration_table_renders_every_point() -> None:
    table = calibrate.markdown_table()
    for point in calibrate.REFERENCE_POINTS:
        assert f"| {point.name} |" in table


# --- catalog ------------------------------------------------------------------------------------


def test_catalog_lookups_accept_names_aliases_and_product_labels() -> None:
    assert get_gpu("h100").name == "H100"
    assert get_gpu("NVIDIA-H100-80GB-HBM3").name == "H100"
    assert get_gpu("nvidia-a100-sxm4-40gb").name == "A100-40GB"
    assert get_model("LLAMA-3.1-8B").name == "meta-llama/Llama-3.1-8B-Instruct"
    with pytest.raises(KeyError, match="known GPUs"):
        get_gpu("TPU-v5e")
    with pytest.raises(KeyError, match="known models"):
        get_model("gpt-5")


def test_catalog_covers_required_entries() -> None:
    assert {"L4", "A10G", "L40S", "A100-40GB", "A100-80GB", "H100", "H200"} <= set(GPUS)
    for name in ("llama-3.1-8b", "llama-3.1-70b", "mistral-7b", "qwen2.5-32b", "tiny"):
        assert get_model(name).name in MODELS


@pytest.mark.parametrize(
    ("name", "published_params"),
    [
        ("llama-3.1-8b", 8.03e9),
        ("llama-3.1-70b", 70.6e9),
        ("mistral-7b", 7.25e9),
        ("qwen2.5-32b", 32.8e9),
    ],
)
def test_parameter_counts_match_published_sizes(name: str, published_params: float) -> None:
    assert get_model(name).num_params == pytest.approx(published_params, rel=0.01)


def test_kv_bytes_per_token() -> None:
    # 2 (K, V) x 32 layers x 8 KV heads x 128 x 2 bytes = 128 KiB.
    assert get_model("llama-3.1-8b").kv_bytes_per_token == 128 * 1024
    tiny = get_model("tiny")
    assert tiny.kv_bytes_per_token == 2 * 2 * 2 * 64 * 2
    assert tiny.max_model_len == 2048


# --- roofline sanity ----------------------------------------------------------------------------


@pytest.fixture
def llama8b_h100() -> PerfModel:
    return PerfModel(get_model("llama-3.1-8b"), get_gpu("H100"))


def _decode(seqs: int, context: int) -> BatchShape:
    return BatchShape(decode_seqs=seqs, decode_context_tokens=seqs * context)


def _prefill(tokens: int) -> BatchShape:
    return BatchShape(
        prefill_tokens=tokens,
        prefill_attention_pairs=tokens * (tokens + 1) // 2,
        prefill_context_tokens=tokens,
    )


def test_empty_step_takes_no_time(llama8b_h100: PerfModel) -> None:
    assert llama8b_h100.step_time(BatchShape()) == 0.0
    assert llama8b_h100.compute_utilization(BatchShape()) == 0.0


def test_decode_step_grows_with_batch_and_context(llama8b_h100: PerfModel) -> None:
    times = [llama8b_h100.step_time(_decode(b, 1000)) for b in (1, 8, 64, 256, 512)]
    assert times == sorted(times) and times[0] < times[-1]
    by_context = [llama8b_h100.step_time(_decode(64, c)) for c in (100, 1000, 8000, 32000)]
    assert by_context == sorted(by_context) and by_context[0] < by_context[-1]


def test_prefill_is_compute_bound_and_decode_memory_bound(llama8b_h100: PerfModel) -> None:
    big_prefill = _prefill(8192)
    compute, memory = llama8b_h100._gpu_times(big_prefill, 1.0)
    assert compute > 3 * memory
    small_decode = _decode(8, 1000)
    compute, memory = llama8b_h100._gpu_times(small_decode, 1.0)
    assert memory > 10 * compute
    # Memory-bound decode at small batch costs about one pass over the weights.
    weights_pass = llama8b_h100.model.weight_bytes / (llama8b_h100.gpu.memory_bandwidth_gbps * 1e9)
    assert weights_pass < llama8b_h100.step_time(small_decode) < 3 * weights_pass


def test_tensor_parallel_is_faster_but_sublinear() -> None:
    model, gpu = get_model("llama-3.1-70b"), get_gpu("H100")
    tp2, tp4 = PerfModel(model, gpu, num_gpus=2), PerfModel(model, gpu, num_gpus=4)
    for shape in (_decode(32, 2000), _prefill(4096)):
        t2, t4 = tp2.step_time(shape), tp4.step_time(shape)
        assert t4 < t2 < 2 * t4
    small = PerfModel(get_model("llama-3.1-8b"), gpu)
    small_tp2 = PerfModel(get_model("llama-3.1-8b"), gpu, num_gpus=2)
    for shape in (_decode(32, 2000), _prefill(4096)):
        assert small_tp2.step_time(shape) < small.step_time(shape) < 2 * small_tp2.step_time(shape)


def test_clock_lock_slows_prefill_much_more_than_decode(llama8b_h100: PerfModel) -> None:
    prefill, decode = _prefill(8192), _decode(16, 1000)
    prefill_slowdown = llama8b_h100.step_time(prefill, 0.5) / llama8b_h100.step_time(prefill)
    decode_slowdown = llama8b_h100.step_time(decode, 0.5) / llama8b_h100.step_time(decode)
    assert prefill_slowdown == pytest.approx(2.0, rel=0.1)
    assert decode_slowdown < 1.15
    with pytest.raises(ValueError):
        llama8b_h100.step_time(decode, 0.0)


def test_compute_utilization_is_a_fraction_and_higher_for_prefill(llama8b_h100: PerfModel) -> None:
    prefill_u = llama8b_h100.compute_utilization(_prefill(8192))
    decode_u = llama8b_h100.compute_utilization(_decode(1, 100))
    assert 0.0 < decode_u < prefill_u <= 1.0
    assert prefill_u > 0.9


def test_lora_adapters_add_cost(llama8b_h100: PerfModel) -> None:
    base = _decode(64, 1000)
    with_loras = BatchShape(decode_seqs=64, decode_context_tokens=64_000, num_loras=4)
    assert llama8b_h100.step_time(with_loras) > llama8b_h100.step_time(base)
    from_cpu = llama8b_h100.lora_load_seconds(16, from_cpu=True)
    from_disk = llama8b_h100.lora_load_seconds(16, from_cpu=False)
    assert 0 < from_cpu < from_disk < 1.0
    assert llama8b_h100.lora_load_seconds(64, True) > from_cpu
    # Rank-16 adapter on every projection of Llama-3.1-8B: ~42M parameters, ~84 MB in BF16.
    assert llama8b_h100.lora_adapter_bytes(16) == pytest.approx(84e6, rel=0.05)


def test_kv_capacity_llama8b_h100(llama8b_h100: PerfModel) -> None:
    tokens = llama8b_h100.kv_cache_capacity_tokens(0.9)
    # 0.9 x 79.6 GiB - 15 GiB of weights - activations ~= 55 GiB of KV at 128 KiB per token.
    assert 400_000 <= tokens <= 500_000
    assert llama8b_h100.kv_cache_capacity_tokens(0.5) < tokens


def test_kv_capacity_grows_with_tensor_parallel() -> None:
    model, gpu = get_model("llama-3.1-70b"), get_gpu("H100")
    assert (
        PerfModel(model, gpu, 8).kv_cache_capacity_tokens()
        > PerfModel(model, gpu, 4).kv_cache_capacity_tokens()
    )


def test_model_that_does_not_fit_raises() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        PerfModel(get_model("llama-3.1-70b"), get_gpu("L4")).kv_cache_capacity_tokens()


def test_step_time_is_cheap(llama8b_h100: PerfModel) -> None:
    import time

    shape = BatchShape(
        prefill_tokens=512,
        prefill_attention_pairs=200_000,
        prefill_context_tokens=2000,
        decode_seqs=500,
        decode_context_tokens=500 * 1500,
        num_loras=2,
    )
    start = time.perf_counter()
    for _ in range(10_000):
        llama8b_h100.step_time(shape)
    # A loose bound: O(1) arithmetic, not a loop over sequences (typically ~1 us per call).
    assert (time.perf_counter() - start) / 10_000 < 50e-6
