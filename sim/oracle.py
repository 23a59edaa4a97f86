"""The oracle lower bound: the fewest replicas per interval that meet the SLO, in hindsight.

With perfect knowledge of the future and instant start-up, a pool needs for each interval
(default 5 minutes) only the fewest replicas that serve that interval's requests within the SLO.
For every interval the oracle simulates exactly those requests on ``n`` fresh replicas (the
same engines and router as the autoscaled runs) and finds the smallest ``n`` for which every
``window_s`` window of the interval meets the percentile targets: it starts from the previous
interval's answer and walks down while the SLO holds, or gallops up and bisects when it does not
(latency does not rise with more replicas, so the search is monotone).

GPU-hours are ``sum(n_i x interval_i)``; no real autoscaler can do better on the same engines,
since it would have to know the interval's load in advance and start replicas in no time.
Starting each interval with empty replicas makes it slightly optimistic (no backlog carried over),
which keeps it a lower bound.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal.sim.attainment import Attainment, RequestLatency, SloTarget, attainment
from shoal.sim.cluster import EngineSpec, Router, least_loaded, simulate
from shoal.sim.trace import TraceRequest

DEFAULT_INTERVAL_S = 300.0


@dataclass(slots=True)
class OracleReport:
    interval_s: float
    replicas: list[int]  # per interval
    gpu_hours: float
    cost: float
    attainment: Attainment
    simulations: int
    wall_s: float
    latencies: list[RequestLatency] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "interval_s": self.interval_s,
            "replicas": self.replicas,
            "gpu_hours": self.gpu_hours,
            "cost": self.cost,
            "attainment": self.attainment.to_dict(),
            "simulations": self.simulations,
            "wall_s": self.wall_s,
        }


def _latencies(
    requests: Sequence[TraceRequest], n: int, engine: EngineSpec, router: Router, seed: int
) -> list[RequestLatency]:
    rep = simulate(requests, [engine] * n, router, seed=seed, keep_requests=True)
    out: list[RequestLatency] = []
    for fin in rep.finished_requests:
        tpot = None
        if fin.num_generation_tokens > 1:
            tpot = (fin.finish_time - fin.first_token_time) / (fin.num_generation_tokens - 1)
        out.append(RequestLatency(fin.arrival_time, fin.ttft, tpot))
    return out


def oracle(
    workload: Sequence[TraceRequest],
    engine: EngineSpec,
    slo: SloTarget,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    window_s: float = 60.0,
    max_replicas: int = 256,
    price_per_replica_hour: float = 0.0,
    router_factory: Callable[[], Router] = lambda: least_loaded,
    seed: int = 0,
    warmup_s: float = 0.0,
    progress: Callable[[float], None] | None = None,
) -> OracleReport:
    """``warmup_s``: report only what comes after it (as ``AutoscaledSimulator.warmup_s``);
    intervals that end before it are not solved."""
    if interval_s <= 0 or window_s <= 0 or interval_s % window_s:
        raise ValueError("interval_s must be a positive multiple of window_s")
    wall0 = time.perf_counter()
    end = workload[-1].arrival_s if workload else 0.0
    n_intervals = max(1, math.ceil(end / interval_s)) if workload else 0
    buckets: list[list[TraceRequest]] = [[] for _ in range(n_intervals)]
    for r in workload:
        buckets[min(int(r.arrival_s // interval_s), n_intervals - 1)].append(r)
    chosen: list[int] = []
    all_latencies: list[RequestLatency] = []
    sims = 0
    prev = 1
    for k, reqs in enumerate(buckets):
        if not reqs or (k + 1) * interval_s <= warmup_s:
            chosen.append(0)
            continue
        cache: dict[int, list[RequestLatency]] = {}

        def meets(
            n: int, reqs: list[TraceRequest] = reqs, cache: dict[int, list[RequestLatency]] = cache
        ) -> bool:
            nonlocal sims
            if n not in cache:
                sims += 1
                cache[n] = _latencies(reqs, n, engine, router_factory(), seed)
            lat = cache[n]
            a = attainment(lat, slo, window_s=window_s)
            return len(lat) == len(reqs) and a.windows_ok >= 1.0

        n = min(max(prev, 1), max_replicas)
        if meets(n):
            while n > 1 and meets(n - 1):
                n -= 1
        else:
            lo, hi = n + 1, min(n * 2, max_replicas)
            while not meets(hi) and hi < max_replicas:
                lo, hi = hi + 1, min(hi * 2, max_replicas)
            while lo < hi:
                mid = (lo + hi) // 2
                if meets(mid):
                    hi = mid
                else:
                    lo = mid + 1
            n = hi
        chosen.append(n)
        all_latencies.extend(r for r in cache[n] if r.arrival_s >= warmup_s)
        prev = n
        if progress is not None:
            progress((k + 1) / n_intervals)
    seconds = 0.0
    for k, n in enumerate(chosen):
        start = max(k * interval_s, warmup_s)
        length = max(min((k + 1) * interval_s, end) - start, 0.0)
        seconds += n * length
    gpu_hours = seconds * engine.num_gpus / 3600.0
    return OracleReport(
        interval_s=interval_s,
        replicas=chosen,
        gpu_hours=gpu_hours,
        cost=seconds / 3600.0 * price_per_replica_hour,
        attainment=attainment(all_latencies, slo, window_s=window_s),
        simulations=sims,
        wall_s=time.perf_counter() - wall0,
        latencies=all_latencies,
    )
