"""The live autoscaling loop: every tick, for each Model with ``spec.autoscaling.enabled``, observe
each pool in Prometheus, ask the pool's policy, and write the replicas to the Model.

The guard (:func:`guarded_decision`) is the one rule that overrides the policy: **no scale-down,
and no scale to zero, on data we do not have.** When Prometheus cannot answer, or a load signal is
missing, NaN or stale (no samples in the window), the pool keeps its current replicas, and the
hold is counted (``shoal_autoscaler_data_missing_holds_total``), logged, and announced with one
Warning Event when it starts. A scale-down also needs every ready replica scraped: a sum over
half the engines looks like half the load.

Everything the loop remembers between ticks is rebuilt from the Models themselves when it starts
or (re)gains the Lease: the policy state annotation (:mod:`shoal.autoscaler.state`) and the
current replicas in the spec. So a restart resumes where the last leader stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

from shoal.api.model import AutoscalingPolicy, ModelFileError, ModelResource, parse_model
from shoal.autoscaler.actuator import ModelActuator, scale_patch
from shoal.autoscaler.metrics import AutoscalerMetrics
from shoal.autoscaler.observe import PoolReading, PoolTarget, read_pool
from shoal.autoscaler.policy import Decision, Policy, PoolSpec
from shoal.autoscaler.prometheus import PrometheusClient, PrometheusError
from shoal.autoscaler.state import (
    STATE_ANNOTATION,
    PoolState,
    StateError,
    decode_state,
    encode_state,
)

log = logging.getLogger(__name__)

PolicyFactory = Callable[[AutoscalingPolicy], Policy]
PoolKey = tuple[str, str, str]  # namespace, model, pool

# Reasons the loop itself gives (policies give their own).
HOLD_PROMETHEUS = "hold-prometheus-unavailable"
HOLD_MISSING = "hold-missing-data"
HOLD_PARTIAL = "hold-partial-scrape"
HOLD_POLICY_ERROR = "hold-policy-error"
HOLDS = (HOLD_PROMETHEUS, HOLD_MISSING, HOLD_PARTIAL, HOLD_POLICY_ERROR)


def pool_spec(model: ModelResource, pool_name: str) -> PoolSpec:
    """What a policy knows about one pool of a Model: the replica's shape, bounds and the SLO."""
    spec = model.spec
    pool = next(p for p in spec.pools if p.name == pool_name)
    slo = spec.slo
    return PoolSpec(
        model=spec.model.name,
        gpu=pool.gpu_type,
        gpus_per_replica=pool.gpus_per_replica,
        min_replicas=pool.min_replicas,
        max_replicas=pool.max_replicas,
        price_per_hour=pool.effective_price_per_hour,
        ttft_slo_s=slo.ttft_ms / 1000 if slo.ttft_ms is not None else None,
        tpot_slo_s=slo.tpot_ms / 1000 if slo.tpot_ms is not None else None,
        slo_percentile=slo.percentile,
    )


def guarded_decision(
    policy: Policy, spec: PoolSpec, reading: PoolReading | None, current: int
) -> Decision:
    """The policy's decision, unless the data cannot support it; always within min/max.

    ``reading`` is ``None`` when Prometheus could not answer. ``current`` is the pool's replicas
    in the spec now: what a hold keeps.
    """
    if reading is None:
        return Decision(current, HOLD_PROMETHEUS)
    if not reading.complete:
        missing = {f"missing_{name}": 1.0 for name in reading.missing}
        return Decision(current, HOLD_MISSING, missing)
    try:
        decision = policy.decide(spec, reading.observation)
    except Exception:  # a policy bug must not stop the other pools or crash the loop
        log.exception("policy %s failed; holding %d replicas", policy.name, current)
        return Decision(current, HOLD_POLICY_ERROR)
    replicas = spec.clamp(decision.replicas)
    if replicas < current:
        up = reading.values.get("engines_up")
        ready = reading.observation.ready_replicas
        if ready > 0 and (up is None or up < ready):
            detail = {"engines_up": up if up is not None else float("nan"), "ready": ready}
            return Decision(current, HOLD_PARTIAL, detail)
    return Decision(replicas, decision.reason, dict(decision.detail))


@dataclass
class PoolMemory:
    """What the loop keeps per pool while it leads."""

    policy: Policy
    autoscaling: AutoscalingPolicy
    last: PoolState | None = None
    holding: bool = False  # in a data-missing hold (one Warning event per hold)


@dataclass
class LoopConfig:
    namespaces: list[str] | None  # None: every namespace
    interval_s: float = 5.0
    # State is written with every replica change, and at least this often while it changes.
    state_interval_s: float = 15.0

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"interval must be positive, got {self.interval_s}")


