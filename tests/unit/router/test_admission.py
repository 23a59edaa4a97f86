"""Admission: priorities, shedding order, timeouts and VTC fairness between tenants."""

from __future__ import annotations

import asyncio

import pytest

from shoal.router.admission import AdmissionController, Rejected, VirtualTokenCounters
from shoal.router.types import Priority


class Capacity:
    """A fake fleet with ``slots`` concurrent requests."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.busy = 0

    def __call__(self, model: str) -> bool:
        return self.busy < self.slots


def test_admits_at_once_with_capacity() -> None:
    async def main() -> None:
        cap = Capacity(1)
        ac = AdmissionController(cap)
        ticket = await ac.admit("m", "t", Priority.STANDARD, 10, 10)
        assert ticket.queued_s == 0.0
        assert ac.counter("m", "t") == 10 + 2 * 10

    asyncio.run(main())


def test_priorities_order_the_queue_and_full_queue_sheds_lowest() -> None:
    async def main() -> None:
        cap = Capacity(0)
        ac = AdmissionController(cap, max_queue=2)
        order: list[str] = []

        async def req(name: str, priority: Priority) -> str:
            try:
                ticket = await ac.admit("m", name, priority, 1, 1)
            except Rejected as exc:
                return f"{name}:{exc.reason}"
            order.append(name)
            cap.busy += 1
            ticket.dispatched()
            return f"{name}:ok"

        shed1 = asyncio.create_task(req("s1", Priority.SHEDDABLE))
        shed2 = asyncio.create_task(req("s2", Priority.SHEDDABLE))
        await asyncio.sleep(0)
        std = asyncio.create_task(req("std", Priority.STANDARD))  # displaces s2 (newest)
        await asyncio.sleep(0)
        late = asyncio.create_task(req("s3", Priority.SHEDDABLE))  # refused: queue full
        crit = asyncio.create_task(req("crit", Priority.CRITICAL))  # displaces s1
        await asyncio.sleep(0)
        assert await late == "s3:queue_full"
        assert await shed2 == "s2:shed"
        assert await shed1 == "s1:shed"
        cap.slots = 10
        ac.pump("m")
        assert await crit == "crit:ok"
        assert await std == "std:ok"
        assert order == ["crit", "std"]

    asyncio.run(main())


def test_waiting_past_the_deadline_is_refused() -> None:
    async def main() -> None:
        ac = AdmissionController(Capacity(0), timeout_s=lambda p: 0.05)
        with pytest.raises(Rejected) as info:
            await ac.admit("m", "t", Priority.SHEDDABLE, 1, 1)
        assert info.value.reason == "queue_timeout"
        assert ac.depth("m") == 0

    asyncio.run(main())


def test_vtc_keeps_light_tenant_latency_bounded_under_a_flood() -> None:
    """A heavy tenant queues 200 requests; a light tenant sends one at a time. Served one by one,
    the light tenant's requests each wait for at most a couple of heavy ones, not the backlog."""

    async def main() -> None:
        cap = Capacity(1)
        ac = AdmissionController(cap, max_queue=10_000)
        served: list[str] = []

        async def req(tenant: str) -> None:
            ticket = await ac.admit("m", tenant, Priority.STANDARD, 100, 100)
            cap.busy += 1
            ticket.dispatched()
            served.append(tenant)

        cap.busy = 1  # saturated: everything queues
        heavy = [asyncio.create_task(req("heavy")) for _ in range(200)]
        await asyncio.sleep(0)
        light_waits: list[int] = []
        for _ in range(10):
            before = len(served)
            light = asyncio.create_task(req("light"))
            await asyncio.sleep(0)
            while not light.done():  # the fleet finishes one request at a time
                cap.busy -= 1
                ac.pump("m")
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            light_waits.append(len(served) - before - 1)
        assert max(light_waits) <= 2, light_waits
        cap.slots = 1000
        ac.pump("m")
        await asyncio.gather(*heavy)

    asyncio.run(main())


def test_idle_tenant_does_not_bank_credit() -> None:
    counters = VirtualTokenCounters(max_tenants=2)
    counters.charge("a", 1000, 0, 1.0, lambda t: False)
    counters.lift("b", counters.get("a"), lambda t: False)
    assert counters.get("b") == counters.get("a")
    counters.charge("c", 1, 0, 1.0, lambda t: False)
    assert len(counters) == 2  # bounded


def test_per_model_queue_limit_and_retry_after_from_the_drain_rate() -> None:
    now = [0.0]

    async def main() -> None:
        cap = Capacity(0)
        ac = AdmissionController(
            cap, max_queue=100, queue_limits={"small": 1}, clock=lambda: now[0]
        )
        assert ac.queue_limit("small") == 1 and ac.queue_limit("other") == 100
        held = asyncio.create_task(ac.admit("small", "t", Priority.STANDARD, 1, 1))
        await asyncio.sleep(0)
        with pytest.raises(Rejected) as refused:
            await ac.admit("small", "t", Priority.STANDARD, 1, 1)
        assert refused.value.reason == "queue_full"
        assert refused.value.retry_after_s == 1  # nothing drained yet: the default
        waiting = [
            asyncio.create_task(ac.admit("other", "t", Priority.STANDARD, 1, 1)) for _ in range(10)
        ]
        await asyncio.sleep(0)
        # One waiter released every 4 s.
        for _ in range(3):
            cap.slots = 1
            ac.pump("other")
            cap.slots = 0
            for _ in range(3):
                await asyncio.sleep(0)
            released = next(t for t in waiting if t.done())
            waiting.remove(released)
            released.result().dispatched()
            now[0] += 4.0
        assert ac.depth("other") == 7
        assert ac.retry_after("other") == 7 * 4  # 7 waiting × 4 s between releases
        for t in [*waiting, held]:
            t.cancel()
        await asyncio.gather(*waiting, held, return_exceptions=True)

    asyncio.run(main())
