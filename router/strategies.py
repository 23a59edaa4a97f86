"""Named routing strategies: presets of the one routing pipeline.

Every preset filters with healthy, model and lora; all but ``random`` and ``round-robin`` also drop
saturated endpoints (not-saturated). Scorers with their default weights, and the picker:

- ``random``: no scorers; random picker.
- ``round-robin``: no scorers; round-robin picker.
- ``least-request``: queue-depth 1; max-score.
- ``least-kv``: kv-cache-usage 1; max-score.
- ``power-of-two``: no scorers; power-of-two picker.
- ``prefix``: approx-prefix 2, queue-depth 1, kv-cache-usage 0.5, lora-affinity 0.5; max-score.
- ``kv-aware``: precise-kv 2, queue-depth 1, kv-cache-usage 0.5, lora-affinity 0.5; max-score.
- ``session``: session-affinity 2, queue-depth 1, lora-affinity 0.5; max-score.

`random` and `round-robin` are deliberately plain (they are the baselines benchmarks compare
against). The affinity weight of 2 against queue-depth 1 means a full prefix hit beats any load
difference, a partial one (under half the prompt) does not; the load bound in the affinity scorers
keeps a hot prefix from piling onto one engine regardless of weights.

Weights are overridable per model (``ModelRouting``) and per call (``build_pipeline(weights=...)``):
an override replaces the preset's weight for that scorer, adds a scorer the preset lacks, or
removes one with weight 0.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType

from shoal.router.filters import HealthyFilter, LoraFilter, ModelFilter, NotSaturatedFilter
from shoal.router.kv_index import KvEventIndex
from shoal.router.pickers import MaxScorePicker, PowerOfTwoPicker, RandomPicker, RoundRobinPicker
from shoal.router.pipeline import DecisionObserver, FallbackRecorder, RoutingPipeline
from shoal.router.prefix_index import ApproxPrefixIndex
from shoal.router.scorers import (
    DEFAULT_LOAD_FACTOR,
    DEFAULT_LOAD_SLACK,
    ApproxPrefixScorer,
    InFlightTokensScorer,
    KvCacheUsageScorer,
    LoraAffinityScorer,
    PreciseKvScorer,
    PrefixHistoryRecorder,
    QueueDepthScorer,
    SessionAffinityScorer,
    SessionTable,
)
from shoal.router.types import Filter, Picker, Scorer

SCORER_NAMES: tuple[str, ...] = (
    "queue-depth",
    "kv-cache-usage",
    "in-flight-tokens",
    "approx-prefix",
    "precise-kv",
    "lora-affinity",
    "session-affinity",
)


# Scorers that read the request's prompt tokens: the prefix scorers its block hashes, and
# in-flight-tokens the token counts of every request in flight (each request's count feeds it).
# A pipeline without them routes without tokenizing the prompt.
TOKEN_READING_SCORERS = frozenset({"approx-prefix", "precise-kv", "in-flight-tokens"})


@dataclass(frozen=True, slots=True)
class _Preset:
    picker: str
    load_aware: bool  # adds NotSaturatedFilter
    weights: Mapping[str, float] = field(default_factory=dict)


_PRESETS: Mapping[str, _Preset] = MappingProxyType(
    {
        "random": _Preset("random", load_aware=False),
        "round-robin": _Preset("round-robin", load_aware=False),
        "least-request": _Preset("max-score", True, {"queue-depth": 1.0}),
        "least-kv": _Preset("max-score", True, {"kv-cache-usage": 1.0}),
        "power-of-two": _Preset("power-of-two", load_aware=True),
        "prefix": _Preset(
            "max-score",
            True,
            {"approx-prefix": 2.0, "queue-depth": 1.0, "kv-cache-usage": 0.5, "lora-affinity": 0.5},
        ),
        "kv-aware": _Preset(
            "max-score",
            True,
            {"precise-kv": 2.0, "queue-depth": 1.0, "kv-cache-usage": 0.5, "lora-affinity": 0.5},
        ),
        "session": _Preset(
            "max-score",
            True,
            {"session-affinity": 2.0, "queue-depth": 1.0, "lora-affinity": 0.5},
        ),
    }
)

STRATEGIES: tuple[str, ...] = tuple(_PRESETS)


def check_strategy(strategy: str) -> None:
    """Raises ValueError naming the valid strategies (for config and header validation)."""
    if strategy not in _PRESETS:
        raise ValueError(f"unknown routing strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")


def preset_weights(strategy: str) -> dict[str, float]:
    check_strategy(strategy)
    return dict(_PRESETS[strategy].weights)


def merged_weights(strategy: str, weights: Mapping[str, float] | None) -> dict[str, float]:
    """The preset's weights with ``weights`` applied (0 removes a scorer)."""
    merged = preset_weights(strategy)
    for name, weight in (weights or {}).items():
        if name not in SCORER_NAMES:
            raise ValueError(f"unknown scorer {name!r}; valid: {', '.join(SCORER_NAMES)}")
        if weight < 0:
            raise ValueError(f"weight of {name} must not be negative: {weight}")
        merged[name] = weight
    return {name: w for name, w in merged.items() if w > 0}


