"""Model status from observed Deployments and pods: pools, endpoints, conditions."""

from __future__ import annotations

from typing import Any

from shoal.api.model import ModelResource
from shoal.operator.desired import desired_state
from shoal.operator.status import Problem, compute_status, condition_transitions

UID = "uid-1"
T0, T1 = "2025-01-01T00:00:00Z", "2025-01-01T00:01:00Z"


def model() -> ModelResource:
    return ModelResource.model_validate(
        {
            "metadata": {"name": "llama", "namespace": "ml", "generation": 3},
            "spec": {
                "model": {"name": "m", "servedName": "llama"},
                "pools": [
                    {"name": "h100", "gpuType": "H100", "replicas": 2},
                    {"name": "a10g", "gpuType": "A10G", "replicas": 1},
                ],
            },
        }
    )


def deployment(pool: str, replicas: int, ready: int, updated: int | None = None, **st: Any) -> Any:
    updated = replicas if updated is None else updated
    return {
        "metadata": {"name": f"llama-{pool}", "generation": 2},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": 2,
            "replicas": max(replicas, updated),
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": ready,
            **st,
        },
    }


def pod(pool: str, ip: str, ready: bool = True, **extra: Any) -> Any:
    return {
        "metadata": {"name": f"llama-{pool}-{ip}", "labels": {"shoal.dev/pool": pool}, **extra},
        "status": {
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def conds(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_all_ready() -> None:
    m = model()
    deps = [deployment("h100", 2, 2), deployment("a10g", 1, 1)]
    pods = [pod("h100", "10.244.1.5"), pod("h100", "10.244.1.4"), pod("a10g", "10.244.5.2")]
    s = compute_status(m, desired_state(m, UID), deps, pods, now=T0)
    assert conds(s) == {
        "Ready": ("True", "AllReplicasReady"),
        "Progressing": ("False", "RolloutComplete"),
        "Degraded": ("False", "AsExpected"),
    }
    assert s["observedGeneration"] == 3
    assert s["replicas"] == 3
    assert s["selector"] == "shoal.dev/component=engine,shoal.dev/model=llama"
    assert s["endpoints"] == ["10.244.1.4:8000", "10.244.1.5:8000", "10.244.5.2:8000"]
    assert s["pools"] == [
        {"name": "h100", "gpuType": "H100", "desiredReplicas": 2, "readyReplicas": 2},
        {"name": "a10g", "gpuType": "A10G", "desiredReplicas": 1, "readyReplicas": 1},
    ]
    assert all(c["lastTransitionTime"] == T0 for c in s["conditions"])


def test_missing_deployment_and_unready_pods_are_progressing() -> None:
    m = model()
    deps = [deployment("h100", 2, 1, updated=1)]
    pods = [pod("h100", "10.244.1.5"), pod("h100", "10.244.1.6", ready=False)]
    s = compute_status(m, desired_state(m, UID), deps, pods, now=T0)
    c = conds(s)
    assert c["Ready"] == ("False", "ReplicasNotReady")
    assert c["Progressing"] == ("True", "RollingOut")
    assert c["Degraded"] == ("False", "AsExpected")
    msg = next(x["message"] for x in s["conditions"] if x["type"] == "Progressing")
    assert "a10g: Deployment not created yet" in msg and "h100: 1/2 replicas updated" in msg
    assert s["endpoints"] == ["10.244.1.5:8000"]
    assert s["replicas"] == 1


def test_terminating_pod_is_not_an_endpoint() -> None:
    m = model()
    pods = [pod("h100", "10.244.1.5", deletionTimestamp="2025-01-01T00:00:00Z")]
    s = compute_status(m, desired_state(m, UID), [], pods, now=T0)
    assert s["endpoints"] == []


def test_unrealisable_spec_is_degraded_with_reason() -> None:
    m = model()
    problem = Problem("InvalidEngineArgs", "engine.args sets --port")
    deps = [deployment("h100", 2, 2)]
    s = compute_status(m, None, deps, [], now=T0, problem=problem)
    c = conds(s)
    assert c["Degraded"] == ("True", "InvalidEngineArgs")
    assert c["Ready"] == ("False", "InvalidEngineArgs")
    assert s["pools"][0]["desiredReplicas"] == 2  # what runs is still reported


def test_unschedulable_pod_degrades() -> None:
    m = model()
    p = pod("h100", "", ready=False)
    p["status"] = {
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/10 nodes are available",
            }
        ]
    }
    s = compute_status(m, desired_state(m, UID), [deployment("h100", 2, 0, updated=2)], [p], now=T0)
    assert conds(s)["Degraded"] == ("True", "Unschedulable")
    msg = next(x["message"] for x in s["conditions"] if x["type"] == "Degraded")
    assert "0/10 nodes are available" in msg


def test_progress_deadline_exceeded_degrades() -> None:
    m = model()
    dep = deployment(
        "h100",
        2,
        0,
        conditions=[
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
        ],
    )
    s = compute_status(m, desired_state(m, UID), [dep], [], now=T0)
    assert conds(s)["Degraded"] == ("True", "ProgressDeadlineExceeded")


def test_apply_problem_with_desired_state_degrades_but_reports_pools() -> None:
    m = model()
    problem = Problem("ApplyFailed", "Deployment llama-h100: 403 Forbidden")
    deps = [deployment("h100", 2, 2), deployment("a10g", 1, 1)]
    s = compute_status(m, desired_state(m, UID), deps, [], now=T0, problem=problem)
    assert conds(s)["Degraded"] == ("True", "ApplyFailed")
    assert conds(s)["Ready"] == ("True", "AllReplicasReady")


def test_transition_time_kept_while_status_unchanged() -> None:
    m = model()
    d = desired_state(m, UID)
    deps = [deployment("h100", 2, 2), deployment("a10g", 1, 1)]
    first = compute_status(m, d, deps, [], now=T0)
    again = compute_status(m, d, deps, [], now=T1, previous=first)
    assert again == first  # identical: the reconciler skips the write
    assert condition_transitions(first, again) == []
    worse = compute_status(m, d, [deployment("h100", 2, 1)], [], now=T1, previous=first)
    times = {c["type"]: c["lastTransitionTime"] for c in worse["conditions"]}
    assert times == {"Ready": T1, "Progressing": T1, "Degraded": T0}
    changed = {t for t, *_ in condition_transitions(first, worse)}
    assert changed == {"Ready", "Progressing"}


def test_scaled_to_zero_is_ready() -> None:
    m = ModelResource.model_validate(
        {
            "metadata": {"name": "llama", "generation": 1},
            "spec": {
                "model": {"name": "m"},
                "pools": [{"name": "h100", "gpuType": "H100", "replicas": 0}],
            },
        }
    )
    s = compute_status(m, desired_state(m, UID), [deployment("h100", 0, 0)], [], now=T0)
    assert conds(s)["Ready"] == ("True", "ScaledToZero")
