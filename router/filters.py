"""Filters: the first stage of the routing pipeline. Each drops endpoints that must not (or should
not) take the request and keeps the input order, so scorers and pickers see a stable list."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from shoal.router.types import EndpointState, RoutingRequest


class HealthyFilter:
    """Drops endpoints marked unhealthy and those ejected after repeated failures (until the
    ejection expires; the proxy's probe then decides whether they come back)."""

    name = "healthy"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock

    def filter(
        self, request: RoutingRequest, candidates: Sequence[EndpointState]
    ) -> list[EndpointState]:
        now = self._clock()
        return [c for c in candidates if c.healthy and c.ejected_until <= now]


class ModelFilter:
    """Keeps endpoints that serve the request's base model.

    An endpoint that declares no models (a static list given without them) is kept: the engine
    answers 404 for a model it does not serve and the proxy retries elsewhere, which beats refusing
    every request to a fleet whose discovery cannot name models.
    """

    name = "model"

    def filter(
        self, request: RoutingRequest, candidates: Sequence[EndpointState]
    ) -> list[EndpointState]:
        base, model = request.base_model, request.model
        return [
            c
            for c in candidates
            if not c.endpoint.models or base in c.endpoint.models or model in c.endpoint.models
        ]


class LoraFilter:
    """For an adapter request, keeps endpoints that have the adapter loaded.

    If none has it the result is empty on purpose: whether to load it somewhere, wait, or answer
    404 is the caller's decision, not a filter's.
    """

    name = "lora"

    def filter(
        self, request: RoutingRequest, candidates: Sequence[EndpointState]
    ) -> list[EndpointState]:
        lora = request.lora
        if lora is None:
            return list(candidates)
        return [c for c in candidates if lora in c.loaded_adapters]


class NotSaturatedFilter:
    """Drops endpoints whose engine queue is longer than ``max_waiting``, whose KV cache is fuller
    than ``max_kv_cache_usage``, or whose metrics are stale (unknown load counts as saturated).

    If that would drop every candidate it returns them all unchanged: when the whole fleet is
    saturated, admission control (the per-model priority queue) decides who waits and who is shed,
    and the scorers still rank the candidates by load. Filtering to empty here would turn overload
    into 503s before admission ever saw it.
    """

    name = "not-saturated"

    def __init__(self, max_waiting: float = 32.0, max_kv_cache_usage: float = 1.0) -> None:
        self.max_waiting = max_waiting
        self.max_kv_cache_usage = max_kv_cache_usage
        self.all_saturated = 0  # times every candidate was saturated and all were passed through

    def is_saturated(self, c: EndpointState) -> bool:
        m = c.metrics
        return (
            c.stale
            or m.num_requests_waiting > self.max_waiting
            or m.kv_cache_usage > self.max_kv_cache_usage
        )

    def filter(
        self, request: RoutingRequest, candidates: Sequence[EndpointState]
    ) -> list[EndpointState]:
        kept = [c for c in candidates if not self.is_saturated(c)]
        if kept or not candidates:
            return kept
        self.all_saturated += 1
        return list(candidates)
