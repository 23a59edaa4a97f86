"""Hardware and model catalog for the engine simulator's performance and power models.

Every constant carries its source. GPU figures are NVIDIA datasheet values (dense tensor-core
throughput, i.e. *without* 2:4 structured sparsity, because LLM weights are dense); model shapes
are copied from each model's Hugging Face ``config.json``; prices are reference on-demand cloud
prices per GPU (instance price divided by GPUs per instance) and only ever used for relative cost
comparisons, so their exact date matters less than their ratios.

Lookups accept canonical names, short aliases (case-insensitive) and, for GPUs, the
``nvidia.com/gpu.product`` node-label values that GPU feature discovery publishes, so a Kubernetes
node's label can be handed straight to :func:`get_gpu`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

_GIB = 1024**3


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU SKU. Bandwidths are in GB/s (10^9 bytes/s), compute in TFLOP/s (10^12)."""

    name: str
    memory_gib: float
    memory_bandwidth_gbps: float
    bf16_tflops: float
    tdp_watts: float
    idle_watts: float
    max_sm_clock_mhz: float
    min_sm_clock_mhz: float
    # Per-GPU, per-direction bandwidth a tensor-parallel all-reduce can use: NVLink where the
    # SKU has it, else PCIe Gen4 x16 (~32 GB/s per direction).
    interconnect_gbps: float
    price_per_hour: float
    product_labels: tuple[str, ...]
    source: str

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * _GIB

    @property
    def has_nvlink(self) -> bool:
        return self.interconnect_gbps > 64.0


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Decoder-only transformer shapes (Llama-style: GQA attention, gated MLP)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_params: int
    max_model_len: int
    source: str
    dtype_bytes: int = 2
    aliases: tuple[str, ...] = ()

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer, for one token."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def embedding_params(self) -> int:
        """The input embedding table: looked up row by row, never multiplied nor streamed whole."""
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def params_non_embedding(self) -> int:
        """Parameters that a token's forward pass multiplies by, minus the output head.

        The LM head is counted separately because vLLM computes logits only for the positions it
        samples from (one per decoding sequence), not for every prompt token.
        """
        return self.num_params - self.embedding_params - self.lm_head_params


def transformer_params(
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    intermediate_size: int,
    vocab_size: int,
    tie_word_embeddings: bool = False,
    attention_bias: bool = False,
) -> int:
    """Parameter count of a Llama-style decoder from its config shapes.

    Per layer: Q and O projections (hidden x heads*head_dim), K and V (hidden x kv_heads*head_dim),
    the gated MLP (three hidden x intermediate matrices) and two RMSNorm weight vectors. Plus the
    embedding table, the LM head (unless tied) and the final norm.
    """
    q_out = num_heads * head_dim
    kv_out = num_kv_heads * head_dim
    attn = 2 * hidden_size * q_out + 2 * hidden_size * kv_out
    if attention_bias:  # Qwen2 has biases on q, k and v (not on o).
        attn += q_out + 2 * kv_out
    mlp = 3 * hidden_size * intermediate_size
    per_layer = attn + mlp + 2 * hidden_size
    embed = vocab_size * hidden_size
    head = 0 if tie_word_embeddings else vocab_size * hidden_size
    return num_layers * per_layer + embed + head + hidden_size


# --- GPUs ---------------------------------------------------------------------------------------
# Clock ranges: max = datasheet max boost clock; min = the lowest supported application/locked SM
# clock reported by `nvidia-smi -q -d SUPPORTED_CLOCKS` (210 MHz on data-center parts), which is the
# floor a power controller may lock to. Idle watts are typical `nvidia-smi` readings of an idle
# card with the driver loaded (persistence mode), not datasheet values; the power model only needs
# them to anchor the zero-utilisation end.

_PCIE4 = 32.0  # PCIe Gen4 x16: 64 GB/s bidirectional, ~32 GB/s per direction.

