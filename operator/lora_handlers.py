"""The kopf layer for ``LoraAdapter``: when to reconcile, and the reads and writes around
:func:`shoal.operator.lora_placement.place`.

The unit of work is one base Model with all its adapters, because placement is joint (the pods'
capacity is shared). A reconcile of ``(namespace, model)``:

1. reads the Model, its LoraAdapters and its ready engine pods, and asks every pod's
   ``/v1/models`` what is loaded (a pod that does not answer is left out this round);
2. checks each adapter against the Model (exists, LoRA enabled, rank ≤ ``maxLoraRank``) and
   fetches its files into the shared adapter cache;
3. places the valid adapters, unloads from each pod what it should not hold (including adapters
   no resource declares, and adapters whose resource is being deleted), then loads what is missing;
4. asks ``/v1/models`` again and writes every adapter's status from that answer.

It runs on LoraAdapter create/update/resume/delete, on any change of an engine pod (a new or
restarted pod gets its adapters), and on a per-Model timer (the safety net that also removes
adapters nobody declares). Reconciles of one Model never overlap and queued requests fold into
one (:class:`~shoal.operator.handlers.Coalescer`). Problems of one adapter become its conditions
and Events; the others go on. Deletion holds a finalizer until no reachable engine lists the
adapter.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import kopf
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from shoal.api.lora import LORA_KIND, LORA_PLURAL, parse_lora_adapter
from shoal.api.model import (
    COMPONENT_LABEL,
    ENGINE_COMPONENT,
    GROUP,
    MODEL_LABEL,
    VERSION,
    ModelFileError,
    ModelResource,
)
from shoal.operator.desired import POOL_LABEL, model_total_replicas, spread_replicas
from shoal.operator.handlers import Coalescer, model_from_object
from shoal.operator.lora_activity import AdapterActivity, EngineLoraSample, parse_lora_activity
from shoal.operator.lora_loader import EngineLoraClient, EngineLoraError
from shoal.operator.lora_metrics import LoraMetrics
from shoal.operator.lora_placement import AdapterDemand, Placement, PodSlots, place
from shoal.operator.lora_replacement import (
    DEFAULT_REPLACEMENT_GRACE_S,
    ReadyPod,
    ReplacementPlan,
    ReplacementTracker,
)
from shoal.operator.lora_sources import (
    DEFAULT_CACHE_DIR,
    DEFAULT_PVC_ROOT,
    AdapterFetcher,
    FetchLimits,
    SourceError,
)
from shoal.operator.status import condition_transitions, pod_ready

log = logging.getLogger(__name__)
Logger = logging.Logger | logging.LoggerAdapter[Any]
Obj = Mapping[str, Any]
MODEL_PLURAL = "models"
_MERGE_PATCH: dict[str, Any] = {"_content_type": "application/merge-patch+json"}


@dataclass(frozen=True)
class LoraOptions:
    cache_dir: Path = DEFAULT_CACHE_DIR
    pvc_root: Path = DEFAULT_PVC_ROOT
    plain_http_hosts: frozenset[str] = frozenset()
    limits: FetchLimits = field(default_factory=FetchLimits)
    resync_interval_s: float = 10.0
    # Loads and unloads in flight at once over all engines: an engine serializes adapter loads
    # anyway, and a wide fan-out would only queue inside it.
    concurrency: int = 32
    engine_timeout_s: float = 30.0
    # a vanished pod's adapters wait this long (plus its start-up time) for its replacement
    replacement_grace_s: float = DEFAULT_REPLACEMENT_GRACE_S
    # an adapter gets an extra replica per this much smoothed activity (lora_activity); None: off
    hot_activity_per_replica: float | None = 1.5


@dataclass
class LoraRuntime:
    api: client.ApiClient
    http: httpx.AsyncClient
    engines: EngineLoraClient
    fetcher: AdapterFetcher
    metrics: LoraMetrics
    coalescer: Coalescer = field(default_factory=Coalescer)
    replacement_grace_s: float = DEFAULT_REPLACEMENT_GRACE_S
    # per "namespace/model": the pods seen last round and the slots reserved for replacements
    trackers: dict[str, ReplacementTracker] = field(default_factory=dict)
    activity: dict[str, AdapterActivity] = field(default_factory=dict)
    hot_activity_per_replica: float | None = None

    def tracker(self, key: str) -> ReplacementTracker:
        if key not in self.trackers:
            self.trackers[key] = ReplacementTracker(self.replacement_grace_s)
        return self.trackers[key]


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str


@dataclass(frozen=True)
class EnginePod:
    name: str
    endpoint: str
    pool: str = ""
    startup_s: float = 0.0  # creation to Ready: how long a replacement will likely take


def _parse_time(value: Any) -> datetime.datetime | None:
    if isinstance(value, datetime.datetime):
        return value
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def startup_seconds(pod: Obj) -> float:
    """Seconds from the pod's creation to its Ready condition (0 when either is unknown)."""
    created = _parse_time((pod.get("metadata") or {}).get("creationTimestamp"))
    conditions = (pod.get("status") or {}).get("conditions") or []
    ready: Obj = next((c for c in conditions if c.get("type") == "Ready"), {})
    became = _parse_time(ready.get("lastTransitionTime"))
    if created is None or became is None:
        return 0.0
    return max(0.0, (became - created).total_seconds())


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------------
# Pure decisions


