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
import contextlib
import dataclasses
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleet
from report import command_line, machine_facts, update_section

from shoal.bench import workloads as wl
from shoal.bench.client import run_open_loop
from shoal.bench.peers import RouterUnderTest, ensure_peers, router_process
from shoal.bench.report import Summary, percentile, summarize
from shoal.local import ManagedProcess, free_port

MODEL = "tiny"


def start_engines(n: int, log_dir: Path) -> tuple[list[ManagedProcess], list[str]]:
    """Engines with sub-millisecond steps, so the router's own cost shows."""
    return fleet.start_engines(
        n, log_dir, model=MODEL, served_name=MODEL, extra_args=("--max-num-seqs", "1024")
    )


async def measure(
    urls: str | Sequence[str], rate: float, duration_s: float, seed: int
) -> tuple[Summary, list[float]]:
    """The run's summary and its successful requests' end-to-end latencies (ms)."""
    n = max(1, int(rate * duration_s))
    reqs = wl.random_prompts(
        wl.arrival_times(rate, n, kind="poisson", seed=seed),
        prompt_tokens=32,
        output_tokens=4,
        seed=seed,
    )
    run = await run_open_loop(urls, reqs, model=MODEL, stream=False, progress=False, timeout_s=30)
    return summarize(run), [r.e2e_s * 1000.0 for r in run.results if r.ok and r.e2e_s is not None]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        # Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_queue_wait_seconds(pid: int) -> float:
    """Time a process's threads spent ready to run but waiting for a CPU (schedstat), a measure
    of how much the router competes with the engines and the client for these shared cores."""
    total_ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        path = f"/proc/{pid}/task/{tid}/schedstat"
        with contextlib.suppress(FileNotFoundError), open(path) as f:  # may have just ended
            total_ns += int(f.read().split()[1])
    return total_ns / 1e9


@dataclasses.dataclass
class Target:
    """What a measurement loads: the engines directly, or a router (with its pid, for CPU)."""

    urls: str | Sequence[str]
    pid: int | None = None


@contextlib.contextmanager
def serving(
    rut: RouterUnderTest | None,
    engine_urls: list[str],
    kv: list[str],
    log_dir: Path,
    errors: dict[str, str],
) -> Iterator[Target | None]:
    """The target to load: the engines themselves, or a router started for this measurement
    alone and stopped after it. Only the router under test runs, so whatever it does in the
    background (Shoal scrapes every engine's /metrics, which stalls a simulated engine for a
    few ms per scrape) is charged to it and to nobody else. None if it failed to start."""
    if rut is None:
        yield Target(engine_urls)
        return
    p = router_process(rut, engine_urls, kv, port=free_port(), log_dir=log_dir, served_model=MODEL)
    try:
        p.start()
        p.wait_healthy(timeout_s=60)
        # Warm up: connections open, the first scrapes and model lists are in.
        asyncio.run(measure(p.url, 50, 2.0, seed=10_000))
    except Exception as exc:
        errors[rut.label] = f"did not start: {exc}"
        p.stop()
        yield None
        return
    try:
        yield Target(p.url, p.pid)
    finally:
        p.stop()


