"""``shoal simulate``: replay a workload on a simulated fleet on a virtual clock.

With ``--autoscaler POLICY`` the fleet is sized by that autoscaling policy on the virtual clock
(``sim.autoscaled``): replicas start up, drain and leave, and the report gives SLO attainment,
GPU-hours, cost and scaling churn.

Without ``--trace`` the workload is synthetic (Poisson arrivals with the Azure conversation trace's
rate and length distributions, see ``sim.trace``), so the command runs with no data at hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable

from shoal.api.model import AutoscalingPolicy
from shoal.autoscaler.policies import POLICY_NAMES, build_policy
from shoal.sim.amplify import amplify_workload
from shoal.sim.attainment import SloTarget
from shoal.sim.autoscaled import AutoscaledSimulator, AutoscaleReport, FleetConfig
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

    a = parser.add_argument_group("autoscaling (with --autoscaler: a fleet that grows and shrinks)")
    a.add_argument(
        "--autoscaler",
        choices=POLICY_NAMES,
        default=None,
        help="size the fleet with this policy (--engines is then the initial replica count)",
    )
    a.add_argument("--min-replicas", type=int, default=0)
    a.add_argument("--max-replicas", type=int, default=None)
    a.add_argument(
        "--startup-s",
        type=float,
        default=None,
        help="seconds from scheduling a replica to serving (default: from the model's size)",
    )
    a.add_argument("--tick-s", type=float, default=15.0, help="autoscaler period (default 15)")
    a.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    a.add_argument("--tpot-slo-ms", type=float, default=60.0)
    a.add_argument("--slo-percentile", type=float, default=95.0)
    a.add_argument(
        "--copies",
        type=int,
        default=1,
        help="raise the rate by overlaying this many shifted copies of the trace (keeps its "
        "shape, unlike --rate-scale)",
    )

    o = parser.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the report as JSON")
    o.add_argument("--plot", default=None, metavar="PNG", help="autoscaling: replicas and load")


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


def _progress(frac: float) -> None:
    bar = "#" * int(frac * 40)
    print(f"\r[{bar:<40}] {frac:6.1%}", end="" if frac < 1 else "\n", file=sys.stderr, flush=True)


def _plot(report: AutoscaleReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = report.timeline
    fig, ax = plt.subplots(figsize=(10, 4))
    minutes = [p.time_s / 60 for p in tl]
    ax.step(minutes, [p.desired for p in tl], where="post", label="target replicas")
    ax.step(minutes, [p.ready for p in tl], where="post", label="ready replicas")
    ax.set_xlabel("minutes")
    ax.set_ylabel("replicas")
    load = ax.twinx()
    load.plot(minutes, [p.request_rate for p in tl], color="grey", alpha=0.5, label="req/s")
    load.set_ylabel("requests/s")
    ax.legend(loc="upper left")
    ax.set_title(f"shoal simulate --autoscaler {report.policy}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run_autoscaled(args: argparse.Namespace, spec: EngineSpec) -> int:
    if args.copies < 1:
        print("shoal simulate: --copies must be >= 1", file=sys.stderr)
        return 2
    workload = list(_workload(args))
    if args.copies > 1:
        workload = amplify_workload(workload, args.copies)
    slo = SloTarget(args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3, args.slo_percentile)
    config = FleetConfig(
        engine=spec,
        initial_replicas=args.engines,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        startup_s=args.startup_s,
        tick_s=args.tick_s,
    )
    policy = build_policy(AutoscalingPolicy(policy=args.autoscaler))
    sim = AutoscaledSimulator(
        config,
        policy,
        slo,
        ROUTERS[args.router](),
        seed=args.seed,
        use_fast_forward=args.fast_forward,
        progress=_progress,
    )
    report = sim.run(workload)
    if args.plot:
        _plot(report, args.plot)
    if args.json:
        print(json.dumps(report.to_dict(timeline=True), indent=2))
    else:
        print(report.format())
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    if args.engines < 0 or (args.engines < 1 and args.autoscaler is None):
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
        if args.autoscaler is not None:
            return run_autoscaled(args, spec)
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