@dataclass
class Autoscaler:
    actuator: ModelActuator
    prom: PrometheusClient
    policy_factory: PolicyFactory
    metrics: AutoscalerMetrics
    config: LoopConfig
    clock: Callable[[], float] = time.time
    pools: dict[PoolKey, PoolMemory] = field(default_factory=dict)
    _state_written: dict[tuple[str, str], float] = field(default_factory=dict)

    def forget_all(self) -> None:
        """Drop the in-memory state (on losing the Lease: the next leader may act meanwhile,
        so whoever leads next reads the Models afresh)."""
        for key in list(self.pools):
            self.metrics.forget_pool(key)
        self.pools.clear()
        self._state_written.clear()

    async def _models(self) -> list[dict[str, Any]]:
        namespaces: Iterable[str | None] = self.config.namespaces or [None]
        out: list[dict[str, Any]] = []
        for ns in namespaces:
            out.extend(await self.actuator.list_models(ns))
        return out

    async def tick(self) -> None:
        """One pass over every autoscaled Model. Never raises for one bad Model or API error."""
        started = time.monotonic()
        try:
            try:
                objs = await self._models()
            except (TimeoutError, ApiException, OSError) as exc:
                self.metrics.errors.labels("kubernetes").inc()
                log.warning("cannot list Models: %r; nothing changes this tick", exc)
                return
            seen: set[PoolKey] = set()
            for obj in objs:
                try:
                    seen |= await self._model(obj)
                except (TimeoutError, ApiException, OSError) as exc:
                    self.metrics.errors.labels("kubernetes").inc()
                    meta = obj.get("metadata") or {}
                    log.warning(
                        "Model %s/%s: Kubernetes refused a write: %s",
                        meta.get("namespace"),
                        meta.get("name"),
                        getattr(exc, "reason", None) or repr(exc),
                    )
                    keys = {
                        k for k in self.pools if k[:2] == (meta.get("namespace"), meta.get("name"))
                    }
                    seen |= keys
            for key in set(self.pools) - seen:
                self.metrics.forget_pool(key)
                del self.pools[key]
        finally:
            self.metrics.tick_duration.observe(time.monotonic() - started)

    # -- one Model ------------------------------------------------------------------------------

    def _parse(self, obj: Mapping[str, Any]) -> ModelResource | None:
        meta = obj.get("metadata") or {}
        keep = ("name", "namespace", "labels", "annotations", "generation")
        doc = {
            "apiVersion": obj.get("apiVersion"),
            "kind": obj.get("kind"),
            "metadata": {k: meta[k] for k in keep if k in meta},
            "spec": obj.get("spec") or {},
        }
        try:
            return parse_model(doc, source=f"Model {meta.get('namespace')}/{meta.get('name')}")
        except ModelFileError as exc:
            # The operator reports an invalid spec on the Model; acting on it would be a guess.
            log.debug("skipping invalid %s", exc)
            return None

    def _restore(self, obj: Mapping[str, Any], ns: str, name: str) -> dict[str, PoolState]:
        text = ((obj.get("metadata") or {}).get("annotations") or {}).get(STATE_ANNOTATION)
        try:
            return decode_state(text)
        except StateError as exc:
            self.metrics.errors.labels("state").inc()
            log.warning("Model %s/%s: %s; its pools start with fresh policy state", ns, name, exc)
            return {}

    def _memory(
        self, key: PoolKey, model: ModelResource, saved: Mapping[str, PoolState]
    ) -> PoolMemory:
        auto = model.spec.autoscaling
        mem = self.pools.get(key)
        if mem is not None and mem.autoscaling == auto:
            return mem
        policy = self.policy_factory(auto)
        carried: PoolState | None = None
        if mem is not None:  # the policy settings changed: carry the state if it is the same kind
            if mem.policy.name == policy.name:
                carried = PoolState(policy.name, 0, "", 0.0, mem.policy.export_state())
        else:
            carried = saved.get(key[2])
        last = mem.last if mem is not None else carried
        if carried is not None and carried.policy == policy.name:
            try:
                policy.import_state(carried.state)
            except Exception:  # a state from another version: start fresh, say so
                self.metrics.errors.labels("state").inc()
                log.warning("pool %s: cannot import %s state; starting fresh", key, policy.name)
                policy = self.policy_factory(auto)
        mem = PoolMemory(policy=policy, autoscaling=auto, last=last)
        self.pools[key] = mem
        return mem

    async def _model(self, obj: Mapping[str, Any]) -> set[PoolKey]:
        model = self._parse(obj)
        if model is None or not model.spec.autoscaling.enabled:
            return set()
        ns, name = model.metadata.namespace or "default", model.metadata.name
        saved = (
            self._restore(obj, ns, name) if not any(k[:2] == (ns, name) for k in self.pools) else {}
        )
        current = model.spec.pool_replicas()
        status = obj.get("status") or {}
        ready = {p.get("name"): int(p.get("readyReplicas", 0)) for p in status.get("pools") or []}
        now = self.clock()
        keys: set[PoolKey] = set()
        decisions: dict[str, Decision] = {}
        for pool in model.spec.pools:
            key = (ns, name, pool.name)
            keys.add(key)
            mem = self._memory(key, model, saved)
            spec = pool_spec(model, pool.name)
            target = PoolTarget(
                ns, name, pool.name, model.spec.model.client_name, spec.slo_percentile
            )
            reading: PoolReading | None
            try:
                reading = await read_pool(
                    self.prom,
                    target,
                    time_s=now,
                    ready_replicas=ready.get(pool.name, 0),
                    desired_replicas=current[pool.name],
                )
            except PrometheusError as exc:
                self.metrics.errors.labels("prometheus").inc()
                log.warning("pool %s/%s/%s: %s", ns, name, pool.name, exc)
                reading = None
            if reading is not None:
                self.metrics.record_inputs(key, reading.values)
            decision = guarded_decision(mem.policy, spec, reading, current[pool.name])
            decisions[pool.name] = decision
            self._account(key, mem, decision, reading, current[pool.name])
        await self._actuate(obj, model, current, decisions, now)
        return keys

    def _account(
        self,
        key: PoolKey,
        mem: PoolMemory,
        decision: Decision,
        reading: PoolReading | None,
        current: int,
    ) -> None:
        self.metrics.record_decision(key, mem.policy.name, decision.reason, decision.replicas)
        if decision.reason == HOLD_POLICY_ERROR:
            self.metrics.errors.labels("policy").inc()
        data_hold = decision.reason in (HOLD_PROMETHEUS, HOLD_MISSING, HOLD_PARTIAL)
        if data_hold:
            cause = decision.reason.removeprefix("hold-")
            self.metrics.holds.labels(*key, cause).inc()
            what = ", ".join(reading.missing) if reading is not None and reading.missing else cause
            log.warning(
                "pool %s/%s/%s: holding %d replicas: no trustworthy load data (%s)",
                *key,
                current,
                what,
            )

    async def _actuate(
        self,
        obj: Mapping[str, Any],
        model: ModelResource,
        current: Mapping[str, int],
        decisions: Mapping[str, Decision],
        now: float,
    ) -> None:
        ns, name = model.metadata.namespace or "default", model.metadata.name
        changes = {p: d.replicas for p, d in decisions.items() if d.replicas != current[p]}
        states: dict[str, PoolState] = {}
        for pool, d in decisions.items():
            mem = self.pools[(ns, name, pool)]
            states[pool] = PoolState(
                policy=mem.policy.name,
                replicas=d.replicas,
                reason=d.reason,
                time_s=now,
                state=mem.policy.export_state(),
            )
        state_due = now - self._state_written.get((ns, name), float("-inf"))
        state_text: str | None = None
        if changes or state_due >= self.config.state_interval_s:
            try:
                state_text = encode_state(states)
            except StateError as exc:
                self.metrics.errors.labels("state").inc()
                log.warning("Model %s/%s: not saving policy state: %s", ns, name, exc)
        if changes or state_text is not None:
            await self.actuator.patch(obj, scale_patch(obj, changes, state_text))
            if state_text is not None:
                self._state_written[(ns, name)] = now
        for pool, d in decisions.items():
            mem = self.pools[(ns, name, pool)]
            mem.last = states[pool]
            await self._events(obj, (ns, name, pool), mem, d, current[pool])

    async def _events(
        self, obj: Mapping[str, Any], key: PoolKey, mem: PoolMemory, d: Decision, before: int
    ) -> None:
        pool = key[2]
        data_hold = d.reason in (HOLD_PROMETHEUS, HOLD_MISSING, HOLD_PARTIAL)
        if d.replicas != before:
            direction = "up" if d.replicas > before else "down"
            self.metrics.scale_changes.labels(*key, direction).inc()
            message = (
                f"pool {pool}: {before} -> {d.replicas} replicas "
                f"(policy {mem.policy.name}: {d.reason})"
            )
            log.info("Model %s/%s %s", key[0], key[1], message)
            await self._event(obj, "ScaledUp" if direction == "up" else "ScaledDown", message)
        if data_hold and not mem.holding:
            await self._event(
                obj,
                "AutoscalingHeld",
                f"pool {pool}: holding {d.replicas} replicas: {d.reason}",
                warning=True,
            )
        elif mem.holding and not data_hold:
            await self._event(obj, "AutoscalingResumed", f"pool {pool}: load data is back")
        mem.holding = data_hold

    async def _event(
        self, obj: Mapping[str, Any], reason: str, message: str, *, warning: bool = False
    ) -> None:
        try:
            await self.actuator.event(obj, reason, message, warning=warning)
        except (ApiException, OSError) as exc:  # an Event lost is not worth a failed tick
            self.metrics.errors.labels("kubernetes").inc()
            log.warning("cannot post Event %s: %r", reason, exc)


async def run_loop(
    autoscaler: Autoscaler,
    is_leader: Callable[[], bool],
    stop: asyncio.Event,
    on_tick: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Tick every ``interval_s`` while leading, until ``stop`` is set."""
    leading = False
    while not stop.is_set():
        now_leading = is_leader()
        autoscaler.metrics.leader.set(1 if now_leading else 0)
        if leading and not now_leading:
            autoscaler.forget_all()
        leading = now_leading
        if leading:
            await autoscaler.tick()
            if on_tick is not None:
                await on_tick()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=autoscaler.config.interval_s)
