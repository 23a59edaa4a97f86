"""``shoal operator``: run the Model operator (kopf, embedded in our own asyncio loop).

Scope: ``--namespace NS`` (repeatable) or ``--all-namespaces``; without either, the namespace the
pod runs in (``POD_NAMESPACE`` or the service account's). Replicas of the operator coordinate with
kopf peering (``--peering NAME``): kopf pauses an operator while a live peer has a higher
priority, and pauses *all* peers that share a priority, so every replica picks a random priority
unless ``--priority`` is given; the highest acts, the others take over when its record expires.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import kopf
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from shoal.operator.desired import AdapterVolumes
from shoal.operator.handlers import OperatorOptions, build_registry, load_kubernetes_config
from shoal.operator.lora_handlers import LoraOptions, register_lora_handlers
from shoal.operator.lora_metrics import LoraMetrics
from shoal.operator.lora_replacement import DEFAULT_REPLACEMENT_GRACE_S
from shoal.operator.lora_sources import DEFAULT_CACHE_DIR, DEFAULT_PVC_ROOT, FetchLimits
from shoal.operator.metrics import OperatorMetrics

log = logging.getLogger("shoal.operator")

PEERING_GROUP = "kopf.dev"
PEERING_VERSION = "v1"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def add_operator_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        metavar="NS",
        help="watch Models in this namespace (repeatable; default: the pod's own namespace)",
    )
    scope.add_argument(
        "--all-namespaces",
        "-A",
        action="store_true",
        help="watch Models in every namespace (needs cluster-wide RBAC)",
    )
    peer = parser.add_argument_group("peering (several replicas, one acts)")
    peer.add_argument(
        "--peering",
        metavar="NAME",
        default=None,
        help="kopf peering object to coordinate replicas through (KopfPeering per namespace, or "
        "ClusterKopfPeering with --all-namespaces); created if missing",
    )
    peer.add_argument(
        "--standalone", action="store_true", help="ignore peering: act even if others run"
    )
    peer.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority; the highest live one acts (default: random per process)",
    )
    peer.add_argument(
        "--peering-lifetime",
        type=int,
        default=30,
        metavar="S",
        help="seconds a silent peer is still considered alive: the failover time after a crash",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=8081,
        help="liveness endpoint port serving /healthz (0: none)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus metrics (shoal_operator_*) on this port (0: none)",
    )
    parser.add_argument(
        "--resync-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="re-reconcile every Model this often (level-triggered safety net)",
    )
    lora = parser.add_argument_group("LoRA adapters")
    lora.add_argument(
        "--lora-cache-dir",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        metavar="DIR",
        help="shared adapter cache: downloads land here; engines must see it at the same path",
    )
    lora.add_argument(
        "--lora-pvc-root",
        type=Path,
        default=DEFAULT_PVC_ROOT,
        metavar="DIR",
        help="where engines mount the claims of pvc:// sources (ROOT/CLAIM/PATH)",
    )
    cache = lora.add_mutually_exclusive_group()
    cache.add_argument(
        "--lora-cache-claim",
        default=None,
        metavar="CLAIM",
        help="ReadWriteMany PersistentVolumeClaim holding the adapter cache: LoRA engine pods "
        "mount it read-only at --lora-cache-dir (it must exist in each Model's namespace)",
    )
    cache.add_argument(
        "--lora-cache-host-path",
        default=None,
        metavar="DIR",
        help="fallback: LoRA engine pods mount this node directory at --lora-cache-dir (a "
        "single node, or a directory every node mounts from shared storage)",
    )
    lora.add_argument(
        "--lora-plain-http-host",
        action="append",
        default=[],
        metavar="HOST",
        help="fetch https:// sources of this host over plain HTTP (a TLS-less mirror; repeatable)",
    )
    lora.add_argument(
        "--lora-resync-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="compare every engine's /v1/models with the placement this often",
    )
    lora.add_argument(
        "--lora-replacement-grace",
        type=float,
        default=DEFAULT_REPLACEMENT_GRACE_S,
        metavar="S",
        help="when a ready engine pod vanishes and its pool is short, keep its adapters for its "
        "replacement this long plus the pod's start-up time, then place them on the others",
    )
    lora.add_argument(
        "--lora-hot-activity-per-replica",
        type=float,
        default=1.5,
        metavar="X",
        help="give an adapter one more replica per X of smoothed activity (engines where it runs "
        "+ engines where it waits, from vllm:lora_requests_info); 0: no hot extras",
    )
    lora.add_argument(
        "--lora-max-bytes",
        type=int,
        default=FetchLimits().max_bytes,
        metavar="N",
        help="largest adapter download or unpacked archive, in bytes",
    )
    # SUPPRESS: as a `shoal` subcommand, an unset flag must not override the top-level --log-level
    parser.add_argument(
        "--log-level", default=argparse.SUPPRESS, help="logging level (default INFO)"
    )


def adapter_volumes_from_args(args: argparse.Namespace) -> AdapterVolumes:
    """The engine pods' adapter mounts from the flags; without a cache volume, say so: the
    engines then see downloads only if --lora-cache-dir is shared some other way."""
    if not args.lora_cache_claim and not args.lora_cache_host_path:
        log.warning(
            "no --lora-cache-claim or --lora-cache-host-path: LoRA engine pods get no adapter "
            "cache volume; adapters downloaded into %s reach them only if that directory is "
            "shared by other means (file:// and pvc:// sources are unaffected)",
            args.lora_cache_dir,
        )
    return AdapterVolumes(
        cache_dir=str(args.lora_cache_dir),
        cache_claim=args.lora_cache_claim or None,
        cache_host_path=args.lora_cache_host_path or None,
        pvc_root=str(args.lora_pvc_root),
    )


def _namespaces(args: argparse.Namespace) -> list[str]:
    if args.namespace:
        return list(dict.fromkeys(args.namespace))
    own = os.environ.get("POD_NAMESPACE")
    if not own and SERVICE_ACCOUNT_NAMESPACE.exists():
        own = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    return [own] if own else []


async def ensure_peering(name: str, namespaces: Sequence[str], clusterwide: bool) -> None:
    """Create the peering object(s) kopf needs when --peering is given; a missing one would stop
    kopf (peering is mandatory once named). Lack of permission is left for kopf to report."""
    await load_kubernetes_config()
    async with client.ApiClient() as api:
        crd = client.CustomObjectsApi(api)
        try:
            if clusterwide:
                body = {
                    "apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}",
                    "kind": "ClusterKopfPeering",
                    "metadata": {"name": name},
                }
                await crd.create_cluster_custom_object(
                    PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings", body
                )
            else:
                for ns in namespaces:
                    body = {
                        "apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}",
                        "kind": "KopfPeering",
                        "metadata": {"name": name, "namespace": ns},
                    }
                    try:
                        await crd.create_namespaced_custom_object(
                            PEERING_GROUP, PEERING_VERSION, ns, "kopfpeerings", body
                        )
                    except ApiException as exc:
                        if exc.status != 409:
                            raise
        except ApiException as exc:
            if exc.status != 409:
                log.warning("cannot create peering object %r: %s %s", name, exc.status, exc.reason)


async def _serve(args: argparse.Namespace, namespaces: list[str], priority: int) -> None:
    peering = args.peering if args.peering and not args.standalone else None
    if peering:
        await ensure_peering(peering, namespaces, args.all_namespaces)
    metrics = OperatorMetrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    registry = build_registry(
        OperatorOptions(
            resync_interval_s=args.resync_interval,
            peering_priority=priority,
            peering_lifetime_s=args.peering_lifetime,
            metrics=metrics,
            cluster_scanning=bool(args.all_namespaces),
            adapter_volumes=adapter_volumes_from_args(args),
        )
    )
    register_lora_handlers(
        registry,
        LoraOptions(
            cache_dir=args.lora_cache_dir,
            pvc_root=args.lora_pvc_root,
            plain_http_hosts=frozenset(args.lora_plain_http_host),
            limits=FetchLimits(max_bytes=args.lora_max_bytes),
            resync_interval_s=args.lora_resync_interval,
            replacement_grace_s=args.lora_replacement_grace,
            hot_activity_per_replica=args.lora_hot_activity_per_replica or None,
        ),
        LoraMetrics(metrics.registry),
    )
    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None
    await kopf.operator(
        registry=registry,
        clusterwide=bool(args.all_namespaces),
        namespaces=() if args.all_namespaces else namespaces,
        peering_name=peering,
        standalone=peering is None,
        priority=priority,
        liveness_endpoint=liveness,
    )


def run_operator(args: argparse.Namespace) -> int:
    level = getattr(args, "log_level", None) or "INFO"
    logging.basicConfig(
        level=str(level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    namespaces = [] if args.all_namespaces else _namespaces(args)
    if not args.all_namespaces and not namespaces:
        print(
            "shoal operator: no namespace to watch: pass --namespace NS, --all-namespaces, or "
            "set POD_NAMESPACE",
            file=sys.stderr,
        )
        return 2
    priority = args.priority if args.priority is not None else random.randint(1, 2**31 - 1)
    log.info(
        "starting: %s, peering %s, priority %d",
        "all namespaces" if args.all_namespaces else f"namespaces {namespaces}",
        args.peering if args.peering and not args.standalone else "off (standalone)",
        priority,
    )
    try:
        asyncio.run(_serve(args, namespaces, priority))
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shoal operator", description=__doc__)
    add_operator_arguments(parser)
    return run_operator(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
