"""The routing pipeline: filters, then weighted scorers, then a picker.

Every strategy is an instance of this one class (``router/strategies.py`` builds the presets), so
there is one code path to test, measure and explain. A decision also names the scorer that
*decided* it (the one whose weighted contribution most separated the winner from the runner-up),
which the metrics export as ``shoal_router_decisions_total{strategy, deciding_scorer}``: that is
how an operator sees whether ``prefix`` is routing by prefix or, under load, by queue depth.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

from shoal.router.types import (
    EndpointState,
    Filter,
    Picker,
    RoutingDecision,
    RoutingRequest,
    Scorer,
)

log = logging.getLogger(__name__)

# deciding_scorer when filtering left exactly one candidate: nothing was scored against anything.
ONLY_CANDIDATE = "only-candidate"


class DecisionObserver(Protocol):
    """Sees every decision (records prefix history, pins sessions). Must not await or raise."""

    name: str

    def observe(self, request: RoutingRequest, decision: RoutingDecision) -> None: ...


class FallbackRecorder:
    """Counts the times a strategy could not use its main signal, and logs each (strategy,
    reason) at most once per ``log_interval_s``.

    The product rule is no silent fallbacks: ``counts`` is what the metrics layer exports as
    ``shoal_router_strategy_fallbacks_total{strategy, reason}``. One recorder may be shared by all
    pipelines; the set of (strategy, reason) pairs is small and fixed, so the maps stay bounded.
    """

    def __init__(
        self,
        log_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self._last_logged: dict[tuple[str, str], float] = {}
        self._interval = log_interval_s
        self._clock = clock
        self._log = logger

    def record(self, strategy: str, reason: str) -> None:
        key = (strategy, reason)
        self.counts[key] += 1
        now = self._clock()
        last = self._last_logged.get(key)
        if last is None or now - last >= self._interval:
            self._last_logged[key] = now
            self._log.warning(
                "routing strategy %r fell back (%s); %d times so far",
                strategy,
                reason,
                self.counts[key],
            )

    def hook(self, strategy: str) -> Callable[[str], None]:
        """A per-strategy callback for scorers: ``hook("kv-aware")("no_kv_events")``."""

        def report(reason: str) -> None:
            self.record(strategy, reason)

        return report


class RoutingPipeline:
    """Filters -> Σ weight × score -> picker. ``decide`` is synchronous and allocation-light:
    a few list passes over the candidates (tens to a hundred) per scorer."""

    def __init__(
        self,
        filters: Sequence[Filter],
        weighted_scorers: Sequence[tuple[Scorer, float]],
        picker: Picker,
        name: str,
        *,
        observers: Sequence[DecisionObserver] = (),
        fallbacks: FallbackRecorder | None = None,
        reads_prompt_tokens: bool = True,
    ) -> None:
        for scorer, weight in weighted_scorers:
            if weight < 0:
                raise ValueError(f"weight of {scorer.name} must not be negative: {weight}")
        self.filters = tuple(filters)
        self.weighted_scorers = tuple((s, w) for s, w in weighted_scorers if w > 0)
        self.picker = picker
        self.name = name
        self.observers = tuple(observers)
        self.fallbacks = fallbacks if fallbacks is not None else FallbackRecorder()
        # Whether routing reads the request's prompt tokens (its block hashes or its token
        # count): the gateway tokenizes a prompt only for pipelines that do.
        self.reads_prompt_tokens = reads_prompt_tokens

    def decide(
        self, request: RoutingRequest, candidates: Sequence[EndpointState]
    ) -> RoutingDecision | None:
        """The endpoint for ``request``, or None when no candidate survives the filters."""
        kept: Sequence[EndpointState] = candidates
        for f in self.filters:
            kept = f.filter(request, kept)
            if not kept:
                return None
        n = len(kept)
        per_scorer: list[list[float]] = []
        combined = [0.0] * n
        for scorer, weight in self.weighted_scorers:
            scores = scorer.score(request, kept)
            if len(scores) != n:
                raise ValueError(f"scorer {scorer.name} returned {len(scores)} scores for {n}")
            per_scorer.append(scores)
            for i in range(n):
                combined[i] += weight * scores[i]
        chosen = self.picker.pick(request, kept, combined)
        decision = RoutingDecision(
            endpoint=chosen,
            strategy=self.name,
            deciding_scorer=self._deciding(kept, chosen, combined, per_scorer),
            scores=tuple(combined),
        )
        for observer in self.observers:
            observer.observe(request, decision)
        return decision

    def _deciding(
        self,
        kept: Sequence[EndpointState],
        chosen: EndpointState,
        combined: list[float],
        per_scorer: list[list[float]],
    ) -> str:
        if len(kept) == 1:
            return ONLY_CANDIDATE
        if not per_scorer:
            return self.picker.name  # random, round-robin, power-of-two: the picker decided
        winner = next(i for i, c in enumerate(kept) if c is chosen)
        runner_up = max((i for i in range(len(kept)) if i != winner), key=combined.__getitem__)
        best_name = self.picker.name  # a tie on every scorer: the picker's tie-break decided
        best_gap = 0.0
        for (scorer, weight), scores in zip(self.weighted_scorers, per_scorer, strict=True):
            gap = weight * (scores[winner] - scores[runner_up])
            if gap > best_gap:
                best_gap, best_name = gap, scorer.name
        return best_name
