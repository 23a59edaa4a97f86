"""A clairvoyant reference router for the virtual fleet: each request to its soonest first token.

No real router can run this. It reads what the virtual-clock cluster simulator knows and an HTTP
router never does: when each engine's step in progress ends, the exact work queued in each engine's
scheduler, and each engine's prefix cache at this instant. With that it predicts, for every engine,
when this request's prefill would finish there (the wait for the step in progress, then the
engine's own scheduling under its token budget: running decodes first, the prefills queued ahead,
then this prompt's uncached tokens) and sends it to the engine with the earliest prediction.

It is greedy (each request for itself, ignoring the arrivals still to come), so it is not an
optimum. It is a practical measure of what more routing information could buy on a workload: a
production policy whose TTFT is close to this router's has little left to gain from routing.
"""

from __future__ import annotations

from collections.abc import Sequence

from shoal.hashing import block_hashes
from shoal.sim.cluster import EngineView
from shoal.sim.perf import BatchShape, causal_pairs
from shoal.sim.trace import TraceRequest

# A prefill never needs more steps than this under any real token budget; the bound only guards
# the loop against a zero budget.
_MAX_STEPS = 10_000


def predicted_ttft_s(view: EngineView, now: float, prompt_tokens: int, cached_tokens: int) -> float:
    """Seconds from ``now`` until ``view``'s engine samples the first token of a new prompt.

    Follows the engine's scheduler (``sim.engine``): each step serves running decodes first, then
    prefill chunks in arrival order under ``max_num_batched_tokens``. Decodes that finish and
    prefills that turn into decodes meanwhile are not modelled: the prediction is for the engine
    as it is now.
    """
    backlog = view.backlog()
    budget = view.max_num_batched_tokens
    decode, decode_ctx = backlog.decode_seqs, backlog.decode_context_tokens
    ahead = backlog.prefill_tokens
    # Context the queued prefills had computed before their remaining tokens.
    ahead_done = max(0, backlog.prefill_context_tokens - backlog.prefill_tokens)
    mine, mine_done = prompt_tokens - cached_tokens, cached_tokens
    t = max(now, view.step_ends_s)
    for _ in range(_MAX_STEPS):
        room = max(0, budget - decode)
        take_ahead = min(ahead, room)
        take_mine = min(mine, room - take_ahead)
        shape = BatchShape(
            prefill_tokens=take_ahead + take_mine,
            prefill_attention_pairs=causal_pairs(take_ahead, ahead_done)
            + causal_pairs(take_mine, mine_done),
            prefill_context_tokens=(ahead_done + take_ahead if take_ahead else 0)
            + (mine_done + take_mine if take_mine else 0),
            decode_seqs=decode,
            decode_context_tokens=decode_ctx,
        )
        t += view.perf.step_time(shape)
        ahead -= take_ahead
        ahead_done += take_ahead
        mine -= take_mine
        mine_done += take_mine
        if mine <= 0:
            return t - now
        decode_ctx += decode
    raise RuntimeError(f"prefill of {prompt_tokens} tokens does not fit the engine's token budget")


def cacheable_block_hashes(prompt_ids: Sequence[int], block_size: int) -> list[int]:
    """Hashes of the prompt's blocks that a prefix-cache lookup may hit: vLLM recomputes at least
    the last prompt token, so only whole blocks before it count."""
    cacheable = (len(prompt_ids) - 1) // block_size * block_size
    return block_hashes(prompt_ids[:cacheable], block_size)


def cached_prefix_tokens(view: EngineView, prompt_ids: Sequence[int]) -> int:
    """Prompt tokens the engine's scheduler would find cached now (whole blocks from the start)."""
    size = view.block_size
    return view.cached_blocks(cacheable_block_hashes(prompt_ids, size)) * size


class EarliestFirstToken:
    """Sends each request to the engine predicted to give it its first token soonest.

    A ``PromptRouter`` for ``sim.cluster.ClusterSimulator``. Ties go to the engine with fewer
    unfinished requests, then the lower index.
    """

    def route_prompt(
        self, request: TraceRequest, prompt_ids: Sequence[int], engines: Sequence[EngineView]
    ) -> int:
        now = request.arrival_s
        best, best_key = 0, (float("inf"), 0)
        hashes: dict[int, list[int]] = {}  # by block size: a fleet usually has one
        for view in engines:
            size = view.block_size
            if size not in hashes:
                hashes[size] = cacheable_block_hashes(prompt_ids, size)
            cached = view.cached_blocks(hashes[size]) * size
            key = (predicted_ttft_s(view, now, len(prompt_ids), cached), view.num_unfinished)
            if key < best_key:
                best, best_key = view.index, key
        return best
