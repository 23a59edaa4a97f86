"""Routing headroom: Shoal's routing pipeline against a clairvoyant router and the TTFT floor.

The routing-quality benchmark (``bench/router_quality.py``) measures real routers over HTTP on
one short request stream. This one asks how much any router could gain on the same workload, on
the virtual-clock fleet (``sim.cluster``: the same engine core and performance model as
``shoal sim``, no HTTP, no time scaling), with streams long enough to see past the first visits:

- Shoal's strategies run through the production pipeline (``shoal.bench.virtual_routing``);
- "load bound off" is Shoal's ``prefix`` with its affinity load bound lifted, so a prefix group
  stays on the engine it first went to, which is what sglang-router's and vllm-router's
  ``cache_aware`` do on this workload (they rebalance only past an imbalance of 64 requests);
- the clairvoyant router (``shoal.bench.clairvoyant``) reads every engine's step timing, queue and
  prefix cache and sends each request where its first token comes soonest;
- the floor (``shoal.bench.ttft_floor``) gives every request its prefill alone on an engine that
  holds its prefix, unless it is the first visit of its group.

Workload: 8 Llama-3.1-8B engines on H100; 32 equally popular prefix groups of 4,000 tokens, 256-token
suffixes, 128 output tokens; Poisson arrivals at 32 req/s (80% of round-robin's measured capacity,
as in the routing-quality benchmark). Each stream length is run with several seeds.

    python bench/routing_headroom.py                  # ~1 min; writes docs/benchmarks.md
    python bench/routing_headroom.py --requests 192 --seeds 1 --no-write
"""

# ruff: noqa: E501  (report prose and table rows read better unwrapped)
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from report import command_line, machine_facts, update_section

from shoal.bench.clairvoyant import EarliestFirstToken
from shoal.bench.report import percentile
from shoal.bench.ttft_floor import TtftFloor, shared_prefix_floor
from shoal.bench.virtual_routing import PipelineRouter
from shoal.bench.workloads import BenchRequest, shared_prefix_trace
from shoal.sim.cluster import ClusterSimulator, EngineSpec, PromptRouter, Router, round_robin
from shoal.sim.perf import PerfModel
from shoal.sim.trace import TraceRequest

RATE_RPS = 32.0
GROUPS = 32
PREFIX_TOKENS = 4000
SUFFIX_TOKENS = 256
OUTPUT_TOKENS = 128
# No request ever holds this many more than the fleet's mean: the bound never binds.
UNBOUNDED_SLACK = 1e9

ROUTERS: dict[str, Callable[[], Router | PromptRouter]] = {
    "round-robin": round_robin,
    "Shoal least-request": lambda: PipelineRouter("least-request"),
    "Shoal prefix": lambda: PipelineRouter("prefix"),
    "Shoal kv-aware": lambda: PipelineRouter("kv-aware"),
    "Shoal prefix, load bound off (≈ peers' cache_aware)": lambda: PipelineRouter(
        "prefix", load_slack=UNBOUNDED_SLACK
    ),
    "clairvoyant (earliest first token)": EarliestFirstToken,
}
PEER_LIKE = "Shoal prefix, load bound off (≈ peers' cache_aware)"
CLAIRVOYANT = "clairvoyant (earliest first token)"


@dataclass(slots=True)
class Run:
    ttft_ms: list[float]
    output_tok_s: float
    hit_rate: float


def stream(n: int, seed: int) -> list[TraceRequest]:
    return shared_prefix_trace(
        RATE_RPS,
        n,
        num_groups=GROUPS,
        prefix_tokens=PREFIX_TOKENS,
        suffix_tokens=SUFFIX_TOKENS,
        output_tokens=OUTPUT_TOKENS,
        seed=seed,
    )


def floor_of(reqs: list[TraceRequest], perf: PerfModel) -> TtftFloor:
    bench_reqs = [
        BenchRequest(
            r.arrival_s, r.output_tokens, prompt_tokens=r.prompt_tokens, group=r.prefix_group
        )
        for r in reqs
    ]
    return shared_prefix_floor(bench_reqs, perf, PREFIX_TOKENS)


def run_one(make: Callable[[], Router | PromptRouter], reqs: list[TraceRequest], seed: int) -> Run:
    report = ClusterSimulator([EngineSpec()] * 8, make(), seed=seed).run(reqs)
    return Run(
        [f.ttft * 1000 for f in report.finished_requests],
        report.output_throughput_tok_s,
        report.prefix_cache_hit_rate,
    )


