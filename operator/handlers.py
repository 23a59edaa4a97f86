"""The kopf layer: when to reconcile a ``Model``, and the Kubernetes reads and writes around the
pure decisions in :mod:`shoal.operator.desired` and :mod:`shoal.operator.status`.

Level-triggered: every reconcile re-reads the Model, computes the whole desired state, applies it
with server-side apply (a no-op when nothing changed), deletes Deployments of removed pools, and
rewrites the status from what it observes. It runs on create/update/resume, on a resync timer,
and on every change of a Deployment the model owns (so a deleted Deployment is recreated and the
status follows rollouts at once). Reconciles of one model never overlap, and requests that arrive
while one is queued fold into it: it reads fresh state when it runs.

A spec that cannot be realised is reported (``Degraded`` + a Warning event), never raised: a
raise would make kopf retry forever with nothing able to succeed. API errors are raised, and kopf
retries them with back-off; the operator process itself never exits because of one model.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import kopf
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from shoal.api.model import GROUP, VERSION, ModelFileError, ModelResource, parse_model
from shoal.operator.desired import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MODEL_LABEL,
    AdapterVolumes,
    DesiredState,
    UnrealisableSpec,
    desired_state,
    stale_deployments,
)
from shoal.operator.lora_claims import model_pvc_claims
from shoal.operator.metrics import OperatorMetrics
from shoal.operator.status import Problem, compute_status, condition_transitions

log = logging.getLogger(__name__)
Logger = logging.Logger | logging.LoggerAdapter[Any]  # what kopf hands to handlers

PLURAL = "models"
FIELD_MANAGER = "shoal-operator"
ANNOTATION_PREFIX = "shoal.dev"


@dataclass(frozen=True)
class OperatorOptions:
    resync_interval_s: float = 10.0
    peering_priority: int = 0
    peering_lifetime_s: int = 60
    metrics: OperatorMetrics | None = None
    # Watching named namespaces: do not scan CRDs and namespaces cluster-wide, which the chart's
    # namespaced RBAC forbids (kopf would retry for about a minute before acting).
    cluster_scanning: bool = True
    # How LoRA Models' engine pods see adapter files (the --lora-* flags); None: no mounts.
    adapter_volumes: AdapterVolumes | None = None


@dataclass
class Coalescer:
    """One reconcile per key at a time; a request made while another waits is dropped, because
    the waiting one reads the cluster when it starts and so sees whatever prompted the request.
    At most one caller waits per key, so the ``waiting`` mark always belongs to that caller."""

    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    waiting: set[str] = field(default_factory=set)

    async def run(self, key: str, fn: Callable[[], Awaitable[None]]) -> None:
        if key in self.waiting:
            return
        self.waiting.add(key)
        lock = self.locks.setdefault(key, asyncio.Lock())
        acquired = False
        try:
            async with lock:
                acquired = True
                self.waiting.discard(key)
                await fn()
        finally:
            if not acquired:  # cancelled while waiting: clear our own mark, nobody else's
                self.waiting.discard(key)
            if not lock.locked() and key not in self.waiting:
                self.locks.pop(key, None)  # bounded: only keys with work in flight stay


@dataclass
class Runtime:
    """What the handlers share, kept in kopf's memo (no module-level state)."""

    api: client.ApiClient
    coalescer: Coalescer = field(default_factory=Coalescer)


# --------------------------------------------------------------------------------------------------
# Reading the Model


def model_from_object(obj: Mapping[str, Any]) -> ModelResource:
    """The typed Model from an API object (server-set metadata dropped); raises ModelFileError."""
    meta = obj.get("metadata") or {}
    keep = ("name", "namespace", "labels", "annotations", "generation")
    doc = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": {k: meta[k] for k in keep if k in meta},
        "spec": obj.get("spec") or {},
    }
    return parse_model(doc, source=f"Model {meta.get('namespace')}/{meta.get('name')}")


