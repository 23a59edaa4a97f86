"""A LoraAdapter's status from what the engines report: phase, Ready and Degraded conditions."""

from __future__ import annotations

from typing import Any

from shoal.operator.lora_handlers import Problem, adapter_status

NOW = "2026-11-24T09:00:00Z"


def status(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "generation": 3,
        "previous": {},
        "problem": None,
        "desired": 2,
        "unplaced": 0,
        "loaded_pods": ["pod-a", "pod-b"],
        "pod_errors": {},
        "ready_pods": 4,
        "path": "/cache/a",
        "now": NOW,
    }
    args.update(overrides)
    return adapter_status(**args)


def cond(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in st["conditions"] if c["type"] == type_)


def test_loaded_on_every_desired_pod_is_ready_and_not_degraded() -> None:
    st = status()
    assert st["phase"] == "Ready" and st["loadedReplicas"] == 2
    assert cond(st, "Ready")["status"] == "True"
    assert cond(st, "Degraded")["reason"] == "AsExpected"


def test_a_replica_kept_for_a_replacement_pod_says_so() -> None:
    st = status(loaded_pods=["pod-a"], waiting=1)
    assert st["phase"] == "Loading"
    assert cond(st, "Ready")["message"] == "loaded on 1/2 pods (1 kept for a replacement pod)"
    assert cond(st, "Degraded")["status"] == "False"


def test_a_refused_load_is_reported_before_missing_room() -> None:
    """An adapter whose load fails does not displace others, so it may also lack room; the
    engine's refusal is the cause worth reading."""
    st = status(loaded_pods=[], unplaced=1, pod_errors={"pod-c": "HTTP 400: rank too large"})
    assert st["phase"] == "Pending"
    degraded = cond(st, "Degraded")
    assert (degraded["reason"], degraded["message"]) == (
        "LoadFailed",
        "pod-c: HTTP 400: rank too large",
    )
    assert st["podErrors"] == [{"pod": "pod-c", "message": "HTTP 400: rank too large", "time": NOW}]


def test_missing_room_alone_is_insufficient_capacity() -> None:
    st = status(loaded_pods=["pod-a"], unplaced=1)
    assert cond(st, "Degraded")["reason"] == "InsufficientCapacity"


def test_a_bad_spec_fails_for_good() -> None:
    st = status(problem=Problem("RankTooLarge", "rank 64 exceeds 16"), loaded_pods=[])
    assert st["phase"] == "Failed"
    assert cond(st, "Ready")["reason"] == "RankTooLarge"


def test_an_unchanged_condition_keeps_its_transition_time() -> None:
    first = status()
    later = status(previous=first, now="2026-11-24T10:00:00Z")
    assert cond(later, "Ready")["lastTransitionTime"] == NOW