def check_adapter(obj: Obj, model: ModelResource | None, model_error: str | None) -> Problem | None:
    """Why this adapter cannot be loaded on the base Model, or None when it can."""
    meta = obj.get("metadata") or {}
    try:
        adapter = parse_lora_adapter(
            {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind", LORA_KIND),
                "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
                "spec": obj.get("spec") or {},
            },
            source=f"LoraAdapter {meta.get('namespace')}/{meta.get('name')}",
        )
    except ModelFileError as exc:
        return Problem("InvalidSpec", "; ".join(str(exc).splitlines()[1:]) or str(exc))
    base = adapter.spec.base_model
    if model is None:
        why = model_error or f"no Model {base!r} in this namespace"
        return Problem("UnknownBaseModel", f"base model {base!r}: {why}")
    lora = model.spec.lora
    if not lora.enabled:
        return Problem(
            "LoraDisabled", f"Model {base!r} does not enable LoRA: set spec.lora.enabled: true"
        )
    if adapter.spec.rank is not None and adapter.spec.rank > lora.max_lora_rank:
        return Problem(
            "RankTooLarge",
            f"rank {adapter.spec.rank} exceeds Model {base!r} lora.maxLoraRank "
            f"{lora.max_lora_rank}: raise maxLoraRank or use a smaller adapter",
        )
    return None


def _condition(
    type_: str, status: str, reason: str, message: str, previous: Obj, gen: int | None, now: str
) -> dict[str, Any]:
    old: Obj = next((c for c in previous.get("conditions") or [] if c.get("type") == type_), {})
    since = old.get("lastTransitionTime") if old.get("status") == status else None
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:4000],
        "lastTransitionTime": since or now,
        "observedGeneration": gen,
    }


