"""Clock locks and power caps slow compute-bound work, as on a real GPU, and telemetry follows."""

from __future__ import annotations

import pytest

from shoal.sim.driver import AsyncEngine
from shoal.sim.engine import EngineCore, sized_engine_config
from shoal.sim.types import EngineRequest, SamplingParams


def _core() -> EngineCore:
    return EngineCore(sized_engine_config(model="llama-3.1-8b", gpu="H100"))


def _prefill_step(core: EngineCore) -> float:
    core.add_request(
        EngineRequest("p", list(range(8000)), SamplingParams(max_tokens=1, ignore_eos=True))
    )
    duration = core.step(0.0).duration
    while core.has_unfinished():
        core.step(0.0)
    return duration


def _decode_step(core: EngineCore) -> float:
    core.add_request(EngineRequest("d", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True)))
    core.step(0.0)  # prefill
    duration = core.step(0.0).duration  # one decode of one sequence: memory bound
    while core.has_unfinished():
        core.step(0.0)
    return duration


def test_clock_lock_slows_compute_bound_prefill_not_memory_bound_decode() -> None:
    full, locked = _core(), _core()
    engine = AsyncEngine(locked)
    half = locked.config.gpu.max_sm_clock_mhz / 2
    engine.set_gpu_limits(clock_lock_mhz=half, power_cap_watts=None)
    assert locked.clock_fraction == pytest.approx(0.5)
    prefill_ratio = _prefill_step(locked) / _prefill_step(full)
    decode_ratio = _decode_step(locked) / _decode_step(full)
    assert 1.6 < prefill_ratio < 2.1
    assert decode_ratio < 1.15


def test_power_cap_lowers_clock_and_keeps_telemetry_under_cap() -> None:
    core = _core()
    engine = AsyncEngine(core)
    tdp = core.config.gpu.tdp_watts
    _prefill_step(core)  # leave a busy utilization behind, as a running engine has
    core.last_utilization = 1.0
    engine.set_gpu_limits(clock_lock_mhz=None, power_cap_watts=0.6 * tdp)
    assert core.clock_fraction < 1.0
    assert core.power.power_watts(1.0, core.clock_fraction) <= 0.6 * tdp + 1e-6


def test_rejects_clock_outside_the_gpu_range() -> None:
    engine = AsyncEngine(_core())
    with pytest.raises(ValueError, match="clock_lock_mhz"):
        engine.set_gpu_limits(clock_lock_mhz=10_000, power_cap_watts=None)
