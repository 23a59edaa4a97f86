"""Pod replacement for LoRA placement: a vanished pod's adapters wait for its replacement.

Without this, a deleted engine pod's adapters move at once onto the survivors and its
replacement gets only what is left, so a pod restart reshuffles adapters across the fleet (each
move is a download, a load and a cold adapter). Instead, when a ready pod vanishes while its pool
is below its desired replicas (a crash, an eviction, ``kubectl delete pod``: the Deployment is
bringing a replacement), its last assignment becomes a reserved slot
(:class:`~shoal.operator.lora_placement.ReservedSlot`) for ``grace_s`` plus the time the vanished
pod took to become ready (its successor will likely need as long). The next new ready pod of the
same pool inherits the slot (a pod coming back under the same name takes its own slot first). A
slot that nobody claims in time, or whose pool is back at its desired size without claiming it
(a scale-down), is released and the placement re-places its adapters on the survivors.

Which reserved adapters really wait is the placement's decision: an adapter that no ready pod
still serves is placed again at once (availability first).

State lives in memory per base Model: after an operator restart the first reconcile finds no
slots and re-places at once, as before. Time is passed in, so this is a pure state machine.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from shoal.operator.lora_placement import Placement, ReservedSlot

DEFAULT_REPLACEMENT_GRACE_S = 60.0
# The engine's startup probe allows 20 minutes (operator/desired.py); a longer recorded start-up
# is a stuck pod, not one worth waiting for.
MAX_STARTUP_S = 1200.0


@dataclass(frozen=True)
class ReadyPod:
    """A ready engine pod as the tracker sees it: its pool and how long it took to start."""

    name: str
    pool: str
    startup_s: float = 0.0


@dataclass
class _Slot:
    name: str
    pool: str
    adapters: frozenset[str]
    created: float
    expires: float


@dataclass
class _Known:
    pool: str
    adapters: frozenset[str]
    startup_s: float


@dataclass(frozen=True)
class ReplacementPlan:
    """What to pass to :func:`place` this round, and what changed (for logs and metrics)."""

    reserved: list[ReservedSlot]
    inherited: dict[str, frozenset[str]]
    opened: list[str] = field(default_factory=list)  # slots opened this round
    claimed: dict[str, str] = field(default_factory=dict)  # new pod -> the slot it took
    expired: list[str] = field(default_factory=list)  # grace period over
    released: list[str] = field(default_factory=list)  # pool back at size without a claim


class ReplacementTracker:
    """One base Model's pods and reserved slots across reconciles (see the module doc)."""

    def __init__(self, grace_s: float = DEFAULT_REPLACEMENT_GRACE_S) -> None:
        if grace_s < 0:
            raise ValueError(f"replacement grace must be ≥ 0 s, got {grace_s}")
        self.grace_s = grace_s
        self._known: dict[str, _Known] = {}
        self._slots: dict[str, _Slot] = {}

    @property
    def slots(self) -> int:
        return len(self._slots)

    def plan(
        self,
        now: float,
        ready: Sequence[ReadyPod],
        desired: Mapping[str, int],
        reachable: Collection[str] | None = None,
    ) -> ReplacementPlan:
        """Open slots for pods that vanished, expire old ones, hand slots to new pods.

        ``ready`` are all ready pods of the Model; ``desired`` the replicas per pool; only pods
        in ``reachable`` (default: all) claim a slot, since only they are placed this round.
        """
        current = {p.name: p for p in ready}
        per_pool: dict[str, int] = {}
        for pod in ready:
            per_pool[pod.pool] = per_pool.get(pod.pool, 0) + 1
        # Pods seen before, per pool: a new pod may already be the replacement, so it must not
        # make the pool look full when deciding whether a vanished pod will be replaced.
        staying: dict[str, int] = {}
        for pod in ready:
            if pod.name in self._known:
                staying[pod.pool] = staying.get(pod.pool, 0) + 1
        opened: list[str] = []
        for name in sorted(set(self._known) - set(current)):
            known = self._known.pop(name)
            if not known.adapters or staying.get(known.pool, 0) >= desired.get(known.pool, 0):
                continue  # nothing to keep, or a scale-down: nobody replaces it
            wait = self.grace_s + min(MAX_STARTUP_S, max(0.0, known.startup_s))
            self._slots[name] = _Slot(name, known.pool, known.adapters, now, now + wait)
            opened.append(name)
        expired = [s for s in sorted(self._slots) if self._slots[s].expires <= now]
        for name in expired:
            del self._slots[name]

        inherited: dict[str, frozenset[str]] = {}
        claimed: dict[str, str] = {}
        for pod in sorted(current.values(), key=lambda p: p.name):
            if pod.name in self._known:
                continue
            if reachable is not None and pod.name not in reachable:
                per_pool[pod.pool] -= 1  # may still claim once it answers: not "back at size"
                continue
            slot = self._slots.get(pod.name)  # the same pod back after a restart
            if slot is None or slot.pool != pod.pool:
                pool_slots = [s for s in self._slots.values() if s.pool == pod.pool]
                slot = min(pool_slots, key=lambda s: (s.created, s.name), default=None)
            if slot is None:
                continue
            del self._slots[slot.name]
            inherited[pod.name] = slot.adapters
            claimed[pod.name] = slot.name
        released = [
            s.name
            for s in sorted(self._slots.values(), key=lambda s: s.name)
            if per_pool.get(s.pool, 0) >= desired.get(s.pool, 0)
        ]
        for name in released:
            del self._slots[name]
        reserved = [ReservedSlot(s.name, s.adapters) for _, s in sorted(self._slots.items())]
        return ReplacementPlan(reserved, inherited, opened, claimed, expired, released)

    def record(self, placement: Placement, ready: Sequence[ReadyPod]) -> None:
        """Remember what each placed pod holds, and what each slot still keeps.

        ``ready`` are the pods the placement covered; a ready pod that did not answer this round
        keeps its last record, so it is not mistaken for a vanished one.
        """
        by_pod = placement.by_pod()
        for pod in ready:
            self._known[pod.name] = _Known(
                pod.pool, frozenset(by_pod.get(pod.name, ())), pod.startup_s
            )
        for name, slot in list(self._slots.items()):
            keep = frozenset(placement.reserved.get(name, ()))
            if keep:
                slot.adapters = keep
            else:
                del self._slots[name]  # every adapter it held was placed elsewhere


__all__ = [
    "DEFAULT_REPLACEMENT_GRACE_S",
    "MAX_STARTUP_S",
    "ReadyPod",
    "ReplacementPlan",
    "ReplacementTracker",
]
