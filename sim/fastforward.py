"""Advance an ``EngineCore`` through many pure-decode steps at once, exactly.

Most of a simulated hour is spent in steps where nothing but decoding happens: every running
request samples one token, no request arrives, finishes, is admitted or preempted. Each such step
is fully determined by the step before, so instead of running ``EngineCore.step`` k times (building
the batch, costing it, emitting outputs nobody reads in a virtual-clock run) this module computes
the k steps directly and leaves the core in the state that k calls of ``step`` would have left:

* step durations come from the same ``PerfModel.step_time`` call on the same ``BatchShape`` per
  step (the decode context grows by one token per sequence per step), and step ends are
  accumulated with the same float additions as the driver (``end = start + duration``), so
  timestamps and inter-token latencies are bit-identical;
* sampled tokens use the core's own deterministic token function;
* KV blocks are allocated and full blocks hashed and registered at the steps where the core would
  do it, in the core's order (allocations of a step in running order, then block caching), so the
  free queue, the prefix cache and the KV events come out the same.

The window ends before the first step that would do anything else: a request finishing, a KV
allocation that does not fit (a preemption), or a step starting at or after ``horizon`` (the next
event from outside, such as an arrival that a router might send to this engine). The cluster
simulator then runs that step with ``EngineCore.step``.

This module reads the core's private state (``_running``, ``_waiting``, the sequences' fields);
it is a friend of ``sim.engine`` by design and is tested against plain stepping.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.kv_events import KvEvent
from shoal.sim.engine import _MASK64, EngineCore
from shoal.sim.perf import BatchShape


@dataclass(slots=True)
class FastForward:
    """What a fast-forwarded window did."""

    steps: int
    # Start of the first and end of the last step (the core's next step starts at ``end``).
    start: float
    end: float
    # Sum of the step durations, accumulated step by step as a stepping driver would.
    busy_s: float
    generated_tokens: int
    kv_events: list[KvEvent]


def _decode_window_limit(core: EngineCore) -> int:
    """Steps the running batch can decode before one of its requests finishes; 0 if the core is
    not in a pure-decode state that this module reproduces exactly."""
    running = core._running
    if not running or core._aborted:
        return 0
    cfg = core.config
    # Waiting requests are admitted only while the batch has room (step phase 1b); at
    # max_num_seqs the admission loop does not run at all, so waiting requests change nothing.
    if core._waiting and len(running) < cfg.max_num_seqs:
        return 0
    if len(running) > cfg.max_num_batched_tokens:
        return 0  # not every sequence gets its decode token every step
    bs = cfg.block_size
    caching = core.kv.enable_prefix_caching
    max_len = cfg.max_model_len
    limit = 1 << 62
    for seq in running:
        n_tokens = len(seq.token_ids)
        if (
            seq.num_output < 1
            or seq.num_computed != n_tokens - 1
            or seq.req.lora_name is not None
            or seq.stop_max_len
            or (caching and len(seq.alloc.block_hashes) != seq.num_computed // bs)
        ):
            return 0
        params = seq.req.params
        # The step that samples output number `num_output + j` finishes the request when it
        # reaches max_tokens, max_model_len, or (without ignore_eos) its natural length.
        left = min(params.max_tokens - seq.num_output, max_len - n_tokens)
        if not params.ignore_eos:
            left = min(left, max(params.min_tokens, 1, seq.natural_len) - seq.num_output)
        # Only the steps before the finishing one are pure decode.
        if left - 1 < limit:
            limit = left - 1
    return max(limit, 0)


def fast_forward(
    core: EngineCore, now: float, horizon: float, max_steps: int | None = None
) -> FastForward | None:
    """Run the pure-decode steps of ``core`` that start in ``[now, horizon)``.

    Returns None (and changes nothing) when the next step is not a pure-decode step; the caller
    then runs ``core.step(now)``.
    """
    if now >= horizon:
        return None
    k = _decode_window_limit(core)
    if max_steps is not None:
        k = min(k, max_steps)
    if k < 1:
        return None
    cfg = core.config
    bs = cfg.block_size
    kv = core.kv
    running = core._running
    caching = kv.enable_prefix_caching

    # KV work in the window, in the core's order: (step, phase, running index) with phase 0 the
    # scheduler's allocation and phase 1 the execution's block caching.
    allocs: list[tuple[int, int, int]] = []
    for i, seq in enumerate(running):
        c0 = seq.num_computed
        # Step j computes position c0 + j - 1 and needs a new block when that position starts one.
        j = len(seq.alloc.blocks) * bs - c0 + 1
        while j <= k:
            allocs.append((j, 0, i))
            j += bs
    if allocs:
        allocs.sort()
        free = kv.num_free_blocks
        if len(allocs) > free:
            # The allocation that does not fit preempts in its step: stop before that step.
            k = min(k, allocs[free][0] - 1)
            if k < 1:
                return None

    # Durations, step by step, until the window or the horizon ends.
    perf = core.perf
    clock = core.clock_fraction
    slowdown = core.slowdown
    b = len(running)
    ctx = 0
    for seq in running:
        ctx += seq.num_computed + 1
    ends = [now]
    end = now
    busy = 0.0
    shape = BatchShape()
    steps = 0
    while steps < k and end < horizon:
        shape = BatchShape(decode_seqs=b, decode_context_tokens=ctx)
        d = perf.step_time(shape, clock) * slowdown
        end = end + d
        busy += d
        ends.append(end)
        ctx += b
        steps += 1
    k = steps
    core.last_utilization = perf.compute_utilization(shape, clock)

    # Tokens and inter-token latencies. Every sequence got a token in the previous step, so after
    # the first gap the latencies are the same for all; they share one list's float objects.
    shared_itls = [ends[j + 1] - ends[j] for j in range(1, k)]
    span = core._vocab_span
    for seq in running:
        append = seq.token_ids.append
        # The engine samples token number kk as 4 + _mix64(gen_seed + kk) % span; splitmix64 is
        # inlined here because this runs once per simulated token.
        base = seq.gen_seed + 0x9E3779B97F4A7C15 + seq.num_output
        for x in range(base, base + k):
            x &= _MASK64
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
            append(4 + (x ^ (x >> 31)) % span)
        seq.num_output += k
        seq.itls.append(ends[1] - seq.last_token_time)
        seq.itls.extend(shared_itls)
        seq.last_token_time = end

    # KV allocations and block caching in step order. Caching reads tokens up to the block's end,
    # all sampled before the step that fills it, so extending token_ids first is safe.
    ops = [op for op in allocs if op[0] <= k]
    if caching:
        for i, seq in enumerate(running):
            c0 = seq.num_computed
            j = bs - c0 % bs
            while j <= k:
                ops.append((j, 1, i))
                j += bs
        ops.sort()
    for j, phase, i in ops:
        seq = running[i]
        if phase == 0:
            ok = kv.allocate(seq.alloc, seq.num_computed + j)
            assert ok, "fast-forward allocation cannot fail: the window was cut before it"
        else:
            kv.cache_full_blocks(seq.alloc, seq.token_ids, seq.num_computed + j, seq.req.lora_name)
    for seq in running:
        seq.num_computed += k

    core.stats.generation_tokens += b * k
    core._refresh_stats()
    return FastForward(
        steps=k,
        start=now,
        end=end,
        busy_s=busy,
        generated_tokens=b * k,
        kv_events=kv.drain_events(),
    )
