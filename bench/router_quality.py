"""Routing quality: TTFT and throughput of routing strategies on one simulated fleet.

8 simulated Llama-3.1-8B engines on H100 (``shoal sim``, KV events on); 32 prefix groups with
4,000-token shared prefixes, 256-token unique suffixes, 128 output tokens; Poisson arrivals at 80%
of round-robin's capacity. Every configuration gets freshly started engines (empty caches) and the
same request stream.

The engines run on a slowed clock (``--time-scale``, simulated seconds per wall second): the
fleet's simulated capacity is far beyond what one 2-core machine can drive through Python
engines, a router and a client in real time. The client measures wall time; latencies are
converted back to simulated time (× time scale) and throughput to simulated rates (÷ time scale).
The router's own processing time is shrunk by the same factor, identically for every router.

Writes the ``router-quality`` section of docs/benchmarks.md.

    python bench/router_quality.py                 # full run (~10 min)
    python bench/router_quality.py --duration-s 20 --configs shoal:round-robin,shoal:prefix
"""

# ruff: noqa: E501  (report prose and table rows read better unwrapped)
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleet
from report import command_line, machine_facts, update_section

from shoal.bench import workloads as wl
from shoal.bench.client import RunResult, run_open_loop
from shoal.bench.peers import RouterUnderTest, ensure_peers, router_process
from shoal.bench.report import Summary, summarize, to_simulated_time
from shoal.bench.ttft_floor import TtftFloor, shared_prefix_floor
from shoal.demo import cache_counters
from shoal.local import ManagedProcess, free_port
from shoal.sim.catalog import get_gpu, get_model
from shoal.sim.perf import PerfModel

MODEL = "llama-8b"
HF_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
GPU = "H100"
PREFIX_TOKENS = 4000
CONFIGS = (
    "shoal:round-robin,shoal:least-request,shoal:prefix,shoal:kv-aware,"
    "sglang:cache_aware,vllm:cache_aware,vllm:kv_aware"
)


def start_engines(
    n: int, log_dir: Path, time_scale: float
) -> tuple[list[ManagedProcess], list[str]]:
    """Llama-3.1-8B on H100, each engine seeded differently, slowed by ``time_scale``."""
    return fleet.start_engines(
        n,
        log_dir,
        model=HF_MODEL,
        served_name=MODEL,
        extra_args=("--gpu", GPU, "--time-scale", str(time_scale)),
        per_engine_args=[("--seed", str(i)) for i in range(n)],
        ready_timeout_s=120,
    )


def workload(rate: float, n: int, seed: int = 0, skew: float = 0.0) -> list[wl.BenchRequest]:
    return wl.shared_prefix(
        wl.arrival_times(rate, n, seed=seed),
        num_groups=32,
        prefix_tokens=PREFIX_TOKENS,
        suffix_tokens=256,
        output_tokens=128,
        seed=seed,
        skew=skew,
    )


