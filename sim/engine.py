"""The simulated engine core: vLLM v1-style scheduling over a paged, prefix-cached KV cache.

``EngineCore.step(now)`` is one engine iteration:

1. **Schedule** under a token budget (``max_num_batched_tokens``) and ``max_num_seqs``: running
   requests first (a decode needs one token, an unfinished prefill its next chunk), then waiting
   requests in order, each after a prefix-cache lookup. When KV blocks run out, the most recently
   admitted running request is preempted by recompute (its blocks are freed; it re-queues at the
   front and recomputes, with prefix-cache hits, when readmitted). A batch mixes at most
   ``max_loras`` adapters.
2. **Cost** the batch with the roofline performance model (``sim.perf``), slowed by a clock lock or
   power cap and by an injected slow-down, plus adapter load time.
3. **Advance**: computed tokens fill blocks (hashed and registered, emitting KV events); every
   request whose whole sequence is now computed samples one token; finished requests free blocks.

The core never reads a clock. ``now`` is the step's start on whatever clock the driver keeps, and
outputs are stamped ``now + duration``.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shoal.hashing import block_hashes
from shoal.sim.catalog import GpuSpec, ModelSpec, get_gpu, get_model
from shoal.sim.kv_cache import KvAllocation, KvCacheManager
from shoal.sim.lora import LoraManager, default_path_check
from shoal.sim.perf import BatchShape, PerfModel, causal_pairs
from shoal.sim.power import GpuPowerModel
from shoal.sim.tokenizer import EOS, SimTokenizer
from shoal.sim.types import (
    EngineRequest,
    EngineStats,
    FinishedRequestStats,
    FinishReason,
    RequestOutput,
    StepResult,
)

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finalizer: a cheap, well-spread deterministic hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass(slots=True)
class EngineConfig:
    model_name: str
    model: ModelSpec
    gpu: GpuSpec
    num_gpus: int
    max_model_len: int
    block_size: int
    num_gpu_blocks: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_lora: bool = False
    max_loras: int = 1
    max_cpu_loras: int | None = None
    max_lora_rank: int = 16
    enable_prefix_caching: bool = True
    seed: int = 0
    # Which LoRA paths count as loadable (default: the path exists, as for vLLM).
    lora_path_check: Callable[[str], bool] = default_path_check
    # Mean length of an answer that ends by EOS (requests without ignore_eos); generated lengths
    # are exponentially distributed around it, deterministic per prompt.
    mean_output_tokens: int = 256


@dataclass(frozen=True, slots=True)
class Backlog:
    """What an engine has yet to compute for the requests it holds (see ``EngineCore.backlog``)."""

    decode_seqs: int  # running requests whose next step samples one token
    decode_context_tokens: int  # their context lengths, summed
    prefill_tokens: int  # prompt tokens not computed yet (running chunks, then waiting requests)
    prefill_context_tokens: int  # the whole prompts of those requests, summed


class _Seq:
    """A request inside the engine."""

    __slots__ = (
        "alloc",
        "first_scheduled",
        "first_token_time",
        "gen_seed",
        "itls",
        "last_token_time",
        "natural_len",
        "num_cached_tokens",
        "num_computed",
        "num_output",
        "num_preemptions",
        "num_prompt",
        "prefix_counted",
        "released",
        "req",
        "stop_max_len",
        "text",
        "token_ids",
    )

    def __init__(self, req: EngineRequest, gen_seed: int, natural_len: int) -> None:
        self.req = req
        self.token_ids: list[int] = list(req.prompt_token_ids)
        self.num_prompt = len(req.prompt_token_ids)
        self.num_computed = 0
        self.num_output = 0
        self.alloc = KvAllocation()
        self.num_cached_tokens = -1  # unknown until first scheduled
        self.prefix_counted = False
        self.first_scheduled = -1.0
        self.first_token_time = -1.0
        self.last_token_time = -1.0
        self.itls: list[float] = []
        self.num_preemptions = 0
        self.gen_seed = gen_seed
        self.natural_len = natural_len
        # Stop strings: full output text and how much of it was released to the client.
        self.text = ""
        self.released = 0
        self.stop_max_len = max((len(s) for s in req.params.stop), default=0)


class EngineCore:
    def __init__(self, config: EngineConfig, tokenizer: SimTokenizer | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer or SimTokenizer(config.model.vocab_size)
        self.perf = PerfModel(config.model, config.gpu, config.num_gpus)
        self.power = GpuPowerModel(config.gpu)
        self.lora = LoraManager(
            max_loras=config.max_loras,
            max_cpu_loras=config.max_cpu_loras,
            max_lora_rank=config.max_lora_rank,
            path_check=config.lora_path_check,
        )
        self.kv = KvCacheManager(
            config.num_gpu_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
            lora_ids=self.lora.ids,
        )
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._seqs: dict[str, _Seq] = {}
        self._aborted: list[_Seq] = []
        self.stats = EngineStats()
        # GPU limits and faults, set through the admin API.
        self.clock_fraction = 1.0
        self.slowdown = 1.0
        self.last_utilization = 0.0
        self._vocab_span = self.tokenizer.vocab_size - 4

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, req: EngineRequest) -> None:
        if req.request_id in self._seqs:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        n = len(req.prompt_token_ids)
        if n == 0:
            raise ValueError("prompt must contain at least one token")
        if n >= self.config.max_model_len:
            raise ValueError(
                f"prompt of {n} tokens leaves no room under max_model_len "
                f"{self.config.max_model_len}"
            )
        if req.lora_name is not None and self.lora.get(req.lora_name) is None:
            raise ValueError(f"unknown LoRA adapter {req.lora_name!r}")
        ids = req.prompt_token_ids
        seed = zlib.crc32(array("I", ids[-256:]).tobytes(), n)
        seed = _mix64(seed ^ (self.config.seed << 32) ^ (req.params.seed << 48))
        if req.lora_name is not None:
            seed = _mix64(seed ^ zlib.crc32(req.lora_name.encode()))
        # Exponential answer length, deterministic per prompt: -mean * ln(u), u in (0, 1].
        u = ((_mix64(seed ^ 0xA5A5) >> 11) + 1) / float(1 << 53)
        natural = max(1, int(-self.config.mean_output_tokens * math.log(u)))
        seq = _Seq(req, seed, natural)
        self._seqs[req.request_id] = seq
        self._waiting.append(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is None:
            return
        if seq in self._running:
            self._running.remove(seq)
        else:
            with contextlib.suppress(ValueError):
                self._waiting.remove(seq)
        self.kv.free(seq.alloc)
        self._aborted.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting or self._aborted)

    def num_unfinished(self) -> int:
        return len(self._running) + len(self._waiting)

    def backlog(self) -> Backlog:
        """The work the scheduler holds for its next steps, for routers that predict latency."""
        decode_seqs = decode_ctx = prefill = prefill_ctx = 0
        for seq in self._running:
            remaining = len(seq.token_ids) - seq.num_computed
            if remaining == 1 and seq.num_computed >= seq.num_prompt:
                decode_seqs += 1
                decode_ctx += seq.num_computed + 1
            else:
                prefill += remaining
                prefill_ctx += len(seq.token_ids)
        for seq in self._waiting:
            # Prefix-cache hits of a waiting request are looked up when it is scheduled, so its
            # whole uncomputed prompt counts: an upper bound.
            prefill += len(seq.token_ids) - seq.num_computed
            prefill_ctx += len(seq.token_ids)
        return Backlog(decode_seqs, decode_ctx, prefill, prefill_ctx)

    # ---- the step --------------------------------------------------------------------------
    def step(self, now: float) -> StepResult:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        scheduled: list[tuple[_Seq, int]] = []
        step_loras: set[str] = set()
        preempted = False
        running = self._running
        kv = self.kv

        # 1a. Running requests: decodes and unfinished prefills.
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            num_new = min(len(seq.token_ids) - seq.num_computed, budget)
            while not kv.allocate(seq.alloc, seq.num_computed + num_new):
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    num_new = 0
                    break
            if num_new == 0:
                break
            scheduled.append((seq, num_new))
            budget -= num_new
            if seq.req.lora_name is not None:
                step_loras.add(seq.req.lora_name)
            i += 1

        # 1b. Waiting requests, unless this step already had to preempt (no room).
        skipped: list[_Seq] = []
        waiting = self._waiting
        while not preempted and waiting and budget > 0 and len(running) < cfg.max_num_seqs:
            seq = waiting[0]
            lora = seq.req.lora_name
            if lora is not None and lora not in step_loras and len(step_loras) >= cfg.max_loras:
                skipped.append(waiting.popleft())
                continue
            hit_ids: list[int] = []
            hashes: list[int] = []
            if seq.num_computed == 0 and kv.enable_prefix_caching:
                # vLLM recomputes at least the last token, so a full hit stops one block short.
                cacheable = (len(seq.token_ids) - 1) // cfg.block_size * cfg.block_size
                hashes = block_hashes(seq.token_ids[:cacheable], cfg.block_size, lora)
                hit_ids = kv.find_cached_prefix(hashes)
            num_cached = len(hit_ids) * cfg.block_size
            num_new = min(len(seq.token_ids) - num_cached, budget)
            kv.take_cached(seq.alloc, hit_ids, hashes)
            if not kv.allocate(seq.alloc, num_cached + num_new):
                kv.free(seq.alloc)
                break
            waiting.popleft()
            seq.num_computed = num_cached
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = num_cached
                seq.first_scheduled = now
            if not seq.prefix_counted:
                seq.prefix_counted = True
                self.stats.prefix_cache_queries += seq.num_prompt
                self.stats.prefix_cache_hits += num_cached
                self.stats.prompt_tokens_cached += num_cached
            running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new
            if lora is not None:
                step_loras.add(lora)
        for seq in reversed(skipped):
            waiting.appendleft(seq)

        return self._execute(now, scheduled, step_loras)

    def _preempt(self, seq: _Seq) -> None:
        self.kv.free(seq.alloc)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.stats.num_preemptions += 1
        self._waiting.appendleft(seq)

    def _execute(
        self, now: float, scheduled: list[tuple[_Seq, int]], step_loras: set[str]
    ) -> StepResult:
        outputs: list[RequestOutput] = []
        finished: list[FinishedRequestStats] = []
        for seq in self._aborted:
            outputs.append(self._final_output(seq, "", FinishReason.ABORT, None, []))
            finished.append(self._finish_stats(seq, FinishReason.ABORT, now))
        self._aborted.clear()

        if not scheduled:
            self._refresh_stats()
            self.last_utilization = 0.0
            return StepResult(0.0, outputs, finished, self.kv.drain_events())

        prefill_tokens = pairs = prefill_ctx = decode_seqs = decode_ctx = 0
        for seq, num_new in scheduled:
            if num_new == 1 and seq.num_computed >= seq.num_prompt:
                decode_seqs += 1
                decode_ctx += seq.num_computed + 1
            else:
                prefill_tokens += num_new
                pairs += causal_pairs(num_new, seq.num_computed)
                prefill_ctx += seq.num_computed + num_new
        shape = BatchShape(
            prefill_tokens=prefill_tokens,
            prefill_attention_pairs=pairs,
            prefill_context_tokens=prefill_ctx,
            decode_seqs=decode_seqs,
            decode_context_tokens=decode_ctx,
            num_loras=len(step_loras),
        )
        duration = self.perf.step_time(shape, self.clock_fraction) * self.slowdown
        for name in step_loras:
            source = self.lora.activate(name)
            if source is not None:
                adapter = self.lora.get(name)
                rank = adapter.rank if adapter is not None else 8
                duration += self.perf.lora_load_seconds(rank, from_cpu=source == "cpu")
        self.last_utilization = self.perf.compute_utilization(shape, self.clock_fraction)
        end = now + duration

        tokenizer = self.tokenizer
        still_running: list[_Seq] = []
        done: set[int] = set()
        for seq, num_new in scheduled:
            seq.num_computed += num_new
            self.kv.cache_full_blocks(seq.alloc, seq.token_ids, seq.num_computed, seq.req.lora_name)
            if seq.num_computed < len(seq.token_ids):
                continue  # prefill chunk: no token sampled yet
            params = seq.req.params
            k = seq.num_output
            if (
                not params.ignore_eos
                and k + 1 >= max(params.min_tokens, 1)
                and (k + 1 >= seq.natural_len)
            ):
                tid = EOS
            else:
                tid = 4 + _mix64(seq.gen_seed + k) % self._vocab_span
            seq.token_ids.append(tid)
            seq.num_output += 1
            self.stats.generation_tokens += 1
            if seq.first_token_time < 0:
                seq.first_token_time = end
                self.stats.prompt_tokens += seq.num_prompt
            else:
                seq.itls.append(end - seq.last_token_time)
            seq.last_token_time = end

            reason: FinishReason | None = None
            stop_reason: str | None = None
            piece = "" if tid == EOS else tokenizer.piece(tid)
            if tid == EOS:
                reason = FinishReason.STOP
            elif seq.num_output >= params.max_tokens or len(seq.token_ids) >= (
                self.config.max_model_len
            ):
                reason = FinishReason.LENGTH
            new_text = piece
            if seq.stop_max_len:
                new_text, hit = self._apply_stop(seq, piece, reason is not None)
                if hit is not None:
                    reason, stop_reason = FinishReason.STOP, hit
            if reason is None:
                outputs.append(
                    RequestOutput(
                        seq.req.request_id,
                        [tid],
                        new_text,
                        num_prompt_tokens=seq.num_prompt,
                        num_cached_tokens=seq.num_cached_tokens,
                        num_output_tokens=seq.num_output,
                    )
                )
            else:
                outputs.append(self._final_output(seq, new_text, reason, stop_reason, [tid]))
                finished.append(self._finish_stats(seq, reason, end))
                self.kv.free(seq.alloc)
                done.add(id(seq))
        if done:
            for seq in self._running:
                if id(seq) not in done:
                    still_running.append(seq)
            self._running[:] = still_running
        self._refresh_stats()
        return StepResult(
            duration,
            outputs,
            finished,
            self.kv.drain_events(),
            num_scheduled_tokens=prefill_tokens + decode_seqs,
            num_prefill_tokens=prefill_tokens,
            num_decode_tokens=decode_seqs,
        )

    def _apply_stop(self, seq: _Seq, piece: str, finishing: bool) -> tuple[str, str | None]:
        """Append ``piece``; cut at a stop string; release text that cannot start one."""
        start = max(0, len(seq.text) - seq.stop_max_len + 1)
        seq.text += piece
        for stop in seq.req.params.stop:
            idx = seq.text.find(stop, start)
            if idx >= 0:
                seq.text = seq.text[:idx]
                out = seq.text[seq.released :]
                seq.released = len(seq.text)
                return out, stop
        # Hold back the tail that may be the beginning of a stop string, as vLLM does.
        limit = len(seq.text) if finishing else max(0, len(seq.text) - seq.stop_max_len + 1)
        if limit <= seq.released:
            return "", None
        out = seq.text[seq.released : limit]
        seq.released = limit
        return out, None

    def _final_output(
        self,
        seq: _Seq,
        text: str,
        reason: FinishReason,
        stop_reason: str | None,
        new_ids: list[int],
    ) -> RequestOutput:
        self._seqs.pop(seq.req.request_id, None)
        return RequestOutput(
            seq.req.request_id,
            new_ids,
            text,
            finished=True,
            finish_reason=reason,
            stop_reason=stop_reason,
            num_prompt_tokens=seq.num_prompt,
            num_cached_tokens=max(seq.num_cached_tokens, 0),
            num_output_tokens=seq.num_output,
        )

    def _finish_stats(self, seq: _Seq, reason: FinishReason, end: float) -> FinishedRequestStats:
        scheduled = seq.first_scheduled if seq.first_scheduled >= 0 else end
        first = seq.first_token_time if seq.first_token_time >= 0 else end
        return FinishedRequestStats(
            request_id=seq.req.request_id,
            finish_reason=reason,
            lora_name=seq.req.lora_name,
            num_prompt_tokens=seq.num_prompt,
            num_generation_tokens=seq.num_output,
            num_cached_tokens=max(seq.num_cached_tokens, 0),
            max_tokens=seq.req.params.max_tokens,
            arrival_time=seq.req.arrival_time,
            queued_time=scheduled,
            first_token_time=first,
            finish_time=end,
            num_preemptions=seq.num_preemptions,
            inter_token_latencies=seq.itls,
        )

    def _refresh_stats(self) -> None:
        st = self.stats
        st.num_running = len(self._running)
        st.num_waiting = len(self._waiting)
        st.kv_cache_usage = self.kv.usage
        if self.lora.ids:
            # vLLM 0.32 lists an adapter under both running and waiting while it has any request
            # in the engine (golden recording 082); a control plane reading the gauge sees that.
            tracked = tuple(
                sorted(
                    {s.req.lora_name for s in self._running if s.req.lora_name}
                    | {s.req.lora_name for s in self._waiting if s.req.lora_name}
                )
            )
            st.running_loras = st.waiting_loras = tracked

    # ---- GPU ---------------------------------------------------------------------------------
    def gpu_power_watts(self) -> float:
        return self.power.power_watts(self.last_utilization, self.clock_fraction)


def kv_blocks_for(
    model: ModelSpec, gpu: GpuSpec, num_gpus: int, block_size: int, gpu_memory_utilization: float
) -> int:
    """Number of KV blocks that fit, as vLLM sizes its cache from free GPU memory."""
    perf = PerfModel(model, gpu, num_gpus)
    return perf.kv_cache_capacity_tokens(gpu_memory_utilization) // block_size


def sized_engine_config(
    *,
    model: str,
    gpu: str,
    num_gpus: int = 1,
    block_size: int = 16,
    gpu_memory_utilization: float = 0.9,
    num_gpu_blocks: int | None = None,
    max_model_len: int | None = None,
    served_model_name: str | None = None,
    **limits: Any,
) -> EngineConfig:
    """An ``EngineConfig`` for a model on some GPUs, with the KV cache sized from their memory.

    Resolves catalog names (``KeyError`` for unknown ones, ``ValueError`` when the model does not
    fit) and caps ``max_model_len`` at what the KV cache can hold, so one request always fits.
    ``limits`` are the remaining ``EngineConfig`` fields (``max_num_seqs``, LoRA limits, ...).
    """
    model_spec = get_model(model)
    gpu_spec = get_gpu(gpu)
    blocks = num_gpu_blocks or kv_blocks_for(
        model_spec, gpu_spec, num_gpus, block_size, gpu_memory_utilization
    )
    max_len = min(max_model_len or model_spec.max_model_len, blocks * block_size)
    return EngineConfig(
        model_name=served_model_name or model_spec.name,
        model=model_spec,
        gpu=gpu_spec,
        num_gpus=num_gpus,
        max_model_len=max_len,
        block_size=block_size,
        num_gpu_blocks=blocks,
        **limits,
    )
