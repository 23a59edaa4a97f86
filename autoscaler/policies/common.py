"""Small pieces every policy shares: holding on incomplete data, finite reads, clamping."""

from __future__ import annotations

import math

from shoal.autoscaler.policy import Decision, Observation, PoolSpec


def value(x: float | None, default: float = 0.0) -> float:
    """``x`` when it is a finite number, else ``default``."""
    return x if x is not None and math.isfinite(x) else default


def hold(spec: PoolSpec, obs: Observation, why: str = "hold: incomplete metrics") -> Decision:
    """Keep the current target. Missing or NaN load signals never scale down (or to zero): the
    live loop also says so in a metric; here the reason label carries it."""
    return Decision(replicas=spec.clamp(obs.desired_replicas), reason=why)


def decision(spec: PoolSpec, replicas: int, reason: str, **detail: float) -> Decision:
    """A decision bounded to the pool's [min, max]; says so when the bound changed it."""
    bounded = spec.clamp(replicas)
    if bounded != replicas:
        reason = f"{reason}; bounded to {bounded}"
    return Decision(
        replicas=bounded, reason=reason, detail={k: float(v) for k, v in detail.items()}
    )
