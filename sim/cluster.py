"""The virtual-clock cluster simulator: a fleet of engine cores on one discrete-event loop.

Hours of traffic in seconds: requests from a workload (``sim.trace``) arrive at their trace times,
a router picks an engine for each, and every engine steps back to back while it has work, each
step taking the duration the performance model gives it. Nothing sleeps; the clock jumps from
event to event.

Events live in a heap of ``(time, kind, seq, engine)``. At equal times arrivals (kind 0) go before
steps (kind 1), so a request that arrives exactly when a step starts is in that step, and ``seq``
breaks the remaining ties in insertion order: the same inputs always give the same run.

An engine's step at ``t`` runs ``EngineCore.step(t)`` and schedules its next step at
``t + duration``; an engine without work sleeps until a request is routed to it. Between
arrivals and finishes, most steps only decode; ``sim.fastforward`` advances those in one go, with
the same results as stepping (``fast_forward=False`` turns it off, which the tests compare).

The router is any callable ``(request, engine views) -> engine index``: ``round_robin`` and
``least_loaded`` live here. A router that reads prompts (prefix affinity) implements
``PromptRouter`` and gets each request's token ids too; one that also implements ``KvEventSink``
receives every engine's KV events as steps end, as a router subscribed to vLLM's KV events would.
Both are how Shoal's production routing pipeline runs here (``shoal.bench.virtual_routing``).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from shoal.kv_events import KvEvent
from shoal.sim.engine import Backlog, EngineConfig, EngineCore, sized_engine_config
from shoal.sim.fastforward import fast_forward
from shoal.sim.perf import PerfModel
from shoal.sim.trace import PromptFactory, TraceRequest
from shoal.sim.types import EngineRequest, FinishedRequestStats, SamplingParams

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
DEFAULT_GPU = "H100"


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """One simulated engine replica, sized the way vLLM sizes itself on that GPU."""

    model: str = DEFAULT_MODEL
    gpu: str = DEFAULT_GPU
    num_gpus: int = 1
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # None: the model's context length, capped at what the KV cache holds (vLLM refuses to start
    # when one sequence cannot fit; the simulator caps instead so that any model/GPU pair runs).
    max_model_len: int | None = None
    enable_prefix_caching: bool = True

    def engine_config(self, seed: int = 0) -> EngineConfig:
        return sized_engine_config(
            model=self.model,
            gpu=self.gpu,
            num_gpus=self.num_gpus,
            block_size=self.block_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_prefix_caching=self.enable_prefix_caching,
            seed=seed,
        )

    def build(self, seed: int = 0) -> EngineCore:
        return EngineCore(self.engine_config(seed))


class EngineView:
    """What a router may look at: a live, read-only view of one engine at the current event."""

    __slots__ = ("_core", "gpu", "index", "model", "num_gpus", "step_ends_s")

    def __init__(self, index: int, core: EngineCore) -> None:
        self.index = index
        self._core = core
        self.model = core.config.model_name
        self.gpu = core.config.gpu.name
        self.num_gpus = core.config.num_gpus
        # When the step in progress ends; at or before the current time the engine is between
        # steps or idle, so a new request starts at once. ClusterSimulator keeps it current;
        # sim.autoscaled, which builds its views per arrival, leaves it at 0.
        self.step_ends_s = 0.0

    @property
    def perf(self) -> PerfModel:
        return self._core.perf

    @property
    def max_num_batched_tokens(self) -> int:
        return self._core.config.max_num_batched_tokens

    @property
    def block_size(self) -> int:
        return self._core.config.block_size

    def cached_blocks(self, block_hashes: list[int]) -> int:
        """How many of these chained block hashes, from the first, the prefix cache holds now."""
        return len(self._core.kv.find_cached_prefix(block_hashes))

    def backlog(self) -> Backlog:
        return self._core.backlog()

    @property
    def num_running(self) -> int:
        return len(self._core._running)

    @property
    def num_waiting(self) -> int:
        return len(self._core._waiting)

    @property
    def num_unfinished(self) -> int:
        return self._core.num_unfinished()

    @property
    def kv_cache_usage(self) -> float:
        return self._core.kv.usage


Router = Callable[[TraceRequest, Sequence[EngineView]], int]


@runtime_checkable
class PromptRouter(Protocol):
    """A router that reads the prompt: ``route_prompt`` is called instead of ``__call__``."""

    def route_prompt(
        self, request: TraceRequest, prompt_ids: Sequence[int], engines: Sequence[EngineView]
    ) -> int: ...


@runtime_checkable
class KvEventSink(Protocol):
    """Receives each engine's KV events at the end of the step that produced them."""

    def on_kv_events(self, engine: int, at_s: float, events: list[KvEvent]) -> None: ...


