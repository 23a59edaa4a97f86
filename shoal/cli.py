"""The ``shoal`` command line: one entry point, one subcommand per job.

Each subcommand lives with its component as a pair of functions, ``add_<x>_arguments(parser)``
and ``run_<x>(args) -> int``; this module only lists them (``COMMANDS``) and dispatches.
Only the chosen subcommand's module is imported: ``shoal sim`` starts in every engine pod and
``shoal router`` in every router replica, and importing the operator's Kubernetes libraries for
them took about a second each time.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # where add_<x>_arguments and run_<x> live
    stem: str  # the <x>
    help: str
    description: str

    def function(self, prefix: str, suffix: str = "") -> Callable[..., Any]:
        func: Callable[..., Any] = getattr(
            importlib.import_module(self.module), f"{prefix}{self.stem}{suffix}"
        )
        return func


COMMANDS = (
    Command(
        "sim",
        "shoal.sim.serve",
        "sim",
        "run one simulated vLLM-compatible engine (OpenAI API, /metrics, KV events)",
        "Serve one simulated engine replica that behaves like a vLLM OpenAI server.",
    ),
    Command(
        "simulate",
        "shoal.sim.simulate_cli",
        "simulate",
        "replay a workload on a simulated fleet on a virtual clock (hours in seconds)",
        "Run a fleet of simulated engines over a trace on a virtual clock.",
    ),
    Command(
        "router",
        "shoal.router.cli",
        "router",
        "run the OpenAI-compatible router in front of engines",
        "Route OpenAI requests to the engine where they finish soonest.",
    ),
    Command(
        "operator",
        "shoal.operator.cli",
        "operator",
        "run the Kubernetes operator that turns Model resources into engine Deployments",
        "Reconcile shoal.dev Models into Deployments per GPU pool and a Service.",
    ),
    Command(
        "autoscaler",
        "shoal.autoscaler.cli",
        "autoscaler",
        "run the autoscaler that sizes Models' GPU pools from Prometheus",
        "Size autoscaled Models' pools from Prometheus metrics, writing their replicas.",
    ),
    Command(
        "up",
        "shoal.local",
        "up",
        "start the engines a Model describes plus the router, locally (no cluster)",
        "Run a Model locally: simulated engines per pool and the Shoal router.",
    ),
    Command(
        "bench",
        "shoal.bench.cli",
        "bench",
        "replay a workload open-loop against any OpenAI endpoint and report latencies",
        "Open-loop load generator for OpenAI-compatible endpoints.",
    ),
    Command(
        "demo",
        "shoal.demo",
        "demo",
        "start a local fleet and compare round-robin with Shoal's best strategy",
        "A one-command demonstration of cache-aware routing on a local fleet.",
    ),
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand gets its arguments (and its module is
    imported), the others are listed by name for ``--help``. Unknown or empty: none."""
    parser = argparse.ArgumentParser(
        prog="shoal",
        description="Shoal: a Kubernetes-native control plane for LLM serving.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub_parser = sub.add_parser(
            command.name, help=command.help, description=command.description
        )
        if only is None or command.name == only:
            command.function("add_", "_arguments")(sub_parser)
    return parser


def chosen_command(argv: Sequence[str]) -> str:
    """The subcommand named on the command line ("" when none): the first word that names one
    (the only global option, ``--log-level``, takes a level, never a command name)."""
    names = {c.name for c in COMMANDS}
    return next((word for word in argv if word in names), "")


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=chosen_command(words))
    # `shoal sim` takes the args an operator passes to vLLM; flags it does not model are logged
    # and ignored rather than fatal, so a real vLLM pod spec runs unchanged on the simulator.
    args, unknown = parser.parse_known_args(words)
    if unknown and args.command != "sim":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO: the router's scrapes and the demo's would drown the output.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if unknown:
        logging.getLogger("shoal.sim").warning(
            "ignoring engine arguments the simulator does not model: %s", " ".join(unknown)
        )
    for command in COMMANDS:
        if command.name == args.command:
            return int(command.function("run_")(args) or 0)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
