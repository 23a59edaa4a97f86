"""Capacity model: the replicas a pool needs to serve a request mix within a latency target.

Built on the simulator's roofline step-time model (``shoal.sim.perf``), the same one the
simulated engines step with, so the sizing and the cluster simulator agree by construction; a
real pool's differences are what the SLO policy's online correction absorbs.

A replica of a continuous-batching engine at arrival rate ``lam`` with mean prompt ``P`` and
output ``O`` tokens settles where each step of ``tau`` seconds carries

* ``B = lam x O x tau`` decoding sequences (Little's law: a request decodes for O steps), and
* ``p = lam x P x tau`` prompt tokens of chunked prefill,

and ``tau`` is the step time of that batch: a fixed point ``tau = f(tau)``. ``f`` is a maximum
of affine functions of ``tau`` (compute-bound or memory-bound), so iterating from the empty step
climbs monotonically to the fixed point when one exists; when the slope reaches 1 the replica
cannot keep up at any step time (the rate exceeds its throughput) and the model says so.

Mean TPOT is ``tau``; mean TTFT is half a step of waiting for the running step plus the step
that carries the request's own prompt. Percentiles are means times tail factors (defaults
below, for p90-p99 of lognormal lengths like the Azure traces), which the SLO policy corrects
with the observed/predicted ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from shoal.sim.catalog import get_gpu, get_model
from shoal.sim.perf import BatchShape, PerfModel

MAX_ITERATIONS = 200
# A step longer than this is not a serving state (the fixed point is running away).
MAX_STEP_S = 5.0
# KV use a replica may plan for; beyond it vLLM preempts and latency collapses.
KV_PLANNING_LIMIT = 0.9
# Share of max_num_seqs a replica may plan to keep busy on average: the batch fluctuates around
# its mean (Poisson arrivals, lognormal lengths), and each excursion over the cap queues requests
# whose TTFT then grows by whole generations. In the simulated Azure-trace runs, TTFT p95 left
# its SLO once the mean batch passed about 80% of the cap, and the roofline underestimates the
# batch near the cap by a quarter or more (the policy corrects online, but from lower loads).
SEQS_PLANNING_LIMIT = 0.6
# Percentile over mean: long prompts and prefill-heavy steps make the tails.
DEFAULT_TTFT_TAIL = 3.0
DEFAULT_TPOT_TAIL = 1.4
MAX_REPLICAS_SEARCHED = 10_000
PROMPT_LOG_SIGMA = 0.985  # sd of ln(prompt tokens), Azure 2023 conversation trace
# Standard normal quantiles at the midpoints of 16 equal-probability bins: the expectation over a
# lognormal prompt length as an average of 16 representative lengths.
_NORMAL_QUANTILES = tuple(NormalDist().inv_cdf((i + 0.5) / 16) for i in range(16))


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """The steady state of one replica at a given load (``feasible`` False: it cannot keep up)."""

    feasible: bool
    step_s: float
    batch: float  # decoding sequences per step
    kv_tokens: float
    ttft_s: float  # mean
    tpot_s: float  # mean


class CapacityModel:
    """Steady-state latency of one replica and the replicas needed for a target."""

    def __init__(
        self,
        model: str,
        gpu: str,
        num_gpus: int = 1,
        *,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        gpu_memory_utilization: float = 0.9,
        ttft_tail: float = DEFAULT_TTFT_TAIL,
        tpot_tail: float = DEFAULT_TPOT_TAIL,
    ) -> None:
        self.perf = PerfModel(get_model(model), get_gpu(gpu), num_gpus)
        self.kv_capacity = self.perf.kv_cache_capacity_tokens(gpu_memory_utilization)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.ttft_tail = ttft_tail
        self.tpot_tail = tpot_tail
        self.max_model_len = 131072

    def _decode_step(self, batch: float, context: float) -> float:
        b = max(1, round(batch))
        shape = BatchShape(decode_seqs=b, decode_context_tokens=round(b * context))
        return self.perf.step_time(shape)

    def _prefill_extra(self, batch: float, context: float, prompt: float) -> float:
        """Mean extra time a step takes when it also computes one whole prompt (prompts come
        whole into a step up to the token budget). Prompt lengths are taken as lognormal with
        the mean given and ``PROMPT_LOG_SIGMA`` (the Azure traces' shape): a step with a long
        prompt is compute-bound, so the mean extra is convex in length and a mean prompt
        would underestimate it."""
        base = self._decode_step(batch, context)
        b = max(1, round(batch))
        mu = math.log(prompt) - PROMPT_LOG_SIGMA**2 / 2
        total = 0.0
        for z in _NORMAL_QUANTILES:
            length = min(math.exp(mu + PROMPT_LOG_SIGMA * z), float(self.max_model_len))
            chunks = max(1, math.ceil(length / self.max_num_batched_tokens))
            per_chunk = length / chunks
            shape = BatchShape(
                prefill_tokens=max(1, round(per_chunk)),
                # Causal attention: each prompt token attends to about half the prompt.
                prefill_attention_pairs=round(per_chunk * (length + 1) / 2),
                prefill_context_tokens=round(length),
                decode_seqs=b,
                decode_context_tokens=round(b * context),
            )
            total += chunks * (self.perf.step_time(shape) - base)
        return total / len(_NORMAL_QUANTILES)

    def replica_load(
        self,
        rate_rps: float,
        prompt_tokens: float,
        output_tokens: float,
        batch_factor: float = 1.0,
    ) -> ReplicaLoad:
        """Steady state of one replica receiving ``rate_rps``.

        In one second the replica runs S decode steps of ``t_dec(B)`` and computes ``lam``
        prompts, each adding ``x`` to its step: S t_dec + lam x = 1, so the mean step is
        tau = t_dec / (1 - lam x), with B = lam O tau: a fixed point in tau.
        """
        lam = max(rate_rps, 0.0)
        prompt = max(prompt_tokens, 1.0)
        output = max(output_tokens, 1.0)
        context = prompt + output / 2
        tau = self._decode_step(1, context)
        feasible = False
        extra = 0.0
        for _ in range(MAX_ITERATIONS):
            batch = lam * output * tau
            extra = self._prefill_extra(batch, context, prompt)
            busy = lam * extra
            if busy >= 1.0:
                tau = math.inf
                break
            nxt = self._decode_step(batch, context) / (1.0 - busy)
            if nxt > MAX_STEP_S:
                tau = nxt
                break
            if abs(nxt - tau) <= 1e-7 + 1e-4 * tau:
                tau, feasible = nxt, True
                break
            tau = nxt
        # batch_factor: observed / modelled sequences in flight (the policy's online correction:
        # the roofline's mean step time underestimates the batch that fills max_num_seqs).
        batch = lam * output * tau * batch_factor
        kv = batch * context
        if (
            batch > SEQS_PLANNING_LIMIT * self.max_num_seqs
            or kv > KV_PLANNING_LIMIT * self.kv_capacity
        ):
            feasible = False
        # TTFT: wait for the running step (half of one on average), then the own prompt's step.
        ttft = tau / 2 + tau + extra
        return ReplicaLoad(feasible, tau, batch, kv, ttft, tau)

    def meets(
        self,
        load: ReplicaLoad,
        ttft_target_s: float | None,
        tpot_target_s: float | None,
        ttft_factor: float = 1.0,
        tpot_factor: float = 1.0,
    ) -> bool:
        """Whether the percentile latencies (mean x tail x correction) are within targets."""
        if not load.feasible:
            return False
        if ttft_target_s is not None and load.ttft_s * self.ttft_tail * ttft_factor > ttft_target_s:
            return False
        tpot = load.tpot_s * self.tpot_tail * tpot_factor
        return not (tpot_target_s is not None and tpot > tpot_target_s)

    def replicas_needed(
        self,
        rate_rps: float,
        prompt_tokens: float,
        output_tokens: float,
        ttft_target_s: float | None,
        tpot_target_s: float | None,
        *,
        ttft_factor: float = 1.0,
        tpot_factor: float = 1.0,
        batch_factor: float = 1.0,
        limit: int = MAX_REPLICAS_SEARCHED,
    ) -> int:
        """The fewest replicas (rate split evenly) whose percentiles meet the targets; 0 for no
        load; ``limit`` when even that many do not (the caller clamps to the pool's maximum)."""
        if rate_rps <= 0:
            return 0
        lo, hi = 1, 1
        # Gallop up to a count that meets the targets, then bisect: latency falls with n.
        while not self._ok(
            rate_rps / hi,
            prompt_tokens,
            output_tokens,
            ttft_target_s,
            tpot_target_s,
            ttft_factor,
            tpot_factor,
            batch_factor,
        ):
            if hi >= limit:
                return limit
            lo, hi = hi + 1, min(hi * 2, limit)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._ok(
                rate_rps / mid,
                prompt_tokens,
                output_tokens,
                ttft_target_s,
                tpot_target_s,
                ttft_factor,
                tpot_factor,
                batch_factor,
            ):
                hi = mid
            else:
                lo = mid + 1
        return hi

    def _ok(
        self,
        rate: float,
        prompt: float,
        output: float,
        ttft: float | None,
        tpot: float | None,
        ttft_factor: float,
        tpot_factor: float,
        batch_factor: float = 1.0,
    ) -> bool:
        return self.meets(
            self.replica_load(rate, prompt, output, batch_factor),
            ttft,
            tpot,
            ttft_factor,
            tpot_factor,
        )
