"""The autoscaling cluster simulator: start-up delay, draining, held requests, oracle, metrics."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.autoscaler.policy import Decision, Observation, PoolSpec
from shoal.sim.amplify import amplify_workload
from shoal.sim.attainment import RequestLatency, SloTarget, attainment
from shoal.sim.autoscaled import AutoscaledSimulator, FleetConfig, default_startup_s
from shoal.sim.cluster import EngineSpec
from shoal.sim.trace import TraceRequest, synthetic_workload

SLO = SloTarget(1.0, 0.06, 95.0)
SMALL = EngineSpec(model="tiny", gpu="H100")


class Scripted:
    """A policy that returns a fixed schedule: replicas from time t on."""

    name = "scripted"

    def __init__(self, schedule: list[tuple[float, int]]) -> None:
        self.schedule = schedule
        self.seen: list[Observation] = []

    def decide(self, spec: PoolSpec, obs: Observation) -> Decision:
        self.seen.append(obs)
        n = [r for t, r in self.schedule if obs.time_s >= t][-1]
        return Decision(n, "scripted")

    def export_state(self) -> dict[str, Any]:
        return {}

    def import_state(self, state: dict[str, Any]) -> None:
        pass


def _workload(rate: float = 4.0, duration: float = 240.0) -> list[TraceRequest]:
    return list(
        synthetic_workload(rate, duration, seed=3, max_prompt_tokens=2048, max_output_tokens=128)
    )


def test_default_startup_grows_with_model_size() -> None:
    small = default_startup_s(SMALL)
    big = default_startup_s(
        EngineSpec(model="meta-llama/Llama-3.1-70B-Instruct", gpu="H100", num_gpus=4)
    )
    assert 60 < small < big
    assert big > 240  # minutes for a 70B model


def test_new_replicas_serve_only_after_the_startup_delay() -> None:
    policy = Scripted([(0, 1), (30, 3)])
    cfg = FleetConfig(engine=SMALL, initial_replicas=1, startup_s=60.0, tick_s=15.0)
    rep = AutoscaledSimulator(cfg, policy, SLO).run(_workload())
    ready = {round(p.time_s): p.ready for p in rep.timeline}
    assert ready[75] == 1  # scaled at 30 s, ready at 90 s
    assert ready[90] == 3
    assert rep.replicas_added == 2
    assert rep.finished == rep.requests


def test_draining_loses_no_request_and_releases_the_gpu() -> None:
    policy = Scripted([(0, 3), (60, 1)])
    cfg = FleetConfig(engine=SMALL, initial_replicas=3, startup_s=30.0)
    work = _workload(rate=20.0, duration=120.0)
    rep = AutoscaledSimulator(cfg, policy, SLO).run(work)
    assert rep.finished == rep.requests == len(work)
    assert rep.replicas_removed == 2
    # Two replicas left shortly after 60 s, not at the end of the run.
    assert rep.gpu_hours < 3 * rep.simulated_s / 3600 * 0.8


def test_requests_wait_at_the_router_with_no_replica_and_count_toward_ttft() -> None:
    policy = Scripted([(0, 1)])
    cfg = FleetConfig(engine=SMALL, initial_replicas=0, startup_s=50.0, tick_s=10.0)
    work = _workload(rate=2.0, duration=120.0)
    rep = AutoscaledSimulator(cfg, policy, SLO).run(work)
    assert rep.held_requests > 0
    assert rep.finished == len(work)
    # The first request arrived near 0 and waited for the replica ready at 60 s (tick 10 + 50).
    assert rep.ttft.max > 45.0
    assert policy.seen[0].router_held > 0


def test_attainment_per_request_and_per_window() -> None:
    lat = [RequestLatency(t, 0.5, 0.03) for t in range(0, 60)]  # window 0: all good
    lat += [RequestLatency(60 + t, 2.0 if t < 10 else 0.5, 0.03) for t in range(0, 60)]
    a = attainment(lat, SLO, unfinished_arrivals=[130.0])
    assert a.requests == 121 and a.unfinished == 1
    assert a.ttft_ok == pytest.approx(110 / 121)
    assert a.tpot_ok == pytest.approx(120 / 121)
    # Window 1 has a p95 TTFT of 2 s (10 of 60 are slow); window 2 has an unfinished request.
    assert a.windows == 3 and a.windows_ok == pytest.approx(1 / 3)
    assert a.missed_window_starts == (60.0, 120.0)


def test_amplify_multiplies_the_rate_and_keeps_the_span() -> None:
    base = [TraceRequest(float(t), 100, 10) for t in range(0, 600, 2)]
    out = amplify_workload(base, 4)
    assert len(out) == 4 * len(base)
    assert [r.arrival_s for r in out] == sorted(r.arrival_s for r in out)
    assert max(r.arrival_s for r in out) <= base[-1].arrival_s
    first_minute = sum(r.arrival_s < 60 for r in out)
    assert first_minute == pytest.approx(4 * 30, abs=8)


def test_warmup_is_replayed_but_not_scored() -> None:
    # A fleet of 1 that grows to 3 at 30 s: scoring from 120 s on leaves out the early
    # requests, the GPU time before 120 s and the scale-up that happened in the warm-up.
    work = _workload(rate=4.0, duration=240.0)
    cfg = FleetConfig(engine=SMALL, initial_replicas=1, startup_s=30.0, tick_s=15.0)
    full = AutoscaledSimulator(cfg, Scripted([(0, 1), (30, 3)]), SLO).run(work)
    warm = AutoscaledSimulator(cfg, Scripted([(0, 1), (30, 3)]), SLO, warmup_s=120.0).run(work)
    assert warm.finished == full.finished == len(work)  # everything still runs
    late = sum(r.arrival_s >= 120.0 for r in work)
    assert warm.attainment.requests == late < full.attainment.requests
    # Three replicas from 120 s to the end are all that is billed.
    assert warm.gpu_hours == pytest.approx(3 * (warm.simulated_s - 120.0) / 3600, rel=1e-6)
    assert full.replicas_added == 2 and warm.replicas_added == 0 and warm.scale_events == 0
    with pytest.raises(ValueError):
        AutoscaledSimulator(cfg, None, SLO, warmup_s=-1.0)
