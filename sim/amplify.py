"""Raise a trace's request rate without squeezing its time axis.

``sim.trace`` can replay a trace faster (``rate_scale``), which also compresses its shape: an
hour of diurnal rise and fall becomes minutes, shorter than a replica's start-up, and no
autoscaler could follow it. For autoscaling benchmarks the rate is raised by overlaying
``copies`` copies of the trace instead, copy ``j`` shifted by ``j x spread_s / copies``
seconds and wrapped around the trace's span (what a shift pushes past the last arrival comes
back at the start, so the first minute is not a ramp from one copy to all): the rate is
``copies`` times the original at every moment (averaged over ``spread_s``), the
minute-to-minute shape stays, and the copies' arrivals interleave instead of coinciding.
"""

from __future__ import annotations

from collections.abc import Sequence

from shoal.sim.trace import TraceRequest

DEFAULT_SPREAD_S = 60.0


def amplify_workload(
    requests: Sequence[TraceRequest], copies: int, spread_s: float = DEFAULT_SPREAD_S
) -> list[TraceRequest]:
    """``copies`` shifted copies of ``requests`` (in arrival order), merged in arrival order."""
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    if spread_s < 0:
        raise ValueError(f"spread_s must be >= 0, got {spread_s}")
    if copies == 1:
        return list(requests)
    span = requests[-1].arrival_s if requests else 0.0
    out: list[TraceRequest] = []
    for j in range(copies):
        shift = j * spread_s / copies
        for r in requests:
            t = r.arrival_s + shift
            if t > span:
                t = (t - span) % span if span > 0 else 0.0
            out.append(
                TraceRequest(t, r.prompt_tokens, r.output_tokens, r.prefix_group, r.prefix_tokens)
            )
    # Stable: equal times keep copy order, so the result is a pure function of the inputs.
    out.sort(key=lambda r: r.arrival_s)
    return out
