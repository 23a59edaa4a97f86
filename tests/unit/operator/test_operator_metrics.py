"""The operator counts and times its reconciles."""

from __future__ import annotations

import asyncio

import pytest

from shoal.operator.metrics import OperatorMetrics


def test_timed_counts_ok_and_error() -> None:
    metrics = OperatorMetrics()

    async def ok() -> None:
        await asyncio.sleep(0)

    async def fails() -> None:
        raise RuntimeError("api refused")

    asyncio.run(metrics.timed(ok))
    with pytest.raises(RuntimeError):
        asyncio.run(metrics.timed(fails))
    value = metrics.registry.get_sample_value
    assert value("shoal_operator_reconciles_total", {"result": "ok"}) == 1.0
    assert value("shoal_operator_reconciles_total", {"result": "error"}) == 1.0
    assert value("shoal_operator_reconcile_duration_seconds_count") == 2.0