def adapter_status(
    *,
    generation: int | None,
    previous: Obj,
    problem: Problem | None,
    desired: int,
    unplaced: int,
    loaded_pods: Sequence[str],
    pod_errors: Mapping[str, str],
    ready_pods: int,
    path: str | None,
    now: str,
    waiting: int = 0,
) -> dict[str, Any]:
    """The status of one adapter from what the engines report (see the module doc);
    ``waiting`` replicas are kept for a replacement pod (the Ready message says so)."""
    loaded = len(loaded_pods)
    held = f" ({waiting} kept for a replacement pod)" if waiting else ""
    if problem is not None:
        phase = "Failed"
        ready = ("False", problem.reason, problem.message)
        degraded = ("True", problem.reason, problem.message)
    else:
        if ready_pods == 0:
            phase, ready = "Pending", ("False", "NoReadyEngines", "no ready engine pod answers")
        elif loaded >= desired > 0:
            phase, ready = "Ready", ("True", "Loaded", f"loaded on {loaded}/{desired} pods")
        else:
            phase = "Loading" if loaded else "Pending"
            ready = ("False", "Loading", f"loaded on {loaded}/{desired} pods{held}")
        # A failed load comes first: it is why such an adapter may also lack room (it does not
        # move healthy adapters to make some, see AdapterDemand.displace).
        if pod_errors:
            first = sorted(pod_errors.items())[0]
            degraded = ("True", "LoadFailed", f"{first[0]}: {first[1]}")
        elif unplaced:
            degraded = (
                "True",
                "InsufficientCapacity",
                f"{unplaced} replica(s) find no room: every pod holds lora.maxLoras adapters; "
                "raise maxLoras, add replicas, or lower this adapter's replicas",
            )
        else:
            degraded = ("False", "AsExpected", "")
    time_of = {e.get("pod"): e.get("time") for e in previous.get("podErrors") or []}
    prev_msg = {e.get("pod"): e.get("message") for e in previous.get("podErrors") or []}
    return {
        "observedGeneration": generation,
        "phase": phase,
        "desiredReplicas": desired,
        "loadedReplicas": loaded,
        "loadedPods": sorted(loaded_pods),
        "path": path,
        "conditions": [
            _condition("Ready", *ready, previous, generation, now),
            _condition("Degraded", *degraded, previous, generation, now),
        ],
        "podErrors": [
            {
                "pod": pod,
                "message": msg[:4000],
                "time": time_of.get(pod) if prev_msg.get(pod) == msg else now,
            }
            for pod, msg in sorted(pod_errors.items())
        ],
    }


def status_differs(old: Obj | None, new: Obj) -> bool:
    old = old or {}
    return any(old.get(k) != v for k, v in new.items())


# --------------------------------------------------------------------------------------------------
# Effects


async def _list_adapters(api: client.ApiClient, ns: str) -> list[dict[str, Any]]:
    res = await client.CustomObjectsApi(api).list_namespaced_custom_object(
        GROUP, VERSION, ns, LORA_PLURAL
    )
    return list(res.get("items") or [])


