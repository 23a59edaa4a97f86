"""``shoal bench``: replay a workload open-loop against any OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from shoal.bench import workloads as wl
from shoal.bench.client import HttpError, RunResult, get_json, run_open_loop
from shoal.bench.report import format_table, plot, summarize

WORKLOADS = ("shared-prefix", "multi-turn", "trace", "random")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url", required=True, help="base URL of an OpenAI server, e.g. http://127.0.0.1:8080"
    )
    p.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--workload", choices=WORKLOADS, default="shared-prefix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="extra request header (repeatable), e.g. x-shoal-strategy:prefix",
    )

    a = p.add_argument_group("arrivals")
    a.add_argument(
        "--rate",
        type=float,
        default=10.0,
        help="mean request rate (req/s; sessions/s for multi-turn)",
    )
    a.add_argument(
        "--num-requests", type=int, default=200, help="requests (sessions for multi-turn)"
    )
    a.add_argument("--arrival", choices=wl.ARRIVAL_KINDS, default="poisson")
    a.add_argument(
        "--cv", type=float, default=2.0, help="gamma arrivals: coefficient of variation of the gaps"
    )
    a.add_argument(
        "--burst-factor", type=float, default=4.0, help="bursty: rate multiplier inside bursts"
    )
    a.add_argument("--burst-period-s", type=float, default=10.0)
    a.add_argument("--burst-len-s", type=float, default=2.0)

    s = p.add_argument_group("request sizes")
    s.add_argument("--groups", type=int, default=8, help="shared-prefix: number of prefix groups")
    s.add_argument(
        "--prefix-tokens", type=int, default=1000, help="shared-prefix: shared tokens per group"
    )
    s.add_argument(
        "--suffix-tokens", type=int, default=100, help="shared-prefix: unique tokens per request"
    )
    s.add_argument("--prompt-tokens", type=int, default=100, help="random: prompt tokens")
    s.add_argument("--output-tokens", type=int, default=64)
    s.add_argument("--turns", type=int, default=4, help="multi-turn: turns per session")
    s.add_argument(
        "--system-tokens", type=int, default=500, help="multi-turn: system prompt tokens"
    )
    s.add_argument("--user-tokens", type=int, default=100, help="multi-turn: tokens per user turn")
    s.add_argument(
        "--turn-gap-s", type=float, default=5.0, help="multi-turn: seconds between turns"
    )
    s.add_argument(
        "--lora",
        metavar="NAME:W,...",
        help="LoRA mix: adapter names with weights; 'base' is the base model",
    )

    t = p.add_argument_group("trace (Azure format: TIMESTAMP,ContextTokens,GeneratedTokens)")
    t.add_argument("--trace", help="path of the trace CSV (with --workload trace)")
    t.add_argument("--trace-start-s", type=float, default=0.0)
    t.add_argument("--trace-duration-s", type=float)
    t.add_argument("--trace-rate-scale", type=float, default=1.0, help="2.0 replays twice as fast")
    t.add_argument("--max-prompt-tokens", type=int, default=4000)
    t.add_argument("--max-output-tokens", type=int, default=1024)

    o = p.add_argument_group("output")
    o.add_argument("--slo-ttft-ms", type=float)
    o.add_argument("--slo-tpot-ms", type=float)
    o.add_argument("--plot", metavar="PNG", help="write latency CDFs and TTFT over time")
    o.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    o.add_argument("--no-stream", action="store_true", help="non-streaming requests (TTFT = e2e)")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--max-connections", type=int, default=4096)
    o.add_argument("--timeout-s", type=float, default=600.0)


def build_workload(args: argparse.Namespace) -> list[wl.BenchRequest]:
    """The request list the flags describe (deterministic in ``--seed``)."""

    def arrivals(n: int) -> list[float]:
        return wl.arrival_times(
            args.rate,
            n,
            kind=args.arrival,
            seed=args.seed,
            cv=args.cv,
            burst_factor=args.burst_factor,
            burst_period_s=args.burst_period_s,
            burst_len_s=args.burst_len_s,
        )

    reqs: list[wl.BenchRequest]
    if args.workload == "shared-prefix":
        reqs = wl.shared_prefix(
            arrivals(args.num_requests),
            num_groups=args.groups,
            prefix_tokens=args.prefix_tokens,
            suffix_tokens=args.suffix_tokens,
            output_tokens=args.output_tokens,
            seed=args.seed,
        )
    elif args.workload == "multi-turn":
        reqs = wl.multi_turn(
            arrivals(args.num_requests),
            turns=args.turns,
            system_tokens=args.system_tokens,
            user_tokens=args.user_tokens,
            output_tokens=args.output_tokens,
            turn_gap_s=args.turn_gap_s,
            seed=args.seed,
        )
    elif args.workload == "trace":
        if not args.trace:
            raise ValueError("--workload trace needs --trace PATH")
        reqs = wl.azure_trace(
            args.trace,
            start_s=args.trace_start_s,
            duration_s=args.trace_duration_s,
            rate_scale=args.trace_rate_scale,
            max_requests=args.num_requests,
            max_prompt_tokens=args.max_prompt_tokens,
            max_output_tokens=args.max_output_tokens,
            seed=args.seed,
        )
    else:
        reqs = wl.random_prompts(
            arrivals(args.num_requests),
            prompt_tokens=args.prompt_tokens,
            output_tokens=args.output_tokens,
            seed=args.seed,
        )
    if args.lora:
        reqs = list(wl.with_lora_mix(reqs, wl.parse_lora_mix(args.lora), seed=args.seed))
    return reqs


def parse_headers(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for h in items:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"header {h!r} is not NAME:VALUE")
        out.append((name.strip(), value.strip()))
    return out


async def default_model(url: str) -> str:
    data: Any = await get_json(url, "/v1/models")
    models = data.get("data") or []
    if not models:
        raise HttpError(f"{url}/v1/models lists no models; pass --model")
    return str(models[0]["id"])


async def _run(args: argparse.Namespace) -> RunResult:
    model = args.model or await default_model(args.url)
    reqs = build_workload(args)
    if not reqs:
        raise ValueError("the workload is empty (check --num-requests / the trace window)")
    if not args.json:
        last = reqs[-1].arrival_s
        print(
            f"shoal bench: {len(reqs)} {args.workload} requests over {last:.1f} s "
            f"to {args.url} (model {model})",
            file=sys.stderr,
        )
    run = await run_open_loop(
        args.url,
        reqs,
        model=model,
        headers=parse_headers(args.header),
        stream=not args.no_stream,
        max_connections=args.max_connections,
        timeout_s=args.timeout_s,
        progress=not args.no_progress,
    )
    run.meta["model"] = model
    return run


def run_bench(args: argparse.Namespace) -> int:
    try:
        run = asyncio.run(_run(args))
    except (ValueError, OSError, HttpError) as exc:
        print(f"shoal bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nshoal bench: interrupted", file=sys.stderr)
        return 130
    summary = summarize(run, args.slo_ttft_ms, args.slo_tpot_ms)
    if args.json:
        print(
            json.dumps({"workload": args.workload, "url": args.url, **summary.to_json()}, indent=2)
        )
    else:
        print(format_table(summary))
    if args.plot:
        plot(
            run,
            args.plot,
            title=f"shoal bench: {args.workload} at {args.rate:g} req/s → {args.url}",
        )
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0 if summary.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (the lead wires ``shoal bench`` into ``shoal.cli``)."""
    p = argparse.ArgumentParser(prog="shoal bench", description=__doc__)
    add_bench_arguments(p)
    return run_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
