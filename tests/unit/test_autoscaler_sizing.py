"""Capacity model (replicas for a rate at a latency target) and the Holt forecaster."""

from __future__ import annotations

import pytest

from shoal.autoscaler.forecast import HoltForecaster
from shoal.autoscaler.sizing import CapacityModel

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(scope="module")
def cap() -> CapacityModel:
    return CapacityModel(MODEL, "H100")


def test_latency_grows_with_load_and_overload_is_infeasible(cap: CapacityModel) -> None:
    loads = [cap.replica_load(r, 1155, 211) for r in (1, 10, 20)]
    assert all(load.feasible for load in loads)
    steps = [load.step_s for load in loads]
    assert steps == sorted(steps) and steps[2] > steps[0] * 1.5
    # An idle replica decodes at the weight-streaming floor: 16 GB at ~1.9 TB/s is ~8 ms.
    assert 0.006 < loads[0].step_s < 0.012
    assert not cap.replica_load(200, 1155, 211).feasible


def test_replicas_needed_is_monotone_in_rate_and_meets_the_target(cap: CapacityModel) -> None:
    counts = [cap.replicas_needed(r, 1155, 211, 1.0, 0.06) for r in (0, 5, 40, 80, 160)]
    assert counts[0] == 0
    assert counts == sorted(counts)
    assert counts[-1] >= 2 * counts[2]
    n = counts[3]
    assert cap.meets(cap.replica_load(80 / n, 1155, 211), 1.0, 0.06)
    assert not cap.meets(cap.replica_load(80 / (n - 1), 1155, 211), 1.0, 0.06)


def test_correction_factor_raises_the_count(cap: CapacityModel) -> None:
    base = cap.replicas_needed(60, 1155, 211, 1.0, 0.06)
    corrected = cap.replicas_needed(60, 1155, 211, 1.0, 0.06, tpot_factor=2.0)
    assert corrected > base


def test_limit_is_returned_when_nothing_meets_the_target(cap: CapacityModel) -> None:
    # A TPOT below the weight-streaming floor cannot be met by any count.
    assert cap.replicas_needed(10, 1155, 211, None, 0.001, limit=64) == 64


def test_holt_follows_a_linear_ramp_and_forecasts_it() -> None:
    f = HoltForecaster(alpha=0.5, beta=0.3)
    for i in range(100):
        f.update(i * 15.0, 10.0 + 0.1 * i * 15.0)  # +0.1 req/s per second
    assert f.trend == pytest.approx(0.1, rel=0.05)
    now = 99 * 15.0
    assert f.forecast(120.0) == pytest.approx(10.0 + 0.1 * (now + 120.0), rel=0.02)


def test_damped_trend_extrapolates_a_ramp_for_a_bounded_horizon() -> None:
    plain = HoltForecaster(alpha=0.5, beta=0.3)
    damped = HoltForecaster(alpha=0.5, beta=0.3, damping=0.8)
    for i in range(100):
        for f in (plain, damped):
            f.update(i * 15.0, 10.0 + 0.1 * i * 15.0)
    level = damped.level
    assert level is not None
    # phi + phi^2 + ... + phi^8 at phi 0.8: 3.33 reference intervals (50 s) of trend, not 120 s.
    expected = level + damped.trend * 15.0 * (0.8 * (1 - 0.8**8) / 0.2)
    assert damped.forecast(120.0) == pytest.approx(expected, rel=1e-9)
    assert level < damped.forecast(120.0) < plain.forecast(120.0)  # type: ignore[operator]
    # However far ahead, a damped trend adds at most phi / (1 - phi) reference intervals of it.
    assert damped.forecast(1e6) == pytest.approx(level + damped.trend * 15.0 * 4.0, rel=1e-6)
    with pytest.raises(ValueError):
        HoltForecaster(damping=0.0)


def test_holt_never_forecasts_below_zero_and_round_trips() -> None:
    f = HoltForecaster()
    for i, x in enumerate([50.0, 40.0, 30.0, 20.0, 10.0, 0.0]):
        f.update(i * 15.0, x)
    assert f.forecast(3600.0) == 0.0
    g = HoltForecaster()
    g.import_state(f.export_state())
    assert g.forecast(30.0) == f.forecast(30.0)
    with pytest.raises(ValueError):
        f.update(100.0, float("nan"))
