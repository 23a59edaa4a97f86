"""The replacement tracker: a vanished pod's adapters are reserved for the next new pod of its
pool for a grace period plus its start-up time, then released."""

from __future__ import annotations

import pytest

from shoal.operator.lora_placement import AdapterDemand, Placement, PodSlots, place
from shoal.operator.lora_replacement import MAX_STARTUP_S, ReadyPod, ReplacementTracker

ADAPTERS = [AdapterDemand(f"a{i}", 2) for i in range(8)]


def _pods(*names: str, pool: str = "h100", startup: float = 5.0) -> list[ReadyPod]:
    return [ReadyPod(n, pool, startup) for n in names]


def _round(
    tracker: ReplacementTracker,
    now: float,
    ready: list[ReadyPod],
    desired: dict[str, int],
    loaded: dict[str, set[str]],
) -> tuple[Placement, dict[str, set[str]]]:
    """One reconcile: plan, place, record; returns the placement and what is loaded after."""
    plan = tracker.plan(now, ready, desired)
    slots = [
        PodSlots(
            p.name, 8, frozenset(loaded.get(p.name, ())), plan.inherited.get(p.name, frozenset())
        )
        for p in ready
    ]
    placement = place(ADAPTERS, slots, reserved=plan.reserved)
    tracker.record(placement, ready)
    return placement, placement.by_pod()


def test_a_deleted_pods_replacement_gets_its_adapters_and_survivors_keep_theirs() -> None:
    t = ReplacementTracker(grace_s=60)
    pods = _pods("p0", "p1", "p2", "p3")
    _, loaded = _round(t, 0, pods, {"h100": 4}, {})
    lost = loaded["p1"]
    assert lost
    survivors = [p for p in pods if p.name != "p1"]
    during, after_delete = _round(t, 10, survivors, {"h100": 4}, loaded)
    assert t.slots == 1 and set(during.reserved["p1"]) == lost
    assert after_delete == {p: loaded[p] for p in ("p0", "p2", "p3")}  # nothing moved
    plan = t.plan(20, [*survivors, ReadyPod("p1-new", "h100", 5.0)], {"h100": 4})
    assert plan.claimed == {"p1-new": "p1"}
    assert plan.inherited == {"p1-new": frozenset(lost)}
    assert plan.reserved == []


def test_slots_open_only_while_the_pool_is_below_its_desired_size() -> None:
    t = ReplacementTracker(grace_s=60)
    t.record(place(ADAPTERS, [PodSlots(p, 8) for p in ("p0", "p1", "p2")]), _pods("p0", "p1", "p2"))
    scale_down = t.plan(5, _pods("p0", "p1"), {"h100": 2})
    assert scale_down.opened == [] and t.slots == 0
    t.record(place(ADAPTERS, [PodSlots(p, 8) for p in ("p0", "p1")]), _pods("p0", "p1"))
    lost = t.plan(6, _pods("p0"), {"h100": 2})
    assert lost.opened == ["p1"] and [s.name for s in lost.reserved] == ["p1"]


def test_a_slot_expires_after_the_grace_period_plus_the_pods_start_up() -> None:
    t = ReplacementTracker(grace_s=60)
    ready = _pods("p0", "p1", startup=30.0)
    t.record(place(ADAPTERS, [PodSlots(p.name, 8) for p in ready]), ready)
    assert t.plan(100, ready[:1], {"h100": 2}).opened == ["p1"]
    assert [s.name for s in t.plan(189.9, ready[:1], {"h100": 2}).reserved] == ["p1"]
    late = t.plan(190.0, ready[:1], {"h100": 2})  # 100 + 60 + 30
    assert late.expired == ["p1"] and late.reserved == [] and t.slots == 0


def test_start_up_counts_at_most_the_startup_probes_limit() -> None:
    t = ReplacementTracker(grace_s=0)
    ready = _pods("p0", "p1", startup=1e9)
    t.record(place(ADAPTERS, [PodSlots(p.name, 8) for p in ready]), ready)
    t.plan(0, ready[:1], {"h100": 2})
    assert t.plan(MAX_STARTUP_S - 1, ready[:1], {"h100": 2}).reserved
    assert t.plan(MAX_STARTUP_S, ready[:1], {"h100": 2}).expired == ["p1"]


