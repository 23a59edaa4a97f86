"""Virtual-clock cluster simulation speed: one hour of the Azure conversation trace, 8 engines.

Acceptance line: the virtual-clock mode simulates one hour of an 8-engine fleet at the Azure
conversation trace's rate in under 60 s of wall time. Runs the simulation ``--runs`` times in this
process (single-threaded: the simulator uses one core) and reports the median and spread.

    python bench/sim_virtual.py [--trace PATH] [--runs 3] [--router round-robin]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

from report import command_line, machine_facts, update_section

from shoal.sim.cluster import ROUTERS, EngineSpec, SimulationReport, simulate
from shoal.sim.trace import AZURE_CONV_RATE_RPS, TraceRequest, load_azure_trace, synthetic_workload

DEFAULT_TRACE = Path("/work/shared/data/azure-llm-2023/AzureLLMInferenceTrace_conv.csv")
TARGET_S = 60.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engines", type=int, default=8)
    parser.add_argument("--router", choices=sorted(ROUTERS), default="round-robin")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    t0 = time.perf_counter()
    workload: list[TraceRequest]
    if args.trace.exists():
        workload = load_azure_trace(args.trace)
        source = f"Azure LLM inference trace 2023, conversation (`{args.trace.name}`)"
    else:
        workload = list(synthetic_workload(AZURE_CONV_RATE_RPS, 3600.0, seed=0))
        source = "synthetic workload shaped like the Azure 2023 conversation trace (trace missing)"
    load_s = time.perf_counter() - t0
    spec = EngineSpec()
    reports: list[SimulationReport] = []
    walls: list[float] = []
    for i in range(args.runs):
        gc.collect()
        t = time.perf_counter()
        rep = simulate(workload, [spec] * args.engines, ROUTERS[args.router](), keep_requests=False)
        walls.append(time.perf_counter() - t)
        reports.append(rep)
        print(f"run {i + 1}: {walls[-1]:.2f} s wall, {rep.steps} steps", file=sys.stderr)
    # The simulation is deterministic: every run must produce the same report.
    first = {
        k: v
        for k, v in reports[0].to_dict().items()
        if k not in ("wall_s", "speedup", "steps_per_s")
    }
    for rep in reports[1:]:
        d = {
            k: v for k, v in rep.to_dict().items() if k not in ("wall_s", "speedup", "steps_per_s")
        }
        if d != first:
            print("runs differ: the simulation is not deterministic", file=sys.stderr)
            return 1

    rep = reports[0]
    med = statistics.median(walls)
    verdict = "meets" if med < TARGET_S else "MISSES"
    lines = [
        "## Virtual-clock cluster simulation (`bench/sim_virtual.py`)",
        "",
        f"- Command: `{command_line()}`",
        f"- Machine: {machine_facts()}. The simulator is single-threaded (one core).",
        f"- Workload: {source}: {rep.requests} requests over {rep.simulated_s:.0f} simulated s "
        f"({rep.prompt_tokens:,} prompt, {rep.output_tokens:,} output tokens), loaded in "
        f"{load_s:.2f} s.",
        f"- Fleet: {args.engines} x {spec.model} on {spec.num_gpus}x {spec.gpu}, "
        f"router `{args.router}`, fast-forward on.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| wall time, median of {len(walls)} runs | **{med:.2f} s** "
        f"(min {min(walls):.2f}, max {max(walls):.2f}); target < {TARGET_S:.0f} s: {verdict} |",
        f"| engine steps | {rep.steps:,} ({rep.fast_forward_steps / max(rep.steps, 1):.1%} "
        "fast-forwarded) |",
        f"| steps per wall second | {rep.steps / med:,.0f} |",
        f"| simulated / wall time | {rep.simulated_s / med:,.0f}x |",
        f"| finished requests | {rep.finished} of {rep.requests} |",
        f"| output throughput | {rep.output_throughput_tok_s:,.0f} tok/s |",
        f"| TTFT p50 / p90 / p99 | {rep.ttft.p50 * 1e3:.1f} / {rep.ttft.p90 * 1e3:.1f} / "
        f"{rep.ttft.p99 * 1e3:.1f} ms |",
        f"| TPOT p50 / p90 / p99 | {rep.tpot.p50 * 1e3:.2f} / {rep.tpot.p90 * 1e3:.2f} / "
        f"{rep.tpot.p99 * 1e3:.2f} ms |",
        f"| e2e p50 / p90 / p99 | {rep.e2e.p50:.2f} / {rep.e2e.p90:.2f} / {rep.e2e.p99:.2f} s |",
        f"| queueing p50 / p99 | {rep.queue.p50 * 1e3:.1f} / {rep.queue.p99 * 1e3:.1f} ms |",
        f"| engine utilization (busy share) | "
        f"{min(e.utilization for e in rep.engines):.1%} to "
        f"{max(e.utilization for e in rep.engines):.1%} |",
        f"| preemptions / KV usage peak | {rep.preemptions} / {rep.kv_usage_peak:.1%} |",
        "",
        "Every run gave an identical report apart from wall time (checked by the script).",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        update_section("sim_virtual", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