async def _read_model(api: client.ApiClient, ns: str, name: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = await client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, ns, MODEL_PLURAL, name
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return obj


async def _engine_pods(api: client.ApiClient, ns: str, model: ModelResource) -> list[EnginePod]:
    res = await client.CoreV1Api(api).list_namespaced_pod(
        ns,
        label_selector=f"{MODEL_LABEL}={model.metadata.name},{COMPONENT_LABEL}={ENGINE_COMPONENT}",
    )
    pods = [dict(api.sanitize_for_serialization(p)) for p in res.items]
    port = model.spec.engine.port
    return sorted(
        (
            EnginePod(
                p["metadata"]["name"],
                f"{p['status']['podIP']}:{port}",
                str((p["metadata"].get("labels") or {}).get(POOL_LABEL, "")),
                startup_seconds(p),
            )
            for p in pods
            if pod_ready(p)
        ),
        key=lambda p: p.name,
    )


async def _credentials(api: client.ApiClient, ns: str, obj: Obj) -> dict[str, str]:
    ref = ((obj.get("spec") or {}).get("credentialsSecret") or {}).get("name")
    if not ref:
        return {}
    try:
        secret = await client.CoreV1Api(api).read_namespaced_secret(ref, ns)
    except ApiException as exc:
        raise SourceError(
            f"credentials Secret {ref!r}: {exc.status} {exc.reason}", "CredentialsUnavailable"
        ) from None
    data = secret.data or {}
    return {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}


def _event(obj: Obj, reason: str, message: str, *, warning: bool = False) -> None:
    body: Any = {
        "apiVersion": obj.get("apiVersion", f"{GROUP}/{VERSION}"),
        "kind": obj.get("kind", LORA_KIND),
        "metadata": obj.get("metadata") or {},
    }
    kopf.event(
        kopf.Body(body), type="Warning" if warning else "Normal", reason=reason, message=message
    )


async def _observe(
    rt: LoraRuntime, pods: Sequence[EnginePod]
) -> tuple[dict[str, set[str]], dict[str, str]]:
    """What every pod lists as loaded; pods that do not answer go in the second dict."""

    async def one(pod: EnginePod) -> tuple[str, set[str] | str]:
        try:
            return pod.name, await rt.engines.loaded(pod.endpoint)
        except EngineLoraError as exc:
            return pod.name, exc.message

    loaded: dict[str, set[str]] = {}
    unreachable: dict[str, str] = {}
    for name, got in await asyncio.gather(*(one(p) for p in pods)):
        if isinstance(got, set):
            loaded[name] = got
        else:
            unreachable[name] = got
    return loaded, unreachable


async def _sample_activity(rt: LoraRuntime, pods: Sequence[EnginePod]) -> list[EngineLoraSample]:
    """Each engine's newest vllm:lora_requests_info; an engine that does not answer is left out
    of this sample (counted as engine_calls_total{operation="metrics"})."""

    async def one(pod: EnginePod) -> EngineLoraSample | None:
        try:
            resp = await rt.http.get(f"http://{pod.endpoint}/metrics")
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            rt.metrics.engine_calls.labels("metrics", "unreachable").inc()
            log.debug("LoRA activity: %s /metrics: %s", pod.name, exc)
            return None
        rt.metrics.engine_calls.labels("metrics", "ok").inc()
        return parse_lora_activity(resp.text)

    return [s for s in await asyncio.gather(*(one(p) for p in pods)) if s is not None]


async def reconcile_model_adapters(
    rt: LoraRuntime, ns: str, model_name: str, logger: Logger, concurrency: int = 32
) -> Placement | None:
    """One reconcile of a base Model's adapters (see the module doc); returns the placement."""
    api = rt.api
    all_adapters = await _list_adapters(api, ns)
    adapters = [a for a in all_adapters if (a.get("spec") or {}).get("baseModel") == model_name]
    model_obj = await _read_model(api, ns, model_name)
    model: ModelResource | None = None
    model_error: str | None = None
    if model_obj is not None:
        try:
            model = model_from_object(model_obj)
        except ModelFileError as exc:
            model_error = f"the Model is invalid: {'; '.join(str(exc).splitlines()[1:])}"
    pods = await _engine_pods(api, ns, model) if model is not None else []
    loaded, unreachable = await _observe(rt, pods)
    reachable = [p for p in pods if p.name in loaded]

    # 2. check and fetch, adapter by adapter
    problems: dict[str, Problem] = {}
    paths: dict[str, str] = {}
    live: dict[str, Obj] = {}
    for obj in adapters:
        name = obj["metadata"]["name"]
        if obj["metadata"].get("deletionTimestamp"):
            continue  # being deleted: it is unloaded below, like an undeclared adapter
        live[name] = obj
        problem = check_adapter(obj, model, model_error)
        if problem is None:
            source = str(obj["spec"]["source"])
            scheme = source.split("://", 1)[0]
            try:
                creds = await _credentials(api, ns, obj)
                paths[name] = str(await rt.fetcher.fetch(ns, name, source, creds))
                rt.metrics.fetches.labels(scheme, "ok").inc()
            except SourceError as exc:
                rt.metrics.fetches.labels(scheme, exc.reason).inc()
                problem = Problem(exc.reason, exc.message)
        if problem is not None:
            problems[name] = problem

    # 3. place and act
    rate = rt.hot_activity_per_replica
    levels: Mapping[str, float] = {}
    if rate:
        activity = rt.activity.setdefault(f"{ns}/{model_name}", AdapterActivity())
        activity.update(time.monotonic(), await _sample_activity(rt, reachable))
        levels = activity.levels()
    demands = [
        AdapterDemand(
            name,
            None
            if obj["spec"].get("replicas", 1) == "all"
            else int(obj["spec"].get("replicas", 1)),
            levels.get(name, 0.0),
            # a load that failed last round (podErrors) must not move healthy adapters for it
            displace=not (obj.get("status") or {}).get("podErrors"),
        )
        for name, obj in sorted(live.items())
        if name in paths
    ]
    capacity = model.spec.lora.max_loras if model is not None else 0
    tracker = rt.tracker(f"{ns}/{model_name}")
    pool_size = (
        spread_replicas(model.spec.pools, model_total_replicas(model)) if model is not None else {}
    )
    ready = [ReadyPod(p.name, p.pool, p.startup_s) for p in pods]
    plan = tracker.plan(time.monotonic(), ready, pool_size, {p.name for p in reachable})
    slots = [
        PodSlots(
            p.name,
            capacity,
            frozenset(loaded[p.name]),
            plan.inherited.get(p.name, frozenset()),
        )
        for p in reachable
    ]
    placement = place(demands, slots, rate_per_replica=rate, reserved=plan.reserved)
    tracker.record(placement, [r for r in ready if r.name in loaded])
    _log_replacements(logger, ns, model_name, plan, placement)
    rt.metrics.reserved_slots.labels(ns, model_name).set(len(placement.reserved))
    for outcome, count in (
        ("opened", len(plan.opened)),
        ("claimed", len(plan.claimed)),
        ("expired", len(plan.expired)),
        ("released", len(plan.released)),
    ):
        if count:
            rt.metrics.reservations.labels(outcome).inc(count)
    wanted = placement.by_pod()
    endpoint = {p.name: p.endpoint for p in reachable}
    errors: dict[str, dict[str, str]] = {}
    gate = asyncio.Semaphore(concurrency)

    async def call(op: str, pod: str, adapter: str) -> None:
        async with gate:
            try:
                if op == "load":
                    await rt.engines.load(endpoint[pod], adapter, paths[adapter])
                else:
                    await rt.engines.unload(endpoint[pod], adapter)
                rt.metrics.engine_calls.labels(op, "ok").inc()
            except EngineLoraError as exc:
                result = "unreachable" if exc.retryable else "refused"
                rt.metrics.engine_calls.labels(op, result).inc()
                errors.setdefault(adapter, {})[pod] = exc.message
                logger.warning("LoRA %s %s on %s: %s", op, adapter, pod, exc.message)

    unloads = [("unload", pod, a) for pod in loaded for a in loaded[pod] - wanted.get(pod, set())]
    loads = [("load", pod, a) for pod, want in wanted.items() for a in want - loaded[pod]]
    # unload first: a pod at capacity must make room before it takes a new adapter
    await asyncio.gather(*(call(*c) for c in unloads))
    await asyncio.gather(*(call(*c) for c in loads))
    if unloads or loads:
        logger.info(
            "LoRA %s/%s: %d loads, %d unloads over %d pods",
            ns, model_name, len(loads), len(unloads), len(reachable),
        )  # fmt: skip
        loaded, more_unreachable = await _observe(rt, reachable)
        unreachable.update(more_unreachable)

    # 4. status from what the engines say now
    now = _now()
    phases: dict[str, int] = {}

    async def write(name: str, obj: Obj) -> None:
        holders = sorted(p for p, names in loaded.items() if name in names)
        pod_errors = dict(errors.get(name, {}))
        for pod, msg in unreachable.items():
            if pod in wanted and name in wanted[pod]:
                pod_errors.setdefault(pod, msg)
        status = adapter_status(
            generation=obj["metadata"].get("generation"),
            previous=obj.get("status") or {},
            problem=problems.get(name),
            desired=placement.desired.get(name, 0),
            unplaced=placement.unplaced.get(name, 0),
            waiting=placement.reserved_for(name),
            loaded_pods=holders,
            pod_errors={p: m for p, m in pod_errors.items() if p not in holders},
            ready_pods=len(reachable),
            path=paths.get(name),
            now=now,
        )
        phases[status["phase"]] = phases.get(status["phase"], 0) + 1
        previous = obj.get("status") or {}
        if not status_differs(previous, status):
            return
        async with gate:
            try:
                await client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
                    GROUP, VERSION, ns, LORA_PLURAL, name, {"status": status}, **_MERGE_PATCH
                )
            except ApiException as exc:
                if exc.status == 404:
                    return  # deleted meanwhile
                raise
        for type_, cstatus, reason, message in condition_transitions(previous, status):
            bad = type_ == "Degraded" and cstatus == "True"
            if type_ == "Degraded" and cstatus == "False" and not previous:
                continue  # a fresh adapter that is fine: no news
            _event(obj, reason, f"{type_}={cstatus}: {message}".rstrip(": "), warning=bad)
            if bad:
                logger.warning("LoraAdapter %s/%s: %s %s", ns, name, reason, message)

    await asyncio.gather(*(write(n, o) for n, o in live.items()))
    for phase in ("Pending", "Loading", "Ready", "Failed"):
        rt.metrics.adapters.labels(ns, model_name, phase).set(phases.get(phase, 0))
    rt.metrics.unplaced.labels(ns, model_name).set(sum(placement.unplaced.values()))
    rt.metrics.unreachable_engines.labels(ns, model_name).set(len(unreachable))
    return placement


