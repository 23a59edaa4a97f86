"""``shoal demo``: one shared-prefix workload on a local fleet, round-robin vs cache-aware routing.

The fleet is 4 simulated Llama-3.1-8B engines on H100 behind the Shoal router. Their KV caches
are deliberately small (``--num-gpu-blocks-override``): the workload's prefixes fit the fleet's
cache only when each group sticks to one engine. Round-robin spreads every group over every
engine and keeps evicting; prefix/KV-aware routing keeps each group where its prefix is cached,
so prefills shrink to the unique suffix and TTFT drops. Both phases send the same shape of load
but different prefix text, so the first phase cannot warm the caches for the second.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from dataclasses import dataclass

import httpx
import yaml

from shoal.api.model import parse_model
from shoal.bench import workloads as wl
from shoal.bench.client import run_open_loop
from shoal.bench.report import Summary, summarize
from shoal.local import FleetError, LocalFleet

DEMO_MODEL = """
apiVersion: shoal.dev/v1alpha1
kind: Model
metadata: {name: demo}
spec:
  model: {name: meta-llama/Llama-3.1-8B-Instruct, servedName: llama-8b}
  engine:
    kind: sim
    # 12,000 tokens of KV cache per engine: room for ~5 of the 16 prefixes of 2,000 tokens.
    args: ["--num-gpu-blocks-override", "750"]
  pools:
    - {name: h100, gpuType: H100, replicas: 4}
  routing: {strategy: kv-aware}
"""

_METRIC = re.compile(
    r"^(vllm:prefix_cache_(?:hits|queries)_total)(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.M
)


@dataclass
class PhaseResult:
    strategy: str
    summary: Summary
    hit_rate: float


def cache_counters(urls: list[str]) -> tuple[float, float]:
    """Sum of ``vllm:prefix_cache_hits_total`` and ``queries_total`` over the engines."""
    hits = queries = 0.0
    with httpx.Client(timeout=5.0) as c:
        for u in urls:
            for name, value in _METRIC.findall(c.get(u + "/metrics").text):
                if name.endswith("hits_total"):
                    hits += float(value)
                else:
                    queries += float(value)
    return hits, queries


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--strategy",
        default="kv-aware",
        choices=["prefix", "kv-aware"],
        help="Shoal strategy to compare with round-robin (default kv-aware)",
    )
    p.add_argument("--rate", type=float, default=10.0, help="requests per second (default 10)")
    p.add_argument("--duration-s", type=float, default=25.0, help="seconds per phase (default 25)")
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--prefix-tokens", type=int, default=2000)
    p.add_argument("--port", type=int, default=0, help="router port (default: a free one)")


def _phase(fleet: LocalFleet, strategy: str, args: argparse.Namespace, seed: int) -> PhaseResult:
    n = max(1, int(args.rate * args.duration_s))
    reqs = wl.shared_prefix(
        wl.arrival_times(args.rate, n, seed=seed),
        num_groups=args.groups,
        prefix_tokens=args.prefix_tokens,
        suffix_tokens=64,
        output_tokens=32,
        seed=seed,
    )
    h0, q0 = cache_counters(fleet.engine_urls)
    print(
        f"\n▶ {strategy}: {n} requests, {args.groups} groups × {args.prefix_tokens}-token prefixes",
        file=sys.stderr,
    )
    run = asyncio.run(
        run_open_loop(
            fleet.url,
            reqs,
            model=fleet.model.spec.model.client_name,
            headers=[("x-shoal-strategy", strategy)],
        )
    )
    h1, q1 = cache_counters(fleet.engine_urls)
    hit = (h1 - h0) / (q1 - q0) if q1 > q0 else float("nan")
    return PhaseResult(strategy, summarize(run), hit)


def format_comparison(a: PhaseResult, b: PhaseResult) -> str:
    rows = [
        ("TTFT p50 (ms)", a.summary.ttft_ms["p50"], b.summary.ttft_ms["p50"], True),
        ("TTFT p90 (ms)", a.summary.ttft_ms["p90"], b.summary.ttft_ms["p90"], True),
        ("end-to-end p90 (ms)", a.summary.e2e_ms["p90"], b.summary.e2e_ms["p90"], True),
        ("output tok/s", a.summary.output_throughput, b.summary.output_throughput, False),
        ("prefix-cache hit rate (%)", 100 * a.hit_rate, 100 * b.hit_rate, False),
        (
            "errors",
            float(a.summary.requests - a.summary.ok),
            float(b.summary.requests - b.summary.ok),
            True,
        ),
    ]
    out = [f"{'':<27}{a.strategy:>14}{b.strategy:>14}{'change':>10}"]
    for name, x, y, _lower_better in rows:
        change = f"{y / x:.2f}×" if x else "-"
        out.append(f"{name:<27}{x:>14,.1f}{y:>14,.1f}{change:>10}")
    return "\n".join(out)


def run_demo(args: argparse.Namespace) -> int:
    model = parse_model(yaml.safe_load(DEMO_MODEL), "<demo Model>")
    fleet = LocalFleet(model, router_port=args.port, strategy="round-robin")
    print("shoal demo: starting 4 simulated H100 engines and the Shoal router ...", file=sys.stderr)
    try:
        fleet.start()
        print(
            f"fleet up: router {fleet.url}, engines {', '.join(fleet.engine_urls)}", file=sys.stderr
        )
        base = _phase(fleet, "round-robin", args, seed=1)
        best = _phase(fleet, args.strategy, args, seed=2)
    except FleetError as exc:
        print(f"shoal demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nshoal demo: interrupted", file=sys.stderr)
        return 130
    finally:
        fleet.stop()
    print(f"\nShared-prefix workload at {args.rate:g} req/s on 4 simulated H100 engines:\n")
    print(format_comparison(base, best))
    p90 = base.summary.ttft_ms["p90"] / best.summary.ttft_ms["p90"]
    print(
        f"\n{args.strategy} routing cut TTFT p90 {p90:.1f}× by keeping each prefix group on the "
        "engine that has it cached."
    )
    return 0
