"""The ``shoal`` command line: one entry point, one subcommand per job.

Subcommands import their component lazily so that ``shoal --help`` stays fast and a missing
optional dependency of one component does not break the others.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal",
        description="Shoal: a Kubernetes-native control plane for LLM serving.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from shoal.sim.serve import add_sim_arguments

    sim = sub.add_parser(
        "sim",
        help="run one simulated vLLM-compatible engine (OpenAI API, /metrics, KV events)",
        description="Serve one simulated engine replica that behaves like a vLLM OpenAI server.",
    )
    add_sim_arguments(sim)

    from shoal.sim.simulate_cli import add_simulate_arguments

    simulate = sub.add_parser(
        "simulate",
        help="replay a workload on a simulated fleet on a virtual clock (hours in seconds)",
        description="Run a fleet of simulated engines over a trace on a virtual clock.",
    )
    add_simulate_arguments(simulate)

    from shoal.router.cli import add_router_arguments

    router = sub.add_parser(
        "router",
        help="run the OpenAI-compatible router in front of engines",
        description="Route OpenAI requests to the engine where they finish soonest.",
    )
    add_router_arguments(router)

    from shoal.operator.cli import add_operator_arguments

    operator = sub.add_parser(
        "operator",
        help="run the Kubernetes operator that turns Model resources into engine Deployments",
        description="Reconcile shoal.dev Models into Deployments per GPU pool and a Service.",
    )
    add_operator_arguments(operator)

    from shoal.local import add_up_arguments

    up = sub.add_parser(
        "up",
        help="start the engines a Model describes plus the router, locally (no cluster)",
        description="Run a Model locally: simulated engines per pool and the Shoal router.",
    )
    add_up_arguments(up)

    from shoal.bench.cli import add_bench_arguments

    bench = sub.add_parser(
        "bench",
        help="replay a workload open-loop against any OpenAI endpoint and report latencies",
        description="Open-loop load generator for OpenAI-compatible endpoints.",
    )
    add_bench_arguments(bench)

    from shoal.demo import add_demo_arguments

    demo = sub.add_parser(
        "demo",
        help="start a local fleet and compare round-robin with Shoal's best strategy",
        description="A one-command demonstration of cache-aware routing on a local fleet.",
    )
    add_demo_arguments(demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # `shoal sim` takes the args an operator passes to vLLM; flags it does not model are logged
    # and ignored rather than fatal, so a real vLLM pod spec runs unchanged on the simulator.
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "sim":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO: the router's scrapes and the demo's would drown the output.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "sim":
        from shoal.sim.serve import run_sim

        if unknown:
            logging.getLogger("shoal.sim").warning(
                "ignoring engine arguments the simulator does not model: %s", " ".join(unknown)
            )

        run_sim(args)
        return 0
    if args.command == "simulate":
        from shoal.sim.simulate_cli import run_simulate

        return int(run_simulate(args))
    if args.command == "up":
        from shoal.local import run_up

        return int(run_up(args))
    if args.command == "bench":
        from shoal.bench.cli import run_bench

        return int(run_bench(args))
    if args.command == "demo":
        from shoal.demo import run_demo

        return int(run_demo(args))
    if args.command == "operator":
        from shoal.operator.cli import run_operator

        return int(run_operator(args))
    if args.command == "router":
        from shoal.router.cli import run_router

        return int(run_router(args))
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
