"""``shoal autoscaler``: size autoscaled Models' pools from Prometheus (docs/autoscaler.md).

Reads each Model with ``spec.autoscaling.enabled`` in ``--namespace`` (repeatable; default the
pod's own), queries ``--prometheus-url`` every ``--interval-s``, and writes pool replicas to the
Model. Several replicas may run: one holds the Lease ``--lease-name`` and acts, the others wait.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from kubernetes_asyncio import client, config

from shoal.autoscaler.actuator import ModelActuator
from shoal.autoscaler.leader import LeaderElector, LeaseConfig
from shoal.autoscaler.loop import Autoscaler, LoopConfig, PolicyFactory, run_loop
from shoal.autoscaler.metrics import AutoscalerMetrics
from shoal.autoscaler.prometheus import PrometheusClient

log = logging.getLogger("shoal.autoscaler")

DEFAULT_POLICY_FACTORY = "shoal.autoscaler.policies:build_policy"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def add_autoscaler_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prometheus-url",
        required=True,
        metavar="URL",
        help="Prometheus HTTP API base URL, e.g. http://prometheus-server.monitoring:9090",
    )
    parser.add_argument(
        "--interval-s", type=float, default=5.0, metavar="S", help="seconds between decisions"
    )
    parser.add_argument(
        "--query-timeout-s",
        type=float,
        default=5.0,
        metavar="S",
        help="give up on a Prometheus query after this long (the pool holds)",
    )
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        metavar="NS",
        help="autoscale Models in this namespace (repeatable; default: the pod's own namespace)",
    )
    parser.add_argument(
        "--all-namespaces", "-A", action="store_true", help="autoscale Models in every namespace"
    )
    parser.add_argument(
        "--kubeconfig",
        default=None,
        metavar="FILE",
        help="kubeconfig to use (default: in-cluster service account, else KUBECONFIG)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus metrics (shoal_autoscaler_*) on this port (0: none)",
    )
    parser.add_argument(
        "--lease-name",
        default="shoal-autoscaler",
        help="coordination.k8s.io Lease that elects the one acting replica",
    )
    parser.add_argument(
        "--lease-namespace",
        default=None,
        metavar="NS",
        help="namespace of the Lease (default: the first --namespace or the pod's own)",
    )
    parser.add_argument("--lease-duration-s", type=float, default=15.0, metavar="S")
    parser.add_argument("--lease-renew-s", type=float, default=5.0, metavar="S")
    parser.add_argument(
        "--policy-factory",
        default=DEFAULT_POLICY_FACTORY,
        metavar="MODULE:FUNCTION",
        help="function building a policy from a Model's spec.autoscaling "
        f"(default {DEFAULT_POLICY_FACTORY})",
    )
    # SUPPRESS: as a `shoal` subcommand, an unset flag must not override the top-level --log-level
    parser.add_argument(
        "--log-level", default=argparse.SUPPRESS, help="logging level (default INFO)"
    )


def _own_namespace() -> str | None:
    own = os.environ.get("POD_NAMESPACE")
    if not own and SERVICE_ACCOUNT_NAMESPACE.exists():
        own = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    return own or None


def load_policy_factory(spec: str) -> PolicyFactory:
    """``module:function`` to the function; a clear error when either is missing."""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ValueError(f"--policy-factory must look like module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import policy module {module_name!r}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"{module_name} has no function {func_name!r}")
    return cast(PolicyFactory, func)


async def _load_kubernetes(kubeconfig: str | None) -> None:
    if kubeconfig is None:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
            return
        except config.ConfigException:
            pass
    await config.load_kube_config(config_file=kubeconfig)


async def _serve(
    args: argparse.Namespace, namespaces: list[str] | None, lease_ns: str, factory: PolicyFactory
) -> None:
    await _load_kubernetes(args.kubeconfig)
    metrics = AutoscalerMetrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    prom = PrometheusClient(args.prometheus_url, timeout_s=args.query_timeout_s)
    async with client.ApiClient() as api:
        elector = LeaderElector(
            api,
            LeaseConfig(
                name=args.lease_name,
                namespace=lease_ns,
                identity=identity,
                lease_duration_s=args.lease_duration_s,
                renew_interval_s=args.lease_renew_s,
            ),
        )
        autoscaler = Autoscaler(
            actuator=ModelActuator(api, identity=identity),
            prom=prom,
            policy_factory=factory,
            metrics=metrics,
            config=LoopConfig(namespaces=namespaces, interval_s=args.interval_s),
        )
        election = asyncio.create_task(elector.run())
        try:
            await run_loop(autoscaler, lambda: elector.is_leader, stop)
        finally:
            election.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await election
            await elector.release()
            await prom.aclose()


def run_autoscaler(args: argparse.Namespace) -> int:
    level = getattr(args, "log_level", None) or "INFO"
    logging.basicConfig(
        level=str(level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    own = _own_namespace()
    namespaces = None if args.all_namespaces else (list(dict.fromkeys(args.namespace)) or None)
    if namespaces is None and not args.all_namespaces:
        namespaces = [own] if own else None
    lease_ns = args.lease_namespace or (namespaces[0] if namespaces else own)
    if (namespaces is None and not args.all_namespaces) or not lease_ns:
        print(
            "shoal autoscaler: no namespace: pass --namespace NS (or --all-namespaces with "
            "--lease-namespace NS), or set POD_NAMESPACE",
            file=sys.stderr,
        )
        return 2
    if args.interval_s <= 0 or args.query_timeout_s <= 0:
        print("shoal autoscaler: --interval-s and --query-timeout-s must be > 0", file=sys.stderr)
        return 2
    try:
        factory = load_policy_factory(args.policy_factory)
        LeaseConfig(args.lease_name, lease_ns, "check", args.lease_duration_s, args.lease_renew_s)
    except ValueError as exc:
        print(f"shoal autoscaler: {exc}", file=sys.stderr)
        return 2
    log.info(
        "starting: %s, Prometheus %s, every %gs, Lease %s/%s",
        "all namespaces" if namespaces is None else f"namespaces {namespaces}",
        args.prometheus_url,
        args.interval_s,
        lease_ns,
        args.lease_name,
    )
    try:
        asyncio.run(_serve(args, namespaces, lease_ns, factory))
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shoal autoscaler", description=__doc__)
    add_autoscaler_arguments(parser)
    return run_autoscaler(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
