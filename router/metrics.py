"""The router's own metrics (``shoal_router_*``), in a private registry.

A private :class:`CollectorRegistry` per router app (no global default registry), so several
routers in one process (tests, the cluster simulator) never collide. Gauges that mirror state
owned elsewhere (queue depth, stale endpoints, fallbacks) are read at scrape time by a custom
collector instead of being pushed on every change: nothing to keep in sync, nothing on the hot
path.

Label values are bounded: ``endpoint`` is a discovered URL, ``model`` a model the fleet serves
(requests for anything else are labelled ``model=""``), ``status`` an HTTP status code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, NamedTuple, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_RATIO_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


class EndpointView(NamedTuple):
    """What the metrics show of one endpoint, read at scrape time."""

    stale: bool
    ejected: bool
    in_flight: int
    scrape_interval_s: float | None


class _StateCollector(Collector):
    """Reads router state at scrape time through callbacks."""

    def __init__(
        self,
        queue_depths: Callable[[], Mapping[str, int]],
        endpoints: Callable[[], Mapping[str, EndpointView]],
        fallbacks: Callable[[], Mapping[tuple[str, str], int]],
        shared_state_up: Callable[[], float | None],
        held: Callable[[], Mapping[str, int]],
        api_keys: Callable[[], tuple[int, int] | None],
    ) -> None:
        self._held = held
        self._api_keys = api_keys
        self._queue_depths = queue_depths
        self._endpoints = endpoints
        self._fallbacks = fallbacks
        self._shared_up = shared_state_up

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "shoal_router_queue_depth", "Requests waiting for capacity, per model", labels=["model"]
        )
        for model, n in sorted(self._queue_depths().items()):
            depth.add_metric([model], n)
        yield depth
        held = GaugeMetricFamily(
            "shoal_router_held_requests",
            "Requests waiting for a declared model or adapter that no engine serves yet "
            "(scale from zero, adapter loading), per base model",
            labels=["model"],
        )
        for model, n in sorted(self._held().items()):
            held.add_metric([model], n)
        yield held
        stale = GaugeMetricFamily(
            "shoal_router_endpoint_stale",
            "1 when the endpoint's metrics are stale (it then counts as saturated)",
            labels=["endpoint"],
        )
        ejected = GaugeMetricFamily(
            "shoal_router_endpoint_ejected",
            "1 while the endpoint is ejected after repeated failures",
            labels=["endpoint"],
        )
        in_flight = GaugeMetricFamily(
            "shoal_router_endpoint_in_flight",
            "Requests in flight to the endpoint (this router plus other replicas via Redis)",
            labels=["endpoint"],
        )
        cadence = GaugeMetricFamily(
            "shoal_router_scrape_interval_seconds",
            "Current wait between /metrics scrapes of the endpoint: the configured fastest while "
            "its metrics tell the router something new, longer while they agree with its own "
            "accounting",
            labels=["endpoint"],
        )
        for url, view in sorted(self._endpoints().items()):
            stale.add_metric([url], 1.0 if view.stale else 0.0)
            ejected.add_metric([url], 1.0 if view.ejected else 0.0)
            in_flight.add_metric([url], view.in_flight)
            if view.scrape_interval_s is not None:
                cadence.add_metric([url], view.scrape_interval_s)
        yield stale
        yield ejected
        yield in_flight
        yield cadence
        fallbacks = CounterMetricFamily(
            "shoal_router_strategy_fallbacks",
            "Decisions where a strategy could not use its main signal",
            labels=["strategy", "reason"],
        )
        for (strategy, reason), n in sorted(self._fallbacks().items()):
            fallbacks.add_metric([strategy, reason], n)
        yield fallbacks
        keys = self._api_keys()
        if keys is not None:
            count, reload_errors = keys
            yield GaugeMetricFamily(
                "shoal_router_api_keys", "API keys in force (inline and from the key file)", count
            )
            yield CounterMetricFamily(
                "shoal_router_api_keys_reload_errors",
                "Key-file reloads that failed (the keys already loaded stay in force)",
                reload_errors,
            )
        up = self._shared_up()
        if up is not None:
            yield GaugeMetricFamily(
                "shoal_router_shared_state_up",
                "1 while shared state (Redis) is reachable; 0: serving on local state only",
                value=up,
            )


_M = TypeVar("_M", bound=MetricWrapperBase)


class CachedLabels(Generic[_M]):
    """A labelled metric whose children are found in a plain dict: prometheus_client's
    ``labels()`` validates its arguments and takes a lock on every call (about 2.5 µs here), and
    the router calls it about seven times per request. Label values are bounded (see above), so
    the dict holds no more than the metric's own series."""

    __slots__ = ("_children", "metric")

    def __init__(self, metric: _M) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], _M] = {}

    def labels(self, *values: str) -> _M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child

    def remove(self, *values: str) -> None:
        self._children.pop(values, None)
        self.metric.remove(*values)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # (model, status) pairs seen per endpoint, so that an endpoint's series can be removed
        # when it leaves the fleet: pods come and go, and their series must not pile up.
        self._endpoint_series: dict[str, set[tuple[str, str]]] = {}
        self.requests = CachedLabels(
            Counter(
                "shoal_router_requests",
                "Requests answered, by model, endpoint (empty if none) and HTTP status",
                ["model", "endpoint", "status"],
                registry=r,
            )
        )
        self.ttft = CachedLabels(
            Histogram(
                "shoal_router_ttft_seconds",
                "Time to first token measured at the router (first upstream chunk of a stream)",
                ["model"],
                buckets=_LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.tpot = CachedLabels(
            Histogram(
                "shoal_router_time_per_output_token_seconds",
                "Time per output token after the first, measured at the router (streamed requests "
                "only: a non-streamed response arrives at once)",
                ["model"],
                buckets=_TPOT_BUCKETS,
                registry=r,
            )
        )
        self.e2e = CachedLabels(
            Histogram(
                "shoal_router_e2e_latency_seconds",
                "End-to-end request latency at the router, queueing included",
                ["model"],
                buckets=_LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.queue_wait = CachedLabels(
            Histogram(
                "shoal_router_queue_wait_seconds",
                "Time requests waited in the admission queue",
                ["model"],
                buckets=_LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.decisions = CachedLabels(
            Counter(
                "shoal_router_decisions",
                "Routing decisions by strategy and the scorer that decided them",
                ["strategy", "deciding_scorer"],
                registry=r,
            )
        )
        self.rejections = CachedLabels(
            Counter(
                "shoal_router_rejections",
                "Requests refused by admission (429) or for lack of endpoints (503)",
                ["model", "reason"],
                registry=r,
            )
        )
        self.retries = CachedLabels(
            Counter(
                "shoal_router_retries",
                "Requests retried on another endpoint after failing before their first byte",
                ["model"],
                registry=r,
            )
        )
        self.ejections = CachedLabels(
            Counter(
                "shoal_router_ejections",
                "Endpoints ejected after consecutive failures",
                ["endpoint"],
                registry=r,
            )
        )
        self.tokenizer_fallbacks = CachedLabels(
            Counter(
                "shoal_router_tokenizer_fallbacks",
                "Requests tokenized with the simulator's tokenizer because the model's Hugging "
                "Face tokenizer is not available (tokenizer: hf); kv-aware cannot match a real "
                "engine's KV events for them",
                ["model"],
                registry=r,
            )
        )
        self.prefix_blocks = CachedLabels(
            Counter(
                "shoal_router_prefix_blocks",
                "Prompt blocks at decision time (kind=prompt) and those the chosen endpoint "
                "was estimated to hold (kind=matched); matched/prompt is the estimated hit ratio. "
                "Counted for tokenized prompts: strategies with a prefix or in-flight-tokens "
                "scorer, or all with tokenize_prompts: always",
                ["strategy", "kind"],
                registry=r,
            )
        )
        self.prefix_hit_ratio = CachedLabels(
            Histogram(
                "shoal_router_prefix_hit_ratio",
                "Estimated prefix hit ratio of each decision (matched blocks / prompt blocks), "
                "for tokenized prompts (see shoal_router_prefix_blocks)",
                ["strategy"],
                buckets=_RATIO_BUCKETS,
                registry=r,
            )
        )

        self.hold_outcomes = CachedLabels(
            Counter(
                "shoal_router_hold_outcomes",
                "Requests that waited for a declared name, by how the wait ended "
                "(served, timeout, full, undeclared)",
                ["model", "outcome"],
                registry=r,
            )
        )

    def count_request(self, model: str, endpoint: str, status: str) -> None:
        self.requests.labels(model, endpoint, status).inc()
        if endpoint:
            self._endpoint_series.setdefault(endpoint, set()).add((model, status))

    def forget_endpoint(self, endpoint: str) -> None:
        """Drop every series labelled with an endpoint that left the fleet."""
        for model, status in self._endpoint_series.pop(endpoint, ()):
            self.requests.remove(model, endpoint, status)
        # remove() raises KeyError for a series that never existed
        with contextlib.suppress(KeyError):
            self.ejections.remove(endpoint)

    def watch_state(
        self,
        queue_depths: Callable[[], Mapping[str, int]],
        endpoints: Callable[[], Mapping[str, EndpointView]],
        fallbacks: Callable[[], Mapping[tuple[str, str], int]],
        shared_state_up: Callable[[], float | None],
        held: Callable[[], Mapping[str, int]] = dict,
        api_keys: Callable[[], tuple[int, int] | None] = lambda: None,
    ) -> None:
        self.registry.register(
            _StateCollector(queue_depths, endpoints, fallbacks, shared_state_up, held, api_keys)
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def sample_value(text: str, name: str, labels: Mapping[str, Any] | None = None) -> float | None:
    """The value of one sample in exposition ``text`` (tests and benchmarks read metrics so)."""
    want = {k: str(v) for k, v in (labels or {}).items()}
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        rest = line[len(name) :]
        if rest.startswith("{"):
            close = rest.rfind("}")
            pairs = dict(item.split("=", 1) for item in rest[1:close].split('",') if "=" in item)
            got = {k: v.strip('"') for k, v in pairs.items()}
            value = rest[close + 1 :]
        elif rest.startswith(" "):
            got, value = {}, rest
        else:
            continue
        if all(got.get(k) == v for k, v in want.items()):
            return float(value.split()[0])
    return None
