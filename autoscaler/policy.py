"""The one interface every sizing policy implements, and what it sees.

A policy is a pure decision: given what was observed about one pool at one moment, and its own
state, it says how many replicas the pool should have and why. It never reads a clock, a socket
or Kubernetes; the live loop (``shoal.autoscaler.loop``) feeds it observations read from
Prometheus, and the cluster simulator (``shoal simulate --autoscaler``) feeds it observations
from simulated engines on a virtual clock. The same code decides in both.

A policy's state is whatever it remembers between decisions (windows of samples, a forecast,
when load last went up). ``export_state`` / ``import_state`` turn it into JSON-ready data so that
the live loop can persist it and resume after a restart without flapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """Static facts about the pool being sized: what one replica is and its bounds."""

    model: str  # the Hugging Face model id (the performance model's key)
    gpu: str  # catalog GPU name, e.g. "H100"
    gpus_per_replica: int = 1
    min_replicas: int = 0
    max_replicas: int | None = None
    price_per_hour: float = 0.0  # per replica
    # SLO at a percentile; None means "no target on this dimension".
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    slo_percentile: float = 90.0

    def clamp(self, replicas: int) -> int:
        """Replicas bounded to [min, max]."""
        hi = self.max_replicas if self.max_replicas is not None else replicas
        return max(self.min_replicas, min(replicas, hi))


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class Observation:
    """What was seen about one pool at ``time_s``.

    Rates and means are over the source's short window (a PromQL ``rate(...[30s])`` live, the
    last interval in simulation). ``None`` (or NaN) means the source could not say: the live loop
    must not scale down or to zero on such an observation (see ``is_complete``).
    """

    time_s: float
    ready_replicas: int  # replicas serving traffic now
    desired_replicas: int  # the current target, including replicas still starting
    request_rate: float | None = None  # requests/s arriving at the pool
    prompt_tokens_mean: float | None = None
    output_tokens_mean: float | None = None
    waiting: float | None = None  # requests queued in engines, summed over replicas
    running: float | None = None  # requests being served, summed over replicas
    kv_usage: float | None = None  # mean KV-cache usage over replicas, 0..1
    ttft_s: float | None = None  # observed TTFT at the SLO percentile
    tpot_s: float | None = None  # observed TPOT at the SLO percentile
    router_held: float = 0.0  # requests the router holds for a pool with no replicas

    def is_complete(self) -> bool:
        """True when the load signals a policy needs are all present and finite."""
        return all(_finite(v) for v in (self.request_rate, self.waiting, self.running))


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy's answer: replicas wanted, and the reason in a few words (exported as a label)."""

    replicas: int
    reason: str
    detail: dict[str, float] = field(default_factory=dict)  # numbers behind the decision


@runtime_checkable
class Policy(Protocol):
    """A sizing policy for one pool. Implementations live in ``shoal.autoscaler.policies``."""

    name: str

    def decide(self, spec: PoolSpec, obs: Observation) -> Decision:
        """The replicas the pool should have now. Must be deterministic given state and inputs."""
        ...

    def export_state(self) -> dict[str, Any]:
        """JSON-ready state to persist."""
        ...

    def import_state(self, state: dict[str, Any]) -> None:
        """Restore what ``export_state`` returned (after a restart)."""
        ...
