"""The scrape cadence: fast while an engine's metrics say something new, slower while calm."""

from __future__ import annotations

import pytest

from shoal.router.engine_state import EngineStateStore
from shoal.router.scrape_cadence import ScrapeCadence, is_calm
from shoal.router.types import Endpoint, EngineMetrics

CADENCE = ScrapeCadence(0.2, 0.8)


def metrics(running: float = 0, waiting: float = 0, kv: float = 0.1) -> EngineMetrics:
    return EngineMetrics(
        num_requests_running=running, num_requests_waiting=waiting, kv_cache_usage=kv
    )


def test_backs_off_by_doubling_up_to_the_slowest_while_calm() -> None:
    interval = CADENCE.fastest_s
    seen = []
    previous = metrics()
    for _ in range(4):
        interval = CADENCE.after_scrape(interval, previous, metrics(), router_in_flight=0)
        seen.append(interval)
    assert seen == [0.4, 0.8, 0.8, 0.8]


@pytest.mark.parametrize(
    ("previous", "current", "router_in_flight", "why"),
    [
        (metrics(), metrics(waiting=1), 1, "a queue formed"),
        (metrics(kv=0.1), metrics(kv=0.3), 0, "KV usage jumped"),
        (metrics(), metrics(running=12), 0, "load the router did not send"),
        (metrics(running=40), metrics(running=20), 40, "the engine lost requests"),
    ],
)
def test_anything_new_sends_it_back_to_the_fastest(
    previous: EngineMetrics, current: EngineMetrics, router_in_flight: int, why: str
) -> None:
    assert not is_calm(previous, current, router_in_flight), why
    assert CADENCE.after_scrape(0.8, previous, current, router_in_flight) == 0.2, why


def test_the_routers_own_load_is_explained_within_a_tolerance() -> None:
    # Responses in transit make the counts differ by a few; 10% of a large count is allowed.
    assert is_calm(metrics(), metrics(running=3), router_in_flight=1)
    assert is_calm(metrics(), metrics(running=95), router_in_flight=100)
    assert not is_calm(metrics(), metrics(running=85), router_in_flight=100)


def test_first_scrape_and_failures_use_the_fastest() -> None:
    assert CADENCE.after_scrape(0.8, None, metrics(), router_in_flight=0) == 0.2
    assert CADENCE.after_failure() == 0.2


def test_equal_bounds_fix_the_interval_and_bad_bounds_are_refused() -> None:
    fixed = ScrapeCadence(0.2, 0.2)
    assert not fixed.adaptive
    assert fixed.after_scrape(0.2, metrics(), metrics(), 0) == 0.2
    with pytest.raises(ValueError, match="fastest"):
        ScrapeCadence(0.5, 0.2)


def test_staleness_is_counted_in_the_endpoints_own_interval() -> None:
    now = [100.0]
    store = EngineStateStore(scrape_interval_s=0.2, stale_after_intervals=5, clock=lambda: now[0])
    store.set_endpoints([Endpoint("http://a:1", ("m",)), Endpoint("http://b:1", ("m",))])
    for url in ("http://a:1", "http://b:1"):
        store.update_metrics(url, metrics(), None)
    store.set_scrape_interval("http://b:1", 0.8)  # calm: scraped every 0.8 s
    now[0] += 2.0  # 10 fast intervals, 2.5 slow ones
    store.refresh_all_staleness()
    a, b = (store.get(u) for u in ("http://a:1", "http://b:1"))
    assert a is not None and a.stale
    assert b is not None and not b.stale
    now[0] += 2.1  # past 5 slow intervals
    store.refresh_all_staleness()
    assert b.stale