def run_config(
    rut: RouterUnderTest, reqs: list[wl.BenchRequest], args: argparse.Namespace, log_dir: Path
) -> tuple[RunResult, float]:
    """Fresh engines + the router under test; returns the run and the prefix-cache hit rate."""
    engines, kv = start_engines(args.engines, log_dir, args.time_scale)
    router = router_process(
        rut, [e.url for e in engines], kv, port=free_port(), log_dir=log_dir, served_model=MODEL
    )
    try:
        router.start()
        router.wait_healthy(timeout_s=120)
        urls = [e.url for e in engines]
        h0, q0 = cache_counters(urls)
        run = asyncio.run(run_open_loop(router.url, reqs, model=MODEL, progress=not args.quiet))
        h1, q1 = cache_counters(urls)
        return run, ((h1 - h0) / (q1 - q0) if q1 > q0 else float("nan"))
    finally:
        router.stop()
        for e in engines:
            e.stop()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--engines", type=int, default=8)
    ap.add_argument("--time-scale", type=float, default=0.1, help="simulated s per wall s")
    ap.add_argument(
        "--duration-s", type=float, default=40.0, help="wall seconds of arrivals per run"
    )
    ap.add_argument(
        "--capacity-rps",
        type=float,
        default=40.0,
        help="round-robin capacity in simulated req/s (40: what the probe measured on "
        "2026-11-23); 0 probes it again",
    )
    ap.add_argument(
        "--probe-rate-wall",
        type=float,
        default=12.0,
        help="wall req/s offered when measuring round-robin capacity",
    )
    ap.add_argument("--load", type=float, default=0.8, help="offered load as a share of capacity")
    ap.add_argument(
        "--group-skew",
        type=float,
        default=0.0,
        help="Zipf exponent of prefix-group popularity (0: equally popular, the issue's "
        "workload; 1.5: the hottest group takes ~44%% of requests)",
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--floor-only",
        action="store_true",
        help="print the TTFT floor of the request stream (shoal/bench/ttft_floor.py) and stop, "
        "without starting engines or routers (needs --capacity-rps)",
    )
    args = ap.parse_args()
    scale = args.time_scale
    if args.floor_only:
        if not args.capacity_rps:
            ap.error("--floor-only needs the capacity (--capacity-rps) to build the stream")
        rate_wall = args.load * args.capacity_rps * scale
        reqs = workload(rate_wall, int(rate_wall * args.duration_s), skew=args.group_skew)
        print(floor_sentence(ttft_floor(reqs)))
        return 0
    configs = [RouterUnderTest.parse(c) for c in args.configs.split(",")]
    errors = ensure_peers([c.impl for c in configs])
    log_dir = Path(tempfile.mkdtemp(prefix="shoal-bench-quality-"))

    capacity = args.capacity_rps
    if not capacity:
        # Saturate round-robin: offer more than it can serve; the rate of completions in the second
        # half of the arrival window (caches warm, queue full, drain tail excluded) is its capacity.
        probe = args.probe_rate_wall
        reqs = workload(probe, int(probe * args.duration_s), seed=123)
        run, _ = run_config(RouterUnderTest("shoal", "round-robin"), reqs, args, log_dir)
        end = reqs[-1].arrival_s
        done = [r for r in run.results if r.ok and end / 2 <= r.start_s + (r.e2e_s or 0) <= end]
        capacity = len(done) / (end / 2) / scale
        if capacity <= 0:
            s = summarize(run)
            print(
                f"capacity probe completed nothing in its window: {s.ok}/{s.requests} ok, "
                f"errors {s.errors}. Like vLLM, the engines admit every arrival into the running "
                "batch while KV cache is free, so an overload that fits in KV cache finishes "
                "nothing until arrivals stop; offer more (--probe-rate-wall) or pass "
                "--capacity-rps",
                file=sys.stderr,
            )
            return 1
        print(
            f"round-robin capacity ≈ {capacity:.1f} simulated req/s (offered {probe / scale:.0f})",
            file=sys.stderr,
        )
    rate_wall = args.load * capacity * scale
    n = int(rate_wall * args.duration_s)
    reqs = workload(rate_wall, n, seed=0, skew=args.group_skew)
    rows: list[tuple[RouterUnderTest, list[Summary], list[float]]] = []
    for c in configs:
        if c.impl in errors:
            continue
        sums, hits = [], []
        for _ in range(args.repeats):
            try:
                run, hit = run_config(c, reqs, args, log_dir)
            except Exception as exc:
                errors[f"{c.impl}:{c.policy}"] = f"{type(exc).__name__}: {exc}"[:600]
                break
            s = to_simulated_time(summarize(run), scale)
            sums.append(s)
            hits.append(hit)
            print(
                f"{c.label:<28} TTFT p50 {s.ttft_ms['p50']:8.1f} p90 {s.ttft_ms['p90']:8.1f} ms  "
                f"{s.output_throughput:8.0f} tok/s  hit {100 * hit:5.1f}%  ok {s.ok}/{s.requests}",
                file=sys.stderr,
            )
        if sums:
            rows.append((c, sums, hits))
    body = render(args, capacity, rate_wall / scale, n, rows, errors, ttft_floor(reqs))
    print(body)
    if not args.no_write:
        update_section("router-quality", body)
    return 0


def ttft_floor(reqs: list[wl.BenchRequest]) -> TtftFloor:
    """The lowest TTFT any router could give each request of this stream (simulated seconds)."""
    return shared_prefix_floor(reqs, PerfModel(get_model(HF_MODEL), get_gpu(GPU)), PREFIX_TOKENS)


