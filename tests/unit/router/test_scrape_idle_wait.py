"""A due scrape waits, within a bound, for the engine to have no request in flight: the engine's
/metrics render blocks its API loop, and every request in flight there waits with it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shoal.router.engine_state import EngineStateStore
from shoal.router.scrape_cadence import ScrapeCadence
from shoal.router.scraper import ScraperPool
from shoal.router.types import Endpoint

URL = "http://e0:8000"


def _store() -> EngineStateStore:
    store = EngineStateStore()
    store.set_endpoints([Endpoint(url=URL)])
    return store


def test_an_idle_endpoint_is_scraped_at_once() -> None:
    async def go() -> bool:
        return await _store().wait_idle(URL, 1.0)

    assert asyncio.run(go()) is True


def test_the_wait_ends_when_the_last_request_ends() -> None:
    async def go() -> tuple[bool, float]:
        store = _store()
        store.begin(URL, 10)
        store.begin(URL, 10)
        loop = asyncio.get_running_loop()
        loop.call_later(0.02, store.end, URL, 10)
        loop.call_later(0.05, store.end, URL, 10)
        start = loop.time()
        idle = await store.wait_idle(URL, 1.0)
        return idle, loop.time() - start

    idle, waited = asyncio.run(go())
    assert idle is True
    assert 0.04 <= waited < 0.5  # not at the first end (one still in flight), not at the deadline


def test_a_busy_endpoint_is_scraped_at_the_deadline() -> None:
    async def go() -> tuple[bool, float]:
        store = _store()
        store.begin(URL, 10)
        loop = asyncio.get_running_loop()
        start = loop.time()
        idle = await store.wait_idle(URL, 0.05)
        return idle, loop.time() - start

    idle, waited = asyncio.run(go())
    assert idle is False
    assert 0.04 <= waited < 0.5


def test_other_replicas_requests_count_and_their_end_wakes_the_waiter() -> None:
    async def go() -> bool:
        store = _store()
        store.set_remote_in_flight({URL: 3})
        asyncio.get_running_loop().call_later(0.02, store.set_remote_in_flight, {})
        return await store.wait_idle(URL, 1.0)

    assert asyncio.run(go()) is True


def test_an_endpoint_that_leaves_the_fleet_releases_its_waiter() -> None:
    async def go() -> float:
        store = _store()
        store.begin(URL, 10)
        loop = asyncio.get_running_loop()
        loop.call_later(0.02, store.set_endpoints, [])
        start = loop.time()
        await store.wait_idle(URL, 1.0)
        return loop.time() - start

    assert asyncio.run(go()) < 0.5


class _RecordingUpstream:
    """Answers the scraper's GETs like an idle engine and records when /metrics was asked."""

    def __init__(self) -> None:
        self.metrics_at: list[float] = []
        self.scraped = asyncio.Event()

    async def post(self, base_url: str, path: str, body: bytes, headers: dict[str, str]) -> Any:
        raise AssertionError("the scraper never posts")

    async def get(self, base_url: str, path: str, timeout_s: float) -> tuple[int, bytes]:
        if path == "/metrics":
            self.metrics_at.append(asyncio.get_running_loop().time())
            self.scraped.set()
            return 200, b'vllm:num_requests_running{model_name="tiny"} 0.0\n'
        return 200, b'{"data": [{"id": "tiny", "root": "tiny", "parent": null}]}'

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("share", [0.5, 0.0])
def test_the_scraper_holds_a_due_scrape_until_the_request_in_flight_ends(share: float) -> None:
    async def go() -> float:
        store = _store()
        upstream = _RecordingUpstream()
        pool = ScraperPool(
            upstream,
            store,
            cadence=ScrapeCadence(0.2, 0.2),
            discover_kv_sources=False,
            idle_wait_share=share,
        )
        store.begin(URL, 10)
        loop = asyncio.get_running_loop()
        start = loop.time()
        loop.call_later(0.05, store.end, URL, 10)
        pool.add(Endpoint(url=URL))
        await asyncio.wait_for(upstream.scraped.wait(), 2.0)
        await pool.close()
        return upstream.metrics_at[0] - start

    first_scrape_after = asyncio.run(go())
    if share:
        assert 0.05 <= first_scrape_after < 0.1  # right after the request ended
    else:
        assert first_scrape_after < 0.05  # at once, request in flight or not
