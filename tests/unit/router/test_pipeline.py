"""RoutingPipeline: filters then weighted scorers then picker, the deciding scorer, observers,
and the fallback recorder."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import pytest

from shoal.router.filters import HealthyFilter, NotSaturatedFilter
from shoal.router.pickers import MaxScorePicker, RandomPicker
from shoal.router.pipeline import ONLY_CANDIDATE, FallbackRecorder, RoutingPipeline
from shoal.router.types import (
    Endpoint,
    EndpointState,
    EngineMetrics,
    RoutingDecision,
    RoutingRequest,
)


class Fixed:
    """A scorer returning given scores by url."""

    def __init__(self, name: str, by_url: dict[str, float]) -> None:
        self.name = name
        self.by_url = by_url

    def score(self, request: RoutingRequest, candidates: Sequence[EndpointState]) -> list[float]:
        return [self.by_url.get(c.url, 0.0) for c in candidates]


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def observe(self, request: RoutingRequest, decision: RoutingDecision) -> None:
        self.seen.append(decision.endpoint.url)


def state(url: str, healthy: bool = True, waiting: float = 0) -> EndpointState:
    return EndpointState(
        endpoint=Endpoint(url=url),
        metrics=EngineMetrics(num_requests_waiting=waiting),
        stale=False,
        healthy=healthy,
    )


REQ = RoutingRequest(model="m", base_model="m", lora=None, prompt_token_ids=[], block_hashes=[])
CANDS = [state("a"), state("b"), state("c")]


def test_weighted_sum_picks_and_names_the_deciding_scorer() -> None:
    prefix = Fixed("prefix", {"a": 1.0, "b": 0.0, "c": 0.0})
    load = Fixed("load", {"a": 0.0, "b": 1.0, "c": 0.5})
    rec = Recorder()
    p = RoutingPipeline(
        [HealthyFilter()],
        [(prefix, 2.0), (load, 1.0)],
        MaxScorePicker(random.Random(0)),
        "prefix",
        observers=[rec],
    )
    d = p.decide(REQ, CANDS)
    assert d is not None
    assert d.endpoint.url == "a"
    assert d.strategy == "prefix"
    assert d.scores == (2.0, 1.0, 0.5)
    assert d.deciding_scorer == "prefix"
    assert rec.seen == ["a"]
    # Halve the prefix weight: load decides now.
    p2 = RoutingPipeline([], [(prefix, 0.4), (load, 1.0)], MaxScorePicker(random.Random(0)), "x")
    d2 = p2.decide(REQ, CANDS)
    assert d2 is not None and d2.endpoint.url == "b" and d2.deciding_scorer == "load"


def test_no_survivor_gives_none_and_observers_see_nothing() -> None:
    rec = Recorder()
    p = RoutingPipeline([HealthyFilter()], [], RandomPicker(), "random", observers=[rec])
    assert p.decide(REQ, [state("a", healthy=False)]) is None
    assert p.decide(REQ, []) is None
    assert rec.seen == []


def test_only_candidate_and_picker_decided_and_tie() -> None:
    load = Fixed("load", {"a": 0.5, "b": 0.5})
    p = RoutingPipeline([], [(load, 1.0)], MaxScorePicker(random.Random(0)), "least-request")
    d = p.decide(REQ, [state("a")])
    assert d is not None and d.deciding_scorer == ONLY_CANDIDATE
    tie = p.decide(REQ, [state("a"), state("b")])
    assert tie is not None and tie.deciding_scorer == "max-score"
    rnd = RoutingPipeline([], [], RandomPicker(random.Random(0)), "random").decide(REQ, CANDS)
    assert rnd is not None and rnd.deciding_scorer == "random"


def test_filters_run_in_order_before_scoring() -> None:
    load = Fixed("load", {"a": 1.0, "b": 0.1, "c": 0.2})
    p = RoutingPipeline(
        [HealthyFilter(), NotSaturatedFilter(max_waiting=3)],
        [(load, 1.0)],
        MaxScorePicker(random.Random(0)),
        "x",
    )
    cands = [state("a", waiting=10), state("b"), state("c", healthy=False)]
    d = p.decide(REQ, cands)
    assert d is not None and d.endpoint.url == "b"
    assert d.scores == (0.1,)


def test_zero_weight_dropped_negative_rejected_and_bad_scorer_caught() -> None:
    load = Fixed("load", {"a": 1.0})
    p = RoutingPipeline([], [(load, 0.0)], RandomPicker(), "x")
    assert p.weighted_scorers == ()
    with pytest.raises(ValueError):
        RoutingPipeline([], [(load, -1.0)], RandomPicker(), "x")

    class Broken:
        name = "broken"

        def score(
            self, request: RoutingRequest, candidates: Sequence[EndpointState]
        ) -> list[float]:
            return [1.0]

    with pytest.raises(ValueError, match="broken"):
        RoutingPipeline([], [(Broken(), 1.0)], RandomPicker(), "x").decide(REQ, CANDS)


def test_fallback_recorder_counts_always_and_logs_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    rec = FallbackRecorder(log_interval_s=60, clock=lambda: now[0])
    hook = rec.hook("kv-aware")
    with caplog.at_level(logging.WARNING, logger="shoal.router.pipeline"):
        for _ in range(5):
            hook("no_kv_events")
        rec.record("session", "no_session_id")
        now[0] = 61.0
        hook("no_kv_events")
    assert rec.counts[("kv-aware", "no_kv_events")] == 6
    assert rec.counts[("session", "no_session_id")] == 1
    logged = [r.getMessage() for r in caplog.records]
    assert sum("kv-aware" in m for m in logged) == 2
    assert sum("session" in m for m in logged) == 1
