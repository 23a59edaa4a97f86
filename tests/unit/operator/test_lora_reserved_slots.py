"""LoRA placement with reserved slots (a vanished pod's adapters kept for its replacement) and
hot adapters' extra replicas kept while they stay hot."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.operator.lora_placement import (
    AdapterDemand,
    Placement,
    PodSlots,
    ReservedSlot,
    place,
)


def _pods(n: int, capacity: int, placement: Placement | None = None) -> list[PodSlots]:
    loaded = placement.by_pod() if placement else {}
    return [PodSlots(f"pod-{i}", capacity, frozenset(loaded.get(f"pod-{i}", ()))) for i in range(n)]


def _adapters(replicas: list[int | None]) -> list[AdapterDemand]:
    return [AdapterDemand(f"a{i}", r) for i, r in enumerate(replicas)]


@settings(max_examples=200, deadline=None)
@given(
    replicas=st.lists(st.one_of(st.integers(1, 3), st.none()), min_size=1, max_size=60),
    n=st.integers(2, 8),
    capacity=st.integers(1, 30),
    removed=st.integers(0, 7),
)
def test_a_reserved_slot_keeps_survivors_still_and_hands_its_adapters_to_the_replacement(
    replicas: list[int | None], n: int, capacity: int, removed: int
) -> None:
    adapters = _adapters(replicas)
    before = place(adapters, _pods(n, capacity))
    gone = f"pod-{removed % n}"
    lost = frozenset(before.by_pod().get(gone, set()))
    survivors = [p for p in _pods(n, capacity, before) if p.name != gone]
    during = place(adapters, survivors, reserved=[ReservedSlot(gone, lost)])

    for pod, held in during.by_pod().items():
        assert len(held) <= capacity, pod
    reserved = set(during.reserved[gone])
    assert reserved <= lost
    for a in adapters:
        was = set(before.pods_of(a.name))
        now = set(during.pods_of(a.name))
        others = was - {gone}
        assert others <= now  # nothing a survivor held moved
        if a.name in reserved:
            # kept for the replacement: only while a ready pod serves it, never for "all"
            assert others and a.replicas is not None
            assert now == others  # the survivors did not take it over
        elif a.name in lost and not others and capacity * (n - 1) > 0:
            # its only replica was on the vanished pod: re-placed at once when room allows
            assert now or during.unplaced.get(a.name), a.name
        assert len(now) + during.reserved_for(a.name) + during.unplaced.get(a.name, 0) >= min(
            len(was), n - 1
        )

    # the replacement inherits the slot: it holds what was reserved, the rest stays put
    new = PodSlots("pod-new", capacity, inherited=frozenset(reserved))
    after = place(adapters, [*_with(survivors, during), new])
    took = after.by_pod().get("pod-new", set())
    assert reserved <= took
    pairs = {(a.name, p) for a in adapters for p in during.pods_of(a.name)}
    moved = pairs - {(a.name, p) for a in adapters for p in after.pods_of(a.name)}
    assert len(moved) <= len(took - reserved)  # beyond the slot, only the usual rebalancing
    assert after.reserved == {}


def _with(pods: list[PodSlots], placement: Placement) -> list[PodSlots]:
    """The pods with what ``placement`` assigned them loaded."""
    by_pod = placement.by_pod()
    return [PodSlots(p.name, p.capacity, frozenset(by_pod.get(p.name, ()))) for p in pods]


def test_replacement_gets_exactly_its_predecessors_adapters_and_nothing_moves_meanwhile() -> None:
    adapters = _adapters([2] * 20)
    before = place(adapters, _pods(4, 12))
    lost = frozenset(before.by_pod()["pod-1"])
    survivors = [p for p in _pods(4, 12, before) if p.name != "pod-1"]
    # Without a reservation the survivors take the lost replicas at once (3 x 12 slots hold 36)
    eager = place(adapters, survivors)
    assert sum(len(v) for v in eager.by_pod().values()) == 36
    # With one, nothing moves: each lost replica waits for the replacement, still served elsewhere
    during = place(adapters, survivors, reserved=[ReservedSlot("pod-1", lost)])
    assert during.by_pod() == {p.name: set(p.loaded) for p in survivors}
    assert set(during.reserved["pod-1"]) == lost
    assert during.unplaced == {}
    assert all(during.reserved_for(a) == 1 for a in lost)
    assert during.desired == {a.name: 2 for a in adapters}
    new = PodSlots("pod-1b", 12, inherited=lost)
    after = place(adapters, [*_with(survivors, during), new])
    assert after.by_pod()["pod-1b"] == set(lost)
    assert after.by_pod() == {**{p.name: set(p.loaded) for p in survivors}, "pod-1b": set(lost)}


def test_an_adapter_whose_only_replica_vanished_is_placed_again_at_once() -> None:
    only = AdapterDemand("only", 1)
    pods = [PodSlots("p0", 4, frozenset({"only"})), PodSlots("p1", 4), PodSlots("p2", 4)]
    during = place([only], pods[1:], reserved=[ReservedSlot("p0", frozenset({"only"}))])
    assert len(during.pods_of("only")) == 1  # availability first
    assert during.reserved == {"p0": ()}
    # replicas 2 whose both holders vanished: both placed again at once
    pair = AdapterDemand("pair", 2)
    slots = [ReservedSlot("p0", frozenset({"pair"})), ReservedSlot("p1", frozenset({"pair"}))]
    both = place([pair], [PodSlots("p2", 4), PodSlots("p3", 4)], reserved=slots)
    assert set(both.pods_of("pair")) == {"p2", "p3"}
    assert both.reserved_for("pair") == 0


def test_adapters_on_every_pod_are_never_reserved() -> None:
    every = AdapterDemand("every", None)
    pods = [PodSlots("p1", 4, frozenset({"every"})), PodSlots("p2", 4, frozenset({"every"}))]
    p = place([every], pods, reserved=[ReservedSlot("p0", frozenset({"every"}))])
    assert set(p.pods_of("every")) == {"p1", "p2"}
    assert p.reserved_for("every") == 0 and p.desired["every"] == 2


def test_a_slot_that_is_no_longer_passed_releases_its_adapters_to_the_survivors() -> None:
    adapters = _adapters([2] * 6)
    before = place(adapters, _pods(3, 8))
    lost = frozenset(before.by_pod()["pod-0"])
    survivors = [p for p in _pods(3, 8, before) if p.name != "pod-0"]
    during = place(adapters, survivors, reserved=[ReservedSlot("pod-0", lost)])
    assert all(len(during.pods_of(a)) == 1 for a in lost)
    expired = place(adapters, _with(survivors, during))  # grace period over
    assert all(len(expired.pods_of(a.name)) == 2 for a in adapters)
    assert expired.reserved == {}


def test_a_reserved_slot_never_serves_when_no_pod_is_ready() -> None:
    p = place(_adapters([2]), [], reserved=[ReservedSlot("p0", frozenset({"a0"}))])
    assert p.assignment == {"a0": ()}
    assert p.reserved == {} and p.reserved_for("a0") == 0


def test_hot_extras_follow_the_rate_and_stay_put_while_hot() -> None:
    cold = [AdapterDemand(f"c{i}", 1) for i in range(4)]
    hot = AdapterDemand("hot", 1, request_rate=2.5)
    first = place([hot, *cold], _pods(5, 4), rate_per_replica=1.0)
    assert len(first.pods_of("hot")) == 3  # ceil(2.5 / 1.0)
    again = place([hot, *cold], _pods(5, 4, first), rate_per_replica=1.0)
    assert again.assignment == first.assignment  # the loaded extras are kept, not reshuffled
    cooled = AdapterDemand("hot", 1, request_rate=0.4)
    calm = place([cooled, *cold], _pods(5, 4, again), rate_per_replica=1.0)
    assert len(calm.pods_of("hot")) == 1 and set(calm.pods_of("hot")) <= set(first.pods_of("hot"))
    # no threshold: the rate is ignored
    assert len(place([hot, *cold], _pods(5, 4)).pods_of("hot")) == 1
