"""The real-time driver: runs an ``EngineCore`` on the wall clock inside an asyncio server.

One task loops: step the core, sleep until the step's simulated duration (divided by the time
scale) has passed, then hand each request its new tokens. Outputs for a request that its consumer
has not picked up yet are merged into one delta, as vLLM's ``RequestOutputCollector`` does, so a
slow client (or a busy event loop) gets fewer, larger chunks instead of an ever-growing backlog.

The simulated clock is ``start + wall elapsed × time_scale``. When the process cannot keep up (the
step's Python work plus serving the streams takes longer than the modelled step), steps end late;
``drift`` records by how much, which the real-time benchmark reports.

vLLM (V1) runs its engine core in a process of its own, beside the API server. When the API
server's event loop is blocked for a moment (rendering ``/metrics``, a slow client), outputs reach
clients late, but the GPU's next step starts on time. This driver keeps that timeline: each step
starts where the previous one ended on the modelled clock, not when this loop got round to it, so
a short stall delays delivery without pushing back every later step. Up to ``CATCH_UP_LIMIT_S``
behind the wall clock: beyond that the process itself cannot keep up, and the timeline restarts
from now (the lost time shows in ``drift``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from shoal.sim.engine import EngineConfig, EngineCore
from shoal.sim.tokenizer import SimTokenizer
from shoal.sim.types import (
    EngineRequest,
    EngineStats,
    FinishedRequestStats,
    RequestOutput,
    StepResult,
)

log = logging.getLogger(__name__)

# How far (wall seconds) a step may start in the past to catch up after the event loop was blocked.
# Big enough for a /metrics render or a garbage collection (a few ms), small enough that an
# overloaded process shows up as drift rather than as a backlog of steps replayed at once.
CATCH_UP_LIMIT_S = 0.05


def _merge(into: RequestOutput, new: RequestOutput) -> None:
    into.new_token_ids.extend(new.new_token_ids)
    into.new_text += new.new_text
    into.finished = new.finished
    into.finish_reason = new.finish_reason
    into.stop_reason = new.stop_reason
    into.num_output_tokens = new.num_output_tokens
    into.num_cached_tokens = new.num_cached_tokens


class _RequestStream:
    """A one-slot mailbox that merges deltas the consumer has not taken yet."""

    __slots__ = ("pending", "waiter")

    def __init__(self) -> None:
        self.pending: RequestOutput | None = None
        self.waiter: asyncio.Future[None] | None = None

    def put(self, out: RequestOutput) -> None:
        if self.pending is None:
            self.pending = out
        else:
            _merge(self.pending, out)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> RequestOutput:
        while self.pending is None:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None
        out, self.pending = self.pending, None
        return out


@dataclass(slots=True)
class DriftStats:
    """How far real step times ran past the modelled ones (wall seconds)."""

    steps: int = 0
    modelled_s: float = 0.0
    actual_s: float = 0.0
    late_steps: int = 0
    max_late_s: float = 0.0

    @property
    def relative(self) -> float:
        return (self.actual_s - self.modelled_s) / self.modelled_s if self.modelled_s else 0.0


class AsyncEngine:
    def __init__(self, core: EngineCore, *, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.core = core
        self.config: EngineConfig = core.config
        self.tokenizer: SimTokenizer = core.tokenizer
        self.time_scale = time_scale
        self.on_step: Callable[[StepResult], None] | None = None
        self.on_finished: Callable[[FinishedRequestStats], None] | None = None
        self.drift = DriftStats()
        self._streams: dict[str, _RequestStream] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._wall0 = time.monotonic()
        self._sim0 = time.time()
        self._stall_s = 0.0
        self._clock_lock_mhz: float | None = None
        self._power_cap_w: float | None = None

    # ---- clock ------------------------------------------------------------------------------
    def now(self) -> float:
        """Simulated unix time."""
        return self._sim_time(time.monotonic())

    def _sim_time(self, wall: float) -> float:
        """Simulated unix time at monotonic wall time ``wall``."""
        return self._sim0 + (wall - self._wall0) * self.time_scale

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="shoal-sim-engine")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ---- requests ---------------------------------------------------------------------------
    async def generate(self, req: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Submit ``req`` and yield its deltas; closing the iterator early aborts it."""
        if req.arrival_time == 0.0:
            req.arrival_time = self.now()
        stream = _RequestStream()
        self.core.add_request(req)  # ValueError for a request the engine cannot take
        self._streams[req.request_id] = stream
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await stream.get()
                finished = out.finished
                yield out
        finally:
            self._streams.pop(req.request_id, None)
            if not finished:
                self.core.abort_request(req.request_id)
                self._wake.set()

    def abort(self, request_id: str) -> None:
        self.core.abort_request(request_id)
        self._wake.set()

    # ---- LoRA, cache, faults, GPU -----------------------------------------------------------
    def add_lora(self, name: str, path: str) -> None:
        self.core.lora.add(name, path)

    def remove_lora(self, name: str) -> None:
        self.core.lora.remove(name)

    def loras(self) -> dict[str, str]:
        return {a.name: a.path for a in self.core.lora.adapters()}

    def reset_prefix_cache(self) -> bool:
        return self.core.kv.reset_prefix_cache()

    def stats(self) -> EngineStats:
        return self.core.stats

    def set_faults(
        self, *, stall_seconds: float | None = None, slowdown: float | None = None
    ) -> None:
        if stall_seconds is not None:
            self._stall_s = max(0.0, stall_seconds)
            self._wake.set()
        if slowdown is not None:
            if slowdown <= 0:
                raise ValueError(f"slowdown must be > 0, got {slowdown}")
            self.core.slowdown = slowdown

    def set_gpu_limits(
        self, *, clock_lock_mhz: float | None, power_cap_watts: float | None
    ) -> None:
        gpu = self.config.gpu
        if clock_lock_mhz is not None and not (
            gpu.min_sm_clock_mhz <= clock_lock_mhz <= gpu.max_sm_clock_mhz
        ):
            raise ValueError(
                f"clock_lock_mhz must be within [{gpu.min_sm_clock_mhz}, {gpu.max_sm_clock_mhz}] "
                f"for {gpu.name}, got {clock_lock_mhz}"
            )
        if power_cap_watts is not None and power_cap_watts <= 0:
            raise ValueError(f"power_cap_watts must be > 0, got {power_cap_watts}")
        self._clock_lock_mhz = clock_lock_mhz
        self._power_cap_w = power_cap_watts
        self._apply_gpu_limits()

    def gpu_limits(self) -> dict[str, float | None]:
        return {"clock_lock_mhz": self._clock_lock_mhz, "power_cap_watts": self._power_cap_w}

    def _apply_gpu_limits(self) -> None:
        core = self.core
        fraction = 1.0
        if self._clock_lock_mhz is not None:
            fraction = self._clock_lock_mhz / self.config.gpu.max_sm_clock_mhz
        if self._power_cap_w is not None:
            # The cap binds at the load the GPU actually runs; a busy GPU needs lower clocks.
            util = max(core.last_utilization, 0.05)
            fraction = min(fraction, core.power.clock_fraction_for_cap(self._power_cap_w, util))
        core.clock_fraction = fraction

    def gpu_telemetry(self) -> list[tuple[float, float, float]]:
        """Per GPU: (power W, SM clock MHz, utilization %); tensor-parallel GPUs run in lockstep."""
        core = self.core
        util = core.last_utilization if core.has_unfinished() else 0.0
        power = core.power.power_watts(util, core.clock_fraction)
        clock = core.power.sm_clock_mhz(core.clock_fraction)
        return [(power, clock, util * 100.0)] * self.config.num_gpus

    # ---- the loop ---------------------------------------------------------------------------
    async def _run(self) -> None:
        core = self.core
        drift = self.drift
        clock = time.monotonic
        # Wall time at which the previous step ended on the modelled timeline; None when idle.
        previous_end: float | None = None
        # Wall time the previous step's outputs were handed out (drift is measured from there).
        previous_delivery = 0.0
        while True:
            if self._stall_s > 0:
                stall, self._stall_s = self._stall_s, 0.0
                log.warning("engine stalled for %.2fs by the admin API", stall)
                await asyncio.sleep(stall)
                previous_end = None  # a stalled GPU loses the time: no catching up
            if not core.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                previous_end = None
                continue
            if self._power_cap_w is not None:
                self._apply_gpu_limits()
            start = clock()
            # Busy since the previous delivery when steps follow each other, else since now.
            busy_since = previous_delivery if previous_end is not None else start
            if previous_end is not None and start - previous_end <= CATCH_UP_LIMIT_S:
                start = previous_end  # the engine core kept stepping while this loop was busy
            try:
                result = core.step(self._sim_time(start))
            except Exception:  # never let one bad step kill the server
                log.exception("engine step failed; aborting all requests")
                for rid in list(self._streams):
                    core.abort_request(rid)
                previous_end = None
                continue
            target = start + result.duration / self.time_scale
            previous_end = target
            delay = target - clock()
            # Always yield once so streams are served even when steps are very short.
            await asyncio.sleep(delay if delay > 0 else 0)
            delivered = clock()
            if result.duration > 0:
                # Wall time since the previous delivery (or since work arrived): summed over a
                # busy stretch it is the wall time the stretch took, so drift is how far the
                # modelled timeline fell behind the wall clock, whatever caught up in between.
                actual = delivered - busy_since
                modelled = result.duration / self.time_scale
                drift.steps += 1
                drift.modelled_s += modelled
                drift.actual_s += actual
                late = actual - modelled
                if late > 0.001:
                    drift.late_steps += 1
                drift.max_late_s = max(drift.max_late_s, late)
            previous_delivery = delivered
            streams = self._streams
            for out in result.outputs:
                stream = streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)
            if self.on_step is not None:
                self.on_step(result)
            if self.on_finished is not None:
                for fin in result.finished:
                    self.on_finished(fin)