def floor_sentence(floor: TtftFloor) -> str:
    n = len(floor.floors_s)
    return (
        f"TTFT floor of this request stream (shoal/bench/ttft_floor.py: each prefill alone in its "
        f"step, every repeat visit of a group finding its prefix cached): {floor.cold_requests} of "
        f"{n} requests ({floor.cold_requests / n:.1%}) are the first visit of their group, whose "
        f"whole prompt no engine holds yet (cold prefill alone: {1000 * floor.cold_s:.1f} ms; a "
        f"warm one: {1000 * floor.warm_s:.1f} ms). No router's TTFT p50 can be under "
        f"{1000 * floor.percentile_s(50):.1f} ms, nor its p90 under "
        f"{1000 * floor.percentile_s(90):.1f} ms."
    )


def _rng(xs: list[float], fmt: str = "{:.0f}") -> str:
    xs = sorted(xs)
    mid = xs[len(xs) // 2]
    return fmt.format(mid) + (f" [{fmt.format(xs[0])}–{fmt.format(xs[-1])}]" if len(xs) > 1 else "")


def render(
    args: argparse.Namespace,
    capacity: float,
    rate: float,
    n: int,
    rows: list[tuple[RouterUnderTest, list[Summary], list[float]]],
    errors: dict[str, str],
    floor: TtftFloor,
) -> str:
    lines = [
        "## Routing quality",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine_facts()}",
        "",
        f"{args.engines} `shoal sim` engines (Llama-3.1-8B on H100, default KV cache size, KV events "
        "on); 32 prefix groups × 4,000-token shared prefixes"
        + (
            f" (popularity Zipf, exponent {args.group_skew:g}: the hottest group takes "
            f"{wl.zipf_weights(32, args.group_skew)[0]:.0%} of requests)"
            if args.group_skew
            else " (equally popular)"
        )
        + ", 256-token suffixes, 128 output tokens "
        f"(streamed, `ignore_eos`); Poisson arrivals at {args.load:.0%} of round-robin's measured "
        f"capacity ({capacity:.1f} req/s) = {rate:.1f} req/s, {n} requests per run; fresh engines per "
        f"run. Engines run at time scale {args.time_scale:g} (simulated s per wall s) so that this "
        "machine can drive them; all figures below are converted to simulated time. "
        f"{args.repeats} run(s) per configuration (median [range] when more than one). All processes "
        "share this machine's 2 cores, so the routers' CPU cost also competes with the engines'.",
        "",
        "| router and policy | TTFT p50 (ms) | TTFT p90 (ms) | output tok/s | prefix-cache hit rate | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c, sums, hits in rows:
        lines.append(
            f"| {c.label} | {_rng([s.ttft_ms['p50'] for s in sums])} | "
            f"{_rng([s.ttft_ms['p90'] for s in sums])} | {_rng([s.output_throughput for s in sums])} | "
            f"{_rng([100 * h for h in hits], '{:.1f}%')} | "
            f"{sum(s.requests - s.ok for s in sums)} |"
        )
    shoal = [r for r in rows if r[0].impl == "shoal" and r[0].policy in ("prefix", "kv-aware")]
    peers = [r for r in rows if r[0].impl != "shoal"]
    if shoal and peers:

        def p90(r: tuple[RouterUnderTest, list[Summary], list[float]]) -> float:
            return sorted(s.ttft_ms["p90"] for s in r[1])[len(r[1]) // 2]

        def tput(r: tuple[RouterUnderTest, list[Summary], list[float]]) -> float:
            return sorted(s.output_throughput for s in r[1])[len(r[1]) // 2]

        best_s, best_p = min(shoal, key=p90), min(peers, key=p90)
        floor_p90 = 1000 * floor.percentile_s(90)
        half = p90(best_p) / 2
        lines += [
            "",
            f"Shoal's best TTFT p90 ({best_s[0].label}, {p90(best_s):.0f} ms) is "
            f"{p90(best_s) / p90(best_p):.2f}× the best peer's ({best_p[0].label}, {p90(best_p):.0f} ms) "
            "(target ≤ 0.5×); its output throughput is "
            f"{tput(best_s) / max(tput(r) for r in peers):.2f}× the best peer's (target ≥ 1×).",
            "",
            floor_sentence(floor)
            + f" Shoal's best p90 is {p90(best_s) / floor_p90:.2f}× that floor, the best peer's "
            f"{p90(best_p) / floor_p90:.2f}×; half the best peer's p90 ({half:.0f} ms) is "
            + (
                "below the floor, so no routing policy can meet the 0.5× target on this stream."
                if half < floor_p90
                else "above the floor."
            ),
        ]
    for what, err in errors.items():
        lines.append(f"\n- {what}: could not run: `{err}`")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