def build_pipeline(
    strategy: str,
    weights: Mapping[str, float] | None = None,
    *,
    approx_index: ApproxPrefixIndex | None = None,
    kv_index: KvEventIndex | None = None,
    sessions: SessionTable | None = None,
    fallbacks: FallbackRecorder | None = None,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
    load_factor: float = DEFAULT_LOAD_FACTOR,
    load_slack: float = DEFAULT_LOAD_SLACK,
    max_waiting: float = 32.0,
) -> RoutingPipeline:
    """The pipeline for ``strategy`` with optional weight overrides.

    Indexes and tables are passed in (shared by all pipelines of a router): ``approx_index`` is
    required by ``approx-prefix``, ``kv_index`` by ``precise-kv``, ``sessions`` by
    ``session-affinity``. When ``approx_index`` is given, every pipeline records its decisions in it
    whatever the strategy, so the history is complete when a request switches to ``prefix``; the
    decisions of a pipeline without a token-reading scorer carry block hashes only when the
    router tokenizes every prompt (``tokenize_prompts: always``).
    """
    check_strategy(strategy)
    preset = _PRESETS[strategy]
    rng = rng or random.Random()
    fallbacks = fallbacks if fallbacks is not None else FallbackRecorder(clock=clock)
    report = fallbacks.hook(strategy)

    def need(thing: object, what: str, scorer: str) -> None:
        if thing is None:
            raise ValueError(f"strategy {strategy!r}: scorer {scorer} needs {what}")

    observers: list[DecisionObserver] = []
    scorers: list[tuple[Scorer, float]] = []
    for name, weight in merged_weights(strategy, weights).items():
        scorer: Scorer
        if name == "queue-depth":
            scorer = QueueDepthScorer()
        elif name == "kv-cache-usage":
            scorer = KvCacheUsageScorer()
        elif name == "in-flight-tokens":
            scorer = InFlightTokensScorer()
        elif name == "approx-prefix":
            need(approx_index, "approx_index", name)
            assert approx_index is not None
            scorer = ApproxPrefixScorer(approx_index, load_factor, load_slack)
        elif name == "precise-kv":
            need(kv_index, "kv_index", name)
            assert kv_index is not None
            scorer = PreciseKvScorer(kv_index, load_factor, load_slack, on_fallback=report)
        elif name == "lora-affinity":
            scorer = LoraAffinityScorer()
        else:  # session-affinity
            need(sessions, "sessions", name)
            assert sessions is not None
            session_scorer = SessionAffinityScorer(
                sessions, load_factor, load_slack, on_fallback=report
            )
            observers.append(session_scorer)
            scorer = session_scorer
        scorers.append((scorer, weight))
    if approx_index is not None:
        observers.append(PrefixHistoryRecorder(approx_index))

    filters: list[Filter] = [HealthyFilter(clock), ModelFilter(), LoraFilter()]
    if preset.load_aware:
        filters.append(NotSaturatedFilter(max_waiting=max_waiting))
    picker: Picker
    if preset.picker == "random":
        picker = RandomPicker(rng)
    elif preset.picker == "round-robin":
        picker = RoundRobinPicker()
    elif preset.picker == "power-of-two":
        picker = PowerOfTwoPicker(rng)
    else:
        picker = MaxScorePicker(rng)
    return RoutingPipeline(
        filters,
        scorers,
        picker,
        strategy,
        observers=observers,
        fallbacks=fallbacks,
        reads_prompt_tokens=any(s.name in TOKEN_READING_SCORERS for s, w in scorers if w > 0),
    )


@dataclass(frozen=True, slots=True)
class ModelRouting:
    """A model's routing configuration: its strategy and weight overrides for that strategy."""

    strategy: str = "prefix"
    weights: Mapping[str, float] = field(default_factory=dict)


class PipelineSet:
    """The pipelines of one router: per model, per strategy, built once and reused.

    Config is validated when the set is built (unknown strategy or scorer, a scorer without its
    index), not at the first request. A per-request strategy override (``x-shoal-strategy``) uses
    that strategy's preset weights: a model's weight overrides belong to its configured strategy.
    The cache holds at most (configured models + 1) × strategies pipelines.
    """

    def __init__(
        self,
        default: ModelRouting,
        per_model: Mapping[str, ModelRouting] | None = None,
        *,
        approx_index: ApproxPrefixIndex | None = None,
        kv_index: KvEventIndex | None = None,
        sessions: SessionTable | None = None,
        fallbacks: FallbackRecorder | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        load_factor: float = DEFAULT_LOAD_FACTOR,
        load_slack: float = DEFAULT_LOAD_SLACK,
        max_waiting: float = 32.0,
    ) -> None:
        self.default = default
        self.per_model = dict(per_model or {})
        self.fallbacks = fallbacks if fallbacks is not None else FallbackRecorder(clock=clock)
        self._build: Callable[[str, Mapping[str, float] | None], RoutingPipeline] = partial(
            build_pipeline,
            approx_index=approx_index,
            kv_index=kv_index,
            sessions=sessions,
            fallbacks=self.fallbacks,
            rng=rng or random.Random(),
            clock=clock,
            load_factor=load_factor,
            load_slack=load_slack,
            max_waiting=max_waiting,
        )
        self._cache: dict[tuple[str | None, str], RoutingPipeline] = {}
        for model, routing in [(None, default), *self.per_model.items()]:
            self._cache[(model, routing.strategy)] = self._build(routing.strategy, routing.weights)

    def for_model(self, base_model: str, strategy: str | None = None) -> RoutingPipeline:
        """The pipeline for a model, optionally under another strategy (validated: ValueError)."""
        key_model = base_model if base_model in self.per_model else None
        routing = self.per_model.get(base_model, self.default)
        chosen = strategy or routing.strategy
        key = (key_model, chosen)
        pipeline = self._cache.get(key)
        if pipeline is None:
            check_strategy(chosen)
            weights = routing.weights if chosen == routing.strategy else None
            pipeline = self._cache[key] = self._build(chosen, weights)
        return pipeline
