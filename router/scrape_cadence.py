"""How often to scrape an engine's ``/metrics``: fast while it tells the router something new.

A scrape is not free for the engine. vLLM renders its whole exposition (~50 kB, a few ms of
prometheus_client on the API server's event loop) for every request to ``/metrics``, and while it
renders, that engine's requests wait: a router replica scraping every 200 ms stalls each engine
for about 1-2% of the time, which shows in the engines' p99 latency (docs/router.md).

Much of what a scrape says the router already knows from its own accounting: how many requests it
has in flight at the engine (shared with other replicas through Redis). So after each scrape the
cadence compares the engine's view with the router's. While they agree, the engine has no queue
and its KV-cache usage holds still, the next scrape waits twice as long, up to ``slowest_s``. As
soon as one of them moves (a queue forms, KV usage jumps, load the router did not send shows up,
a scrape fails), it is back to ``fastest_s``. The router's own in-flight counts keep its load
signals current between scrapes (``SaturationPolicy`` adds what it sent since the last scrape).
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.router.types import EngineMetrics

# KV-cache usage may drift by this much (fraction of the cache) between two calm scrapes.
KV_USAGE_STEADY = 0.05
# The engine's running + waiting may differ from the router's in-flight count by this many
# requests (or by INFLIGHT_TOLERANCE_FRACTION of it, whichever is larger) and still count as
# explained: responses in transit and requests not yet admitted make them differ by a few.
INFLIGHT_TOLERANCE = 2
INFLIGHT_TOLERANCE_FRACTION = 0.1


@dataclass(frozen=True, slots=True)
class ScrapeCadence:
    fastest_s: float
    slowest_s: float

    def __post_init__(self) -> None:
        if not 0 < self.fastest_s <= self.slowest_s:
            raise ValueError(
                f"scrape intervals must satisfy 0 < fastest ({self.fastest_s}s) "
                f"<= slowest ({self.slowest_s}s)"
            )

    @property
    def adaptive(self) -> bool:
        return self.slowest_s > self.fastest_s

    def after_scrape(
        self,
        interval_s: float,
        previous: EngineMetrics | None,
        current: EngineMetrics,
        router_in_flight: int,
    ) -> float:
        """The wait before the next scrape, given the one just read and the one before it."""
        if previous is not None and is_calm(previous, current, router_in_flight):
            return min(self.slowest_s, interval_s * 2)
        return self.fastest_s

    def after_failure(self) -> float:
        return self.fastest_s


def is_calm(previous: EngineMetrics, current: EngineMetrics, router_in_flight: int) -> bool:
    """The engine has no queue, its KV usage holds still, and its load is the router's own."""
    if current.num_requests_waiting > 0:
        return False
    if abs(current.kv_cache_usage - previous.kv_cache_usage) > KV_USAGE_STEADY:
        return False
    engine_load = current.num_requests_running + current.num_requests_waiting
    tolerance = max(INFLIGHT_TOLERANCE, INFLIGHT_TOLERANCE_FRACTION * router_in_flight)
    return abs(engine_load - router_in_flight) <= tolerance
