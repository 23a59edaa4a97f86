"""``shoal sim``: one simulated engine replica behind vLLM's OpenAI server interface.

The flags are vLLM's spellings, so an operator (or a Deployment template) can start the simulator
with the argv it would give ``vllm serve``. Flags vLLM has but the simulator does not model are
accepted and ignored with a log line instead of failing the pod.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from shoal.kv_events import EventBatch
from shoal.sim.driver import AsyncEngine
from shoal.sim.engine import EngineCore, sized_engine_config
from shoal.sim.kv_publisher import KvEventPublisher
from shoal.sim.metrics import VllmMetrics, vllm_cache_config
from shoal.sim.protocol import DEFAULT_MAX_BODY_BYTES
from shoal.sim.server import ServerSettings, create_app
from shoal.sim.types import StepResult

log = logging.getLogger(__name__)

# vLLM flags taking a value that do not change what the simulator models.
_IGNORED_VALUE_FLAGS = (
    "--dtype",
    "--load-format",
    "--tokenizer",
    "--tokenizer-mode",
    "--revision",
    "--tokenizer-revision",
    "--code-revision",
    "--download-dir",
    "--kv-cache-dtype",
    "--quantization",
    "--swap-space",
    "--cpu-offload-gb",
    "--max-log-len",
    "--chat-template",
    "--chat-template-content-format",
    "--response-role",
    "--uvicorn-log-level",
    "--api-key",
    "--pipeline-parallel-size",
    "--data-parallel-size",
    "--distributed-executor-backend",
    "--max-logprobs",
    "--generation-config",
    "--override-generation-config",
    "--hf-overrides",
    "--compilation-config",
    "--speculative-config",
    "--scheduling-policy",
    "--long-prefill-token-threshold",
    "--max-num-partial-prefills",
    "--prefix-caching-hash-algo",
    "--tool-call-parser",
    "--reasoning-parser",
    "--root-path",
    "--allowed-origins",
    "--limit-mm-per-prompt",
    "--mm-processor-kwargs",
    "--otlp-traces-endpoint",
    "--lora-dtype",
    "--max-seq-len-to-capture",
)
# vLLM boolean flags that do not change what the simulator models.
_IGNORED_SWITCHES = (
    "--trust-remote-code",
    "--enforce-eager",
    "--disable-log-requests",
    "--enable-log-requests",
    "--disable-log-stats",
    "--enable-chunked-prefill",
    "--no-enable-chunked-prefill",
    "--disable-frontend-multiprocessing",
    "--enable-auto-tool-choice",
    "--enable-request-id-headers",
    "--disable-fastapi-docs",
    "--enable-tokenizer-info-endpoint",
    "--disable-uvicorn-access-log",
    "--enable-sleep-mode",
    "--enable-force-include-usage",
    "--enable-log-outputs",
    "--disable-custom-all-reduce",
    "--enable-expert-parallel",
    "--fully-sharded-loras",
    "--async-scheduling",
)


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--dev-mode", action="store_true", help="as VLLM_SERVER_DEV_MODE=1")
    g.add_argument(
        "--no-router-compat",
        dest="router_compat",
        action="store_false",
        help="answer 404 on the SGLang-router probe endpoints, exactly as vLLM does",
    )
    g.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    g.add_argument(
        "--event-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop (default asyncio: with uvloop the engine's step timers fired late, "
        "+30%% step-time drift at 500 streams against +8%% on asyncio in "
        "bench/sim_realtime.py --event-loop uvloop|asyncio)",
    )
    g.add_argument("--enable-prompt-tokens-details", action="store_true")
    g.add_argument("--enable-server-load-tracking", action="store_true")
    g.add_argument("--no-admin-api", dest="admin_api", action="store_false")
    g.add_argument("--kv-events-config", default=None, help="JSON, as vLLM's flag")

    m = parser.add_argument_group("model and hardware")
    m.add_argument("model_tag", nargs="?", default=None, help="model, as in `vllm serve MODEL`")
    m.add_argument("--model", default=None, help="default meta-llama/Llama-3.1-8B-Instruct")
    m.add_argument("--served-model-name", nargs="+", default=None)
    m.add_argument("--gpu", default="H100", help="GPU type the performance model simulates")
    m.add_argument(
        "--num-gpus", "--tensor-parallel-size", "-tp", dest="num_gpus", type=int, default=1
    )
    m.add_argument("--max-model-len", type=int, default=None)
    m.add_argument("--max-num-seqs", type=int, default=256)
    m.add_argument("--max-num-batched-tokens", type=int, default=8192)
    m.add_argument("--block-size", type=int, default=16)
    m.add_argument("--num-gpu-blocks-override", type=int, default=None)
    m.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    m.add_argument(
        "--enable-prefix-caching",
        dest="enable_prefix_caching",
        action="store_true",
        default=True,
    )
    m.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--time-scale", type=float, default=1.0, help="simulated s per wall s")

    lo = parser.add_argument_group("LoRA")
    lo.add_argument("--enable-lora", action="store_true")
    lo.add_argument("--max-loras", type=int, default=1)
    lo.add_argument("--max-cpu-loras", type=int, default=None)
    lo.add_argument("--max-lora-rank", type=int, default=16)
    lo.add_argument("--lora-modules", nargs="+", default=None, help="name=path ... to preload")
    lo.add_argument(
        "--lora-path-check",
        choices=("exists", "any"),
        default="exists",
        help="exists: lora_path must exist, as in vLLM (404 otherwise); any: accept any path",
    )
    lo.add_argument(
        "--lora-fake-root",
        action="append",
        default=[],
        help="paths under this directory are accepted without existing (repeatable)",
    )

    ig = parser.add_argument_group("vLLM flags accepted and ignored")
    for flag in _IGNORED_VALUE_FLAGS:
        ig.add_argument(flag, dest=_ignored_dest(flag), default=None, help=argparse.SUPPRESS)
    for flag in _IGNORED_SWITCHES:
        ig.add_argument(flag, dest=_ignored_dest(flag), action="store_true", help=argparse.SUPPRESS)


def _ignored_dest(flag: str) -> str:
    return "ignored_" + flag.lstrip("-").replace("-", "_")


def lora_path_check(mode: str, fake_roots: list[str]) -> Callable[[str], bool]:
    """How ``/v1/load_lora_adapter`` validates ``lora_path``.

    vLLM answers 404 for a path it cannot load. The simulator has no weights to load, so by default
    the path must exist (any file or directory); ``fake_roots`` name directories whose paths are
    accepted without existing (the golden recordings load ``/models/tiny-lora``), and ``any``
    accepts every path.
    """
    roots = [os.path.normpath(r) for r in fake_roots]

    def check(path: str) -> bool:
        if mode == "any":
            return True
        norm = os.path.normpath(path)
        if any(norm == r or norm.startswith(r.rstrip("/") + "/") for r in roots):
            return True
        return os.path.exists(path)

    return check


def build_engine(args: argparse.Namespace) -> tuple[AsyncEngine, int]:
    model_name = args.model or args.model_tag or "meta-llama/Llama-3.1-8B-Instruct"
    served = args.served_model_name[0] if args.served_model_name else model_name
    config = sized_engine_config(
        model=model_name,
        gpu=args.gpu,
        num_gpus=args.num_gpus,
        block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_gpu_blocks=args.num_gpu_blocks_override,
        max_model_len=args.max_model_len,
        served_model_name=served,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_lora=args.enable_lora,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_lora_rank=args.max_lora_rank,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
        lora_path_check=lora_path_check(args.lora_path_check, args.lora_fake_root),
    )
    core = EngineCore(config)
    for item in args.lora_modules or ():
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--lora-modules expects name=path, got {item!r}")
        core.lora.add(name, path)
    return AsyncEngine(core, time_scale=args.time_scale), config.num_gpu_blocks


def _kv_publisher(raw: str | None) -> KvEventPublisher | None:
    if not raw:
        return None
    cfg: dict[str, Any] = json.loads(raw)
    if not cfg.get("enable_kv_cache_events", False):
        return None
    if cfg.get("publisher", "zmq") != "zmq":
        raise SystemExit(f"unsupported KV events publisher {cfg.get('publisher')!r}")
    return KvEventPublisher(
        endpoint=cfg.get("endpoint", "tcp://*:5557"),
        replay_endpoint=cfg.get("replay_endpoint"),
        topic=cfg.get("topic", ""),
        buffer_steps=int(cfg.get("buffer_steps", 10000)),
        hwm=int(cfg.get("hwm", 100000)),
        max_queue_size=int(cfg.get("max_queue_size", 100000)),
    )


def _log_ignored(args: argparse.Namespace) -> None:
    for key, value in sorted(vars(args).items()):
        if key.startswith("ignored_") and value not in (None, False):
            flag = "--" + key[len("ignored_") :].replace("_", "-")
            log.info("ignoring vLLM flag %s=%s: the simulator does not model it", flag, value)


def run_sim(args: argparse.Namespace) -> None:
    import uvicorn

    _log_ignored(args)
    try:
        engine, blocks = build_engine(args)
    except (KeyError, ValueError) as exc:  # unknown model/GPU, a model that does not fit
        raise SystemExit(f"shoal sim: {exc.args[0] if exc.args else exc}") from None
    cfg = engine.config
    publisher = _kv_publisher(args.kv_events_config)
    if publisher is not None:

        def publish(step: StepResult) -> None:
            if step.kv_events:
                publisher.publish(EventBatch(time.time(), list(step.kv_events)))

        engine.on_step = publish
    labels = cfg.gpu.product_labels
    metrics = VllmMetrics(
        cfg.model_name,
        cache_config=vllm_cache_config(
            block_size=cfg.block_size,
            num_gpu_blocks=blocks,
            max_model_len=cfg.max_model_len,
            num_gpu_blocks_override=args.num_gpu_blocks_override,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=cfg.enable_prefix_caching,
        ),
        max_loras=cfg.max_loras,
        gpu_count=cfg.num_gpus,
        max_model_len=cfg.max_model_len,
        gpu_model_name=labels[0].replace("-", " ") if labels else cfg.gpu.name,
    )
    settings = ServerSettings(
        model_path=args.model or args.model_tag or "meta-llama/Llama-3.1-8B-Instruct",
        served_model_aliases=tuple((args.served_model_name or [])[1:]),
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        dev_mode=args.dev_mode or os.environ.get("VLLM_SERVER_DEV_MODE") == "1",
        router_compat=args.router_compat,
        runtime_lora_updating=args.enable_lora,
        server_load_tracking=args.enable_server_load_tracking,
        admin_api=args.admin_api,
        max_body_bytes=args.max_body_bytes,
    )
    kv_sources = {"0": publisher.describe()} if publisher is not None else None
    app = create_app(engine, metrics, kv_sources, settings)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        access_log=False,
        log_level="warning",
        http="httptools" if _has("httptools") else "h11",
        lifespan="on",
        timeout_keep_alive=5,
    )
    server = uvicorn.Server(config)
    log.info(
        "shoal sim serving %s (%s on %dx %s, %d KV blocks of %d) on http://%s:%d",
        cfg.model_name,
        cfg.model.name,
        cfg.num_gpus,
        cfg.gpu.name,
        blocks,
        cfg.block_size,
        args.host,
        args.port,
    )

    # Everything built so far lives as long as the server: move it out of the collector's sight,
    # and collect the young generation less often. Full collections over a heap holding hundreds of
    # streams' state otherwise stall the engine loop for tens of milliseconds (vLLM freezes its
    # start-up objects for the same reason).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)

    async def main() -> None:
        poller = asyncio.create_task(_poll_replay(publisher)) if publisher is not None else None
        try:
            await server.serve()
        finally:
            if poller is not None:
                poller.cancel()
            if publisher is not None:
                publisher.close()

    if args.event_loop == "uvloop" and _has("uvloop"):
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


async def _poll_replay(publisher: KvEventPublisher) -> None:
    """Answer KV-event replay requests; a non-blocking poll keeps zmq off the event loop."""
    while True:
        try:
            publisher.poll_replay()
        except Exception:
            log.exception("KV event replay failed")
        await asyncio.sleep(0.02)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
