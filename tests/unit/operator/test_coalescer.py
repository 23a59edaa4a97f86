"""The reconcile coalescer: never two reconciles of one model at once, bursts fold into one."""

from __future__ import annotations

import asyncio

from shoal.operator.handlers import Coalescer


def test_runs_never_overlap_and_bursts_fold() -> None:
    async def scenario() -> tuple[int, int]:
        c = Coalescer()
        running = 0
        peak = 0
        runs = 0

        async def work() -> None:
            nonlocal running, peak, runs
            running += 1
            runs += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

        for _ in range(5):  # repeated bursts, as deployment events during a rollout
            await asyncio.gather(*(c.run("ns/m", work) for _ in range(10)))
        await c.run("ns/m", work)  # a later request still runs (no leaked mark)
        assert not c.locks and not c.waiting
        return peak, runs

    peak, runs = asyncio.run(scenario())
    assert peak == 1
    assert runs == 5 * 2 + 1  # per burst: the first runs, one waiter folds the other eight


def test_cancelled_waiter_leaves_no_mark() -> None:
    async def scenario() -> None:
        c = Coalescer()
        gate = asyncio.Event()

        async def blocked() -> None:
            await gate.wait()

        first = asyncio.create_task(c.run("k", blocked))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(c.run("k", blocked))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert "k" not in c.waiting
        gate.set()
        await first
        ran = False

        async def mark() -> None:
            nonlocal ran
            ran = True

        await c.run("k", mark)
        assert ran

    asyncio.run(scenario())
