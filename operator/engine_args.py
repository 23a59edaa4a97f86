"""Engine command lines per engine kind (vLLM, SGLang, the Shoal simulator): pure functions.

The operator owns the flags that other parts of the system rely on: the served name (the router
matches requests by it), the tensor-parallel size (it must equal the GPUs the pod requests), the
port (probes, the Service and the router use it) and the KV-events config (the router subscribes
to it by topic). Extra arguments from the spec may add anything else, but may not set those: a
spec that tries is reported as unrealisable instead of silently producing a pod that lies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from shoal.api.model import EngineKind, GpuPool, ModelSpec

KV_EVENTS_PORT = 5557
POD_IP_ENV = "POD_IP"

# Images used when the spec names none; pinned so that a rollout never changes under a tag.
DEFAULT_IMAGES: dict[EngineKind, str] = {
    EngineKind.VLLM: "vllm/vllm-openai:v0.10.1",
    EngineKind.SGLANG: "lmsysorg/sglang:v0.5.0-cu126",
    EngineKind.SIM: "ghcr.io/shoal-dev/shoal:0.1.0",
}

# Flags the operator derives from the spec; extra args may not override them (see module doc).
_MANAGED_FLAGS: dict[EngineKind, tuple[str, ...]] = {
    EngineKind.VLLM: (
        "--served-model-name",
        "--tensor-parallel-size",
        "-tp",
        "--port",
        "--host",
        "--kv-events-config",
    ),
    EngineKind.SGLANG: (
        "--model-path",
        "--served-model-name",
        "--tp",
        "--tp-size",
        "--port",
        "--host",
        "--kv-events-config",
    ),
    EngineKind.SIM: (
        "--served-model-name",
        "--tensor-parallel-size",
        "--num-gpus",
        "-tp",
        "--port",
        "--host",
        "--kv-events-config",
        "--gpu",
    ),
}


class EngineArgsError(ValueError):
    """The spec's engine arguments cannot be turned into a correct command line."""


@dataclass(frozen=True)
class EngineCommand:
    """The engine container's ``command`` and ``args``."""

    command: list[str]
    args: list[str]


def kv_events_topic(served_name: str, port: int) -> str:
    """The ZMQ topic an engine publishes KV events under: ``kv@<pod ip>:<port>@<served name>``.

    ``$(POD_IP)`` is expanded by the kubelet from the container's downward-API env, so every pod's
    topic names its own endpoint and a subscriber can tell the publishers apart.
    """
    return f"kv@$({POD_IP_ENV}):{port}@{served_name}"


def kv_events_config(served_name: str, port: int, kv_port: int = KV_EVENTS_PORT) -> str:
    """vLLM's ``--kv-events-config`` JSON (SGLang reads the same keys)."""
    cfg = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{kv_port}",
        "topic": kv_events_topic(served_name, port),
    }
    return json.dumps(cfg, separators=(",", ":"))


def _flag_name(token: str) -> str:
    return token.split("=", 1)[0]


def check_extra_args(kind: EngineKind, extra: list[str]) -> None:
    """Raise :class:`EngineArgsError` when extra args set a flag the operator manages."""
    managed = set(_MANAGED_FLAGS[kind])
    clashes = sorted({_flag_name(t) for t in extra if _flag_name(t) in managed})
    if clashes:
        raise EngineArgsError(
            f"engine.args sets {', '.join(clashes)}, which the operator derives from the spec "
            f"(model.servedName, pools[].gpusPerReplica, engine.port); remove "
            f"{'it' if len(clashes) == 1 else 'them'} from engine.args"
        )


def _vllm_style_flags(spec: ModelSpec, pool: GpuPool) -> list[str]:
    """Flags shared by ``vllm serve`` and ``shoal sim`` (which takes vLLM's spellings)."""
    served = spec.model.client_name
    port = spec.engine.port
    args = ["--served-model-name", served, "--tensor-parallel-size", str(pool.gpus_per_replica)]
    if spec.model.revision:
        args += ["--revision", spec.model.revision]
    args.append(
        "--enable-prefix-caching"
        if spec.engine.enable_prefix_caching
        else "--no-enable-prefix-caching"
    )
    if spec.max_model_len is not None:
        args += ["--max-model-len", str(spec.max_model_len)]
    if spec.lora.enabled:
        args += [
            "--enable-lora",
            "--max-loras",
            str(spec.lora.max_loras),
            "--max-lora-rank",
            str(spec.lora.max_lora_rank),
        ]
        if spec.lora.max_cpu_loras is not None:
            args += ["--max-cpu-loras", str(spec.lora.max_cpu_loras)]
    args += ["--kv-events-config", kv_events_config(served, port)]
    args += ["--host", "0.0.0.0", "--port", str(port)]
    return args


def vllm_command(spec: ModelSpec, pool: GpuPool) -> EngineCommand:
    check_extra_args(EngineKind.VLLM, spec.engine.args)
    args = [spec.model.name, *_vllm_style_flags(spec, pool), *spec.engine.args]
    return EngineCommand(command=["vllm", "serve"], args=args)


def sglang_command(spec: ModelSpec, pool: GpuPool) -> EngineCommand:
    check_extra_args(EngineKind.SGLANG, spec.engine.args)
    served = spec.model.client_name
    port = spec.engine.port
    args = [
        "--model-path",
        spec.model.name,
        "--served-model-name",
        served,
        "--tp",
        str(pool.gpus_per_replica),
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        # the router scrapes /metrics like a vLLM pod's; SGLang serves it only when asked
        "--enable-metrics",
        "--kv-events-config",
        kv_events_config(served, port),
    ]
    if spec.model.revision:
        args += ["--revision", spec.model.revision]
    if not spec.engine.enable_prefix_caching:
        args.append("--disable-radix-cache")  # SGLang's prefix cache is on unless disabled
    if spec.max_model_len is not None:
        args += ["--context-length", str(spec.max_model_len)]
    if spec.lora.enabled:
        args += [
            "--enable-lora",
            "--max-loras-per-batch",
            str(spec.lora.max_loras),
            "--max-lora-rank",
            str(spec.lora.max_lora_rank),
        ]
    args += spec.engine.args
    return EngineCommand(command=["python3", "-m", "sglang.launch_server"], args=args)


def sim_command(spec: ModelSpec, pool: GpuPool) -> EngineCommand:
    check_extra_args(EngineKind.SIM, spec.engine.args)
    args = [spec.model.name, *_vllm_style_flags(spec, pool), "--gpu", pool.gpu_type]
    return EngineCommand(command=["shoal", "sim"], args=[*args, *spec.engine.args])


def engine_command(spec: ModelSpec, pool: GpuPool) -> EngineCommand:
    """The container command line for one pool's engine."""
    builders = {
        EngineKind.VLLM: vllm_command,
        EngineKind.SGLANG: sglang_command,
        EngineKind.SIM: sim_command,
    }
    return builders[spec.engine.kind](spec, pool)


def engine_image(spec: ModelSpec) -> str:
    return spec.engine.image or DEFAULT_IMAGES[spec.engine.kind]