GPUS: dict[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        GpuSpec(
            name="L4",
            memory_gib=22.5,  # 24 GB GDDR6 nominal; 23034 MiB visible to CUDA.
            memory_bandwidth_gbps=300.0,
            bf16_tflops=121.0,  # 242 with sparsity.
            tdp_watts=72.0,
            idle_watts=16.0,
            max_sm_clock_mhz=2040.0,
            min_sm_clock_mhz=210.0,
            interconnect_gbps=_PCIE4,
            price_per_hour=0.71,  # GCP g2-standard-4 (1x L4), us-central1 on-demand.
            product_labels=("NVIDIA-L4",),
            source=(
                "NVIDIA L4 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/l4); "
                "GCP Compute Engine GPU pricing (g2-standard-4)"
            ),
        ),
        GpuSpec(
            name="A10G",
            memory_gib=22.0,  # 24 GB GDDR6 nominal; 22731 MiB visible to CUDA.
            memory_bandwidth_gbps=600.0,
            # AWS's A10 variant trades tensor throughput for CUDA-core throughput: ~70 dense
            # FP16/BF16 tensor TFLOPS versus the A10's 125 (Baseten, "NVIDIA A10 vs A10G").
            bf16_tflops=70.0,
            tdp_watts=300.0,
            idle_watts=25.0,
            max_sm_clock_mhz=1710.0,
            min_sm_clock_mhz=210.0,
            interconnect_gbps=_PCIE4,
            price_per_hour=1.006,  # AWS g5.xlarge (1x A10G), us-east-1 on-demand.
            product_labels=("NVIDIA-A10G",),
            source=(
                "baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference; "
                "AWS EC2 G5 instance page and on-demand pricing (g5.xlarge)"
            ),
        ),
        GpuSpec(
            name="L40S",
            memory_gib=44.5,  # 48 GB GDDR6 nominal; 46068 MiB visible to CUDA.
            memory_bandwidth_gbps=864.0,
            bf16_tflops=362.0,  # 733 with sparsity.
            tdp_watts=350.0,
            idle_watts=30.0,
            max_sm_clock_mhz=2520.0,
            min_sm_clock_mhz=210.0,
            interconnect_gbps=_PCIE4,
            price_per_hour=1.861,  # AWS g6e.xlarge (1x L40S), us-east-1 on-demand.
            product_labels=("NVIDIA-L40S",),
            source=(
                "NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s); "
                "AWS EC2 G6e on-demand pricing (g6e.xlarge)"
            ),
        ),
        GpuSpec(
            name="A100-40GB",
            memory_gib=40.0,
            memory_bandwidth_gbps=1555.0,
            bf16_tflops=312.0,
            tdp_watts=400.0,
            idle_watts=50.0,
            max_sm_clock_mhz=1410.0,
            min_sm_clock_mhz=210.0,
            interconnect_gbps=300.0,  # NVLink 3: 600 GB/s bidirectional.
            price_per_hour=3.67,  # GCP a2-highgpu-1g, us-central1 on-demand.
            product_labels=("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB"),
            source=(
                "NVIDIA A100 Tensor Core GPU datasheet (SXM4 40GB); "
                "GCP Compute Engine GPU pricing (a2-highgpu-1g)"
            ),
        ),
        GpuSpec(
            name="A100-80GB",
            memory_gib=80.0,
            memory_bandwidth_gbps=2039.0,
            bf16_tflops=312.0,
            tdp_watts=400.0,
            idle_watts=55.0,
            max_sm_clock_mhz=1410.0,
            min_sm_clock_mhz=210.0,
            interconnect_gbps=300.0,
            price_per_hour=5.07,  # GCP a2-ultragpu-1g, us-central1 on-demand.
            product_labels=("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"),
            source=(
                "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB); "
                "GCP Compute Engine GPU pricing (a2-ultragpu-1g)"
            ),
        ),
        GpuSpec(
            name="H100",
            memory_gib=79.6,  # 80 GB HBM3 nominal; 81559 MiB visible to CUDA.
            memory_bandwidth_gbps=3350.0,
            bf16_tflops=989.0,  # 1979 with sparsity.
            tdp_watts=700.0,
            idle_watts=70.0,
            max_sm_clock_mhz=1980.0,
            min_sm_clock_mhz=210.0,
            interconnect_gbps=450.0,  # NVLink 4: 900 GB/s bidirectional.
            price_per_hour=12.29,  # AWS p5.48xlarge $98.32/h / 8 GPUs, us-east-1 (2024 list).
            product_labels=("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-SXM5-80GB"),
            source=(
                "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM); "
                "AWS EC2 P5 on-demand pricing (p5.48xlarge)"
            ),
        ),
        GpuSpec(
            name="H200",
            memory_gib=131.0,  # 141 GB HBM3e nominal (10^9 bytes) = 131 GiB.
            memory_bandwidth_gbps=4800.0,
            bf16_tflops=989.0,  # Same GH100 die and clocks as H100 SXM.
            tdp_watts=700.0,
            idle_watts=75.0,
            max_sm_clock_mhz=1980.0,
            min_sm_clock_mhz=210.0,
            interconnect_gbps=450.0,
            price_per_hour=10.60,  # GCP a3-ultragpu-8g / 8 GPUs, approximate on-demand.
            product_labels=("NVIDIA-H200", "NVIDIA-H200-141GB-HBM3e"),
            source=(
                "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM); "
                "GCP Compute Engine GPU pricing (a3-ultragpu-8g), approximate"
            ),
        ),
    )
}

# --- Models -------------------------------------------------------------------------------------


