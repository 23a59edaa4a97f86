"""What a ``Model`` should look like in the cluster: pure functions from the typed spec to objects.

One Deployment per GPU pool (``<model>-<pool>``) and one headless Service for the model's engines,
all owned by the Model so that the garbage collector removes them with it. The objects are plain
dicts in API (camelCase) form, complete enough for server-side apply: applying the same desired
state twice changes nothing, which is what makes the reconciler idempotent.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal.api.model import API_VERSION, KIND, EngineKind, GpuPool, ModelResource
from shoal.operator.engine_args import (
    KV_EVENTS_PORT,
    POD_IP_ENV,
    EngineArgsError,
    engine_command,
    engine_image,
)
from shoal.sim.catalog import get_gpu

MODEL_LABEL = "shoal.dev/model"
POOL_LABEL = "shoal.dev/pool"
COMPONENT_LABEL = "shoal.dev/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "shoal"
GPU_TYPE_ANNOTATION = "shoal.dev/gpu-type"
KV_EVENTS_PORT_ANNOTATION = "shoal.dev/kv-events-port"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
HTTP_PORT_NAME = "http"
KV_EVENTS_PORT_NAME = "kv-events"
HEALTH_PATH = "/health"
LORA_CACHE_VOLUME = "lora-cache"
LORA_CLAIM_VOLUME_PREFIX = "lora-pvc-"


class UnrealisableSpec(Exception):
    """A spec that passed admission but cannot be turned into objects; ``reason`` is CamelCase
    (it becomes the ``Degraded`` condition's reason) and ``message`` says what to change."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class AdapterVolumes:
    """How a LoRA Model's engine pods see adapter files: the operator's adapter cache (a
    ReadWriteMany claim, or a node directory as the fallback) mounted read-only at the same path
    the operator downloads into, and every ``pvc://`` claim its adapters use at
    ``<pvc_root>/<claim>``. Set from the operator's ``--lora-*`` flags, not from the Model."""

    cache_dir: str
    cache_claim: str | None = None
    cache_host_path: str | None = None
    pvc_root: str = "/mnt/shoal/pvc"
    claims: tuple[str, ...] = ()  # pvc:// claims of this Model's adapters, sorted

    def __post_init__(self) -> None:
        if self.cache_claim and self.cache_host_path:
            raise ValueError("the adapter cache is a claim or a host path, not both")


def claim_volume_name(claim: str) -> str:
    """A volume name (DNS label, ≤ 63) for a pvc:// claim: claim names run to 253 characters,
    and a hash keeps the name stable when other claims come and go (no needless rollout)."""
    return LORA_CLAIM_VOLUME_PREFIX + hashlib.blake2b(claim.encode(), digest_size=6).hexdigest()


def adapter_volumes(volumes: AdapterVolumes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, engine container mounts) for the adapter cache and the pvc:// claims.

    Engines only read adapters, so every mount is read-only; the operator alone writes the cache.
    """
    pod: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    cache: dict[str, Any] | None = None
    if volumes.cache_claim:
        cache = {"persistentVolumeClaim": {"claimName": volumes.cache_claim, "readOnly": True}}
    elif volumes.cache_host_path:
        cache = {"hostPath": {"path": volumes.cache_host_path, "type": "DirectoryOrCreate"}}
    if cache is not None:
        pod.append({"name": LORA_CACHE_VOLUME, **cache})
        mounts.append({"name": LORA_CACHE_VOLUME, "mountPath": volumes.cache_dir, "readOnly": True})
    root = volumes.pvc_root.rstrip("/")
    for claim in sorted(set(volumes.claims)):
        name = claim_volume_name(claim)
        pod.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": name, "mountPath": f"{root}/{claim}", "readOnly": True})
    return pod, mounts


@dataclass(frozen=True)
class DesiredState:
    deployments: list[dict[str, Any]]
    service: dict[str, Any]
    replicas: dict[str, int] = field(default_factory=dict)  # pool name -> desired replicas

    @property
    def deployment_names(self) -> set[str]:
        return {d["metadata"]["name"] for d in self.deployments}


# --------------------------------------------------------------------------------------------------
# Replicas per pool


def spread_replicas(pools: Sequence[GpuPool], total: int | None) -> dict[str, int]:
    """Replicas per pool: each pool's own ``replicas``, or ``total`` spread over the pools.

    With a total (``spec.replicas``, set by ``kubectl scale``), pools get shares proportional to
    their declared ``replicas`` (equal shares when those are all zero), clamped to each pool's
    min/max; a clamped pool's excess or shortfall is re-spread over the others. Fractions are
    rounded by largest remainder, ties to the earlier pool, so the result is deterministic and
    sums to ``total`` whenever the bounds allow it (else every pool sits at the bound).
    """
    if total is None:
        return {p.name: p.replicas for p in pools}
    lo = {p.name: p.min_replicas for p in pools}
    hi = {p.name: p.max_replicas if p.max_replicas is not None else math.inf for p in pools}
    weights = {p.name: float(p.replicas) for p in pools}
    if sum(weights.values()) == 0:
        weights = {p.name: 1.0 for p in pools}
    order = [p.name for p in pools]

    # Water-filling on real shares: fix the pools whose share leaves their bounds, re-spread.
    fixed: dict[str, float] = {}
    while True:
        free = [n for n in order if n not in fixed]
        left = total - sum(fixed.values())
        wsum = sum(weights[n] for n in free)
        share = {n: (left * weights[n] / wsum if wsum > 0 else 0.0) for n in free}
        if wsum == 0:  # only zero-weight pools left: equal shares among them
            share = {n: left / len(free) for n in free} if free else {}
        out_of_bounds: dict[str, float] = {n: lo[n] for n in free if share[n] < lo[n]}
        out_of_bounds |= {n: hi[n] for n in free if share[n] > hi[n]}
        if not out_of_bounds:
            break
        # Fix only the violations in the direction of the overall imbalance first, the usual
        # water-filling step; fixing both sides at once could overshoot the total.
        over = sum(share[n] - hi[n] for n in free if share[n] > hi[n])
        under = sum(lo[n] - share[n] for n in free if share[n] < lo[n])
        if over >= under:
            fixed |= {n: hi[n] for n in free if share[n] > hi[n]}
        else:
            fixed |= {n: lo[n] for n in free if share[n] < lo[n]}
        if len(fixed) == len(order):
            break

    result = {n: int(v) for n, v in fixed.items()}
    free = [n for n in order if n not in fixed]
    if free:
        exact = {n: share[n] for n in free}
        floors = {n: math.floor(exact[n] + 1e-9) for n in free}
        remaining = total - sum(result.values()) - sum(floors.values())
        by_remainder = sorted(free, key=lambda n: (-(exact[n] - floors[n]), order.index(n)))
        for n in by_remainder:
            if remaining <= 0:
                break
            if floors[n] + 1 <= hi[n]:
                floors[n] += 1
                remaining -= 1
        result |= floors
    return {n: max(lo[n], min(result[n], int(min(hi[n], 2**31 - 1)))) for n in order}


def model_total_replicas(model: ModelResource) -> int | None:
    """``spec.replicas`` (the scale subresource's field) when the API model has it and it is set."""
    value = getattr(model.spec, "replicas", None)
    return int(value) if isinstance(value, int) else None


# --------------------------------------------------------------------------------------------------
# Objects


def deployment_name(model_name: str, pool_name: str) -> str:
    return f"{model_name}-{pool_name}"


def selector_labels(model_name: str) -> dict[str, str]:
    """Labels every engine pod of the model carries: the Service's and the scale selector."""
    return {MODEL_LABEL: model_name, COMPONENT_LABEL: "engine"}


def selector_string(model_name: str) -> str:
    """``status.selector`` for the scale subresource (an HPA reads pods by it)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(model_name).items()))


def pool_labels(model_name: str, pool_name: str) -> dict[str, str]:
    return {
        **selector_labels(model_name),
        POOL_LABEL: pool_name,
        MANAGED_BY_LABEL: MANAGED_BY,
    }


def owner_reference(model_name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": model_name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _gpu_product_labels(pool: GpuPool) -> list[str]:
    try:
        gpu = get_gpu(pool.gpu_type)
    except KeyError:
        raise UnrealisableSpec(
            "UnknownGpuType",
            f"pool {pool.name!r}: GPU type {pool.gpu_type!r} is not in this operator's catalog; "
            "use a known GPU type or upgrade the operator",
        ) from None
    if not gpu.product_labels:
        raise UnrealisableSpec(
            "UnknownGpuProduct",
            f"pool {pool.name!r}: no nvidia.com/gpu.product label is known for GPU type "
            f"{gpu.name!r}, so no node can be selected for it",
        )
    return list(gpu.product_labels)


def _tolerations(pool: GpuPool) -> list[dict[str, Any]]:
    # GPU nodes carry an nvidia.com/gpu taint that only GPU workloads tolerate.
    out: list[dict[str, Any]] = [
        {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
    ]
    for t in pool.tolerations:
        item = t.model_dump(by_alias=True, exclude_none=True, mode="json")
        if t.operator == "Exists":
            item.pop("value", None)  # the API rejects a value with operator Exists
        if item not in out:
            out.append(item)
    return out


def _probe(path: str, period_s: int, failures: int, initial_delay_s: int = 0) -> dict[str, Any]:
    probe: dict[str, Any] = {
        "httpGet": {"path": path, "port": HTTP_PORT_NAME},
        "periodSeconds": period_s,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }
    if initial_delay_s:
        probe["initialDelaySeconds"] = initial_delay_s
    return probe


def engine_container(model: ModelResource, pool: GpuPool) -> dict[str, Any]:
    spec = model.spec
    try:
        cmd = engine_command(spec, pool)
    except EngineArgsError as exc:
        raise UnrealisableSpec("InvalidEngineArgs", str(exc)) from None
    gpus = str(pool.gpus_per_replica)
    env: list[dict[str, Any]] = [
        # before the spec's env: $(POD_IP) in args and later env entries refers to it
        {"name": POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    env += [{"name": k, "value": v} for k, v in sorted(spec.engine.env.items())]
    container: dict[str, Any] = {
        "name": "engine",
        "image": engine_image(spec),
        "command": cmd.command,
        "args": cmd.args,
        "env": env,
        "ports": [
            {"name": HTTP_PORT_NAME, "containerPort": spec.engine.port, "protocol": "TCP"},
            {"name": KV_EVENTS_PORT_NAME, "containerPort": KV_EVENTS_PORT, "protocol": "TCP"},
        ],
        "resources": {"limits": {GPU_RESOURCE: gpus}, "requests": {GPU_RESOURCE: gpus}},
        # Loading weights takes minutes on a real engine: the startup probe holds liveness off
        # for up to 20 minutes, after which a hung engine is restarted within 30 s.
        "startupProbe": _probe(HEALTH_PATH, period_s=10, failures=120),
        "readinessProbe": _probe(HEALTH_PATH, period_s=5, failures=3, initial_delay_s=5),
        "livenessProbe": _probe(HEALTH_PATH, period_s=10, failures=3, initial_delay_s=15),
    }
    if spec.engine.kind is not EngineKind.SIM:
        # tensor-parallel workers exchange tensors through /dev/shm (NCCL); the 64 MiB default
        # of a container runtime is too small
        container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    return container


def pool_deployment(
    model: ModelResource,
    uid: str,
    pool: GpuPool,
    replicas: int,
    volumes: AdapterVolumes | None = None,
) -> dict[str, Any]:
    name = model.metadata.name
    labels = pool_labels(name, pool.name)
    match = {MODEL_LABEL: name, POOL_LABEL: pool.name}
    products = _gpu_product_labels(pool)
    pod_spec: dict[str, Any] = {
        "containers": [engine_container(model, pool)],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": products}
                            ]
                        }
                    ]
                }
            }
        },
        "tolerations": _tolerations(pool),
        # engines drain in-flight streams on SIGTERM; give them time before SIGKILL
        "terminationGracePeriodSeconds": 60,
    }
    if pool.node_selector:
        pod_spec["nodeSelector"] = dict(sorted(pool.node_selector.items()))
    if model.spec.engine.kind is not EngineKind.SIM:
        pod_spec["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if volumes is not None and model.spec.lora.enabled:
        extra, mounts = adapter_volumes(volumes)
        if extra:
            pod_spec["volumes"] = [*pod_spec.get("volumes", []), *extra]
            engine = pod_spec["containers"][0]
            engine["volumeMounts"] = [*engine.get("volumeMounts", []), *mounts]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name(name, pool.name),
            "namespace": model.metadata.namespace,
            "labels": labels,
            "annotations": {GPU_TYPE_ANNOTATION: pool.gpu_type},
            "ownerReferences": [owner_reference(name, uid)],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": match},
            # Surge one replica, never drop below the desired count: serving capacity holds
            # through a rollout, at the price of one replica's spare GPUs.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {GPU_TYPE_ANNOTATION: pool.gpu_type},
                },
                "spec": pod_spec,
            },
        },
    }


def model_service(model: ModelResource, uid: str) -> dict[str, Any]:
    """Headless: the router reaches pods through the Service's EndpointSlices, never a ClusterIP
    (which would spread requests at random); the slices inherit the ``shoal.dev/model`` label."""
    name = model.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": model.metadata.namespace,
            # The slices inherit these labels; the router selects engines by the component.
            "labels": {MODEL_LABEL: name, COMPONENT_LABEL: "engine", MANAGED_BY_LABEL: MANAGED_BY},
            "annotations": {KV_EVENTS_PORT_ANNOTATION: str(KV_EVENTS_PORT)},
            "ownerReferences": [owner_reference(name, uid)],
        },
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(name),
            "ports": [
                {
                    "name": HTTP_PORT_NAME,
                    "port": model.spec.engine.port,
                    "targetPort": HTTP_PORT_NAME,
                    "protocol": "TCP",
                },
                {
                    "name": KV_EVENTS_PORT_NAME,
                    "port": KV_EVENTS_PORT,
                    "targetPort": KV_EVENTS_PORT_NAME,
                    "protocol": "TCP",
                },
            ],
        },
    }


def desired_state(
    model: ModelResource, uid: str, volumes: AdapterVolumes | None = None
) -> DesiredState:
    """Everything the model should own; raises :class:`UnrealisableSpec` for a spec that passed
    admission but cannot be realised (every pool is checked before any object is returned, so a
    bad pool never leaves the others half-updated). ``volumes``: how a LoRA Model's engines see
    adapter files (ignored when the Model does not enable LoRA)."""
    replicas = spread_replicas(model.spec.pools, model_total_replicas(model))
    deployments = [
        pool_deployment(model, uid, p, replicas[p.name], volumes) for p in model.spec.pools
    ]
    return DesiredState(deployments, model_service(model, uid), replicas)


def stale_deployments(owned: Sequence[str], desired: DesiredState) -> list[str]:
    """Deployments the model owns that no pool asks for any more (a removed or renamed pool)."""
    return sorted(set(owned) - desired.deployment_names)
