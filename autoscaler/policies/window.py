"""Time-stamped samples over a sliding window: the memory every windowed policy keeps.

Policies see one observation per tick; a window keeps ``(time, value)`` pairs no older than its
span and answers mean and max over any sub-span. Samples are kept in arrival order, so pruning
and the queries walk from the newest end. The window is bounded by its span (and by
``max_samples``, a hard limit in case a caller ticks far faster than expected).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

DEFAULT_MAX_SAMPLES = 4096


class TimeWindow:
    """Samples within ``span_s`` of the newest one."""

    __slots__ = ("_samples", "max_samples", "span_s")

    def __init__(self, span_s: float, max_samples: int = DEFAULT_MAX_SAMPLES) -> None:
        if not span_s > 0:
            raise ValueError(f"window span must be > 0 s, got {span_s}")
        self.span_s = span_s
        self.max_samples = max_samples
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, time_s: float, value: float) -> None:
        if self._samples and time_s < self._samples[-1][0]:
            raise ValueError(f"sample at {time_s} s is older than the last one")
        self._samples.append((time_s, value))
        horizon = time_s - self.span_s
        while self._samples and self._samples[0][0] <= horizon:
            self._samples.popleft()

    def _recent(self, now_s: float, span_s: float | None) -> list[float]:
        span = self.span_s if span_s is None else min(span_s, self.span_s)
        horizon = now_s - span
        out: list[float] = []
        for t, v in reversed(self._samples):
            if t <= horizon:
                break
            out.append(v)
        return out

    def mean(self, now_s: float, span_s: float | None = None) -> float | None:
        """Mean of the samples newer than ``now_s - span_s``; None when there are none."""
        values = self._recent(now_s, span_s)
        return math.fsum(values) / len(values) if values else None

    def max(self, now_s: float, span_s: float | None = None) -> float | None:
        values = self._recent(now_s, span_s)
        return max(values) if values else None

    def export(self) -> list[list[float]]:
        return [[t, v] for t, v in self._samples]

    def restore(self, samples: Any) -> None:
        """Load what ``export`` returned; malformed input raises ``ValueError``."""
        if not isinstance(samples, list):
            raise ValueError("window state must be a list of [time, value] pairs")
        self._samples.clear()
        for item in samples:
            if not (isinstance(item, list | tuple) and len(item) == 2):
                raise ValueError(f"bad window sample {item!r}")
            self.add(float(item[0]), float(item[1]))
