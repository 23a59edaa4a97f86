from __future__ import annotations

import asyncio

import pytest

from shoal.router.holding import HoldFull, HoldQueue, HoldTimeout, NoLongerDeclared


def test_waiter_is_released_when_the_name_becomes_servable() -> None:
    async def scenario() -> None:
        served: dict[str, str] = {}
        holds = HoldQueue(max_per_name=4, timeout_s=5.0)
        task = asyncio.create_task(holds.wait("m", "m", served.get))
        await asyncio.sleep(0.01)
        assert holds.depths() == {"m": 1}
        holds.notify()  # a change that does not help: keeps waiting
        await asyncio.sleep(0.01)
        assert not task.done()
        served["m"] = "endpoint"
        holds.notify()
        assert await asyncio.wait_for(task, 1.0) == "endpoint"
        assert holds.depths() == {}

    asyncio.run(scenario())


def test_wait_is_bounded_in_count_and_time() -> None:
    async def scenario() -> None:
        holds = HoldQueue(max_per_name=1, timeout_s=0.05)
        first = asyncio.create_task(holds.wait("a", "base", lambda _n: None))
        await asyncio.sleep(0)
        with pytest.raises(HoldFull):
            await holds.wait("b", "base", lambda _n: None)  # same base model: over the limit
        with pytest.raises(HoldTimeout):
            await first
        assert holds.depths() == {} and not holds.waiting

    asyncio.run(scenario())


def test_already_servable_name_does_not_wait_or_count() -> None:
    async def scenario() -> None:
        holds = HoldQueue(max_per_name=0, timeout_s=0.01)
        assert await holds.wait("m", "m", lambda _n: 1) == 1

    asyncio.run(scenario())


def test_waiter_leaves_when_its_name_is_no_longer_declared() -> None:
    async def scenario() -> None:
        declared = {"m"}
        holds = HoldQueue(max_per_name=4, timeout_s=5.0)
        task = asyncio.create_task(
            holds.wait("m", "m", lambda _n: None, lambda n: n in declared, recheck_s=0.01)
        )
        await asyncio.sleep(0.03)
        assert not task.done()
        declared.clear()  # the Model was deleted
        with pytest.raises(NoLongerDeclared):
            await asyncio.wait_for(task, 1.0)
        assert holds.depths() == {}

    asyncio.run(scenario())