def _one_line(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return "; ".join(lines[1:] if len(lines) > 1 and lines[0].endswith(":") else lines)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def invalid_spec_status(
    generation: int | None, problem: Problem, previous: Mapping[str, Any] | None, now: str
) -> dict[str, Any]:
    """Status for a spec the typed model rejects: only conditions can be said with certainty."""
    prev = {c.get("type"): c for c in (previous or {}).get("conditions") or []}
    conds = []
    for type_, status in (("Ready", "False"), ("Progressing", "False"), ("Degraded", "True")):
        old = prev.get(type_) or {}
        since = old.get("lastTransitionTime") if old.get("status") == status else None
        conds.append(
            {
                "type": type_,
                "status": status,
                "reason": problem.reason,
                "message": problem.message,
                "lastTransitionTime": since or now,
                "observedGeneration": generation,
            }
        )
    out = dict(previous or {})
    out.update({"observedGeneration": generation, "conditions": conds})
    return out


# --------------------------------------------------------------------------------------------------
# Effects


async def _apply(api: client.ApiClient, obj: dict[str, Any]) -> dict[str, Any]:
    """Server-side apply one object; returns it as stored."""
    name, ns = obj["metadata"]["name"], obj["metadata"]["namespace"]
    kw: dict[str, Any] = {
        "field_manager": FIELD_MANAGER,
        "force": True,  # the operator owns these fields; take them back from a manual edit
        "_content_type": "application/apply-patch+yaml",
    }
    res: Any
    if obj["kind"] == "Deployment":
        res = await client.AppsV1Api(api).patch_namespaced_deployment(name, ns, obj, **kw)
    else:
        res = await client.CoreV1Api(api).patch_namespaced_service(name, ns, obj, **kw)
    return dict(api.sanitize_for_serialization(res))


async def _owned_deployments(
    api: client.ApiClient, ns: str, model_name: str, uid: str
) -> list[dict[str, Any]]:
    res = await client.AppsV1Api(api).list_namespaced_deployment(
        ns, label_selector=f"{MODEL_LABEL}={model_name}"
    )
    items = [dict(api.sanitize_for_serialization(d)) for d in res.items]
    # The label alone could match a hand-made Deployment; only delete or count what we own.
    return [
        d
        for d in items
        if any(r.get("uid") == uid for r in d["metadata"].get("ownerReferences") or [])
    ]


async def _engine_pods(api: client.ApiClient, ns: str, model_name: str) -> list[dict[str, Any]]:
    res = await client.CoreV1Api(api).list_namespaced_pod(
        ns, label_selector=f"{MODEL_LABEL}={model_name},shoal.dev/component=engine"
    )
    return [dict(api.sanitize_for_serialization(p)) for p in res.items]


async def _write_status(api: client.ApiClient, ns: str, name: str, status: dict[str, Any]) -> None:
    await client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        ns,
        PLURAL,
        name,
        {"status": status},
        **_MERGE_PATCH,
    )


# A dict body would otherwise go out as a JSON patch; a merge patch replaces the status lists whole.
_MERGE_PATCH: dict[str, Any] = {"_content_type": "application/merge-patch+json"}