def _failed(rut: RouterUnderTest, errors: dict[str, str]) -> bool:
    """Its implementation is not installed, or this configuration of it did not start (a
    second configuration of the same router still runs)."""
    return rut.impl in errors or rut.label in errors


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
        "--repeats", type=int, default=4, help="runs per (router, rate); spread reported"
    )
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument(
        "--max-rate-steps", default="400,600,800,1000,1300,1600", help="'' skips the search"
    )
    ap.add_argument("--p99-bound-ms", type=float, default=100.0)
    ap.add_argument(
        "--routers",
        default="shoal:round-robin,shoal:round-robin?scrape_interval_max_ms=200,"
        "shoal:round-robin?http_server=uvicorn,sglang:round_robin,vllm:round_robin",
        help="impl:policy, comma-separated; Shoal takes config keys: shoal:policy?key=value",
    )
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    args = ap.parse_args()

    routers = [RouterUnderTest.parse(r) for r in args.routers.split(",")]
    errors = ensure_peers([r.impl for r in routers])
    rates = [float(r) for r in args.rates.split(",")]
    log_dir = Path(tempfile.mkdtemp(prefix="shoal-bench-overhead-"))
    engines, kv = start_engines(args.engines, log_dir)
    urls = [e.url for e in engines]
    ran: list[RouterUnderTest] = []
    # results[label][rate] = list of summaries (one per repeat)
    results: dict[str, dict[float, list[Summary]]] = {"direct": {}}
    # pooled[label][rate] = end-to-end latencies (ms) of every repeat together
    pooled: dict[str, dict[float, list[float]]] = {"direct": {}}
    max_rate: dict[str, float] = {}
    # cpu_ms[label][rate] = router CPU milliseconds per request, one per repeat
    cpu_ms: dict[str, dict[float, list[float]]] = {}
    # wait_ms[label][rate] = router run-queue wait milliseconds per request, one per repeat
    wait_ms: dict[str, dict[float, list[float]]] = {}
    steps = [float(x) for x in args.max_rate_steps.split(",") if x.strip()]
    try:
        candidates: list[RouterUnderTest | None] = [None]  # None: the engines, directly
        candidates += [r for r in routers if r.impl not in errors]
        for rate in rates:
            for rep in range(args.repeats):
                # Rotate the order every repeat: a slow drift of the machine (another process,
                # thermal, page cache) then lands on every router in turn, not always on the last.
                shift = rep % len(candidates)
                for rut in candidates[shift:] + candidates[:shift]:
                    if rut is not None and _failed(rut, errors):
                        continue
                    label = "direct" if rut is None else rut.label
                    with serving(rut, urls, kv, log_dir, errors) as target:
                        if target is None:
                            continue
                        cpu0 = cpu_seconds(target.pid) if target.pid else 0.0
                        wait0 = run_queue_wait_seconds(target.pid) if target.pid else 0.0
                        s, e2e = asyncio.run(measure(target.urls, rate, args.duration_s, seed=rep))
                        if target.pid:
                            # seconds over the run -> milliseconds per request
                            ms_per_request = 1000.0 / max(1, s.requests)
                            cpu_ms.setdefault(label, {}).setdefault(rate, []).append(
                                (cpu_seconds(target.pid) - cpu0) * ms_per_request
                            )
                            wait_ms.setdefault(label, {}).setdefault(rate, []).append(
                                (run_queue_wait_seconds(target.pid) - wait0) * ms_per_request
                            )
                    if rut is not None and rut not in ran:
                        ran.append(rut)
                    results.setdefault(label, {}).setdefault(rate, []).append(s)
                    pooled.setdefault(label, {}).setdefault(rate, []).extend(e2e)
                    print(
                        f"{label:<28} {rate:>6.0f} req/s  p50 {s.e2e_ms['p50']:7.2f} ms  "
                        f"p99 {s.e2e_ms['p99']:7.2f} ms  ok {s.ok}/{s.requests}",
                        file=sys.stderr,
                    )
        for rut in candidates if steps else []:
            if rut is not None and _failed(rut, errors):
                continue
            label = "direct" if rut is None else rut.label
            best = 0.0
            with serving(rut, urls, kv, log_dir, errors) as target:
                if target is None:
                    continue
                for step in steps:
                    s, _ = asyncio.run(
                        measure(target.urls, step, min(args.duration_s, 6.0), seed=99)
                    )
                    ok = sustained(s, step, args.p99_bound_ms)
                    print(
                        f"{label:<28} max-rate probe {step:>6.0f}: "
                        f"{'ok' if ok else 'not sustained'} "
                        f"(achieved {s.request_throughput:.0f}/s, p99 {s.e2e_ms['p99']:.1f} ms)",
                        file=sys.stderr,
                    )
                    if not ok:
                        break
                    best = step
            max_rate[label] = best
    finally:
        for e in engines:
            e.stop()
    body = render(args, rates, results, pooled, max_rate, cpu_ms, wait_ms, errors, ran)
    print(body)
    if not args.no_write:
        update_section("router-overhead", body)
    return 0