def test_a_pod_back_under_its_own_name_takes_its_own_slot_first() -> None:
    t = ReplacementTracker(grace_s=60)
    ready = _pods("p0", "p1", "p2")
    placement = place(ADAPTERS, [PodSlots(p.name, 8) for p in ready])
    t.record(placement, ready)
    t.plan(1, _pods("p1", "p2"), {"h100": 3})  # p0 goes first: the older slot
    t.plan(2, _pods("p2"), {"h100": 3})
    back = t.plan(3, _pods("p1", "p2"), {"h100": 3})
    assert back.claimed == {"p1": "p1"}
    assert back.inherited["p1"] == frozenset(placement.by_pod()["p1"])
    assert [s.name for s in back.reserved] == ["p0"]


def test_only_a_new_reachable_pod_of_the_same_pool_claims() -> None:
    t = ReplacementTracker(grace_s=60)
    ready = [ReadyPod("a0", "a10g"), ReadyPod("h0", "h100"), ReadyPod("h1", "h100")]
    t.record(place(ADAPTERS, [PodSlots(p.name, 8) for p in ready]), ready)
    desired = {"a10g": 1, "h100": 2}
    t.plan(1, ready[:2], desired)  # h1 vanished
    other_pool = t.plan(2, [*ready[:2], ReadyPod("a1", "a10g")], desired)
    assert other_pool.claimed == {} and t.slots == 1
    silent = t.plan(3, [*ready[:2], ReadyPod("h9", "h100")], desired, reachable={"a0", "h0"})
    assert silent.claimed == {} and t.slots == 1
    ok = t.plan(4, [*ready[:2], ReadyPod("h9", "h100")], desired, reachable={"a0", "h0", "h9"})
    assert ok.claimed == {"h9": "h1"}


def test_a_slot_is_released_when_the_pool_is_back_at_size_without_claiming_it() -> None:
    t = ReplacementTracker(grace_s=60)
    ready = _pods("p0", "p1")
    t.record(place(ADAPTERS, [PodSlots(p.name, 8) for p in ready]), ready)
    t.plan(1, ready[:1], {"h100": 2})
    shrunk = t.plan(2, ready[:1], {"h100": 1})  # scaled down meanwhile
    assert shrunk.released == ["p1"] and shrunk.reserved == []


def test_recording_drops_what_the_placement_no_longer_keeps_in_a_slot() -> None:
    t = ReplacementTracker(grace_s=60)
    ready = _pods("p0", "p1")
    t.record(place(ADAPTERS, [PodSlots(p.name, 8) for p in ready]), ready)
    plan = t.plan(1, ready[:1], {"h100": 2})
    assert t.slots == 1
    # the survivor lists nothing loaded (say it restarted too): no ready pod serves what p1
    # held, so nothing waits and the slot is gone once the placement is recorded
    placement = place(ADAPTERS, [PodSlots("p0", 8)], reserved=plan.reserved)
    assert placement.reserved == {"p1": ()}
    t.record(placement, ready[:1])
    assert t.slots == 0


def test_negative_grace_is_refused() -> None:
    with pytest.raises(ValueError, match="grace"):
        ReplacementTracker(grace_s=-1)


def test_a_replacement_already_ready_when_the_loss_is_seen_still_gets_the_slot() -> None:
    t = ReplacementTracker(grace_s=60)
    ready = _pods("p0", "p1", "p2")
    placement = place(ADAPTERS, [PodSlots(p.name, 8) for p in ready])
    t.record(placement, ready)
    # p2 is gone and its replacement is ready (not answering yet) in the same round
    now = [*ready[:2], ReadyPod("p2-new", "h100")]
    first = t.plan(1, now, {"h100": 3}, reachable={"p0", "p1"})
    assert first.opened == ["p2"] and first.claimed == {} and t.slots == 1
    second = t.plan(2, now, {"h100": 3})
    assert second.claimed == {"p2-new": "p2"}
    assert second.inherited["p2-new"] == frozenset(placement.by_pod()["p2"])