def _mid(xs: list[float], fmt: str) -> str:
    xs = sorted(xs)
    mid = statistics.median(xs)
    return fmt.format(mid) + (f" [{fmt.format(xs[0])}–{fmt.format(xs[-1])}]" if len(xs) > 1 else "")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", default="192,640,3200", help="stream lengths, comma-separated")
    ap.add_argument("--seeds", type=int, default=5, help="streams per length (seeds 0..N-1)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    lengths = [int(x) for x in args.requests.split(",")]
    perf = EngineSpec().build().perf
    t0 = time.perf_counter()

    lines = [
        "## Routing headroom",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine_facts()}",
        "",
        "The routing-quality workload on the virtual-clock fleet (`sim.cluster`: the engine core and "
        "performance model of `shoal sim`, no HTTP): 8 Llama-3.1-8B engines on H100, 32 equally popular "
        f"prefix groups × {PREFIX_TOKENS:,}-token prefixes, {SUFFIX_TOKENS}-token suffixes, {OUTPUT_TOKENS} "
        f"output tokens, Poisson arrivals at {RATE_RPS:g} req/s. Shoal's rows run the production routing "
        "pipeline (`shoal/bench/virtual_routing.py`). 'Load bound off' keeps each prefix group on the "
        "engine it first went to, as the peers' `cache_aware` do on this workload. The clairvoyant "
        "router (`shoal/bench/clairvoyant.py`) sees each engine's step timing, queue and prefix cache, "
        "which no real router can, and sends each request where its first token comes soonest. The "
        "floor (`shoal/bench/ttft_floor.py`) runs every prefill alone on an engine holding its prefix "
        f"unless it is its group's first visit. {args.seeds} streams (seeds) per length: median "
        "[range] over them; times are simulated.",
    ]
    for n in lengths:
        per_router: dict[str, list[Run]] = {name: [] for name in ROUTERS}
        floors: list[TtftFloor] = []
        for seed in range(args.seeds):
            reqs = stream(n, seed)
            floors.append(floor_of(reqs, perf))
            for name, make in ROUTERS.items():
                per_router[name].append(run_one(make, reqs, seed))
        floor_p90 = [1000 * f.percentile_s(90) for f in floors]
        floor_p50 = [1000 * f.percentile_s(50) for f in floors]
        cold = [f.cold_requests / n for f in floors]
        lines += [
            "",
            f"### {n:,} requests ({n / RATE_RPS:g} s of arrivals; first visits {_mid([100 * c for c in cold], '{:.1f}')}% of requests)",
            "",
            "| router | TTFT p50 (ms) | TTFT p90 (ms) | TTFT p99 (ms) | output tok/s | prefix-cache hit rate |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        p90s: dict[str, list[float]] = {}
        for name, runs in per_router.items():
            p90s[name] = [percentile(r.ttft_ms, 90) for r in runs]
            lines.append(
                f"| {name} | {_mid([percentile(r.ttft_ms, 50) for r in runs], '{:.1f}')} | "
                f"{_mid(p90s[name], '{:.1f}')} | {_mid([percentile(r.ttft_ms, 99) for r in runs], '{:.1f}')} | "
                f"{_mid([r.output_tok_s for r in runs], '{:.0f}')} | {_mid([100 * r.hit_rate for r in runs], '{:.1f}%')} |"
            )
            print(f"{n:>6} {name:<52} p90 {_mid(p90s[name], '{:.1f}')}", file=sys.stderr)
        lines.append(
            f"| floor (no router can do better) | {_mid(floor_p50, '{:.1f}')} | {_mid(floor_p90, '{:.1f}')} | | | |"
        )
        shoal_best = min(
            ("Shoal prefix", "Shoal kv-aware"), key=lambda k: statistics.median(p90s[k])
        )
        med = {k: statistics.median(v) for k, v in p90s.items()}
        half_peer = med[PEER_LIKE] / 2
        lines += [
            "",
            f"Clairvoyant p90 / load-bound-off p90: **{med[CLAIRVOYANT] / med[PEER_LIKE]:.2f}×**; "
            f"{shoal_best} / load-bound-off: {med[shoal_best] / med[PEER_LIKE]:.2f}×. Half the "
            f"load-bound-off p90 is {half_peer:.1f} ms: "
            + (
                f"below the floor ({statistics.median(floor_p90):.1f} ms), so no router reaches it."
                if half_peer < statistics.median(floor_p90)
                else (
                    f"under the clairvoyant router's {med[CLAIRVOYANT]:.1f} ms, so even perfect "
                    "knowledge of the engines does not reach it."
                    if half_peer < med[CLAIRVOYANT]
                    else f"reached by the clairvoyant router ({med[CLAIRVOYANT]:.1f} ms)."
                )
            ),
        ]
    lines += ["", f"Wall time of this run: {time.perf_counter() - t0:.0f} s."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        update_section("routing-headroom", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
