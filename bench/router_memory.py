"""Router memory: RSS of one ``shoal router`` process after N distinct prompts (default 1,000,000).

Two fast ``tiny`` engines answer 1-token completions; the client sends distinct 64-token prompts
(every one new to the router's prefix index and its per-request maps) at a steady open-loop rate
and samples the router's RSS from ``/proc/PID/status`` along the way. Every router structure has
a hard bound (DESIGN.md, "Bounded state"), so RSS must flatten once the bounds are reached
instead of growing with the number of prompts.

Writes the ``router-memory`` section of docs/benchmarks.md.

    python bench/router_memory.py                          # 1,000,000 prompts (~30 min here)
    python bench/router_memory.py --prompts 50000 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import command_line, machine_facts, update_section
from router_overhead import MODEL, start_engines

from shoal.bench import workloads as wl
from shoal.bench.client import run_open_loop
from shoal.bench.peers import RouterUnderTest, router_process
from shoal.bench.report import summarize
from shoal.local import free_port


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=600.0, help="requests per second")
    ap.add_argument("--chunk", type=int, default=50_000, help="prompts between RSS samples")
    ap.add_argument("--strategy", default="prefix")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="shoal-bench-memory-"))
    engines, kv = start_engines(2, log_dir)
    router = router_process(
        RouterUnderTest("shoal", args.strategy),
        [e.url for e in engines],
        kv,
        port=free_port(),
        log_dir=log_dir,
        served_model=MODEL,
    )
    samples: list[tuple[int, float]] = []
    errors = 0
    try:
        router.start()
        router.wait_healthy()
        assert router.pid is not None
        samples.append((0, rss_mib(router.pid)))
        sent = 0
        while sent < args.prompts:
            n = min(args.chunk, args.prompts - sent)
            # A fresh seed per chunk keeps every prompt distinct across chunks.
            reqs = wl.random_prompts(
                wl.arrival_times(args.rate, n, kind="constant"),
                prompt_tokens=64,
                output_tokens=1,
                seed=1000 + sent,
            )
            run = asyncio.run(
                run_open_loop(router.url, reqs, model=MODEL, stream=False, progress=False)
            )
            errors += sum(1 for r in run.results if not r.ok)
            sent += n
            s = summarize(run)
            samples.append((sent, rss_mib(router.pid)))
            print(
                f"{sent:>9,} prompts: router RSS {samples[-1][1]:7.1f} MiB "
                f"(chunk p99 {s.e2e_ms['p99']:.1f} ms, {errors} errors so far)",
                file=sys.stderr,
            )
    finally:
        router.stop()
        for e in engines:
            e.stop()
    lines = [
        "## Router memory",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine_facts()}",
        "",
        f"One `shoal router` (strategy `{args.strategy}`) in front of 2 `tiny` engines; "
        f"{args.prompts:,} distinct 64-token prompts, 1 output token, {args.rate:g} req/s; "
        f"{errors} errors. Router RSS (MiB) by prompts served:",
        "",
        "| prompts | RSS (MiB) |",
        "| ---: | ---: |",
        *[f"| {n:,} | {r:.1f} |" for n, r in samples],
        "",
        f"Before: {samples[0][1]:.1f} MiB; after: {samples[-1][1]:.1f} MiB; "
        f"largest: {max(r for _, r in samples):.1f} MiB.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        update_section("router-memory", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
