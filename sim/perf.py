"""Roofline step-time model of an LLM engine step (vLLM-style continuous batching).

One engine step runs one forward pass over every scheduled token: prompt tokens of prefill chunks
and one token per decoding sequence. Its GPU time is bounded by the larger of

* compute: matmul FLOPs (2 x parameters x tokens, plus attention's query-key pairs) over the
  dense BF16 tensor throughput, scaled by an achieved-efficiency factor and the SM clock; and
* memory: bytes streamed from HBM (all weights once per step, the KV cache that attention reads,
  the KV that the step writes) over memory bandwidth, scaled by an achieved-efficiency factor;

and on top of it come the parts a roofline does not see: host-side step overhead (scheduling,
input preparation, sampling, output processing) that vLLM does not overlap with the GPU, a
per-sequence share of it, tensor-parallel all-reduces, and the cost of mixing LoRA adapters.

The constants live in :class:`Efficiency`; ``docs/calibration.md`` explains how they were fitted
to published vLLM measurements and how close the model lands (``bench/calibrate.py``).

``step_time`` runs once per simulated engine step, so everything that does not depend on the batch
is folded into a handful of coefficients in ``PerfModel.__init__``; a call is a few float ops.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.sim.catalog import GpuSpec, ModelSpec

_GIB = 1024**3


def causal_pairs(new_tokens: int, cached_tokens: int) -> int:
    """Query-key pairs of a prefill chunk: ``new_tokens`` queries, each attending to the
    ``cached_tokens`` before the chunk and causally within it (``BatchShape`` sums these)."""
    return new_tokens * cached_tokens + new_tokens * (new_tokens + 1) // 2


@dataclass(frozen=True, slots=True)
class BatchShape:
    """What one engine step computes, summed over its sequences (never a list of them)."""

    # New prompt tokens computed this step (chunked-prefill chunks summed).
    prefill_tokens: int = 0
    # Sum over prefill chunks of new * (cached_before + (new + 1) / 2): causal query-key pairs,
    # for attention FLOPs.
    prefill_attention_pairs: int = 0
    # Sum over prefill chunks of cached_before + new: KV that prefill attention reads.
    prefill_context_tokens: int = 0
    # Sequences producing one token this step.
    decode_seqs: int = 0
    # Sum of the decoding sequences' context lengths: KV that decode attention reads.
    decode_context_tokens: int = 0
    # Distinct LoRA adapters used by the step's sequences.
    num_loras: int = 0

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.decode_seqs


@dataclass(frozen=True, slots=True)
class Efficiency:
    """Calibrated constants of the step-time model (see docs/calibration.md for the fit)."""

    # Achieved fraction of dense BF16 tensor peak over the step's matmuls and attention, end to
    # end: large GEMMs alone reach 70-80% of peak on A100/H100, the step's other kernels (norms,
    # rotary, activation, sampling) and smaller tile shapes bring the step average lower.
    compute: float
    # Achieved fraction of peak memory bandwidth over a memory-bound step, end to end. A pure
    # streaming kernel reaches 80-90%; a decode step is dozens of kernels per layer with launch
    # gaps and small reads between the big weight streams, so the step average is lower.
    memory: float
    # Fixed host time per step that the GPU waits for: scheduling, building input tensors,
    # launching the CUDA graph, sampling bookkeeping, returning outputs.
    step_overhead_s: float
    # Host time per scheduled sequence per step (block tables, sampling metadata, detokenizing).
    per_seq_overhead_s: float
    # Latency of one all-reduce (kernel launch plus NVLink/PCIe round trips), paid twice per layer.
    tp_comm_latency_s: float
    # Achieved fraction of the interconnect bandwidth by the all-reduce's data transfer.
    tp_comm_efficiency: float
    # Extra per-step host cost with tensor-parallel workers: broadcasting the step's inputs to
    # every worker and gathering the sampled tokens back.
    tp_step_overhead_s: float
    # Multiplicative cost per distinct LoRA adapter in a step: the batched LoRA kernels (Punica
    # SGMV/BGMV) add a shrink and an expand per adapted projection and lose batching across
    # adapters; S-LoRA and Punica report a few percent per adapter at small batch.
    lora_per_adapter_overhead: float
    # Client-observed latency outside engine steps for one request: HTTP handling, tokenization,
    # hand-off from the API server to the engine and streaming the first chunk back. Added to TTFT
    # by the calibration; the simulator's real HTTP server incurs its own instead.
    request_overhead_s: float
    # Memory per GPU that vLLM's profiling run sets aside outside weights and KV cache:
    # peak activations for a max-size batch, CUDA graphs, NCCL buffers, non-torch allocations.
    activation_reserve_gib: float = 1.5
    # How much a lower SM clock slows memory-bound kernels: at clock fraction f memory time grows
    # by 1 / (1 - s * (1 - f)). Memory clocks are not locked with SM clocks, so the effect is small
    # (POLCA, Patel et al. 2023: token generation throughput barely drops under SM frequency caps
    # that cost prefill tens of percent).
    memory_clock_sensitivity: float = 0.1
    # Power-relevant activity of a memory-bound kernel relative to a compute-bound one. Used only
    # by compute_utilization() to feed the power model: HBM-streaming decode keeps SMs and the
    # memory system busy enough to draw ~60% of the dynamic power of a GEMM-bound prefill
    # (POLCA: token phase power well below prompt phase power).
    memory_bound_activity: float = 0.6


# Calibrated against vLLM v0.5.4 (Lambda Labs' vllm-benchmark, 2024): compute/memory/TP terms are
# GPU-side and shared with the modern preset; its host overheads are those of the v0.5 engine,
# whose CPU time per step and per sequence was large enough to leave H100s idle between steps
# (vLLM blog, "vLLM v0.6.0: 2.7x Throughput Improvement and 5x Latency Reduction", 2024-09-05).
VLLM_V05_EFFICIENCY = Efficiency(
    compute=0.60,
    memory=0.58,
    step_overhead_s=0.8e-3,
    per_seq_overhead_s=0.12e-3,
    tp_comm_latency_s=25e-6,
    tp_comm_efficiency=0.3,
    tp_step_overhead_s=0.5e-3,
    lora_per_adapter_overhead=0.05,
    request_overhead_s=20e-3,
)

# Modern vLLM (v0.6+: CUDA graphs everywhere, multi-process front end, async output processing,
# the V1 engine): the same GPU-side constants (compute, memory, tp_comm_efficiency) with the host
# overheads that the v0.6 rewrite cut, and the custom one-shot all-reduce's lower latency;
# calibrated against the vLLM project's nightly latency benchmark (docs/calibration.md). This is
# the default.
VLLM_V1_EFFICIENCY = Efficiency(
    compute=0.60,
    memory=0.58,
    step_overhead_s=0.5e-3,
    per_seq_overhead_s=0.01e-3,
    tp_comm_latency_s=8e-6,
    tp_comm_efficiency=0.3,
    tp_step_overhead_s=1.0e-3,
    lora_per_adapter_overhead=0.05,
    request_overhead_s=10e-3,
)

DEFAULT_EFFICIENCY = VLLM_V1_EFFICIENCY

# LoRA adapter loading (vLLM's LRU adapter cache): a copy from pinned host memory over PCIe Gen4/5
# reaches ~20 GB/s in practice; loading from local NVMe includes safetensors parsing and reaches
# ~1.5 GB/s. The fixed parts cover allocating the adapter slot and registering its weights.
_LORA_HOST_TO_DEVICE_BYTES_PER_S = 20e9
_LORA_DISK_BYTES_PER_S = 1.5e9
_LORA_FIXED_FROM_CPU_S = 2e-3
_LORA_FIXED_FROM_DISK_S = 30e-3


class PerfModel:
    """Step time, utilisation and memory capacity of one engine replica (``num_gpus``-way TP)."""

    def __init__(
        self,
        model: ModelSpec,
        gpu: GpuSpec,
        num_gpus: int = 1,
        efficiency: Efficiency | None = None,
    ) -> None:
        if num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
        self.model = model
        self.gpu = gpu
        self.num_gpus = num_gpus
        self.efficiency = eff = efficiency if efficiency is not None else DEFAULT_EFFICIENCY

        n = float(num_gpus)
        flops_per_s = n * gpu.bf16_tflops * 1e12 * eff.compute
        bytes_per_s = n * gpu.memory_bandwidth_gbps * 1e9 * eff.memory

        # Compute seconds per unit of each BatchShape field (at full clock).
        self._c_token = 2.0 * model.params_non_embedding / flops_per_s
        self._c_logits = 2.0 * model.lm_head_params / flops_per_s  # per decoding sequence
        # QK^T and PV: 2 FLOPs per multiply-add, 2 matmuls, every head, every layer.
        self._c_attn = 4.0 * model.num_layers * model.num_heads * model.head_dim / flops_per_s

        # Memory seconds: the whole weight set (minus the embedding table, which is gathered row by
        # row) streams once per step; KV is read by attention and written for every new token.
        weight_stream_bytes = (model.num_params - model.embedding_params) * model.dtype_bytes
        self._m_weights = weight_stream_bytes / bytes_per_s
        self._m_kv = model.kv_bytes_per_token / bytes_per_s

        # Tensor parallelism: two all-reduces per layer (after attention and after the MLP) of the
        # step's hidden states; a ring moves 2 (n - 1) / n of the buffer through each GPU's link.
        if num_gpus > 1:
            ring = 2.0 * (n - 1.0) / n
            link = gpu.interconnect_gbps * 1e9 * eff.tp_comm_efficiency
            all_reduces = 2 * model.num_layers
            self._tp_fixed = all_reduces * eff.tp_comm_latency_s + eff.tp_step_overhead_s
            self._tp_per_token = all_reduces * ring * model.hidden_size * model.dtype_bytes / link
        else:
            self._tp_fixed = 0.0
            self._tp_per_token = 0.0

    # --- step time ------------------------------------------------------------------------------

    def _gpu_times(self, shape: BatchShape, clock_fraction: float) -> tuple[float, float]:
        """(compute seconds, memory seconds) of the step's kernels at the given SM clock."""
        if not 0.0 < clock_fraction <= 1.0:
            raise ValueError(f"clock_fraction must be in (0, 1], got {clock_fraction}")
        tokens = shape.prefill_tokens + shape.decode_seqs
        compute = (
            self._c_token * tokens
            + self._c_logits * shape.decode_seqs
            + self._c_attn * (shape.prefill_attention_pairs + shape.decode_context_tokens)
        ) / clock_fraction
        memory = self._m_weights + self._m_kv * (
            shape.prefill_context_tokens + shape.decode_context_tokens + tokens
        )
        sensitivity = self.efficiency.memory_clock_sensitivity
        memory /= 1.0 - sensitivity * (1.0 - clock_fraction)
        return compute, memory

    def _kernel_time(self, shape: BatchShape, compute: float, memory: float) -> float:
        kernels = compute if compute > memory else memory
        if shape.num_loras > 0:
            kernels *= 1.0 + self.efficiency.lora_per_adapter_overhead * shape.num_loras
        return kernels

    def step_time(self, shape: BatchShape, clock_fraction: float = 1.0) -> float:
        """Seconds one engine step takes; 0 for an empty step."""
        tokens = shape.prefill_tokens + shape.decode_seqs
        if tokens <= 0:
            return 0.0
        compute, memory = self._gpu_times(shape, clock_fraction)
        eff = self.efficiency
        return (
            self._kernel_time(shape, compute, memory)
            + self._tp_fixed
            + self._tp_per_token * tokens
            + eff.step_overhead_s
            + eff.per_seq_overhead_s * shape.decode_seqs
        )

    def compute_utilization(self, shape: BatchShape, clock_fraction: float = 1.0) -> float:
        """Share of the step the SMs are busy, in [0, 1], weighted for power.

        Compute-bound kernel time counts fully, memory-bound kernel time counts
        ``memory_bound_activity``; host overhead and communication waits count as idle. This is the
        utilisation that :class:`shoal.sim.power.GpuPowerModel` turns into watts.
        """
        tokens = shape.prefill_tokens + shape.decode_seqs
        if tokens <= 0:
            return 0.0
        compute, memory = self._gpu_times(shape, clock_fraction)
        kernels = self._kernel_time(shape, compute, memory)
        if compute >= memory:
            activity = kernels
        else:
            # A memory-bound step computes for `compute` seconds of its `memory` and streams for
            # the rest; LoRA stretches both parts alike.
            stretch = kernels / memory
            busy_memory = memory - compute
            activity = stretch * (compute + self.efficiency.memory_bound_activity * busy_memory)
        total = self.step_time(shape, clock_fraction)
        return max(0.0, min(1.0, activity / total))

    # --- memory ---------------------------------------------------------------------------------

    def kv_cache_capacity_tokens(self, gpu_memory_utilization: float = 0.9) -> int:
        """Tokens of KV cache that fit next to the weights, as vLLM sizes its cache.

        vLLM takes ``gpu_memory_utilization`` of every GPU's memory, subtracts the weights and the
        peak of a profiling run (activations, CUDA graphs, communication buffers), and gives the
        rest to KV blocks. Raises ``ValueError`` when nothing is left.
        """
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}"
            )
        budget = self.gpu.memory_bytes * gpu_memory_utilization * self.num_gpus
        reserve = self.efficiency.activation_reserve_gib * _GIB * self.num_gpus
        free = budget - self.model.weight_bytes - reserve
        if free <= 0:
            raise ValueError(
                f"{self.model.name} does not fit on {self.num_gpus}x {self.gpu.name} at "
                f"gpu_memory_utilization={gpu_memory_utilization}: weights need "
                f"{self.model.weight_bytes / _GIB:.1f} GiB plus "
                f"{reserve / _GIB:.1f} GiB of activations, but only {budget / _GIB:.1f} GiB is "
                "available; use more GPUs (tensor parallelism) or a larger GPU"
            )
        return int(free // self.model.kv_bytes_per_token)

    # --- LoRA -----------------------------------------------------------------------------------

    def lora_adapter_bytes(self, rank: int) -> int:
        """Bytes of a rank-``rank`` adapter on every attention and MLP projection of every layer."""
        m = self.model
        q_out = m.num_heads * m.head_dim
        kv_out = m.num_kv_heads * m.head_dim
        h, inter = m.hidden_size, m.intermediate_size
        # A LoRA pair on a (d_in -> d_out) projection holds rank * (d_in + d_out) parameters.
        per_layer = (
            (h + q_out)  # q_proj
            + 2 * (h + kv_out)  # k_proj, v_proj
            + (q_out + h)  # o_proj
            + 2 * (h + inter)  # gate_proj, up_proj
            + (inter + h)  # down_proj
        )
        return rank * per_layer * m.num_layers * m.dtype_bytes

    def lora_load_seconds(self, rank: int, from_cpu: bool) -> float:
        """Seconds to bring an adapter onto the GPU: from host memory (vLLM's CPU LoRA cache) or
        from local disk."""
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        size = float(self.lora_adapter_bytes(rank))
        if from_cpu:
            return _LORA_FIXED_FROM_CPU_S + size / _LORA_HOST_TO_DEVICE_BYTES_PER_S
        return _LORA_FIXED_FROM_DISK_S + size / _LORA_DISK_BYTES_PER_S
