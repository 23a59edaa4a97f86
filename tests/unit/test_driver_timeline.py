"""The real-time driver keeps the engine core's timeline when its event loop is briefly blocked.

vLLM's engine core runs in its own process: a blocked API-server loop (a /metrics render) delays
output delivery, not the GPU's next step. These tests block the driver's loop with a synchronous
sleep (as a render does) and check that the request still ends about when the model says, and
that a long block (an overloaded process) is not caught up on but shows as drift.
"""

from __future__ import annotations

import asyncio
import time

from shoal.sim.driver import CATCH_UP_LIMIT_S, AsyncEngine
from shoal.sim.engine import EngineCore, sized_engine_config
from shoal.sim.types import EngineRequest, SamplingParams

OUTPUT_TOKENS = 40


def _engine() -> AsyncEngine:
    return AsyncEngine(EngineCore(sized_engine_config(model="llama-3.1-8b", gpu="H100")))


def _modelled_s() -> float:
    """The simulated duration of the test request, stepped without any clock."""
    core = EngineCore(sized_engine_config(model="llama-3.1-8b", gpu="H100"))
    core.add_request(_request())
    total = 0.0
    while core.has_unfinished():
        total += core.step(0.0).duration
    return total


def _request() -> EngineRequest:
    return EngineRequest(
        "r", list(range(64)), SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    )


async def _run_with_block(block_s: float) -> tuple[float, AsyncEngine]:
    """Wall seconds the request took while the loop was blocked for ``block_s`` mid-way."""
    engine = _engine()
    await engine.start()
    loop = asyncio.get_running_loop()
    # A synchronous block, like a /metrics render on the API server's loop.
    loop.call_later(0.05, time.sleep, block_s)
    started = time.monotonic()
    try:
        async for _ in engine.generate(_request()):
            pass
    finally:
        await engine.stop()
    return time.monotonic() - started, engine


def test_a_short_block_delays_delivery_but_not_the_engine_timeline() -> None:
    modelled = _modelled_s()
    assert modelled > 0.2  # long enough that the block falls mid-request
    block = 0.03
    assert block < CATCH_UP_LIMIT_S
    took, engine = asyncio.run(_run_with_block(block))
    # Before, every step after the block started late: the request took modelled + block.
    assert took < modelled + block * 0.5, (took, modelled)
    # The step spanning the block was handed out late, but the timeline lost nothing overall.
    assert engine.drift.max_late_s >= block * 0.5
    assert engine.drift.actual_s - engine.drift.modelled_s < block * 0.5


def test_a_block_past_the_catch_up_limit_is_lost_time() -> None:
    modelled = _modelled_s()
    block = CATCH_UP_LIMIT_S * 3
    took, engine = asyncio.run(_run_with_block(block))
    assert took >= modelled + block * 0.8, (took, modelled)
    assert engine.drift.actual_s - engine.drift.modelled_s >= block * 0.8