def _log_replacements(
    logger: Logger, ns: str, model: str, plan: ReplacementPlan, placement: Placement
) -> None:
    for slot in plan.opened:
        kept = placement.reserved.get(slot, ())
        logger.info(
            "LoRA %s/%s: pod %s vanished; %d adapter(s) kept for its replacement",
            ns, model, slot, len(kept),
        )  # fmt: skip
    for pod, slot in plan.claimed.items():
        logger.info("LoRA %s/%s: pod %s takes over %s's adapters", ns, model, pod, slot)
    for slot in plan.expired:
        logger.warning(
            "LoRA %s/%s: no replacement for pod %s within the grace period; its adapters are "
            "placed on the other pods", ns, model, slot,
        )  # fmt: skip
    for slot in plan.released:
        logger.info(
            "LoRA %s/%s: pool of pod %s is back at size without it (scaled down); its adapters "
            "are placed on the other pods", ns, model, slot,
        )  # fmt: skip


async def still_loaded(rt: LoraRuntime, ns: str, model_name: str, adapter: str) -> list[str]:
    """Reachable engine pods of the Model that still list ``adapter``."""
    model_obj = await _read_model(rt.api, ns, model_name)
    if model_obj is None:
        return []
    try:
        model = model_from_object(model_obj)
    except ModelFileError:
        return []
    pods = await _engine_pods(rt.api, ns, model)
    loaded, _ = await _observe(rt, pods)
    return sorted(p for p, names in loaded.items() if adapter in names)


