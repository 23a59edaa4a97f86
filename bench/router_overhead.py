"""Router overhead: latency a router adds over calling the engines directly, side by side.

Fast simulated engines (the ``tiny`` model: sub-millisecond steps) answer short non-streaming
requests. At each offered rate the same open-loop request stream goes (1) straight to the
engines, round-robin, and (2) through each router under test (Shoal, sglang-router,
vllm-router, each with its round-robin policy so that only the proxy path is compared). The added
latency at a percentile is router p - direct p. Then the rate is raised until a router no longer
keeps up (achieved < 95% of offered, errors, or p99 above a bound) to find the highest rate one
router process sustains *on this machine*.

Writes the ``router-overhead`` section of docs/benchmarks.md.

    python bench/router_overhead.py                       # full run (~6 min)
    python bench/router_overhead.py --duration-s 4 --rates 50,200   # quick look
"""

# ruff: noqa: E501  (report prose and table rows read better unwrapped)
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleet
from report import command_line, machine_facts, update_section

from shoal.bench import workloads as wl
from shoal.bench.client import run_open_loop
from shoal.bench.peers import RouterUnderTest, ensure_peers, router_process
from shoal.bench.report import Summary, summarize
from shoal.local import ManagedProcess, free_port

MODEL = "tiny"


def start_engines(n: int, log_dir: Path) -> tuple[list[ManagedProcess], list[str]]:
    """Engines with sub-millisecond steps, so the router's own cost shows."""
    return fleet.start_engines(
        n, log_dir, model=MODEL, served_name=MODEL, extra_args=("--max-num-seqs", "1024")
    )


async def measure(urls: str | Sequence[str], rate: float, duration_s: float, seed: int) -> Summary:
    n = max(1, int(rate * duration_s))
    reqs = wl.random_prompts(
        wl.arrival_times(rate, n, kind="poisson", seed=seed),
        prompt_tokens=32,
        output_tokens=4,
        seed=seed,
    )
    run = await run_open_loop(urls, reqs, model=MODEL, stream=False, progress=False, timeout_s=30)
    return summarize(run)


