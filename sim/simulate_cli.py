"""``shoal simulate``: replay a workload on a simulated fleet on a virtual clock.

Without ``--trace`` the workload is synthetic (Poisson arrivals with the Azure conversation trace's
rate and length distributions, see ``sim.trace``), so the command runs with no data at hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable

from shoal.sim.cluster import DEFAULT_GPU, DEFAULT_MODEL, ROUTERS, EngineSpec, simulate
from shoal.sim.trace import (
    AZURE_CONV_RATE_RPS,
    TraceRequest,
    load_azure_trace,
    synthetic_workload,
)


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    w = parser.add_argument_group("workload")
    w.add_argument(
        "--trace",
        default=None,
        metavar="PATH",
        help="Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens); "
        "default: a synthetic workload shaped like the Azure 2023 conversation trace",
    )
    w.add_argument(
        "--duration-s",
        type=float,
        default=None,
        help="simulated seconds of arrivals (default: the whole trace, or 3600 for synthetic)",
    )
    w.add_argument(
        "--rate-scale",
        type=float,
        default=1.0,
        help="multiply the request rate (2.0 replays arrivals twice as fast)",
    )
    w.add_argument(
        "--rate-rps",
        type=float,
        default=AZURE_CONV_RATE_RPS,
        help=f"synthetic request rate before --rate-scale (default {AZURE_CONV_RATE_RPS:.2f})",
    )
    w.add_argument(
        "--prefix-groups",
        type=int,
        default=0,
        help="synthetic: number of shared system prompts (default 0: no sharing)",
    )
    w.add_argument(
        "--prefix-share",
        type=float,
        default=0.5,
        help="synthetic: share of requests that use a shared system prompt (with --prefix-groups)",
    )
    w.add_argument(
        "--prefix-tokens",
        type=int,
        default=512,
        help="synthetic: length of a shared system prompt in tokens",
    )
    w.add_argument("--seed", type=int, default=0, help="workload and engine seed")

    f = parser.add_argument_group("fleet")
    f.add_argument("--engines", type=int, default=8, help="number of engine replicas (default 8)")
    f.add_argument("--model", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    f.add_argument(
        "--gpu", default=DEFAULT_GPU, help=f"GPU type per replica (default {DEFAULT_GPU})"
    )
    f.add_argument("--num-gpus", type=int, default=1, help="tensor-parallel GPUs per replica")
    f.add_argument("--max-num-seqs", type=int, default=256)
    f.add_argument("--max-num-batched-tokens", type=int, default=8192)
    f.add_argument("--max-model-len", type=int, default=None)
    f.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    f.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    f.add_argument("--router", choices=sorted(ROUTERS), default="round-robin")
    f.add_argument(
        "--no-fast-forward",
        dest="fast_forward",
        action="store_false",
        help="step every engine iteration one by one (slow; same results)",
    )

    o = parser.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the report as JSON")


def _workload(args: argparse.Namespace) -> Iterable[TraceRequest]:
    if args.trace is not None:
        return load_azure_trace(args.trace, duration_s=args.duration_s, rate_scale=args.rate_scale)
    duration = args.duration_s if args.duration_s is not None else 3600.0
    return synthetic_workload(
        args.rate_rps * args.rate_scale,
        duration,
        seed=args.seed,
        num_prefix_groups=args.prefix_groups,
        prefix_share=args.prefix_share,
        prefix_tokens=args.prefix_tokens,
    )


def run_simulate(args: argparse.Namespace) -> int:
    if args.engines < 1:
        print("shoal simulate: --engines must be >= 1", file=sys.stderr)
        return 2
    try:
        spec = EngineSpec(
            model=args.model,
            gpu=args.gpu,
            num_gpus=args.num_gpus,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            enable_prefix_caching=args.enable_prefix_caching,
        )
        spec.engine_config()  # fail early on an unknown model/GPU or a model that does not fit
        workload = _workload(args)
        report = simulate(
            workload,
            [spec] * args.engines,
            ROUTERS[args.router](),
            seed=args.seed,
            fast_forward=args.fast_forward,
            keep_requests=False,
        )
    except (KeyError, ValueError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"shoal simulate: {msg}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        source = args.trace or "synthetic workload (Azure 2023 conversation shape)"
        print(f"workload        {source}, rate x{args.rate_scale:g}, router {args.router}")
        print(report.format())
    return 0
