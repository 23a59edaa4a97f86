"""Where the autoscaler's memory lives between restarts: one annotation on the Model.

Each pool's entry holds the policy's exported state (its windows, forecast, the time load last
rose), the last decision and when it was taken. A restarted or newly elected autoscaler imports
it before its first decision, so a KPA window full of high load or an SLO policy's scale-down delay
carries on instead of starting empty and scaling down (test: restart mid-scale-up).

An annotation, not a ConfigMap: it lives and dies with the Model, needs no extra RBAC, and is
written in the same patch as the replicas it explains. Its size is bounded: Kubernetes caps all
annotations of an object at 256 KiB together, and this one takes at most :data:`MAX_STATE_BYTES`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

STATE_ANNOTATION = "shoal.dev/autoscaler-state"
STATE_VERSION = 1
MAX_STATE_BYTES = 64 * 1024


class StateError(ValueError):
    """State that cannot be written (too large, not JSON) or read back (corrupt, wrong version)."""


@dataclass(frozen=True, slots=True)
class PoolState:
    policy: str  # the policy that exported ``state``; another policy starts fresh
    replicas: int  # the last decision
    reason: str
    time_s: float  # when it was taken (wall clock, seconds since the epoch)
    state: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "replicas": self.replicas,
            "reason": self.reason,
            "time": self.time_s,
            "state": self.state,
        }


def encode_state(pools: Mapping[str, PoolState]) -> str:
    """The annotation's value. Raises :class:`StateError` when it would exceed the bound or a
    policy exported something JSON cannot carry (NaN included: it would not read back)."""
    doc = {"version": STATE_VERSION, "pools": {n: p.to_json() for n, p in sorted(pools.items())}}
    try:
        text = json.dumps(doc, separators=(",", ":"), allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise StateError(f"policy state is not plain JSON: {exc}") from None
    size = len(text.encode())
    if size > MAX_STATE_BYTES:
        raise StateError(
            f"autoscaler state is {size} bytes, over the {MAX_STATE_BYTES}-byte limit of the "
            f"{STATE_ANNOTATION} annotation; the policy keeps too many samples"
        )
    return text


def _pool(name: str, raw: Any) -> PoolState:
    if not isinstance(raw, dict):
        raise StateError(f"pool {name!r}: entry is not an object")
    try:
        replicas, time_s = int(raw["replicas"]), float(raw["time"])
        policy, reason, state = str(raw["policy"]), str(raw.get("reason", "")), raw["state"]
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"pool {name!r}: {exc!r}") from None
    if not isinstance(state, dict) or replicas < 0 or not math.isfinite(time_s):
        raise StateError(f"pool {name!r}: bad state, replicas or time")
    return PoolState(policy=policy, replicas=replicas, reason=reason, time_s=time_s, state=state)


def decode_state(text: str | None) -> dict[str, PoolState]:
    """The pools' states from the annotation (``{}`` when there is none). Raises
    :class:`StateError` for a value this version cannot read: the caller reports it and starts
    those pools fresh, holding their current replicas."""
    if not text:
        return {}
    if len(text.encode()) > MAX_STATE_BYTES:
        raise StateError(f"{STATE_ANNOTATION} is over {MAX_STATE_BYTES} bytes")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise StateError(f"{STATE_ANNOTATION} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
        version = doc.get("version") if isinstance(doc, dict) else None
        raise StateError(
            f"{STATE_ANNOTATION} has version {version!r}; this autoscaler reads {STATE_VERSION}"
        )
    pools = doc.get("pools")
    if not isinstance(pools, dict):
        raise StateError(f"{STATE_ANNOTATION} has no pools object")
    return {str(name): _pool(str(name), raw) for name, raw in pools.items()}
