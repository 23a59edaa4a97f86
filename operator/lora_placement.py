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
3. *Fill*: replicas still missing may use any room up to the hard capacity.
4. *Hot extras*: adapters whose request rate exceeds ``rate_per_replica`` × replicas get more
   replicas, hottest first, from the room left (never displacing a base replica).

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
    """One adapter's wish: ``replicas`` pods (None: every ready pod), and its request rate."""

    name: str
    replicas: int | None = 1
    request_rate: float = 0.0


@dataclass(frozen=True)
class PodSlots:
    """A ready engine pod: how many adapters it may hold and which it holds now."""

    name: str
    capacity: int
    loaded: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Placement:
    """Adapter → the pods that should hold it; replicas that found no room."""

    assignment: dict[str, tuple[str, ...]]
    unplaced: dict[str, int] = field(default_factory=dict)
    desired: dict[str, int] = field(default_factory=dict)

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


def _wanted(demand: AdapterDemand, pods: int) -> int:
    if demand.replicas is None:
        return pods
    return max(0, min(demand.replicas, pods))


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
) -> Placement:
    """The placement of ``adapters`` on ``pods`` (see the module doc)."""
    if load_factor < 1:
        raise ValueError(f"load_factor must be ≥ 1, got {load_factor}")
    demands = {d.name: d for d in adapters}
    by_name = {p.name: p for p in pods}
    n = len(by_name)
    want = {a: _wanted(d, n) for a, d in demands.items()}
    if n == 0:
        return Placement({a: () for a in demands}, {a: w for a, w in want.items() if w}, want)

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

    # 1. keep: per pod, the loaded pairs still wanted, best-ranked first, up to the soft cap;
    #    then per adapter, at most its replicas (best-ranked kept).
    for name in sorted(by_name):
        keep = best_adapters((a for a in by_name[name].loaded if want.get(a, 0) > 0), name)
        for adapter in keep[: soft[name]]:
            held[adapter].add(name)
    for adapter, pods_held in held.items():
        if len(pods_held) > want[adapter]:
            held[adapter] = set(best_pods(adapter, pods_held)[: want[adapter]])
    for pods_held in held.values():
        for name in pods_held:
            load[name] += 1

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

    # Most-wanted first: an adapter on every pod has the fewest choices.
    order = sorted(demands, key=lambda a: (-want[a], -demands[a].request_rate, a))
    hard = {name: max(0, p.capacity) for name, p in by_name.items()}
    # 2. place under the soft cap, 3. fill up to capacity
    for cap in (soft, hard):
        for adapter in order:
            add(adapter, want[adapter] - len(held[adapter]), cap)
    # 4. hot extras, hottest first, from what room is left
    for adapter in sorted(demands, key=lambda a: (-demands[a].request_rate, a)):
        extra = _hot(demands[adapter], want[adapter], n, rate_per_replica)
        add(adapter, extra, hard)

    assignment = {a: tuple(sorted(held[a])) for a in demands}
    unplaced = {a: want[a] - len(held[a]) for a in demands if len(held[a]) < want[a]}
    desired = {a: max(want[a], len(held[a])) for a in demands}
    return Placement(assignment, unplaced, desired)


__all__ = [
    "DEFAULT_LOAD_FACTOR",
    "AdapterDemand",
    "Placement",
    "PodSlots",
    "place",
    "rendezvous_score",
]
