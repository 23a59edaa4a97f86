"""The autoscaling cluster simulator: a fleet that grows and shrinks on the virtual clock.

``sim.cluster`` replays a workload on a fixed fleet. Here an autoscaling policy (the production
``shoal.autoscaler.policies`` objects, unchanged) ticks every ``tick_s`` virtual seconds, sees an
``Observation`` built from the fleet as the live loop would build it from Prometheus, and sets
the replica count:

* a new replica holds its GPU from the moment it is scheduled and serves ``startup_s`` later
  (scheduling, image pull, weight download and engine start-up; see ``default_startup_s``);
* a removed replica that is still starting is deleted at once; a serving one drains: it takes
  no new requests and leaves (releasing its GPU) when its last request has finished;
* requests that arrive while no replica is ready wait at the router, which releases them to the
  first replica that becomes ready; their wait counts toward their TTFT;
* the router is any ``sim.cluster.Router`` callable over the ready replicas.

Observations (what a PromQL ``rate(...[30s])`` would show): request rate and mean prompt length
of the arrivals in the last ``observe_window_s``, mean output length, TTFT and TPOT at the SLO
percentile of requests finished in that window, and the waiting and running requests and mean KV
usage over the replicas now.

GPU time runs from scheduling to release; cost is GPU time times the replica's price.
Everything is deterministic: the same inputs give the same report.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal.autoscaler.policy import Observation, Policy, PoolSpec
from shoal.sim.attainment import Attainment, RequestLatency, SloTarget, attainment, percentile
from shoal.sim.catalog import get_gpu, get_model
from shoal.sim.cluster import Distribution, EngineSpec, EngineView, Router, least_loaded
from shoal.sim.engine import EngineCore
from shoal.sim.fastforward import fast_forward
from shoal.sim.trace import PromptFactory, TraceRequest
from shoal.sim.types import EngineRequest, SamplingParams

# Start-up of an LLM replica, from pod scheduling to serving (default_startup_s):
SCHEDULING_S = 10.0  # scheduler + kubelet + container start on a node that has the GPU free
IMAGE_PULL_S = 20.0  # a vLLM image (~10 GB) from a node-local cache / registry mirror
WEIGHT_BYTES_PER_S = 0.5e9  # weights from an object store or the Hub (~4 Gbit/s sustained)
ENGINE_INIT_S = 40.0  # vLLM: loading to GPU, torch.compile + CUDA graph capture, KV profiling


def default_startup_s(spec: EngineSpec) -> float:
    """Seconds from scheduling a replica to serving: fixed parts plus the weight download.

    Llama-3.1-8B (16 GB of BF16 weights): 10 + 20 + 32 + 40 = 102 s; a 70B model: ~5 minutes.
    """
    weights = get_model(spec.model).weight_bytes
    return SCHEDULING_S + IMAGE_PULL_S + weights / WEIGHT_BYTES_PER_S + ENGINE_INIT_S


@dataclass(frozen=True, slots=True)
class FleetConfig:
    engine: EngineSpec = field(default_factory=EngineSpec)
    initial_replicas: int = 1
    min_replicas: int = 0
    max_replicas: int | None = None
    startup_s: float | None = None  # None: default_startup_s(engine)
    tick_s: float = 15.0
    observe_window_s: float = 30.0
    price_per_replica_hour: float | None = None  # None: the catalog's GPU price x GPUs

    def resolved_startup_s(self) -> float:
        return default_startup_s(self.engine) if self.startup_s is None else self.startup_s

    def resolved_price(self) -> float:
        if self.price_per_replica_hour is not None:
            return self.price_per_replica_hour
        return get_gpu(self.engine.gpu).price_per_hour * self.engine.num_gpus

    def pool_spec(self, slo: SloTarget) -> PoolSpec:
        return PoolSpec(
            model=self.engine.model,
            gpu=self.engine.gpu,
            gpus_per_replica=self.engine.num_gpus,
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            price_per_hour=self.resolved_price(),
            ttft_slo_s=slo.ttft_s,
            tpot_slo_s=slo.tpot_s,
            slo_percentile=slo.percentile,
        )


_STARTING, _READY, _DRAINING, _GONE = "starting", "ready", "draining", "gone"


class _Replica:
    __slots__ = ("core", "end_s", "id", "ready_s", "start_s", "state", "stepping")

    def __init__(self, rid: int, core: EngineCore, start_s: float, ready_s: float) -> None:
        self.id = rid
        self.core = core
        self.start_s = start_s
        self.ready_s = ready_s
        self.end_s: float | None = None
        self.state = _STARTING
        self.stepping = False


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    time_s: float
    desired: int
    ready: int
    starting: int
    draining: int
    request_rate: float
    held: int
    reason: str


@dataclass(slots=True)
class AutoscaleReport:
    policy: str
    requests: int
    finished: int
    held_requests: int  # requests that waited at the router for a first replica
    attainment: Attainment
    ttft: Distribution
    tpot: Distribution
    gpu_hours: float
    cost: float
    scale_events: int  # ticks that changed the target
    replicas_added: int
    replicas_removed: int
    peak_replicas: int
    simulated_s: float
    wall_s: float
    startup_s: float
    timeline: list[TimelinePoint] = field(default_factory=list, repr=False)
    warmup_s: float = 0.0  # what is reported counts from here (AutoscaledSimulator.warmup_s)

    @property
    def churn(self) -> int:
        return self.replicas_added + self.replicas_removed

    def to_dict(self, timeline: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "policy": self.policy,
            "requests": self.requests,
            "finished": self.finished,
            "held_requests": self.held_requests,
            "attainment": self.attainment.to_dict(),
            "ttft": _dist(self.ttft),
            "tpot": _dist(self.tpot),
            "gpu_hours": self.gpu_hours,
            "cost": self.cost,
            "scale_events": self.scale_events,
            "replicas_added": self.replicas_added,
            "replicas_removed": self.replicas_removed,
            "churn": self.churn,
            "peak_replicas": self.peak_replicas,
            "simulated_s": self.simulated_s,
            "wall_s": self.wall_s,
            "startup_s": self.startup_s,
            "warmup_s": self.warmup_s,
        }
        if timeline:
            d["timeline"] = [
                [p.time_s, p.desired, p.ready, p.starting, p.draining, p.request_rate, p.held]
                for p in self.timeline
            ]
        return d

    def format(self) -> str:
        a = self.attainment
        return "\n".join(
            [
                f"policy          {self.policy}",
                f"requests        {self.requests} ({self.finished} finished, "
                f"{self.held_requests} held at the router for a first replica)",
                f"SLO windows     {a.windows_ok:.2%} of {a.windows} windows meet the percentile "
                "targets",
                f"SLO requests    TTFT {a.ttft_ok:.2%}, TPOT {a.tpot_ok:.2%}, both {a.both_ok:.2%}",
                f"TTFT            p50 {self.ttft.p50 * 1e3:.0f}  p90 {self.ttft.p90 * 1e3:.0f}  "
                f"p99 {self.ttft.p99 * 1e3:.0f} ms",
                f"TPOT            p50 {self.tpot.p50 * 1e3:.1f}  p90 {self.tpot.p90 * 1e3:.1f}  "
                f"p99 {self.tpot.p99 * 1e3:.1f} ms",
                f"GPU-hours       {self.gpu_hours:.2f} (cost {self.cost:.2f}), peak "
                f"{self.peak_replicas} replicas, start-up {self.startup_s:.0f} s",
                f"churn           {self.scale_events} scale events, {self.replicas_added} added, "
                f"{self.replicas_removed} removed",
                f"simulated       {self.simulated_s:.0f} s in {self.wall_s:.1f} s wall"
                + (f", reported from {self.warmup_s:.0f} s (warm-up)" if self.warmup_s else ""),
            ]
        )


def _dist(d: Distribution) -> dict[str, float]:
    return {"mean": d.mean, "p50": d.p50, "p90": d.p90, "p99": d.p99, "max": d.max}


_READY_EVENT, _TICK, _STEP = 0, 1, 2
ProgressFn = Callable[[float], None]


class AutoscaledSimulator:
    """One run of a workload on a fleet sized by ``policy`` (None: the initial fleet, fixed)."""

    def __init__(
        self,
        config: FleetConfig,
        policy: Policy | None,
        slo: SloTarget,
        router: Router | None = None,
        *,
        seed: int = 0,
        use_fast_forward: bool = True,
        warmup_s: float = 0.0,
        progress: ProgressFn | None = None,
    ) -> None:
        if warmup_s < 0:
            raise ValueError(f"warmup_s must be >= 0, got {warmup_s}")
        if config.initial_replicas < 0 or config.tick_s <= 0 or config.observe_window_s <= 0:
            raise ValueError("need initial_replicas >= 0, tick_s > 0 and observe_window_s > 0")
        self.config = config
        self.policy = policy
        self.slo = slo
        self.spec = config.pool_spec(slo)
        self.router: Router = router if router is not None else least_loaded
        self.seed = seed
        self.use_fast_forward = use_fast_forward
        # Simulation warm-up: requests that arrive before it, GPU time before it and scaling
        # before it are not reported (the policies still see and act on everything), so that a
        # run cut from a continuous service is not judged on its arbitrary starting fleet.
        self.warmup_s = warmup_s
        self.progress = progress
        self.startup_s = config.resolved_startup_s()
        self._engine_config = config.engine.engine_config(seed)
        self._prompts = PromptFactory(seed, vocab_size=self._engine_config.model.vocab_size)

    def run(self, workload: Sequence[TraceRequest]) -> AutoscaleReport:
        wall0 = time.perf_counter()
        cfg = self.config
        replicas: list[_Replica] = []
        heap: list[tuple[float, int, int, int]] = []
        seq = 0
        added = removed = scale_events = 0
        held: deque[TraceRequest] = deque()
        held_total = 0
        routed = 0
        latencies: list[RequestLatency] = []
        arrivals_win: deque[tuple[float, int]] = deque()
        finished_win: deque[tuple[float, float, float | None, int]] = deque()
        timeline: list[TimelinePoint] = []
        ready_views: list[EngineView] = []
        ready_ids: list[int] = []
        last_event = 0.0
        peak = 0

        def push(t: float, kind: int, rid: int) -> None:
            nonlocal seq
            seq += 1
            heapq.heappush(heap, (t, kind, seq, rid))

        def new_replica(now: float, ready_now: bool) -> None:
            rid = len(replicas)
            core = EngineCore(self._engine_config)
            ready_at = now if ready_now else now + self.startup_s
            replicas.append(_Replica(rid, core, now, ready_at))
            if ready_now:
                replicas[rid].state = _READY
            else:
                push(ready_at, _READY_EVENT, rid)

        def refresh_views() -> None:
            ready_ids[:] = [r.id for r in replicas if r.state == _READY]
            ready_views[:] = [EngineView(i, replicas[rid].core) for i, rid in enumerate(ready_ids)]

        def dispatch(req: TraceRequest, now: float) -> None:
            nonlocal routed
            i = self.router(req, ready_views)
            if not 0 <= i < len(ready_views):
                raise ValueError(f"router returned {i}, {len(ready_views)} replicas are ready")
            rep = replicas[ready_ids[i]]
            core = rep.core
            max_len = core.config.max_model_len
            prompt = min(req.prompt_tokens, max_len - 1)
            output = min(req.output_tokens, max_len - prompt)
            sized = TraceRequest(req.arrival_s, prompt, output, req.prefix_group, req.prefix_tokens)
            core.add_request(
                EngineRequest(
                    request_id=str(routed),
                    prompt_token_ids=self._prompts.prompt_ids(routed, sized),
                    params=SamplingParams(max_tokens=output, ignore_eos=True),
                    arrival_time=req.arrival_s,
                )
            )
            routed += 1
            if not rep.stepping:
                rep.stepping = True
                push(now, _STEP, rep.id)

        def release(rep: _Replica, now: float) -> None:
            rep.state = _GONE
            rep.end_s = now

        def active() -> list[_Replica]:
            return [r for r in replicas if r.state in (_STARTING, _READY)]

        def apply(desired: int, now: float) -> None:
            nonlocal added, removed, scale_events
            current = active()
            if desired == len(current):
                return
            measured = now >= self.warmup_s
            scale_events += measured
            if desired > len(current):
                for _ in range(desired - len(current)):
                    new_replica(now, ready_now=False)
                added += desired - len(current) if measured else 0
                return
            excess = len(current) - desired
            removed += excess if measured else 0
            # Replicas still starting go first (newest first), then the least loaded ready ones.
            starting = sorted(
                (r for r in current if r.state == _STARTING), key=lambda r: -r.start_s
            )
            ready = sorted(
                (r for r in current if r.state == _READY),
                key=lambda r: (r.core.num_unfinished(), -r.id),
            )
            for rep in (starting + ready)[:excess]:
                if rep.state == _STARTING or not rep.core.has_unfinished():
                    release(rep, now)
                else:
                    rep.state = _DRAINING
            refresh_views()

        def observe(now: float) -> Observation:
            window = cfg.observe_window_s
            while arrivals_win and arrivals_win[0][0] <= now - window:
                arrivals_win.popleft()
            while finished_win and finished_win[0][0] <= now - window:
                finished_win.popleft()
            span = min(window, now) if now > 0 else window
            serving = [r for r in replicas if r.state in (_READY, _DRAINING)]
            waiting = float(sum(len(r.core._waiting) for r in serving))
            running = float(sum(len(r.core._running) for r in serving))
            ready = [r for r in serving if r.state == _READY]
            kv = sum(r.core.kv.usage for r in ready) / len(ready) if ready else None
            ttfts = [f[1] for f in finished_win]
            tpots = [f[2] for f in finished_win if f[2] is not None]
            pct = self.slo.percentile
            return Observation(
                time_s=now,
                ready_replicas=len(ready),
                desired_replicas=len(active()),
                request_rate=len(arrivals_win) / span,
                prompt_tokens_mean=(
                    sum(a[1] for a in arrivals_win) / len(arrivals_win) if arrivals_win else None
                ),
                output_tokens_mean=(
                    sum(f[3] for f in finished_win) / len(finished_win) if finished_win else None
                ),
                waiting=waiting,
                running=running,
                kv_usage=kv,
                ttft_s=percentile(ttfts, pct) if ttfts else None,
                tpot_s=percentile(tpots, pct) if tpots else None,
                router_held=float(len(held)),
            )

        for _ in range(cfg.initial_replicas):
            new_replica(0.0, ready_now=True)
        refresh_views()
        push(cfg.tick_s, _TICK, -1)
        next_tick = cfg.tick_s
        total = len(workload)
        horizon_s = workload[-1].arrival_s if workload else 0.0
        idx = 0
        next_t = workload[0].arrival_s if workload else math.inf
        report_every = max(total // 200, 1)

        while True:
            if heap and heap[0][0] < next_t:
                t, kind, _s, rid = heapq.heappop(heap)
                last_event = t
                if kind == _TICK:
                    in_flight = any(r.core.has_unfinished() for r in replicas if r.state != _GONE)
                    if idx >= total and not in_flight and not held:
                        continue  # the run is over: no more ticks
                    obs = observe(t)
                    reason = "static"
                    if self.policy is not None:
                        dec = self.policy.decide(self.spec, obs)
                        reason = dec.reason
                        apply(self.spec.clamp(dec.replicas), t)
                    live = active()
                    n_ready = sum(r.state == _READY for r in live)
                    if t >= self.warmup_s:
                        peak = max(peak, len(live))
                    timeline.append(
                        TimelinePoint(
                            t,
                            len(live),
                            n_ready,
                            len(live) - n_ready,
                            sum(r.state == _DRAINING for r in replicas),
                            obs.request_rate or 0.0,
                            len(held),
                            reason,
                        )
                    )
                    next_tick = t + cfg.tick_s
                    push(next_tick, _TICK, -1)
                    continue
                rep = replicas[rid]
                if kind == _READY_EVENT:
                    if rep.state != _STARTING:
                        continue  # deleted while starting
                    rep.state = _READY
                    refresh_views()
                    while held:
                        dispatch(held.popleft(), t)
                    continue
                # An engine step.
                core = rep.core
                if self.use_fast_forward:
                    ff = fast_forward(core, t, min(next_t, next_tick))
                    if ff is not None:
                        push(ff.end, _STEP, rid)
                        continue
                result = core.step(t)
                if result.duration > 0.0:
                    push(t + result.duration, _STEP, rid)
                else:
                    rep.stepping = False
                for fin in result.finished:
                    tpot = None
                    if fin.num_generation_tokens > 1:
                        tpot = (fin.finish_time - fin.first_token_time) / (
                            fin.num_generation_tokens - 1
                        )
                    latencies.append(RequestLatency(fin.arrival_time, fin.ttft, tpot))
                    finished_win.append(
                        (fin.finish_time, fin.ttft, tpot, fin.num_generation_tokens)
                    )
                if rep.state == _DRAINING and not core.has_unfinished():
                    release(rep, t + max(result.duration, 0.0))
                continue
            if idx >= total:
                if not heap:
                    break
                continue
            # An arrival.
            req = workload[idx]
            t = next_t
            last_event = t
            arrivals_win.append((t, req.prompt_tokens))
            if ready_views:
                dispatch(req, t)
            else:
                held.append(req)
                held_total += 1
            idx += 1
            next_t = workload[idx].arrival_s if idx < total else math.inf
            if self.progress is not None and idx % report_every == 0:
                self.progress(idx / total)

        end = max(last_event, horizon_s)
        for rep in replicas:
            if rep.state != _GONE:
                release(rep, end)
        warm = self.warmup_s
        gpu_s = sum(max((r.end_s or end) - max(r.start_s, warm), 0.0) for r in replicas)
        scored = [r for r in latencies if r.arrival_s >= warm]
        unfinished = [r.arrival_s for r in held if r.arrival_s >= warm]
        att = attainment(scored, self.slo, unfinished_arrivals=unfinished)
        if self.progress is not None:
            self.progress(1.0)
        return AutoscaleReport(
            policy=self.policy.name if self.policy is not None else "static",
            requests=total,
            finished=len(latencies),
            held_requests=held_total,
            attainment=att,
            ttft=Distribution.of([r.ttft_s for r in scored]),
            tpot=Distribution.of([r.tpot_s for r in scored if r.tpot_s is not None]),
            gpu_hours=gpu_s * cfg.engine.num_gpus / 3600.0,
            cost=gpu_s / 3600.0 * cfg.resolved_price(),
            scale_events=scale_events,
            replicas_added=added,
            replicas_removed=removed,
            peak_replicas=max(peak, cfg.initial_replicas if warm <= 0 else 0),
            simulated_s=end,
            wall_s=time.perf_counter() - wall0,
            startup_s=self.startup_s,
            timeline=timeline,
            warmup_s=warm,
        )