def _med(xs: list[float]) -> float:
    ys = sorted(xs)
    return ys[len(ys) // 2] if len(ys) % 2 else (ys[len(ys) // 2 - 1] + ys[len(ys) // 2]) / 2


def _per_rate_table(
    title: str,
    data: dict[str, dict[float, list[float]]],
    routers: list[RouterUnderTest],
    rates: list[float],
) -> list[str]:
    """A router x rate table of per-repeat values (median [range]); nothing without data."""
    if not data:
        return []
    lines = [
        "",
        title,
        "",
        "| router | " + " | ".join(f"{r:g} req/s" for r in rates) + " |",
        "| --- |" + " ---: |" * len(rates),
    ]
    for r in routers:
        per_rate = data.get(r.label, {})
        cells = [
            f"{_med(v):.2f} [{min(v):.2f}, {max(v):.2f}]" if (v := per_rate.get(rate)) else ""
            for rate in rates
        ]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return lines


def render(
    args: argparse.Namespace,
    rates: list[float],
    results: dict[str, dict[float, list[Summary]]],
    pooled: dict[str, dict[float, list[float]]],
    max_rate: dict[str, float],
    cpu_ms: dict[str, dict[float, list[float]]],
    wait_ms: dict[str, dict[float, list[float]]],
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
        f"{args.duration_s:g} s per point, {args.repeats} runs per point, in an order rotated every "
        "repeat. Added latency = end-to-end through the router − end-to-end calling the engines "
        "directly (round-robin by the client), at the same percentile. 'pooled' takes each "
        "percentile over every repeat's requests together (the headline: a p99 from "
        f"{args.repeats}× the tail samples); 'per run' is the median and [range] of the repeats' "
        "own differences, to show the noise. Every router uses its "
        "round-robin policy so that the proxy path is compared. Only the router under test runs "
        "during its measurement (started before it, stopped after it), so its background work is "
        "charged to it alone: Shoal scrapes every engine's `/metrics`, and rendering that ~50 kB "
        "exposition blocks a simulated engine's API-server loop for about 5 ms (prometheus_client, "
        "as in vLLM's API server); the peers' round-robin polls nothing. By default Shoal scrapes "
        "every 200 ms while an engine's metrics say something its own accounting does not, and "
        "backs off to 800 ms while the engine is calm (router/scrape_cadence.py); on this "
        "benchmark's engines (no queue, load all the router's own) it backs off. The row with "
        "`scrape_interval_max_ms 200` scrapes every 200 ms throughout, to show what the cadence "
        "saves. Shoal serves HTTP with its own server (router/http_server.py), which hands the "
        "inference routes to the gateway without ASGI (router/exchange.py); the row with "
        "`http_server uvicorn` serves the same app with uvicorn, through ASGI, as Shoal did "
        "before. Shoal's "
        "round-robin does not tokenize prompts (`tokenize_prompts: auto`: only strategies that "
        "read the tokens do). "
        "Shoal's round-robin does not subscribe to the engines' KV events (`kv_events: "
        "off`), as vllm-router is given event sources only for `kv_aware`. The client, the "
        "engines and the "
        "router share this machine's cores: the numbers include CPU contention, and the 'max rate' "
        "is the machine's limit for engines + router + client together, not the router's alone.",
        "",
        "| router | rate (req/s) | p50 added, pooled (ms) | p99 added, pooled (ms) | "
        "p50 added, per run | p99 added, per run | p99 ratio Shoal / best peer (pooled) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    shoals = {r.label for r in routers if r.impl == "shoal"}
    peers = [r.label for r in routers if r.impl != "shoal"]
    for rate in rates:
        d = results["direct"].get(rate, [])
        if not d:
            continue

        def added(label: str, key: str, rate: float = rate, d: list[Summary] = d) -> list[float]:
            runs = results[label].get(rate, [])
            return [r.e2e_ms[key] - dr.e2e_ms[key] for r, dr in zip(runs, d, strict=False)]

        direct_all = pooled["direct"].get(rate, [])

        def pooled_added(
            label: str, q: float, rate: float = rate, direct_all: list[float] = direct_all
        ) -> float:
            return percentile(pooled[label].get(rate, []), q) - percentile(direct_all, q)

        lines.append(
            f"| direct (baseline) | {rate:g} | p50 {percentile(direct_all, 50):.2f} | "
            f"p99 {percentile(direct_all, 99):.2f} | | | |"
        )
        best_peer = min((pooled_added(p, 99) for p in peers if pooled[p].get(rate)), default=None)
        for r in routers:
            a50, a99 = added(r.label, "p50"), added(r.label, "p99")
            if not a50:
                continue
            p50, p99 = pooled_added(r.label, 50), pooled_added(r.label, 99)
            ratio = ""
            if r.label in shoals and best_peer is not None:
                ratio = f"{p99 / best_peer:.2f}×" if best_peer > 0 else "n/a (peer ≤ 0)"
            lines.append(
                f"| {r.label} | {rate:g} | {p50:.2f} | {p99:.2f} | "
                f"{_med(a50):.2f} [{min(a50):.2f}, {max(a50):.2f}] | "
                f"{_med(a99):.2f} [{min(a99):.2f}, {max(a99):.2f}] | {ratio} |"
            )
    lines += _per_rate_table(
        "Router CPU per request (user + system time of the router process over each run, "
        "from /proc, divided by the run's requests; median [range] of the repeats, ms). "
        "Unlike latency this hardly depends on what else the machine is doing:",
        cpu_ms,
        routers,
        rates,
    )
    lines += _per_rate_table(
        "Router run-queue wait per request (time the router's threads were ready to run but "
        "waited for a CPU, from /proc/<pid>/task/*/schedstat, divided by the run's requests; "
        "median [range], ms):",
        wait_ms,
        routers,
        rates,
    )
    if max_rate:
        lines += [
            "",
            "Highest rate sustained (achieved ≥ 95% of offered, no errors, "
            f"p99 ≤ {args.p99_bound_ms:g} ms; probe steps {args.max_rate_steps} req/s):",
            "",
        ]
    elif errors:
        lines.append("")
    for label, rate in max_rate.items():
        lines.append(f"- {label}: {rate:g} req/s" if rate else f"- {label}: below the first step")
    for name, err in errors.items():
        lines.append(f"- {name}: could not run: `{err}`")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
