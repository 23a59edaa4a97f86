"""Short-term forecast of a pool's arrival rate: Holt's linear trend on irregular ticks.

The SLO policy sizes for the load that will arrive by the time a replica started now is ready
(minutes for a large model), so it needs the level and the trend of the request rate, not the
last sample. Holt's double exponential smoothing keeps both (level l, trend b per second):

    l_t = a x_t + (1 - a)(l_{t-dt} + b dt)
    b_t = c (l_t - l_{t-dt}) / dt + (1 - c) b

with the smoothing factors given per reference interval and adapted to the actual gap
(a' = 1 - (1 - a)^(dt / ref)), so a missed tick does not change what a sample weighs.
Forecast h seconds ahead: max(0, l + b h), or with Gardner & McKenzie's damped trend (1985)
max(0, l + b r (phi + phi^2 + ... + phi^k)), k = h / r for the reference interval r: a trend
measured over the last minutes is not assumed to last for the whole horizon, which keeps a
short climb from being extrapolated into minutes of over-provisioning. A seasonal
(Holt-Winters) term is not used: a day's season needs a day of history, and the horizon here is
minutes.
"""

from __future__ import annotations

import math
from typing import Any


class HoltForecaster:
    """Level and trend of a rate sampled at (possibly irregular) times."""

    __slots__ = ("_level", "_t", "_trend", "alpha", "beta", "damping", "reference_s")

    def __init__(
        self,
        alpha: float = 0.3,
        beta: float = 0.1,
        reference_s: float = 15.0,
        damping: float = 1.0,
    ) -> None:
        if not (0 < alpha <= 1 and 0 <= beta <= 1):
            raise ValueError(f"need 0 < alpha <= 1 and 0 <= beta <= 1, got {alpha}, {beta}")
        if not 0 < damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {damping}")
        if not reference_s > 0:
            raise ValueError(f"reference_s must be > 0, got {reference_s}")
        self.alpha = alpha
        self.beta = beta
        self.reference_s = reference_s
        self.damping = damping
        self._level: float | None = None
        self._trend = 0.0
        self._t = 0.0

    @property
    def level(self) -> float | None:
        return self._level

    @property
    def trend(self) -> float:
        """Change of the rate per second."""
        return self._trend

    def update(self, time_s: float, x: float) -> None:
        if not math.isfinite(x):
            raise ValueError(f"sample must be finite, got {x}")
        if self._level is None:
            self._level, self._t = x, time_s
            return
        dt = time_s - self._t
        if dt <= 0:
            return  # same tick seen twice (or clock went back): keep the older estimate
        k = dt / self.reference_s
        a = 1.0 - (1.0 - self.alpha) ** k
        c = 1.0 - (1.0 - self.beta) ** k
        predicted = self._level + self._trend * dt
        level = a * x + (1.0 - a) * predicted
        self._trend = c * (level - self._level) / dt + (1.0 - c) * self._trend
        self._level = level
        self._t = time_s

    def forecast(self, horizon_s: float) -> float | None:
        if self._level is None:
            return None
        horizon = max(horizon_s, 0.0)
        phi = self.damping
        if phi >= 1.0:
            return max(0.0, self._level + self._trend * horizon)
        # Sum of phi^1..phi^k for k = horizon / reference (k need not be whole).
        k = horizon / self.reference_s
        steps = phi * (1.0 - math.pow(phi, k)) / (1.0 - phi)
        return max(0.0, self._level + self._trend * self.reference_s * steps)

    def export_state(self) -> dict[str, Any]:
        return {"level": self._level, "trend": self._trend, "t": self._t}

    def import_state(self, state: dict[str, Any]) -> None:
        level = state.get("level")
        self._level = None if level is None else float(level)
        self._trend = float(state.get("trend", 0.0))
        self._t = float(state.get("t", 0.0))
