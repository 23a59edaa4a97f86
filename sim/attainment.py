"""SLO attainment of a simulated run, defined two ways.

* **Per request**: the share of finished requests whose TTFT is within the TTFT target, whose
  TPOT (time per output token after the first: (finish - first token) / (output - 1), requests
  with more than one output token) is within the TPOT target, and both (a one-token request
  meets the TPOT target trivially).
* **Per window**: requests are grouped into consecutive ``window_s`` windows by arrival time;
  a window meets the SLO when its TTFT and TPOT at the SLO percentile (linear interpolation
  between closest ranks) are within the targets. Attainment is the share of windows with at
  least one request that meet it. This is how an SLO "TTFT p95 <= 1 s" is judged on a dashboard,
  minute by minute, and it is the headline figure of ``bench/autoscaler.py``.

Requests that never finish count as misses in both (they have no latency to meet anything).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SloTarget:
    ttft_s: float | None
    tpot_s: float | None
    percentile: float = 95.0  # in (0, 100)

    def __post_init__(self) -> None:
        if not 0 < self.percentile < 100:
            raise ValueError(f"percentile must be in (0, 100), got {self.percentile}")


@dataclass(frozen=True, slots=True)
class RequestLatency:
    arrival_s: float
    ttft_s: float
    tpot_s: float | None  # None for a one-token output


@dataclass(frozen=True, slots=True)
class Attainment:
    requests: int
    unfinished: int
    ttft_ok: float  # shares in [0, 1]
    tpot_ok: float
    both_ok: float
    windows: int
    windows_ok: float
    # Start times (s) of the windows that missed, in order: where to look in a timeline.
    missed_window_starts: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "unfinished": self.unfinished,
            "ttft_ok": self.ttft_ok,
            "tpot_ok": self.tpot_ok,
            "both_ok": self.both_ok,
            "windows": self.windows,
            "windows_ok": self.windows_ok,
        }


def percentile(values: list[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); ``values`` non-empty."""
    s = sorted(values)
    pos = pct / 100.0 * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def attainment(
    latencies: Iterable[RequestLatency],
    slo: SloTarget,
    *,
    unfinished_arrivals: Iterable[float] = (),
    window_s: float = 60.0,
) -> Attainment:
    ttft_max = slo.ttft_s if slo.ttft_s is not None else math.inf
    tpot_max = slo.tpot_s if slo.tpot_s is not None else math.inf
    n = ttft_ok = tpot_ok = both = 0
    ttfts: dict[int, list[float]] = defaultdict(list)
    tpots: dict[int, list[float]] = defaultdict(list)
    for r in latencies:
        n += 1
        a = r.ttft_s <= ttft_max
        b = r.tpot_s is None or r.tpot_s <= tpot_max
        ttft_ok += a
        tpot_ok += b
        both += a and b
        w = int(r.arrival_s // window_s)
        ttfts[w].append(r.ttft_s)
        if r.tpot_s is not None:
            tpots[w].append(r.tpot_s)
    unfinished_windows: set[int] = set()
    unfinished = 0
    for t in unfinished_arrivals:
        unfinished += 1
        unfinished_windows.add(int(t // window_s))
    windows = set(ttfts) | unfinished_windows
    missed: list[int] = []
    for w in sorted(windows):
        if (
            w in unfinished_windows
            or percentile(ttfts[w], slo.percentile) > ttft_max
            or (tpots[w] and percentile(tpots[w], slo.percentile) > tpot_max)
        ):
            missed.append(w)
    ok = len(windows) - len(missed)
    total = n + unfinished
    return Attainment(
        requests=total,
        unfinished=unfinished,
        ttft_ok=ttft_ok / total if total else 1.0,
        tpot_ok=tpot_ok / total if total else 1.0,
        both_ok=both / total if total else 1.0,
        windows=len(windows),
        windows_ok=ok / len(windows) if windows else 1.0,
        missed_window_starts=tuple(w * window_s for w in missed),
    )
