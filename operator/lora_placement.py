"""Which engine pods hold which LoRA adapters: a pure function of adapters and ready pods.

Goals, in order: no pod holds more adapters than its capacity (the Model's ``lora.maxLoras``: the
adapters that fit in GPU slots at once, so a request never waits for a swap); every adapter gets
its replicas when the capacity allows; what is already loaded stays where it is (a load costs a
download and a copy to the GPU, an unload drops a warm adapter), so pods coming and going move only
what they must; load is spread evenly; hot adapters get extra replicas from spare room.

How:

1. *Keep* what is loaded on pods that are still ready, up to each adapter's replicas and each
   pod's *soft cap* (``load_factor`` × its share of all replicas, never above capacity). When a pod
   joins, the others' share falls and each drops the pairs it ranks lowest by rendezvous hash, so
   the new pod receives about its share and nothing else moves.
2. *Place* the missing replicas, most-wanted adapters first: on the least-loaded pods with room
   under the soft cap, ties broken by rendezvous (highest-random-weight) hash of adapter and pod,
   which makes the outcome independent of pod order and stable across runs. A replacement pod
   is the least loaded, so it takes back the adapters its predecessor held.
3. *Fill*: replicas still missing may use any room up to the hard capacity. When the only room
   left is on pods that already hold the adapter (pods that joined one by one, the first ones
   full), *swap*: move another adapter from a full pod to a pod with room, and take its place.
   So a replica stays unplaced only when the fleet's capacity is really short (or the adapter
   may not displace others: its last load failed).
4. *Hot extras*: adapters whose request rate exceeds ``rate_per_replica`` × replicas get more
   replicas, hottest first, from the room left (never displacing a base replica). Extras already
   loaded are kept while the adapter stays hot, so they do not hop between pods.

*Reserved slots* (pod replacement): when a ready pod vanishes and its pool is below its desired
replicas, the operator keeps the vanished pod's adapters as a :class:`ReservedSlot` for a grace
period. A reserved adapter counts toward its replicas, so the survivors do not take it over and
its replacement pod (a :class:`PodSlots` with ``inherited``: kept as if loaded) gets exactly what
its predecessor held. Availability comes first: a reserved adapter that no ready pod holds is not
counted, so it is placed on the survivors at once. Adapters on every pod (``replicas: None``) are
never reserved: a new pod gets them anyway.

Replicas that cannot be placed are reported per adapter (``unplaced``); the operator turns them
into an ``InsufficientCapacity`` condition. The cost is O(adapters × pods × log pods).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_LOAD_FACTOR = 1.25


@dataclass(frozen=True)
class AdapterDemand:
    """One adapter's wish: ``replicas`` pods (None: every ready pod), and its request rate.

    ``displace``: whether the adapter may move another one to make room (a swap). The operator
    sets it False for an adapter whose last load an engine refused or never answered, so a load
    that keeps failing does not move healthy adapters round after round.
    """

    name: str
    replicas: int | None = 1
    request_rate: float = 0.0
    displace: bool = True


@dataclass(frozen=True)
class PodSlots:
    """A ready engine pod: how many adapters it may hold, which it holds now, and which it takes
    over from a vanished predecessor (kept like loaded ones; the operator then loads them)."""

    name: str
    capacity: int
    loaded: frozenset[str] = frozenset()
    inherited: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ReservedSlot:
    """The adapters a vanished pod held, kept for its replacement (see the module doc)."""

    name: str
    adapters: frozenset[str]


@dataclass(frozen=True)
class Placement:
    """Adapter → the pods that should hold it; replicas that found no room."""

    assignment: dict[str, tuple[str, ...]]
    unplaced: dict[str, int] = field(default_factory=dict)
    desired: dict[str, int] = field(default_factory=dict)
    # reserved slot -> the adapters it still holds for its replacement pod
    reserved: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def reserved_for(self, adapter: str) -> int:
        """Replicas of ``adapter`` waiting in reserved slots for a replacement pod."""
        return sum(adapter in held for held in self.reserved.values())

    def pods_of(self, adapter: str) -> tuple[str, ...]:
        return self.assignment.get(adapter, ())

    def by_pod(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for adapter, pods in self.assignment.items():
            for pod in pods:
                out.setdefault(pod, set()).add(adapter)
        return out


def rendezvous_score(adapter: str, pod: str) -> int:
    """Highest-random-weight hash of an (adapter, pod) pair: stable across processes."""
    digest = hashlib.blake2b(f"{adapter}\0{pod}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _wanted(demand: AdapterDemand, pods: int, slots: int) -> int:
    """Replicas to hold: all ready pods for ``None``; else the replicas, capped by the ready pods
    plus the reserved slots (a slot stands for a pod that is coming back)."""
    if demand.replicas is None:
        return pods
    return max(0, min(demand.replicas, pods + slots))


def _hot(demand: AdapterDemand, base: int, pods: int, rate_per_replica: float | None) -> int:
    if not rate_per_replica or demand.request_rate <= 0:
        return 0
    return max(0, min(pods, math.ceil(demand.request_rate / rate_per_replica)) - base)


def place(
    adapters: Iterable[AdapterDemand],
    pods: Sequence[PodSlots],
    *,
    load_factor: float = DEFAULT_LOAD_FACTOR,
    rate_per_replica: float | None = None,
    reserved: Sequence[ReservedSlot] = (),
) -> Placement:
    """The placement of ``adapters`` on ``pods`` (see the module doc)."""
    if load_factor < 1:
        raise ValueError(f"load_factor must be ≥ 1, got {load_factor}")
    demands = {d.name: d for d in adapters}
    by_name = {p.name: p for p in pods}
    slots = {s.name: s for s in reserved if s.name not in by_name}
    n = len(by_name)
    want = {a: _wanted(d, n, len(slots) if n else 0) for a, d in demands.items()}
    if n == 0:  # nothing serves: a reservation cannot keep anything available
        return Placement({a: () for a in demands}, {a: w for a, w in want.items() if w}, want)
    extra = {a: _hot(d, want[a], n, rate_per_replica) for a, d in demands.items()}

    total_capacity = sum(max(0, p.capacity) for p in by_name.values())
    total_want = sum(want.values())
    soft = {
        name: min(
            max(0, p.capacity),
            math.ceil(load_factor * total_want * max(0, p.capacity) / max(1, total_capacity)),
        )
        for name, p in by_name.items()
    }
    score: dict[tuple[str, str], int] = {}

    def hrw(adapter: str, pod: str) -> int:
        key = (adapter, pod)
        if key not in score:
            score[key] = rendezvous_score(adapter, pod)
        return score[key]

    def best_adapters(names: Iterable[str], pod: str) -> list[str]:
        return sorted(names, key=lambda a: -hrw(a, pod))

    def best_pods(adapter: str, names: Iterable[str]) -> list[str]:
        return sorted(names, key=lambda pod: -hrw(adapter, pod))

    held: dict[str, set[str]] = {a: set() for a in demands}
    load: dict[str, int] = dict.fromkeys(by_name, 0)

    # 1. keep: per pod, the loaded (or inherited) pairs still wanted, best-ranked first, up to
    #    the soft cap; then per adapter, at most its replicas and hot extras (best-ranked kept).
    for name in sorted(by_name):
        pod = by_name[name]
        keep = best_adapters((a for a in pod.loaded | pod.inherited if want.get(a, 0) > 0), name)
        for adapter in keep[: soft[name]]:
            held[adapter].add(name)
    for adapter, pods_held in held.items():
        limit = want[adapter] + extra[adapter]
        if len(pods_held) > limit:
            held[adapter] = set(best_pods(adapter, pods_held)[:limit])
    for pods_held in held.values():
        for name in pods_held:
            load[name] += 1

    # Reserved slots hold their adapters for a replacement pod while a ready pod still serves
    # the adapter and its replicas are not yet met; they never receive new adapters.
    waiting: dict[str, set[str]] = {a: set() for a in demands}
    for slot in sorted(slots.values(), key=lambda s: s.name):
        for adapter in sorted(slot.adapters):
            demand = demands.get(adapter)
            if demand is None or demand.replicas is None or not held[adapter]:
                continue
            if len(held[adapter]) + len(waiting[adapter]) < want[adapter]:
                waiting[adapter].add(slot.name)

    def add(adapter: str, missing: int, cap: Mapping[str, int]) -> int:
        if missing <= 0:
            return 0
        candidates = [
            name for name in by_name if name not in held[adapter] and load[name] < cap[name]
        ]
        candidates.sort(key=lambda pod: (load[pod], -hrw(adapter, pod)))
        chosen = candidates[:missing]
        for name in chosen:
            held[adapter].add(name)
            load[name] += 1
        return len(chosen)

    def swap(adapter: str) -> bool:
        """Free a full pod for ``adapter`` by moving one of its adapters to a pod with room.

        It always succeeds when the adapter is held on fewer pods than exist and some pod has
        room: that pod holds the adapter (else ``add`` had taken it), so every pod without it is
        full, and a full pod holds something the roomier pod lacks.
        """
        rooms = [name for name in by_name if load[name] < hard[name]]
        full = [name for name in by_name if name not in held[adapter] and load[name] >= hard[name]]
        for donor in sorted(full, key=lambda pod: -hrw(adapter, pod)):
            on_donor = [a for a in held if donor in held[a] and a != adapter]
            for moved in sorted(on_donor, key=lambda a: hrw(a, donor)):  # its worst-ranked first
                targets = [r for r in rooms if r != donor and r not in held[moved]]
                if not targets:
                    continue
                target = min(targets, key=lambda pod: (load[pod], -hrw(moved, pod)))
                held[moved].discard(donor)
                held[moved].add(target)
                load[target] += 1
                held[adapter].add(donor)
                return True
        return False

    # Most-wanted first: an adapter on every pod has the fewest choices.
    order = sorted(demands, key=lambda a: (-want[a], -demands[a].request_rate, a))
    hard = {name: max(0, p.capacity) for name, p in by_name.items()}

    # 2. place under the soft cap, 3. fill up to capacity
    def missing(adapter: str) -> int:
        return want[adapter] - len(held[adapter]) - len(waiting[adapter])

    for cap in (soft, hard):
        for adapter in order:
            add(adapter, missing(adapter), cap)
    # 3b. swap: room may be left only on pods that already hold the adapter (pods joined one by
    #     one and the first ones filled up). Then move another adapter from a full pod to such a
    #     pod, which frees the full pod for this one: one unload and two loads instead of a
    #     replica that stays unplaced for good.
    for adapter in order:
        while demands[adapter].displace and missing(adapter) > 0 and swap(adapter):
            pass
    # 4. hot extras, hottest first, from what room is left
    for adapter in sorted(demands, key=lambda a: (-demands[a].request_rate, a)):
        add(adapter, missing(adapter) + extra[adapter], hard)

    assignment = {a: tuple(sorted(held[a])) for a in demands}
    unplaced = {a: missing(a) for a in demands if missing(a) > 0}
    desired = {a: max(want[a], len(held[a])) for a in demands}
    kept: dict[str, set[str]] = {}
    for adapter, names in waiting.items():
        for slot_name in names:
            kept.setdefault(slot_name, set()).add(adapter)
    reserved_out = {s: tuple(sorted(kept.get(s, ()))) for s in sorted(slots)}
    return Placement(assignment, unplaced, desired, reserved_out)


__all__ = [
    "DEFAULT_LOAD_FACTOR",
    "AdapterDemand",
    "Placement",
    "PodSlots",
    "ReservedSlot",
    "place",
    "rendezvous_score",
]