class RoundRobin:
    """Engines in turn, regardless of load."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def __call__(self, request: TraceRequest, engines: Sequence[EngineView]) -> int:
        i = self._next % len(engines)
        self._next = i + 1
        return i


def round_robin() -> Router:
    return RoundRobin()


def least_loaded(request: TraceRequest, engines: Sequence[EngineView]) -> int:
    """The engine with the fewest unfinished requests; the lowest index on ties."""
    best = 0
    best_load = engines[0].num_unfinished
    for view in engines[1:]:
        load = view.num_unfinished
        if load < best_load:
            best, best_load = view.index, load
    return best


ROUTERS: dict[str, Callable[[], Router]] = {
    "round-robin": round_robin,
    "least-loaded": lambda: least_loaded,
}


@dataclass(frozen=True, slots=True)
class Distribution:
    """Summary of a latency sample in seconds (all zero for an empty sample)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Distribution:
        if not values:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        s = sorted(values)
        return cls(
            len(s),
            math.fsum(s) / len(s),
            _quantile(s, 0.5),
            _quantile(s, 0.9),
            _quantile(s, 0.99),
            s[-1],
        )


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(slots=True)
class EngineReport:
    index: int
    model: str
    gpu: str
    num_gpus: int
    requests: int
    finished: int
    steps: int
    fast_forward_steps: int
    busy_s: float
    utilization: float  # busy share of the simulated span
    preemptions: int
    kv_usage_peak: float
    prefix_cache_hit_rate: float
    output_tokens: int


@dataclass(slots=True)
class SimulationReport:
    requests: int
    finished: int
    unfinished: int
    # Requests whose prompt or output had to be cut to the engine's max_model_len.
    truncated: int
    prompt_tokens: int
    output_tokens: int
    simulated_s: float
    wall_s: float
    steps: int
    fast_forward_steps: int
    output_throughput_tok_s: float
    request_throughput_rps: float
    ttft: Distribution
    tpot: Distribution
    e2e: Distribution
    queue: Distribution
    preemptions: int
    kv_usage_peak: float
    prefix_cache_hit_rate: float
    engines: list[EngineReport]
    # Per-request stats in finishing order; left out of to_dict().
    finished_requests: list[FinishedRequestStats] = field(default_factory=list, repr=False)

    @property
    def speedup(self) -> float:
        """Simulated seconds per wall second."""
        return self.simulated_s / self.wall_s if self.wall_s > 0 else math.inf

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.wall_s if self.wall_s > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["finished_requests"]
        d["speedup"] = self.speedup
        d["steps_per_s"] = self.steps_per_s
        return d

    def format(self) -> str:
        """A human-readable report."""

        def ms(dist: Distribution) -> str:
            return (
                f"mean {dist.mean * 1e3:8.1f}  p50 {dist.p50 * 1e3:8.1f}  "
                f"p90 {dist.p90 * 1e3:8.1f}  p99 {dist.p99 * 1e3:8.1f} ms"
            )

        lines = [
            f"requests        {self.requests} ({self.finished} finished, "
            f"{self.unfinished} unfinished, {self.truncated} truncated to max_model_len)",
            f"tokens          {self.prompt_tokens} prompt, {self.output_tokens} output",
            f"simulated       {self.simulated_s:.1f} s in {self.wall_s:.2f} s wall "
            f"({self.speedup:.0f}x real time), {self.steps} engine steps "
            f"({self.fast_forward_steps} fast-forwarded, {self.steps_per_s:,.0f} steps/s)",
            f"throughput      {self.output_throughput_tok_s:,.0f} output tok/s, "
            f"{self.request_throughput_rps:.2f} req/s",
            f"TTFT            {ms(self.ttft)}",
            f"TPOT            {ms(self.tpot)}",
            f"e2e             {ms(self.e2e)}",
            f"queueing        {ms(self.queue)}",
            f"preemptions     {self.preemptions}; KV usage peak {self.kv_usage_peak:.1%}; "
            f"prefix cache hit rate {self.prefix_cache_hit_rate:.1%}",
            "engine  model                               gpu         reqs   util  preempt  kv peak",
        ]
        for e in self.engines:
            gpu = f"{e.num_gpus}x {e.gpu}"
            lines.append(
                f"{e.index:>6}  {e.model[:34]:<34}  {gpu:<10}  {e.requests:>5}  "
                f"{e.utilization:5.1%}  {e.preemptions:>7}  {e.kv_usage_peak:6.1%}"
            )
        return "\n".join(lines)