class _Shape(TypedDict):
    """The config.json fields that both ModelSpec and transformer_params take."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int


_LLAMA31_8B: _Shape = {
    "num_layers": 32,
    "hidden_size": 4096,
    "num_heads": 32,
    "num_kv_heads": 8,
    "head_dim": 128,
    "intermediate_size": 14336,
    "vocab_size": 128256,
}
_LLAMA31_70B: _Shape = {
    "num_layers": 80,
    "hidden_size": 8192,
    "num_heads": 64,
    "num_kv_heads": 8,
    "head_dim": 128,
    "intermediate_size": 28672,
    "vocab_size": 128256,
}
_MISTRAL_7B_V03: _Shape = {
    "num_layers": 32,
    "hidden_size": 4096,
    "num_heads": 32,
    "num_kv_heads": 8,
    "head_dim": 128,
    "intermediate_size": 14336,
    "vocab_size": 32768,
}
_QWEN25_32B: _Shape = {
    "num_layers": 64,
    "hidden_size": 5120,
    "num_heads": 40,
    "num_kv_heads": 8,
    "head_dim": 128,
    "intermediate_size": 27648,
    "vocab_size": 152064,
}
# The golden recordings' test model (shared/golden/vllm-0.32.0/model/config.json).
_TINY: _Shape = {
    "num_layers": 2,
    "hidden_size": 256,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 64,
    "intermediate_size": 512,
    "vocab_size": 1280,
}

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="meta-llama/Llama-3.1-8B-Instruct",
            **_LLAMA31_8B,
            num_params=transformer_params(**_LLAMA31_8B),  # 8.03e9
            max_model_len=131072,
            aliases=("llama-3.1-8b", "llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B"),
            source="huggingface.co/meta-llama/Llama-3.1-8B-Instruct/blob/main/config.json",
        ),
        ModelSpec(
            name="meta-llama/Llama-3.1-70B-Instruct",
            **_LLAMA31_70B,
            num_params=transformer_params(**_LLAMA31_70B),  # 70.6e9
            max_model_len=131072,
            aliases=("llama-3.1-70b", "llama-3.1-70b-instruct", "meta-llama/Llama-3.1-70B"),
            source="huggingface.co/meta-llama/Llama-3.1-70B-Instruct/blob/main/config.json",
        ),
        ModelSpec(
            name="mistralai/Mistral-7B-Instruct-v0.3",
            **_MISTRAL_7B_V03,
            num_params=transformer_params(**_MISTRAL_7B_V03),  # 7.25e9
            max_model_len=32768,
            aliases=("mistral-7b", "mistral-7b-v0.3", "mistral-7b-instruct-v0.3"),
            source="huggingface.co/mistralai/Mistral-7B-Instruct-v0.3/blob/main/config.json",
        ),
        ModelSpec(
            name="Qwen/Qwen2.5-32B-Instruct",
            **_QWEN25_32B,
            num_params=transformer_params(**_QWEN25_32B, attention_bias=True),  # 32.8e9
            max_model_len=32768,
            aliases=("qwen2.5-32b", "qwen2.5-32b-instruct"),
            source="huggingface.co/Qwen/Qwen2.5-32B-Instruct/blob/main/config.json",
        ),
        ModelSpec(
            name="tiny",
            **_TINY,
            num_params=transformer_params(**_TINY),
            max_model_len=2048,
            aliases=("tiny-llama-test",),
            source="shared/golden/vllm-0.32.0/model/config.json (served with max_model_len 2048)",
        ),
    )
}


def _norm(name: str) -> str:
    return name.strip().lower()


_GPU_INDEX: dict[str, GpuSpec] = {}
for _gpu in GPUS.values():
    _GPU_INDEX[_norm(_gpu.name)] = _gpu
    for _label in _gpu.product_labels:
        _GPU_INDEX[_norm(_label)] = _gpu
# Common spellings: the bare SKU family name means the larger/SXM variant that clouds rent.
for _alias, _target in (
    ("a100", "A100-80GB"),
    ("a100-80g", "A100-80GB"),
    ("a100-40g", "A100-40GB"),
    ("h100-sxm", "H100"),
    ("h100-80gb", "H100"),
    ("h200-141gb", "H200"),
    ("nvidia-a10g", "A10G"),
):
    _GPU_INDEX[_alias] = GPUS[_target]

_MODEL_INDEX: dict[str, ModelSpec] = {}
for _model in MODELS.values():
    _MODEL_INDEX[_norm(_model.name)] = _model
    for _alias in _model.aliases:
        _MODEL_INDEX[_norm(_alias)] = _model


def get_gpu(name: str) -> GpuSpec:
    """The GPU for a canonical name, an alias or an ``nvidia.com/gpu.product`` label."""
    try:
        return _GPU_INDEX[_norm(name)]
    except KeyError:
        raise KeyError(
            f"unknown GPU {name!r}; known GPUs: {', '.join(sorted(GPUS))} "
            "(or one of their nvidia.com/gpu.product labels)"
        ) from None


def get_model(name: str) -> ModelSpec:
    """The model for a canonical Hugging Face name or a short alias (case-insensitive)."""
    try:
        return _MODEL_INDEX[_norm(name)]
    except KeyError:
        aliases = sorted(a for m in MODELS.values() for a in m.aliases)
        raise KeyError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))} "
            f"(aliases: {', '.join(aliases)})"
        ) from None
