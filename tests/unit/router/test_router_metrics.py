from __future__ import annotations

from shoal.router.metrics import RouterMetrics, sample_value


def test_series_of_an_endpoint_that_left_are_removed() -> None:
    metrics = RouterMetrics()
    metrics.count_request("m", "http://a:1", "200")
    metrics.count_request("m", "http://a:1", "500")
    metrics.count_request("m", "http://b:1", "200")
    metrics.count_request("m", "", "503")
    metrics.ejections.labels("http://a:1").inc()
    metrics.forget_endpoint("http://a:1")
    metrics.forget_endpoint("http://never-seen:1")  # harmless
    text = metrics.render().decode()
    assert "http://a:1" not in text
    assert sample_value(text, "shoal_router_requests_total", {"endpoint": "http://b:1"}) == 1.0
    assert sample_value(text, "shoal_router_requests_total", {"status": "503"}) == 1.0


def test_held_requests_gauge_reads_the_hold_queue() -> None:
    metrics = RouterMetrics()
    metrics.watch_state(dict, dict, dict, lambda: None, lambda: {"llama": 3})
    text = metrics.render().decode()
    assert sample_value(text, "shoal_router_held_requests", {"model": "llama"}) == 3.0


def test_a_series_counted_again_after_its_endpoint_left_starts_from_zero() -> None:
    """Children are cached for speed; a removed series must not live on in the cache, or counts
    after an endpoint comes back would go to a child the registry no longer shows."""
    m = RouterMetrics()
    for _ in range(3):
        m.count_request("llama", "http://e1", "200")
    m.forget_endpoint("http://e1")
    m.count_request("llama", "http://e1", "200")
    text = m.render().decode()
    labels = {"model": "llama", "endpoint": "http://e1", "status": "200"}
    assert sample_value(text, "shoal_router_requests_total", labels) == 1.0