_ARRIVAL, _STEP = 0, 1


class ClusterSimulator:
    """A fleet of engine cores driven by one virtual clock.

    ``engines`` are specs (built here with per-engine seeds) or ready cores (for fleets with
    custom configurations). The simulator is single-use: build a new one per run.
    """

    def __init__(
        self,
        engines: Sequence[EngineSpec | EngineCore],
        router: Router | PromptRouter | None = None,
        *,
        seed: int = 0,
        fast_forward: bool = True,
        keep_requests: bool = True,
    ) -> None:
        if not engines:
            raise ValueError("a cluster needs at least one engine")
        self.cores: list[EngineCore] = [
            e if isinstance(e, EngineCore) else e.build(seed=seed * 1000 + i)
            for i, e in enumerate(engines)
        ]
        self.views = [EngineView(i, core) for i, core in enumerate(self.cores)]
        self.router: Router | PromptRouter = router if router is not None else round_robin()
        # Which call a router takes is decided once: a runtime Protocol check costs microseconds.
        self._prompt_router: PromptRouter | None = None
        self._plain_router: Router | None = None
        if isinstance(self.router, PromptRouter):
            self._prompt_router = self.router
        else:
            self._plain_router = self.router
        self._kv_sink = self.router if isinstance(self.router, KvEventSink) else None
        self.fast_forward = fast_forward
        self.keep_requests = keep_requests
        self._prompts = PromptFactory(
            seed, vocab_size=min(c.config.model.vocab_size for c in self.cores)
        )
        self._used = False

    def run(
        self, workload: Iterable[TraceRequest], until_s: float | None = None
    ) -> SimulationReport:
        """Replay ``workload``; with ``until_s``, stop admitting arrivals at that simulated time
        (requests already in the fleet still run to completion)."""
        if self._used:
            raise RuntimeError("ClusterSimulator.run() may be called once per simulator")
        self._used = True
        wall0 = time.perf_counter()
        cores = self.cores
        views = self.views
        prompt_router = self._prompt_router
        plain_router = self._plain_router
        kv_sink = self._kv_sink
        n = len(cores)
        heap: list[tuple[float, int, int, int]] = []
        seq = 0
        stepping = [False] * n
        steps = [0] * n
        ff_steps = [0] * n
        busy = [0.0] * n
        routed = [0] * n
        done = [0] * n
        kv_peak = [0.0] * n
        finished: list[FinishedRequestStats] = []
        ttft: list[float] = []
        tpot: list[float] = []
        e2e: list[float] = []
        queue: list[float] = []
        requests = truncated = prompt_tokens = 0
        last_finish = 0.0
        use_ff = self.fast_forward
        limit = math.inf if until_s is None else until_s

        arrivals = iter(workload)
        nxt = next(arrivals, None)
        next_t = nxt.arrival_s if nxt is not None and nxt.arrival_s < limit else math.inf
        last_arrival = -math.inf

        while True:
            if heap and heap[0][0] < next_t:
                t, _kind, _seq, e = heapq.heappop(heap)
                core = cores[e]
                if use_ff:
                    ff = fast_forward(core, t, next_t)
                    if ff is not None:
                        steps[e] += ff.steps
                        ff_steps[e] += ff.steps
                        busy[e] += ff.busy_s
                        usage = core.kv.usage
                        if usage > kv_peak[e]:
                            kv_peak[e] = usage
                        if kv_sink is not None and ff.kv_events:
                            kv_sink.on_kv_events(e, ff.end, ff.kv_events)
                        seq += 1
                        views[e].step_ends_s = ff.end
                        heapq.heappush(heap, (ff.end, _STEP, seq, e))
                        continue
                result = core.step(t)
                duration = result.duration
                if duration > 0.0:
                    steps[e] += 1
                    busy[e] += duration
                    usage = core.kv.usage
                    if usage > kv_peak[e]:
                        kv_peak[e] = usage
                    seq += 1
                    views[e].step_ends_s = t + duration
                    heapq.heappush(heap, (t + duration, _STEP, seq, e))
                    if kv_sink is not None and result.kv_events:
                        kv_sink.on_kv_events(e, t + duration, result.kv_events)
                else:
                    # Nothing schedulable: sleep until a request is routed here.
                    stepping[e] = False
                for fin in result.finished:
                    done[e] += 1
                    if fin.finish_time > last_finish:
                        last_finish = fin.finish_time
                    ttft.append(fin.ttft)
                    e2e.append(fin.e2e)
                    queue.append(fin.queue_time)
                    if fin.num_generation_tokens > 1:
                        tpot.append(
                            (fin.finish_time - fin.first_token_time)
                            / (fin.num_generation_tokens - 1)
                        )
                    if self.keep_requests:
                        finished.append(fin)
                continue
            if nxt is None or next_t == math.inf:
                if not heap:
                    break
                continue
            # An arrival.
            t = next_t
            if t < last_arrival:
                raise ValueError(f"workload is not in arrival order at t={t}")
            last_arrival = t
            req = nxt
            ids = None
            if prompt_router is not None:
                ids = self._prompts.prompt_ids(requests, req)
                e = prompt_router.route_prompt(req, ids, views)
            else:
                assert plain_router is not None
                e = plain_router(req, views)
            if not 0 <= e < n:
                raise ValueError(f"router returned engine {e}, fleet has {n}")
            core = cores[e]
            max_len = core.config.max_model_len
            prompt = min(req.prompt_tokens, max_len - 1)
            output = min(req.output_tokens, max_len - prompt)
            if prompt != req.prompt_tokens or output != req.output_tokens:
                truncated += 1
                req = TraceRequest(t, prompt, output, req.prefix_group, req.prefix_tokens)
                ids = None
            if ids is None:
                ids = self._prompts.prompt_ids(requests, req)
            core.add_request(
                EngineRequest(
                    request_id=str(requests),
                    prompt_token_ids=ids,
                    params=SamplingParams(max_tokens=output, ignore_eos=True),
                    arrival_time=t,
                )
            )
            requests += 1
            prompt_tokens += prompt
            routed[e] += 1
            if not stepping[e]:
                stepping[e] = True
                seq += 1
                heapq.heappush(heap, (t, _STEP, seq, e))
            nxt = next(arrivals, None)
            next_t = nxt.arrival_s if nxt is not None and nxt.arrival_s < limit else math.inf

        wall = time.perf_counter() - wall0
        span = max(last_finish, last_arrival, 0.0)
        engine_reports: list[EngineReport] = []
        hits = queries = 0
        for i, core in enumerate(cores):
            st = core.stats
            hits += st.prefix_cache_hits
            queries += st.prefix_cache_queries
            engine_reports.append(
                EngineReport(
                    index=i,
                    model=core.config.model_name,
                    gpu=core.config.gpu.name,
                    num_gpus=core.config.num_gpus,
                    requests=routed[i],
                    finished=done[i],
                    steps=steps[i],
                    fast_forward_steps=ff_steps[i],
                    busy_s=busy[i],
                    utilization=busy[i] / span if span > 0 else 0.0,
                    preemptions=st.num_preemptions,
                    kv_usage_peak=kv_peak[i],
                    prefix_cache_hit_rate=(
                        st.prefix_cache_hits / st.prefix_cache_queries
                        if st.prefix_cache_queries
                        else 0.0
                    ),
                    output_tokens=st.generation_tokens,
                )
            )
        total_out = sum(c.stats.generation_tokens for c in cores)
        n_done = sum(done)
        return SimulationReport(
            requests=requests,
            finished=n_done,
            unfinished=requests - n_done,
            truncated=truncated,
            prompt_tokens=prompt_tokens,
            output_tokens=total_out,
            simulated_s=span,
            wall_s=wall,
            steps=sum(steps),
            fast_forward_steps=sum(ff_steps),
            output_throughput_tok_s=total_out / span if span > 0 else 0.0,
            request_throughput_rps=n_done / span if span > 0 else 0.0,
            ttft=Distribution.of(ttft),
            tpot=Distribution.of(tpot),
            e2e=Distribution.of(e2e),
            queue=Distribution.of(queue),
            preemptions=sum(c.stats.num_preemptions for c in cores),
            kv_usage_peak=max(kv_peak),
            prefix_cache_hit_rate=hits / queries if queries else 0.0,
            engines=engine_reports,
            finished_requests=finished,
        )


def simulate(
    workload: Iterable[TraceRequest],
    engines: Sequence[EngineSpec | EngineCore],
    router: Router | PromptRouter | None = None,
    *,
    seed: int = 0,
    fast_forward: bool = True,
    until_s: float | None = None,
    keep_requests: bool = True,
) -> SimulationReport:
    """Build a fleet, replay ``workload`` on it and report."""
    sim = ClusterSimulator(
        engines, router, seed=seed, fast_forward=fast_forward, keep_requests=keep_requests
    )
    return sim.run(workload, until_s=until_s)