def _status_differs(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    old = old or {}
    return any(old.get(k) != v for k, v in new.items())


def _event(ref: kopf.Body, reason: str, message: str, *, warning: bool = False) -> None:
    """A core/v1 Event on the Model. kopf.event, not kopf.info: info is filtered by the posting
    level, which stays at WARNING to keep kopf's own per-handler chatter out of the Events."""
    kopf.event(ref, type="Warning" if warning else "Normal", reason=reason, message=message)


def _api_problem(exc: ApiException, what: str) -> Problem:
    reason = "InvalidObject" if exc.status == 422 else "ApplyFailed"
    body = str(exc.body or exc.reason or "")[:500]
    return Problem(reason, f"{what}: {exc.status} {exc.reason}: {body}")


async def reconcile(
    api: client.ApiClient,
    ns: str,
    name: str,
    logger: Logger,
    volumes: AdapterVolumes | None = None,
) -> None:
    """Bring one Model's owned objects and status to what its spec says (see module doc)."""
    try:
        obj = await client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, name
        )
    except ApiException as exc:
        if exc.status == 404:
            return  # deleted meanwhile; the garbage collector removes what it owned
        raise
    meta = obj.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return  # being deleted: recreating owned objects now would fight the garbage collector
    uid, generation = str(meta["uid"]), meta.get("generation")
    previous = obj.get("status") or {}
    raw_ref: Any = {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": meta}
    ref = kopf.Body(raw_ref)  # what the Events are about

    try:
        model = model_from_object(obj)
    except ModelFileError as exc:
        invalid = Problem("InvalidSpec", _one_line(str(exc)))
        status = invalid_spec_status(generation, invalid, previous, _now())
        if _status_differs(previous, status):
            await _write_status(api, ns, name, status)
            _event(ref, "InvalidSpec", invalid.message, warning=True)
            logger.warning("Model %s/%s: %s", ns, name, invalid.message)
        return

    desired: DesiredState | None = None
    problem: Problem | None = None
    if volumes is not None and model.spec.lora.enabled:
        volumes = replace(volumes, claims=await model_pvc_claims(api, ns, name))
    try:
        desired = desired_state(model, uid, volumes)
    except UnrealisableSpec as exc:
        problem = Problem(exc.reason, exc.message)

    before = {d["metadata"]["name"]: d for d in await _owned_deployments(api, ns, name, uid)}
    if desired is not None:
        problem = await _apply_desired(api, ns, ref, desired, before, logger)

    deployments = await _owned_deployments(api, ns, name, uid)
    pods = await _engine_pods(api, ns, name)
    status = compute_status(
        model, desired, deployments, pods, now=_now(), previous=previous, problem=problem
    )
    if _status_differs(previous, status):
        await _write_status(api, ns, name, status)
        for type_, cstatus, reason, message in condition_transitions(previous, status):
            warning = type_ == "Degraded" and cstatus == "True"
            _event(ref, reason, f"{type_}={cstatus}: {message}", warning=warning)
            logger.info("Model %s/%s: %s=%s (%s) %s", ns, name, type_, cstatus, reason, message)


async def _apply_desired(
    api: client.ApiClient,
    ns: str,
    ref: kopf.Body,
    desired: DesiredState,
    before: dict[str, dict[str, Any]],
    logger: Logger,
) -> Problem | None:
    """Apply every desired object and delete stale Deployments; the first failure as a Problem
    (the other objects are still applied: one bad pool does not hold the rest back)."""
    problem: Problem | None = None
    for dep in desired.deployments:
        dname = dep["metadata"]["name"]
        try:
            stored = await _apply(api, dep)
        except ApiException as exc:
            if exc.status in (422, 400, 403):  # will not succeed by retrying as-is
                problem = problem or _api_problem(exc, f"Deployment {dname}")
                _event(ref, "ApplyFailed", problem.message, warning=True)
                continue
            raise
        old = before.get(dname)
        replicas = dep["spec"]["replicas"]
        if old is None:
            _event(ref, "Created", f"Deployment {dname} ({replicas} replicas)")
            logger.info("created Deployment %s/%s", ns, dname)
        elif old["metadata"].get("generation") != stored["metadata"].get("generation"):
            _event(ref, "Updated", f"Deployment {dname} ({replicas} replicas)")
            logger.info("updated Deployment %s/%s", ns, dname)
    try:
        await _apply(api, desired.service)
    except ApiException as exc:
        if exc.status not in (422, 400, 403):
            raise
        problem = problem or _api_problem(exc, f"Service {desired.service['metadata']['name']}")
    for dname in stale_deployments(list(before), desired):
        try:
            await client.AppsV1Api(api).delete_namespaced_deployment(
                dname, ns, propagation_policy="Background"
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
        _event(ref, "Deleted", f"Deployment {dname}: its pool was removed")
        logger.info("deleted Deployment %s/%s (pool removed)", ns, dname)
    return problem


# --------------------------------------------------------------------------------------------------
# Registration


async def load_kubernetes_config() -> None:
    """In-cluster service account when running in a pod, else KUBECONFIG / ~/.kube/config."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        await config.load_kube_config()


def build_registry(options: OperatorOptions | None = None) -> kopf.OperatorRegistry:
    """A registry with the Model handlers (a fresh one per operator: tests run several)."""
    opts = options or OperatorOptions()
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    async def _startup(*, settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
        # Progress and diff-base in annotations under our own prefix: kopf's default also writes
        # status.kopf, which the Model's status schema does not allow (it would be pruned).
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix=ANNOTATION_PREFIX
        )
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
        )
        # Events are the explicit ones (_event); kopf's per-handler chatter only when bad.
        settings.posting.level = logging.WARNING
        settings.peering.priority = opts.peering_priority
        settings.peering.lifetime = opts.peering_lifetime_s
        settings.peering.stealth = True
        settings.scanning.disabled = not opts.cluster_scanning
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        await load_kubernetes_config()
        memo.runtime = Runtime(api=client.ApiClient())

    @kopf.on.cleanup(registry=registry)
    async def _cleanup(*, memo: Any, **_: Any) -> None:
        runtime: Runtime | None = getattr(memo, "runtime", None)
        if runtime is not None:
            await runtime.api.close()

    @kopf.on.login(registry=registry)
    async def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return await kopf.login_via_async_client(**kwargs)

    async def _reconcile(memo: Any, ns: str | None, name: str, logger: Logger) -> None:
        if ns is None:  # Models are namespaced; a cluster-scoped body is not ours
            return
        runtime: Runtime = memo.runtime
        metrics = opts.metrics
        volumes = opts.adapter_volumes

        async def work() -> None:
            if metrics is None:
                await reconcile(runtime.api, ns, name, logger, volumes)
            else:
                await metrics.timed(lambda: reconcile(runtime.api, ns, name, logger, volumes))

        await runtime.coalescer.run(f"{ns}/{name}", work)

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
    async def model_changed(
        *, namespace: str | None, name: str, memo: Any, logger: Logger, **_: Any
    ) -> None:
        await _reconcile(memo, namespace, name, logger)

    @kopf.timer(GROUP, VERSION, PLURAL, interval=opts.resync_interval_s, registry=registry)
    async def model_resync(
        *, namespace: str | None, name: str, memo: Any, logger: Logger, **_: Any
    ) -> None:
        await _reconcile(memo, namespace, name, logger)

    @kopf.on.event(
        "apps", "v1", "deployments", labels={MANAGED_BY_LABEL: MANAGED_BY}, registry=registry
    )
    async def deployment_event(
        event: Mapping[str, Any],
        body: kopf.Body,
        memo: kopf.Memo,
        logger: Logger,
        **_: Any,
    ) -> None:
        if event.get("type") is None:  # the initial listing: resume handlers cover it
            return
        meta = body.get("metadata") or {}
        owners = [
            r
            for r in meta.get("ownerReferences") or []
            if r.get("kind") == "Model" and str(r.get("apiVersion", "")).startswith(f"{GROUP}/")
        ]
        if owners and meta.get("namespace"):
            await _reconcile(memo, str(meta["namespace"]), str(owners[0]["name"]), logger)

    return registry
