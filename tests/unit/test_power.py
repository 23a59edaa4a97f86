"""The GPU power model: bounds, monotonicity and the cap-to-clock inverse."""

from __future__ import annotations

import itertools

import pytest

from shoal.sim.catalog import GPUS, get_gpu
from shoal.sim.power import GpuPowerModel


@pytest.fixture(params=sorted(GPUS))
def power(request: pytest.FixtureRequest) -> GpuPowerModel:
    return GpuPowerModel(GPUS[request.param])


def test_bounds_are_idle_and_tdp(power: GpuPowerModel) -> None:
    gpu = power.gpu
    assert power.power_watts(0.0) == pytest.approx(gpu.idle_watts)
    assert power.power_watts(1.0) == pytest.approx(gpu.tdp_watts)
    # Out-of-range utilisation is clamped, never extrapolated.
    assert power.power_watts(-0.5) == pytest.approx(gpu.idle_watts)
    assert power.power_watts(1.7) == pytest.approx(gpu.tdp_watts)
    assert power.power_watts(0.0, 0.3) == pytest.approx(gpu.idle_watts)


def test_monotone_in_utilization_and_clock(power: GpuPowerModel) -> None:
    utils = [i / 10 for i in range(11)]
    by_util = [power.power_watts(u, 0.8) for u in utils]
    assert all(a < b for a, b in itertools.pairwise(by_util))
    clocks = [0.2 + i * 0.08 for i in range(11)]
    by_clock = [power.power_watts(0.7, f) for f in clocks]
    assert all(a < b for a, b in itertools.pairwise(by_clock))


def test_clock_lock_cuts_peak_power_by_tens_of_percent() -> None:
    h100 = GpuPowerModel(get_gpu("H100"))
    # POLCA-like behaviour: ~0.75 of max clock removes roughly 20-35% of peak power.
    saving = 1 - h100.power_watts(1.0, 0.75) / h100.power_watts(1.0, 1.0)
    assert 0.2 < saving < 0.35


def test_cap_inverse_is_consistent(power: GpuPowerModel) -> None:
    gpu = power.gpu
    for util in (0.3, 0.6, 1.0):
        for cap in (gpu.idle_watts + 0.3 * (gpu.tdp_watts - gpu.idle_watts), 0.8 * gpu.tdp_watts):
            fraction = power.clock_fraction_for_cap(cap, util)
            assert power.min_clock_fraction <= fraction <= 1.0
            if fraction > power.min_clock_fraction and fraction < 1.0:
                # The highest clock that fits: exactly at the cap.
                assert power.power_watts(util, fraction) == pytest.approx(cap, rel=1e-9)
            elif fraction == 1.0:
                assert power.power_watts(util, 1.0) <= cap


def test_generous_cap_allows_full_clock(power: GpuPowerModel) -> None:
    assert power.clock_fraction_for_cap(power.gpu.tdp_watts, 1.0) == 1.0
    assert power.clock_fraction_for_cap(power.gpu.tdp_watts * 0.5, 0.0) == 1.0


def test_cap_below_idle_gives_min_clock(power: GpuPowerModel) -> None:
    below_idle = power.gpu.idle_watts * 0.5
    assert power.clock_fraction_for_cap(below_idle, 0.8) == pytest.approx(power.min_clock_fraction)
    assert power.clock_fraction_for_cap(below_idle, 0.0) == pytest.approx(power.min_clock_fraction)


def test_tighter_caps_mean_lower_clocks() -> None:
    a100 = GpuPowerModel(get_gpu("A100-80GB"))
    caps = [150.0, 200.0, 250.0, 300.0, 350.0, 400.0]
    fractions = [a100.clock_fraction_for_cap(cap, 0.9) for cap in caps]
    assert fractions == sorted(fractions)
    assert fractions[0] < fractions[-1] == 1.0


def test_sm_clock_mhz() -> None:
    h100 = GpuPowerModel(get_gpu("H100"))
    assert h100.sm_clock_mhz(1.0) == pytest.approx(1980.0)
    assert h100.sm_clock_mhz(0.5) == pytest.approx(990.0)
    assert h100.sm_clock_mhz(0.01) == pytest.approx(210.0)  # never below the lowest lockable
    with pytest.raises(ValueError):
        h100.sm_clock_mhz(1.5)
