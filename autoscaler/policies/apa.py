"""``apa``: AIBrix's Advanced Pod Autoscaler (fluctuation tolerances and rate limits).

As the AIBrix documentation describes it ("Metric-based Autoscaling": APA is "similar as HPA but
it has fluctuation parameter which acts as minimum buffer before triggering scaling up and down
to prevent oscillation"), with its defaults: up-fluctuation tolerance 0.1, down-fluctuation
tolerance 0.2, max scale-up rate 2 and max scale-down rate 2 per decision, the metric averaged
over a window.

* per-pod load = windowed concurrency / ready pods; ratio = per-pod load / target;
* ratio > 1 + up tolerance: scale up to ceil(total / target), at most ceil(2 x ready);
* ratio < 1 - down tolerance: scale down to ceil(total / target), at least floor(ready / 2);
* otherwise keep the current target.

AIBrix's own code computes the new count as ceil(per-pod load / target), i.e. it forgets to
multiply by the pods the per-pod figure was divided by, so it lands near 1-2 pods whatever the
fleet; here the count comes from the total. Within the tolerances AIBrix returns the ready count,
which cancels replicas still starting; here the current target is kept instead.
"""

from __future__ import annotations

import math
from typing import Any

from shoal.autoscaler.policies.common import decision, hold, value
from shoal.autoscaler.policies.kpa import DEFAULT_TARGET_CONCURRENCY, TARGET_UTILIZATION
from shoal.autoscaler.policies.window import TimeWindow
from shoal.autoscaler.policy import Decision, Observation, PoolSpec

UP_FLUCTUATION_TOLERANCE = 0.1
DOWN_FLUCTUATION_TOLERANCE = 0.2
MAX_SCALE_UP_RATE = 2.0
MAX_SCALE_DOWN_RATE = 2.0
WINDOW_S = 60.0


class ApaPolicy:
    name = "apa"

    def __init__(
        self,
        target_concurrency: float = DEFAULT_TARGET_CONCURRENCY * TARGET_UTILIZATION,
        *,
        window_s: float = WINDOW_S,
        up_tolerance: float = UP_FLUCTUATION_TOLERANCE,
        down_tolerance: float = DOWN_FLUCTUATION_TOLERANCE,
        max_scale_up_rate: float = MAX_SCALE_UP_RATE,
        max_scale_down_rate: float = MAX_SCALE_DOWN_RATE,
    ) -> None:
        if not target_concurrency > 0:
            raise ValueError(f"target_concurrency must be > 0, got {target_concurrency}")
        self.target = target_concurrency
        self.up_tolerance = up_tolerance
        self.down_tolerance = down_tolerance
        self.max_scale_up_rate = max_scale_up_rate
        self.max_scale_down_rate = max_scale_down_rate
        self._concurrency = TimeWindow(window_s)

    def decide(self, spec: PoolSpec, obs: Observation) -> Decision:
        if not obs.is_complete():
            return hold(spec, obs)
        now = obs.time_s
        current = obs.desired_replicas
        total = value(obs.running) + value(obs.waiting) + obs.router_held
        self._concurrency.add(now, total)
        load = self._concurrency.mean(now) or 0.0
        ready = obs.ready_replicas
        if ready == 0:
            # Nothing to divide by: activate on any load, else stay where we are (or at zero).
            if obs.router_held > 0 or total > 0:
                return decision(spec, max(current, 1), "apa: activate", load=load)
            return decision(spec, current, "apa: idle", load=load)
        ratio = load / ready / self.target
        expected = math.ceil(load / self.target)
        if ratio > 1.0 + self.up_tolerance:
            limit = math.ceil(self.max_scale_up_rate * ready)
            return decision(spec, min(expected, limit), "apa: scale up", load=load, ratio=ratio)
        if ratio < 1.0 - self.down_tolerance:
            limit = math.floor(ready / self.max_scale_down_rate)
            return decision(spec, max(expected, limit), "apa: scale down", load=load, ratio=ratio)
        return decision(spec, current, "apa: within tolerance", load=load, ratio=ratio)

    def export_state(self) -> dict[str, Any]:
        return {"concurrency": self._concurrency.export()}

    def import_state(self, state: dict[str, Any]) -> None:
        self._concurrency.restore(state.get("concurrency", []))
