"""``kpa``: the Knative Pod Autoscaler (stable and panic windows on concurrency).

Follows Knative Serving's autoscaler (``pkg/autoscaler/scaling/autoscaler.go``, "Configuring
the autoscaler", knative.dev) with the windows the issue sets for LLM pods:

* concurrency (requests in flight: running + waiting, plus what the router holds, as Knative's
  activator reports) is averaged over a stable window (180 s) and a panic window (60 s);
* desired pods per window = ceil(average / (target x target utilization)), limited to
  [floor(ready / max scale-down rate), ceil(ready x max scale-up rate)];
* panic starts when the panic-window desired count is >= panic threshold (2x) the ready pods,
  and lasts until one stable window has passed without that; in panic the count never goes down;
* a 10% tolerance on the load/capacity ratio (as AIBrix's KPA adds) keeps small wobbles from
  scaling;
* scale-down delay: the decision is the highest over the last ``scale_down_delay_s``, so load
  must stay low that long before replicas go (Knative's ``scale-down-delay``);
* scale to zero follows from an average of zero (Knative's default allows it), only where the
  Model's ``min_replicas`` is 0.

Knative's defaults are a 60 s stable window and a 10% (6 s) panic window, made for request
handlers that start in a second; an LLM replica takes minutes, so 180 s / 60 s apply unless the
Model sets its own windows.
"""

from __future__ import annotations

import math
from typing import Any

from shoal.autoscaler.policies.common import decision, hold, value
from shoal.autoscaler.policies.window import TimeWindow
from shoal.autoscaler.policy import Decision, Observation, PoolSpec

# Knative's container-concurrency-target-default is 100; a vLLM replica of a 7-8B model on one
# H100 keeps up to max_num_seqs = 256 sequences in its batch, and ~100 in flight keeps decode
# latency in the tens of milliseconds, so Knative's default fits a vLLM pod as is.
DEFAULT_TARGET_CONCURRENCY = 100.0
TARGET_UTILIZATION = 0.7  # Knative container-concurrency-target-percentage default (70%)
STABLE_WINDOW_S = 180.0
PANIC_WINDOW_S = 60.0
PANIC_THRESHOLD = 2.0
TOLERANCE = 0.1
MAX_SCALE_UP_RATE = 1000.0  # Knative max-scale-up-rate default
MAX_SCALE_DOWN_RATE = 2.0  # Knative max-scale-down-rate default


class KpaPolicy:
    name = "kpa"

    def __init__(
        self,
        target_concurrency: float = DEFAULT_TARGET_CONCURRENCY,
        *,
        target_utilization: float = TARGET_UTILIZATION,
        stable_window_s: float = STABLE_WINDOW_S,
        panic_window_s: float = PANIC_WINDOW_S,
        panic_threshold: float = PANIC_THRESHOLD,
        scale_down_delay_s: float = 0.0,
        tolerance: float = TOLERANCE,
    ) -> None:
        if not target_concurrency > 0:
            raise ValueError(f"target_concurrency must be > 0, got {target_concurrency}")
        if not 0 < panic_window_s <= stable_window_s:
            raise ValueError("need 0 < panic_window_s <= stable_window_s")
        self.target = target_concurrency * target_utilization
        self.stable_window_s = stable_window_s
        self.panic_window_s = panic_window_s
        self.panic_threshold = panic_threshold
        self.scale_down_delay_s = scale_down_delay_s
        self.tolerance = tolerance
        self._concurrency = TimeWindow(stable_window_s)
        self._delay = TimeWindow(max(scale_down_delay_s, 1e-9))
        self._panic_since: float | None = None
        self._max_panic_pods = 0

    def decide(self, spec: PoolSpec, obs: Observation) -> Decision:
        if not obs.is_complete():
            return hold(spec, obs)
        now = obs.time_s
        current = obs.desired_replicas
        concurrency = value(obs.running) + value(obs.waiting) + obs.router_held
        self._concurrency.add(now, concurrency)
        stable = self._concurrency.mean(now) or 0.0
        panic = self._concurrency.mean(now, self.panic_window_s) or 0.0
        ready = max(1, obs.ready_replicas)
        up_limit = math.ceil(MAX_SCALE_UP_RATE * ready)
        down_limit = math.floor(ready / MAX_SCALE_DOWN_RATE)
        stable_pods = min(max(math.ceil(stable / self.target), down_limit), up_limit)
        panic_pods = min(max(math.ceil(panic / self.target), down_limit), up_limit)

        over = panic_pods / ready >= self.panic_threshold
        if over:
            self._panic_since = now  # enter panic, or extend it
        elif self._panic_since is not None and now >= self._panic_since + self.stable_window_s:
            self._panic_since = None
            self._max_panic_pods = 0

        if self._panic_since is not None:
            desired = max(panic_pods, self._max_panic_pods, current)
            self._max_panic_pods = desired
            reason = "kpa: panic"
        else:
            desired = stable_pods
            reason = "kpa: stable"
            if current > 0 and stable > 0:
                ratio = stable / (self.target * current)
                if abs(ratio - 1.0) <= self.tolerance:
                    desired, reason = current, "kpa: within tolerance"

        if self.scale_down_delay_s > 0:
            if self._delay.max(now) is None:
                # No history (a fresh start): the running fleet's size stands for the decisions
                # before it, so a restart or a new autoscaler cannot cut a serving fleet at once.
                self._delay.add(now, float(current))
            self._delay.add(now, float(desired))
            delayed = int(self._delay.max(now) or desired)
            if delayed > desired:
                desired, reason = delayed, f"{reason}; scale-down delay"
        return decision(
            spec,
            desired,
            reason,
            stable=stable,
            panic=panic,
            stable_pods=stable_pods,
            panic_pods=panic_pods,
        )

    def export_state(self) -> dict[str, Any]:
        return {
            "concurrency": self._concurrency.export(),
            "delay": self._delay.export(),
            "panic_since": self._panic_since,
            "max_panic_pods": self._max_panic_pods,
        }

    def import_state(self, state: dict[str, Any]) -> None:
        self._concurrency.restore(state.get("concurrency", []))
        self._delay.restore(state.get("delay", []))
        since = state.get("panic_since")
        self._panic_since = None if since is None else float(since)
        self._max_panic_pods = int(state.get("max_panic_pods", 0))