def sustained(s: Summary, rate: float, p99_bound_ms: float) -> bool:
    return (
        not s.errors
        and s.request_throughput >= 0.95 * rate
        and s.e2e_ms["p99"] <= p99_bound_ms
        and s.dispatch_lag_p99_ms < 50
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rates", default="50,100,200,400")
    ap.add_argument("--duration-s", type=float, default=10.0)
    ap.add_argument(
        "--repeats", type=int, default=2, help="runs per (router, rate); spread reported"
    )
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--max-rate-steps", default="400,600,800,1000,1300,1600")
    ap.add_argument("--p99-bound-ms", type=float, default=100.0)
    ap.add_argument("--routers", default="shoal:round-robin,sglang:round_robin,vllm:round_robin")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    args = ap.parse_args()

    routers = [RouterUnderTest(*r.split(":", 1)) for r in args.routers.split(",")]
    errors = ensure_peers([r.impl for r in routers])
    rates = [float(r) for r in args.rates.split(",")]
    log_dir = Path(tempfile.mkdtemp(prefix="shoal-bench-overhead-"))
    engines, kv = start_engines(args.engines, log_dir)
    urls = [e.url for e in engines]
    procs: dict[RouterUnderTest, ManagedProcess] = {}
    try:
        for r in routers:
            if r.impl in errors:
                continue
            p = router_process(r, urls, kv, port=free_port(), log_dir=log_dir, served_model=MODEL)
            try:
                p.start()
                p.wait_healthy(timeout_s=60)
                procs[r] = p
            except Exception as exc:
                errors[r.impl] = f"{r.label} did not start: {exc}"
                p.stop()
        # results[label][rate] = list of summaries (one per repeat)
        results: dict[str, dict[float, list[Summary]]] = {"direct": {}}
        for r in procs:
            results[r.label] = {}
        for rate in rates:
            for rep in range(args.repeats):
                targets: list[tuple[str, str | Sequence[str]]] = [("direct", urls)]
                targets += [(r.label, p.url) for r, p in procs.items()]
                for label, target in targets:
                    s = asyncio.run(measure(target, rate, args.duration_s, seed=rep))
                    results[label].setdefault(rate, []).append(s)
                    print(
                        f"{label:<28} {rate:>6.0f} req/s  p50 {s.e2e_ms['p50']:7.2f} ms  "
                        f"p99 {s.e2e_ms['p99']:7.2f} ms  ok {s.ok}/{s.requests}",
                        file=sys.stderr,
                    )
        max_rate: dict[str, float] = {}
        for label, target in [("direct", urls), *[(r.label, p.url) for r, p in procs.items()]]:
            best = 0.0
            for step in [float(x) for x in args.max_rate_steps.split(",")]:
                s = asyncio.run(measure(target, step, min(args.duration_s, 6.0), seed=99))
                ok = sustained(s, step, args.p99_bound_ms)
                print(
                    f"{label:<28} max-rate probe {step:>6.0f}: {'ok' if ok else 'not sustained'} "
                    f"(achieved {s.request_throughput:.0f}/s, p99 {s.e2e_ms['p99']:.1f} ms)",
                    file=sys.stderr,
                )
                if not ok:
                    break
                best = step
            max_rate[label] = best
    finally:
        for p in procs.values():
            p.stop()
        for e in engines:
            e.stop()
    body = render(args, rates, results, max_rate, errors, list(procs))
    print(body)
    if not args.no_write:
        update_section("router-overhead", body)
    return 0


def _med(xs: list[float]) -> float:
    ys = sorted(xs)
    return ys[len(ys) // 2] if len(ys) % 2 else (ys[len(ys) // 2 - 1] + ys[len(ys) // 2]) / 2


def render(
    args: argparse.Namespace,
    rates: list[float],
    results: dict[str, dict[float, list[Summary]]],
    max_rate: dict[str, float],
    errors: dict[str, str],
    routers: list[RouterUnderTest],
) -> str:
    lines = [
        "## Router overhead",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine_facts()}",
        "",
        f"{args.engines} `shoal sim` engines (model `tiny`, sub-millisecond steps), short non-streaming "
        "requests (32 prompt tokens, 4 output tokens), Poisson arrivals, "
        f"{args.duration_s:g} s per point, {args.repeats} runs per point (median shown, range in "
        "brackets). Added latency = end-to-end through the router − end-to-end calling the engines "
        "directly (round-robin by the client), at the same percentile. Every router uses its "
        "round-robin policy so that only the proxy path is compared. The client, the engines and all "
        "routers share this machine's cores: the numbers include CPU contention, and the 'max rate' is "
        "the machine's limit for engines + router + client together, not the router's alone.",
        "",
        "| router | rate (req/s) | p50 added (ms) | p99 added (ms) | p99 ratio Shoal / best peer |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    shoal = next((r.label for r in routers if r.impl == "shoal"), None)
    peers = [r.label for r in routers if r.impl != "shoal"]
    for rate in rates:
        d = results["direct"].get(rate, [])
        if not d:
            continue

        def added(label: str, key: str, rate: float = rate, d: list[Summary] = d) -> list[float]:
            runs = results[label].get(rate, [])
            return [r.e2e_ms[key] - dr.e2e_ms[key] for r, dr in zip(runs, d, strict=False)]

        lines.append(
            f"| direct (baseline) | {rate:g} | p50 {_med([s.e2e_ms['p50'] for s in d]):.2f} | "
            f"p99 {_med([s.e2e_ms['p99'] for s in d]):.2f} | |"
        )
        best_peer = min((_med(added(p, "p99")) for p in peers), default=None)
        for r in routers:
            a50, a99 = added(r.label, "p50"), added(r.label, "p99")
            if not a50:
                continue
            ratio = ""
            if r.label == shoal and best_peer is not None:
                ratio = f"{_med(a99) / best_peer:.2f}×" if best_peer > 0 else "n/a (peer ≤ 0)"
            lines.append(
                f"| {r.label} | {rate:g} | {_med(a50):.2f} [{min(a50):.2f}, {max(a50):.2f}] | "
                f"{_med(a99):.2f} [{min(a99):.2f}, {max(a99):.2f}] | {ratio} |"
            )
    lines += [
        "",
        "Highest rate sustained (achieved ≥ 95% of offered, no errors, "
        f"p99 ≤ {args.p99_bound_ms:g} ms; probe steps {args.max_rate_steps} req/s):",
        "",
    ]
    for label, rate in max_rate.items():
        lines.append(f"- {label}: {rate:g} req/s" if rate else f"- {label}: below the first step")
    for impl, err in errors.items():
        lines.append(f"- {impl}: could not run: `{err}`")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
