"""``hpa``: the Kubernetes Horizontal Pod Autoscaler on a KEDA-style queue target.

The baseline most LLM deployments run: KEDA's Prometheus scaler feeds the waiting requests to an
HPA as an external metric with an ``AverageValue`` target (default 5 waiting per replica). This
follows the HPA controller's algorithm as documented ("Horizontal Pod Autoscaling", kubernetes.io,
algorithm details and configurable scaling behavior) and KEDA's activation/cool-down:

* usage ratio = metric / (target x current replicas); within the 10% tolerance nothing changes,
  else the recommendation is ``ceil(metric / target)`` (what the controller computes for an
  ``AverageValue`` external metric, equal to ``ceil(current x ratio)``);
* stabilization: recommendations are remembered; scaling up takes the lowest over the scale-up
  window (0 s by default, so the newest), scaling down the highest over the 300 s scale-down
  window;
* rate limits (default behavior): up by at most max(100%, 4 pods) per 15 s period, counted
  from the replicas at the period's start; down by up to 100% per 15 s (no practical limit);
* KEDA: an HPA never goes below one replica; with ``min_replicas == 0`` KEDA activates the
  workload (0 -> 1) when the metric is above its activation threshold (0) and deactivates it
  (-> 0) after the metric stayed at 0 for ``cooldownPeriod`` (300 s).

The metric is the engines' waiting requests plus the requests the router holds for the pool.
"""

from __future__ import annotations

import math
from typing import Any

from shoal.autoscaler.policies.common import decision, hold, value
from shoal.autoscaler.policies.window import TimeWindow
from shoal.autoscaler.policy import Decision, Observation, PoolSpec

DEFAULT_TARGET_QUEUE_DEPTH = 5.0  # KEDA examples for vLLM scale on waiting > 5 per replica
TOLERANCE = 0.1  # --horizontal-pod-autoscaler-tolerance default
SCALE_DOWN_STABILIZATION_S = 300.0  # behavior.scaleDown.stabilizationWindowSeconds default
SCALE_UP_STABILIZATION_S = 0.0  # behavior.scaleUp.stabilizationWindowSeconds default
RATE_PERIOD_S = 15.0  # periodSeconds of the default scale-up and scale-down policies
SCALE_UP_PERCENT = 100.0
SCALE_UP_PODS = 4
KEDA_COOLDOWN_S = 300.0  # ScaledObject cooldownPeriod default


class HpaPolicy:
    name = "hpa"

    def __init__(
        self,
        target_queue_depth: float = DEFAULT_TARGET_QUEUE_DEPTH,
        *,
        tolerance: float = TOLERANCE,
        scale_down_stabilization_s: float = SCALE_DOWN_STABILIZATION_S,
        keda_cooldown_s: float = KEDA_COOLDOWN_S,
    ) -> None:
        if not target_queue_depth > 0:
            raise ValueError(f"target_queue_depth must be > 0, got {target_queue_depth}")
        self.target = target_queue_depth
        self.tolerance = tolerance
        self.keda_cooldown_s = keda_cooldown_s
        # Recommendations over the longest stabilization window.
        self._recommendations = TimeWindow(max(scale_down_stabilization_s, 1e-9))
        self._down_window_s = scale_down_stabilization_s
        # Scale changes (time, +added / -removed) over the rate-limit period.
        self._changes = TimeWindow(RATE_PERIOD_S)
        self._last_active_s: float | None = None

    def decide(self, spec: PoolSpec, obs: Observation) -> Decision:
        if not obs.is_complete():
            return hold(spec, obs)
        now = obs.time_s
        current = obs.desired_replicas
        metric = value(obs.waiting) + obs.router_held
        if metric > 0 or self._last_active_s is None:
            self._last_active_s = now

        if current == 0:
            # The HPA is disabled at zero replicas; KEDA activates the workload.
            if metric > 0:
                return self._apply(spec, now, current, 1, "keda: activate", metric=metric)
            return decision(spec, 0, "keda: inactive", metric=metric)
        if spec.min_replicas == 0 and now - self._last_active_s >= self.keda_cooldown_s:
            return self._apply(spec, now, current, 0, "keda: cooldown to zero", metric=metric)

        ratio = metric / (self.target * current)
        within = abs(ratio - 1.0) <= self.tolerance
        raw = current if within else math.ceil(metric / self.target)
        raw = max(raw, 1)  # an HPA's minReplicas is at least 1 (KEDA handles zero)
        self._recommendations.add(now, float(raw))
        up = raw  # 0 s scale-up window: the newest recommendation
        down = int(self._recommendations.max(now, self._down_window_s) or raw)
        rec = current
        if rec < up:
            rec = up
        if rec > down:
            rec = down
        reason = "hpa: within tolerance" if rec == current else "hpa: queue target"
        if rec > current:
            # Replicas at the start of the period: now minus what the period already added.
            added = round(sum(v for v in self._changes_in_period(now) if v > 0))
            start = current - added
            limit = max(math.ceil(start * (1 + SCALE_UP_PERCENT / 100.0)), start + SCALE_UP_PODS)
            if rec > limit:
                rec, reason = limit, "hpa: scale-up rate limit"
        return self._apply(spec, now, current, rec, reason, metric=metric, ratio=ratio, raw=raw)

    def _changes_in_period(self, now: float) -> list[float]:
        return [v for t, v in self._changes.export() if t > now - RATE_PERIOD_S]

    def _apply(
        self, spec: PoolSpec, now: float, current: int, replicas: int, reason: str, **d: float
    ) -> Decision:
        out = decision(spec, replicas, reason, **d)
        if out.replicas != current:
            self._changes.add(now, float(out.replicas - current))
        return out

    def export_state(self) -> dict[str, Any]:
        return {
            "recommendations": self._recommendations.export(),
            "changes": self._changes.export(),
            "last_active_s": self._last_active_s,
        }

    def import_state(self, state: dict[str, Any]) -> None:
        self._recommendations.restore(state.get("recommendations", []))
        self._changes.restore(state.get("changes", []))
        last = state.get("last_active_s")
        self._last_active_s = None if last is None else float(last)