# --------------------------------------------------------------------------------------------------
# Registration


def register_lora_handlers(
    registry: kopf.OperatorRegistry, options: LoraOptions, metrics: LoraMetrics
) -> None:
    """Add the LoraAdapter handlers to the operator's registry (the Model startup handler has
    configured kopf and the Kubernetes client by the time these run)."""
    opts = options

    @kopf.on.startup(registry=registry)
    async def _lora_startup(*, memo: Any, **_: Any) -> None:
        http = httpx.AsyncClient(
            timeout=opts.engine_timeout_s,
            limits=httpx.Limits(max_connections=opts.concurrency * 2),
        )
        memo.lora = LoraRuntime(
            api=client.ApiClient(),
            http=http,
            engines=EngineLoraClient(http),
            fetcher=AdapterFetcher(
                cache_dir=opts.cache_dir,
                pvc_root=opts.pvc_root,
                limits=opts.limits,
                plain_http_hosts=opts.plain_http_hosts,
            ),
            metrics=metrics,
            replacement_grace_s=opts.replacement_grace_s,
            hot_activity_per_replica=opts.hot_activity_per_replica,
        )

    @kopf.on.cleanup(registry=registry)
    async def _lora_cleanup(*, memo: Any, **_: Any) -> None:
        rt: LoraRuntime | None = getattr(memo, "lora", None)
        if rt is not None:
            await rt.http.aclose()
            await rt.api.close()

    async def _reconcile(memo: Any, ns: str | None, model: str | None, logger: Logger) -> None:
        if not ns or not model:
            return
        rt: LoraRuntime = memo.lora

        async def work() -> None:
            started = time.monotonic()
            try:
                await reconcile_model_adapters(rt, ns, model, logger, opts.concurrency)
            except BaseException:
                rt.metrics.reconciles.labels("error").inc()
                raise
            else:
                rt.metrics.reconciles.labels("ok").inc()
            finally:
                rt.metrics.duration.observe(time.monotonic() - started)

        await rt.coalescer.run(f"{ns}/{model}", work)

    @kopf.on.resume(GROUP, VERSION, LORA_PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, LORA_PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, LORA_PLURAL, field="spec", registry=registry)
    async def lora_changed(
        *,
        namespace: str | None,
        spec: kopf.Spec,
        old: Any,
        memo: Any,
        logger: Logger,
        **_: Any,
    ) -> None:
        await _reconcile(memo, namespace, spec.get("baseModel"), logger)
        previous = ((old or {}).get("spec") or {}).get("baseModel")
        if previous and previous != spec.get("baseModel"):
            await _reconcile(memo, namespace, previous, logger)  # unload from the old base

    @kopf.on.delete(GROUP, VERSION, LORA_PLURAL, registry=registry)
    async def lora_deleted(
        *, namespace: str | None, name: str, spec: kopf.Spec, memo: Any, logger: Logger, **_: Any
    ) -> None:
        model = spec.get("baseModel")
        if not namespace or not model:
            return
        await _reconcile(memo, namespace, model, logger)
        left = await still_loaded(memo.lora, namespace, model, name)
        if left:
            # kopf keeps the finalizer and calls again after the delay
            raise kopf.TemporaryError(f"still loaded on {', '.join(left)}; unloading", delay=2)
        logger.info("LoraAdapter %s/%s unloaded everywhere", namespace, name)

    @kopf.timer(
        GROUP, VERSION, MODEL_PLURAL, interval=opts.resync_interval_s, registry=registry,
        id="lora_resync",
    )  # fmt: skip
    async def lora_resync(
        *, namespace: str | None, name: str, memo: Any, logger: Logger, **_: Any
    ) -> None:
        await _reconcile(memo, namespace, name, logger)

    @kopf.on.event("", "v1", "pods", labels={COMPONENT_LABEL: ENGINE_COMPONENT}, registry=registry)
    async def engine_pod_event(
        event: Mapping[str, Any], body: kopf.Body, memo: Any, logger: Logger, **_: Any
    ) -> None:
        if event.get("type") is None:  # the initial listing: the resume handlers cover it
            return
        meta = body.get("metadata") or {}
        model = (meta.get("labels") or {}).get(MODEL_LABEL)
        await _reconcile(memo, meta.get("namespace"), model, logger)


__all__ = [
    "LoraOptions",
    "LoraRuntime",
    "Problem",
    "adapter_status",
    "check_adapter",
    "reconcile_model_adapters",
    "register_lora_handlers",
]
