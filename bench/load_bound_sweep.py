"""Where to set the affinity load bound: Shoal's ``kv-aware`` over (load factor, slack) pairs.

A prefix scorer keeps an endpoint's prefix score only while the endpoint's load is at most
``mean × load_factor + load_slack`` (``router/scorers.py``). Too tight, and requests leave the
engine that holds their prefix for one that must prefill it cold: on the routing-quality workload
that is a 108 ms prefill instead of an 8.5 ms one, and it stalls every request that shares the
cold engine's step. Too loose, and a hot prefix piles onto one engine. This sweep runs the
production pipeline on the virtual-clock fleet (``shoal.bench.virtual_routing``) over both kinds of
workload, at three request rates and two stream lengths, several seeds each, and ranks the pairs
by their worst TTFT or TPOT p90 relative to the best pair on each workload (the regret).

Workload: 8 Llama-3.1-8B engines on H100, 32 prefix groups × 4,000-token prefixes, 256-token
suffixes, 128 output tokens, Poisson arrivals; group popularity equal or Zipf 1.5 (the hottest
group takes 44% of requests).

    python bench/load_bound_sweep.py              # ~8 min on 2 cores; writes docs/benchmarks.md
    python bench/load_bound_sweep.py --seeds 2 --lengths 640 --rates 32 --no-write
"""

# ruff: noqa: E501  (report prose and table rows read better unwrapped)
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from report import command_line, machine_facts, update_section

from shoal.bench.report import percentile
from shoal.bench.virtual_routing import PipelineRouter
from shoal.bench.workloads import shared_prefix_trace
from shoal.router.scorers import DEFAULT_LOAD_FACTOR, DEFAULT_LOAD_SLACK
from shoal.sim.cluster import ClusterSimulator, EngineSpec

OFF = (1.0, 1e9)  # a bound that never binds
PAIRS = ((1.25, 2.0), (1.25, 4.0), (1.5, 4.0), (2.0, 2.0), (1.25, 8.0), OFF)
SKEWS = (0.0, 1.5)


def one_run(
    pair: tuple[float, float], rate: float, n: int, skew: float, seed: int
) -> tuple[float, float]:
    """(TTFT p90, TPOT p90) in ms of one stream under one (factor, slack) pair."""
    reqs = shared_prefix_trace(rate, n, seed=seed, skew=skew)
    router = PipelineRouter("kv-aware", load_factor=pair[0], load_slack=pair[1])
    report = ClusterSimulator([EngineSpec()] * 8, router, seed=seed).run(reqs)
    ttft = [f.ttft * 1000 for f in report.finished_requests]
    return percentile(ttft, 90), report.tpot.p90 * 1000


def label(pair: tuple[float, float]) -> str:
    if pair == OFF:
        return "off"
    default = pair == (DEFAULT_LOAD_FACTOR, DEFAULT_LOAD_SLACK)
    return f"{pair[0]:g} / {pair[1]:g}" + (" (default)" if default else "")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--rates",
        default="24,32,36",
        help="req/s, comma-separated (32 = 80%% of round-robin's capacity)",
    )
    ap.add_argument("--lengths", default="640,3200", help="requests per stream, comma-separated")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rates = [float(x) for x in args.rates.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    workloads = list(itertools.product(SKEWS, rates, lengths))
    jobs = [
        (pair, rate, n, skew, seed)
        for (skew, rate, n), pair, seed in itertools.product(workloads, PAIRS, range(args.seeds))
    ]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = dict(
            zip(jobs, pool.map(one_run, *zip(*jobs, strict=True), chunksize=1), strict=True)
        )
    wall = time.perf_counter() - t0

    def cell(
        pair: tuple[float, float], skew: float, rate: float, n: int
    ) -> tuple[list[float], list[float]]:
        runs = [results[(pair, rate, n, skew, s)] for s in range(args.seeds)]
        return [r[0] for r in runs], [r[1] for r in runs]

    lines = [
        "## Affinity load bound sweep",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine_facts()}",
        "",
        "Shoal `kv-aware` (the production pipeline on the virtual-clock fleet) with each (load factor, "
        "slack) pair: a prefix score counts only while the endpoint's load is at most mean × factor + "
        "slack. 8 Llama-3.1-8B engines on H100, 32 prefix groups × 4,000-token prefixes, 256-token "
        "suffixes, 128 output tokens, Poisson arrivals. Each cell: TTFT p90 in ms, median [range] over "
        f"{args.seeds} seeds, then TPOT p90 (median). 'Zipf' = group popularity Zipf 1.5 (the hottest "
        "group takes 44% of requests). Regret: the pair's worst ratio, over the workloads and the two "
        "latencies, of its median to the best pair's on that workload: the affinity is there for "
        "TTFT, the bound for TPOT (a pile of decodes on one engine slows every step there).",
        "",
        "| factor / slack | "
        + " | ".join(f"{'Zipf' if s else 'equal'}, {r:g} req/s, {n:,} req" for s, r, n in workloads)
        + " | regret |",
        "| --- | " + " | ".join("---:" for _ in workloads) + " | ---: |",
    ]
    best_ttft = {w: min(statistics.median(cell(p, *w)[0]) for p in PAIRS) for w in workloads}
    best_tpot = {w: min(statistics.median(cell(p, *w)[1]) for p in PAIRS) for w in workloads}
    regrets: dict[tuple[float, float], float] = {}
    for pair in PAIRS:
        cells, ratios = [], []
        for w in workloads:
            p90, tpot = cell(pair, *w)
            mid = statistics.median(p90)
            ratios += [mid / best_ttft[w], statistics.median(tpot) / best_tpot[w]]
            cells.append(
                f"{mid:.1f} [{min(p90):.1f}–{max(p90):.1f}]; {statistics.median(tpot):.1f}"
            )
        regrets[pair] = max(ratios)
        lines.append(f"| {label(pair)} | " + " | ".join(cells) + f" | {regrets[pair]:.2f}× |")
    winner = min(regrets, key=regrets.__getitem__)
    lines += [
        "",
        f"Lowest regret: **{label(winner)}** ({regrets[winner]:.2f}×). Wall time {wall:.0f} s with "
        f"{args.workers} worker processes.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        update_section("load-bound-sweep", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
