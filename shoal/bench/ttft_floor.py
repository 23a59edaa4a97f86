"""The lowest TTFT any router could give a shared-prefix request stream: a floor for targets.

A router decides only where a request goes. Whatever it decides, the request's first token comes
after the engine computes the prompt tokens that engine does not hold yet, in at least one step.
The floor gives every request the best case a router could arrange:

- the first request of each prefix group finds its prefix nowhere in the fleet (fresh engines), so
  it computes its whole prompt;
- every later request finds its group's whole shared prefix cached on the engine it is sent to;
- each prefill runs alone in its step: no queue, no decoding sequences beside it, no step in
  progress to wait for, no HTTP or router time.

Step times come from the simulator's performance model (``PerfModel.step_time``), the same one
the engines under test run, so a measured TTFT can only be above its request's floor. A target
below the floor's percentile cannot be met by any routing policy on that request stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shoal.bench.report import percentile
from shoal.bench.workloads import BenchRequest
from shoal.sim.perf import BatchShape, PerfModel, causal_pairs


def prefill_alone_s(perf: PerfModel, cached_tokens: int, new_tokens: int) -> float:
    """Seconds of one step that prefills ``new_tokens`` on ``cached_tokens`` and nothing else."""
    if new_tokens <= 0:
        raise ValueError(f"a prefill computes at least one token, got {new_tokens}")
    shape = BatchShape(
        prefill_tokens=new_tokens,
        prefill_attention_pairs=causal_pairs(new_tokens, cached_tokens),
        prefill_context_tokens=cached_tokens + new_tokens,
    )
    return perf.step_time(shape)


@dataclass(frozen=True, slots=True)
class TtftFloor:
    """Per-request TTFT floors of one request stream, in seconds, and what they are made of."""

    floors_s: list[float]
    cold_requests: int  # first visits of their group: the whole prompt is computed
    cold_s: float  # the floor of a cold request (the longest prompt's, if lengths differ)
    warm_s: float  # the floor of a warm one (the longest suffix's)

    def percentile_s(self, q: float) -> float:
        """The same interpolated percentile (``q`` in [0, 100]) the bench's latency tables use."""
        return percentile(self.floors_s, q)


def shared_prefix_floor(
    requests: Sequence[BenchRequest], perf: PerfModel, prefix_tokens: int
) -> TtftFloor:
    """Floors for a stream from ``workloads.shared_prefix`` (requests carry their ``group``)."""
    seen: set[int] = set()
    floors: list[float] = []
    cold_s = warm_s = 0.0
    cold = 0
    for req in sorted(requests, key=lambda r: r.arrival_s):
        if req.group is None:
            raise ValueError("shared_prefix_floor needs requests that name their prefix group")
        if req.group in seen:
            floor = prefill_alone_s(perf, prefix_tokens, req.prompt_tokens - prefix_tokens)
            warm_s = max(warm_s, floor)
        else:
            seen.add(req.group)
            cold += 1
            floor = prefill_alone_s(perf, 0, req.prompt_tokens)
            cold_s = max(cold_s, floor)
        floors.append(floor)
    return TtftFloor(floors_s=floors, cold_requests=cold, cold_s=cold_s, warm_s=warm_s)
