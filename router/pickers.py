"""Pickers: the last stage of the routing pipeline, choosing one of the filtered candidates.

Randomness comes from an injected ``random.Random`` so tests and the virtual-clock cluster
simulator are reproducible. Every picker is given a non-empty candidate list (the pipeline returns
no decision before calling a picker on nothing).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from shoal.router.types import EndpointState, RoutingRequest

# Two scores closer than this are a tie: float sums of weighted scores are not exact.
TIE_EPSILON = 1e-9


class MaxScorePicker:
    """The highest combined score; ties broken uniformly at random (never by list order, which
    would send every tied request to the same first endpoint)."""

    name = "max-score"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(
        self,
        request: RoutingRequest,
        candidates: Sequence[EndpointState],
        scores: Sequence[float],
    ) -> EndpointState:
        best = max(scores)
        tied = [i for i, s in enumerate(scores) if s >= best - TIE_EPSILON]
        return candidates[tied[0] if len(tied) == 1 else self._rng.choice(tied)]


class RandomPicker:
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(
        self,
        request: RoutingRequest,
        candidates: Sequence[EndpointState],
        scores: Sequence[float],
    ) -> EndpointState:
        return self._rng.choice(candidates)


class RoundRobinPicker:
    """Cycles through the candidates of each base model in URL order.

    Remembers the last URL per model rather than a counter, so an endpoint joining, leaving or
    being filtered out does not skip or repeat the others. Bounded: at most ``max_models`` models
    are remembered (beyond that the cycle restarts for the oldest; harmless).
    """

    name = "round-robin"

    def __init__(self, max_models: int = 4096) -> None:
        self._last: dict[str, str] = {}
        self._max_models = max_models

    def pick(
        self,
        request: RoutingRequest,
        candidates: Sequence[EndpointState],
        scores: Sequence[float],
    ) -> EndpointState:
        last = self._last.get(request.base_model)
        after: EndpointState | None = None  # smallest url greater than last
        first = candidates[0]  # smallest url overall
        for c in candidates:
            url = c.url
            if url < first.url:
                first = c
            if last is not None and url > last and (after is None or url < after.url):
                after = c
        chosen = after if after is not None else first
        if request.base_model not in self._last and len(self._last) >= self._max_models:
            del self._last[next(iter(self._last))]
        self._last[request.base_model] = chosen.url
        return chosen


class PowerOfTwoPicker:
    """Two candidates at random, the less loaded of them (Mitzenmacher's power of two choices):
    nearly the balance of least-load without herding every router replica onto one endpoint.
    Stale metrics count as infinitely loaded."""

    name = "power-of-two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    @staticmethod
    def _load(c: EndpointState) -> float:
        return math.inf if c.stale else c.load

    def pick(
        self,
        request: RoutingRequest,
        candidates: Sequence[EndpointState],
        scores: Sequence[float],
    ) -> EndpointState:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(range(len(candidates)), 2)
        ca, cb = candidates[a], candidates[b]
        return cb if self._load(cb) < self._load(ca) else ca
