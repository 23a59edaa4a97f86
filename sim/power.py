"""GPU board power as a function of utilisation and SM clock, and the clock a power cap allows.

The model splits board power into three parts:

* ``idle_watts``: what the card draws with the driver loaded and nothing running (fans, HBM
  refresh, leakage at idle voltage);
* an SM part of the dynamic power, which follows the SM clock: dynamic CMOS power is
  ``C * V^2 * f`` and, inside the DVFS range, voltage rises roughly with frequency, so it scales as
  ``f^k`` with ``k`` between 2 (voltage floor reached) and 3 (voltage proportional to frequency);
  we use ``k = 2.5``;
* a memory/uncore part of the dynamic power (HBM traffic, NVLink, L2), which an SM clock lock
  does not touch.

Both dynamic parts scale with utilisation (the power-weighted busy share of a step that
:meth:`shoal.sim.perf.PerfModel.compute_utilization` reports), so utilisation 1 at full clock is
TDP. POLCA (Patel et al., "POLCA: Power Oversubscription in LLM Cloud Providers", 2023) measured
on A100/H100 inference servers that locking SM clocks cuts peak power by tens of percent while
memory-bound token generation barely slows, the behaviour this split reproduces: lowering the
clock to ~0.75 of max removes ~30% of the peak.
"""

from __future__ import annotations

import math

from shoal.sim.catalog import GpuSpec

# Exponent of the SM clock in the SM share of dynamic power (between 2 and 3, see above).
CLOCK_POWER_EXPONENT = 2.5
# Share of dynamic power that follows the SM clock; the rest is memory and uncore. Compute-bound
# GEMMs spend most of their energy in the SMs (tensor cores, register files, L1).
SM_POWER_SHARE = 0.7


class GpuPowerModel:
    """Board power of one GPU under a given utilisation and SM clock lock."""

    def __init__(self, gpu: GpuSpec) -> None:
        if not 0.0 <= gpu.idle_watts < gpu.tdp_watts:
            raise ValueError(f"{gpu.name}: need 0 <= idle_watts < tdp_watts")
        self.gpu = gpu
        self._dynamic = gpu.tdp_watts - gpu.idle_watts
        self.min_clock_fraction = gpu.min_sm_clock_mhz / gpu.max_sm_clock_mhz

    def _check_clock(self, clock_fraction: float) -> None:
        if not 0.0 < clock_fraction <= 1.0:
            raise ValueError(f"clock_fraction must be in (0, 1], got {clock_fraction}")

    def power_watts(self, utilization: float, clock_fraction: float = 1.0) -> float:
        """Watts at ``utilization`` (clamped to [0, 1]) with the SM clock at ``clock_fraction``
        of its maximum: ``idle_watts`` when idle, ``tdp_watts`` fully busy at full clock."""
        self._check_clock(clock_fraction)
        u = min(1.0, max(0.0, utilization))
        clock_scale = SM_POWER_SHARE * math.pow(clock_fraction, CLOCK_POWER_EXPONENT) + (
            1.0 - SM_POWER_SHARE
        )
        return self.gpu.idle_watts + self._dynamic * u * clock_scale

    def clock_fraction_for_cap(self, cap_watts: float, utilization: float) -> float:
        """The highest clock fraction (never below the GPU's minimum) whose power at
        ``utilization`` fits under ``cap_watts``; the minimum when even that does not fit."""
        u = min(1.0, max(0.0, utilization))
        if self.power_watts(u, 1.0) <= cap_watts:
            return 1.0
        if u == 0.0:  # Idle power does not depend on the clock: nothing to gain by lowering it.
            return self.min_clock_fraction
        # Invert power_watts for the SM clock term.
        sm_term = ((cap_watts - self.gpu.idle_watts) / (self._dynamic * u) - 1.0) / SM_POWER_SHARE
        sm_term += 1.0
        if sm_term <= 0.0:
            return self.min_clock_fraction
        fraction = math.pow(sm_term, 1.0 / CLOCK_POWER_EXPONENT)
        return min(1.0, max(self.min_clock_fraction, fraction))

    def sm_clock_mhz(self, clock_fraction: float) -> float:
        """The SM clock in MHz that ``clock_fraction`` of the maximum boost clock means, never
        below the lowest lockable clock."""
        self._check_clock(clock_fraction)
        return max(self.gpu.min_sm_clock_mhz, clock_fraction * self.gpu.max_sm_clock_mhz)
