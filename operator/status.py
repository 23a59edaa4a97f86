"""A ``Model``'s status from what the cluster shows: pure functions of observed objects.

Inputs are the Deployments and pods the model owns (API dicts, as listed) and the desired state
the reconciler computed (or the reason it could not). The output is the whole ``status`` in wire
form: per-pool desired/ready replicas, endpoints of ready pods, the ``Ready``/``Progressing``/
``Degraded`` conditions, ``observedGeneration``, and the scale subresource's ``replicas`` (ready)
and ``selector``. A condition keeps its ``lastTransitionTime`` while its status stays the same,
so recomputing an unchanged status yields an identical document and the reconciler can skip the
write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.api.model import Condition, ModelResource, ModelStatus, PoolStatus
from shoal.operator.desired import (
    POOL_LABEL,
    DesiredState,
    deployment_name,
    selector_string,
)

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Problem:
    """Why the desired state could not be (fully) applied: the ``Degraded`` reason."""

    reason: str
    message: str


def _get(obj: Any, *keys: str, default: Any = None) -> Any:
    cur = obj
    for k in keys:
        if not isinstance(cur, Mapping):
            return default
        cur = cur.get(k)
    return default if cur is None else cur


def _condition_true(obj: Obj, type_: str) -> dict[str, Any] | None:
    for c in _get(obj, "status", "conditions", default=[]):
        if c.get("type") == type_ and c.get("status") == "True":
            return dict(c)
    return None


def pod_ready(pod: Obj) -> bool:
    if _get(pod, "metadata", "deletionTimestamp"):
        return False
    return bool(_get(pod, "status", "podIP")) and _condition_true(pod, "Ready") is not None


def endpoints(pods: Sequence[Obj], port: int) -> list[str]:
    """``ip:port`` of every ready engine pod, sorted (stable output, no spurious status writes)."""
    return sorted({f"{_get(p, 'status', 'podIP')}:{port}" for p in pods if pod_ready(p)})


@dataclass(frozen=True)
class PoolObservation:
    name: str
    gpu_type: str
    desired: int
    ready: int
    rolled_out: bool
    detail: str  # why it is not rolled out, for the Progressing message
    problem: Problem | None


def observe_pool(
    model_name: str,
    pool_name: str,
    gpu_type: str,
    desired: int,
    deployment: Obj | None,
    pods: Sequence[Obj],
) -> PoolObservation:
    if deployment is None:
        return PoolObservation(
            pool_name, gpu_type, desired, 0, desired == 0, "Deployment not created yet", None
        )
    st = _get(deployment, "status", default={})
    ready = int(st.get("readyReplicas") or 0)
    updated = int(st.get("updatedReplicas") or 0)
    available = int(st.get("availableReplicas") or 0)
    total = int(st.get("replicas") or 0)
    spec_replicas = int(_get(deployment, "spec", "replicas", default=desired))
    generation = int(_get(deployment, "metadata", "generation", default=0))
    observed = int(st.get("observedGeneration") or 0)

    detail = ""
    if spec_replicas != desired:
        detail = f"scaling {spec_replicas} → {desired}"
    elif observed < generation:
        detail = "Deployment change not yet observed"
    elif updated < desired:
        detail = f"{updated}/{desired} replicas updated"
    elif total > updated:
        detail = f"{total - updated} old replicas terminating"
    elif available < desired:
        detail = f"{available}/{desired} replicas available"

    problem: Problem | None = None
    name = deployment_name(model_name, pool_name)
    progressing = next(
        (c for c in st.get("conditions") or [] if c.get("type") == "Progressing"), None
    )
    failure = _condition_true(deployment, "ReplicaFailure")
    if progressing and progressing.get("reason") == "ProgressDeadlineExceeded":
        problem = Problem(
            "ProgressDeadlineExceeded",
            f"pool {pool_name!r}: Deployment {name} made no progress: {progressing.get('message')}",
        )
    elif failure:
        problem = Problem(
            "ReplicaFailure", f"pool {pool_name!r}: {failure.get('message') or failure['reason']}"
        )
    else:
        for p in pods:
            if _get(p, "metadata", "labels", POOL_LABEL) != pool_name:
                continue
            sched = next(
                (
                    c
                    for c in _get(p, "status", "conditions", default=[])
                    if c.get("type") == "PodScheduled"
                ),
                None,
            )
            if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
                problem = Problem(
                    "Unschedulable",
                    f"pool {pool_name!r} ({gpu_type}): pod {_get(p, 'metadata', 'name')} cannot "
                    f"be scheduled: {sched.get('message', '')}".rstrip(": "),
                )
                break
    return PoolObservation(pool_name, gpu_type, desired, ready, not detail, detail, problem)


def _conditions(
    pools: Sequence[PoolObservation],
    spec_problem: Problem | None,
) -> list[tuple[str, str, str, str]]:
    """(type, status, reason, message) for Ready, Progressing, Degraded."""
    ready_total = sum(p.ready for p in pools)
    desired_total = sum(p.desired for p in pools)
    counts = ", ".join(f"{p.name} {p.ready}/{p.desired}" for p in pools)
    if spec_problem is not None:
        msg = f"{spec_problem.message}; existing engines are left as they were"
        return [
            ("Ready", "False", spec_problem.reason, msg),
            ("Progressing", "False", spec_problem.reason, msg),
            ("Degraded", "True", spec_problem.reason, spec_problem.message),
        ]

    problems = [p.problem for p in pools if p.problem is not None]
    if problems:
        degraded = ("Degraded", "True", problems[0].reason, "; ".join(p.message for p in problems))
    else:
        degraded = ("Degraded", "False", "AsExpected", "all pools are realisable")

    rolling = [p for p in pools if not p.rolled_out]
    if rolling:
        progressing = (
            "Progressing",
            "True",
            "RollingOut",
            "; ".join(f"{p.name}: {p.detail}" for p in rolling),
        )
    else:
        progressing = ("Progressing", "False", "RolloutComplete", "every pool is up to date")

    if desired_total == 0:
        ready = ("Ready", "True", "ScaledToZero", "no replicas requested")
    elif all(p.ready >= p.desired for p in pools):
        ready = (
            "Ready",
            "True",
            "AllReplicasReady",
            f"{ready_total}/{desired_total} replicas ready ({counts})",
        )
    else:
        ready = (
            "Ready",
            "False",
            "ReplicasNotReady",
            f"{ready_total}/{desired_total} replicas ready ({counts})",
        )
    return [ready, progressing, degraded]


def _previous_conditions(previous: Obj | None) -> dict[str, Obj]:
    return {c.get("type", ""): c for c in _get(previous, "conditions", default=[])}


def compute_status(
    model: ModelResource,
    desired: DesiredState | None,
    deployments: Sequence[Obj],
    pods: Sequence[Obj],
    *,
    now: str,
    previous: Obj | None = None,
    problem: Problem | None = None,
) -> dict[str, Any]:
    """The model's whole status (wire form).

    ``desired`` is None when the spec could not be realised; ``problem`` then says why. A problem
    with a desired state (an apply that failed) is reported as ``Degraded`` alongside the pools.
    ``now`` stamps conditions whose status changed; ``previous`` is the current status.
    """
    name = model.metadata.name
    by_name = {_get(d, "metadata", "name"): d for d in deployments}
    pools: list[PoolObservation] = []
    for pool in model.spec.pools:
        dep = by_name.get(deployment_name(name, pool.name))
        if desired is not None:
            want = desired.replicas.get(pool.name, 0)
        else:  # unrealisable: report what runs against what the deployment asks for
            want = int(_get(dep, "spec", "replicas", default=0)) if dep else 0
        pools.append(observe_pool(name, pool.name, pool.gpu_type, want, dep, pods))

    spec_problem = problem if desired is None else None
    conds = _conditions(pools, spec_problem)
    if desired is not None and problem is not None:  # the apply itself failed
        conds[2] = ("Degraded", "True", problem.reason, problem.message)

    prev = _previous_conditions(previous)
    generation = model.metadata.generation
    conditions: list[Condition] = []
    for type_, cstatus, reason, message in conds:
        old = prev.get(type_)
        since = now
        if old is not None and old.get("status") == cstatus and old.get("lastTransitionTime"):
            since = str(old["lastTransitionTime"])
        conditions.append(
            Condition.model_validate(
                {
                    "type": type_,
                    "status": cstatus,
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": since,
                    "observedGeneration": generation,
                }
            )
        )

    status = ModelStatus(
        observed_generation=generation,
        replicas=sum(p.ready for p in pools),
        conditions=conditions,
        pools=[
            PoolStatus(
                name=p.name,
                gpu_type=p.gpu_type,
                desired_replicas=p.desired,
                ready_replicas=p.ready,
            )
            for p in pools
        ],
        endpoints=endpoints(pods, model.spec.engine.port),
    )
    out: dict[str, Any] = status.model_dump(by_alias=True, exclude_none=True, mode="json")
    # The scale subresource reads the pod selector from status; set it even while the typed
    # status model does not declare the field yet.
    out["selector"] = selector_string(name)
    return out


def condition_transitions(previous: Obj | None, current: Obj) -> list[tuple[str, str, str, str]]:
    """Conditions whose status or reason changed: (type, status, reason, message), for Events."""
    prev = _previous_conditions(previous)
    changed = []
    for c in _get(current, "conditions", default=[]):
        old = prev.get(c["type"])
        if old is None or old.get("status") != c["status"] or old.get("reason") != c["reason"]:
            changed.append((c["type"], c["status"], c["reason"], c.get("message", "")))
    return changed
