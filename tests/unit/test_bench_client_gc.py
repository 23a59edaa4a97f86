"""The load generator freezes its heap during a run so that its own full collections (11-22 ms
each, measured) do not stall the requests of whichever router is being measured."""

from __future__ import annotations

import gc

import pytest

from shoal.bench.client import gc_frozen


def test_objects_are_frozen_during_the_block_and_released_after() -> None:
    before = gc.get_freeze_count()
    kept = [object() for _ in range(10)]
    with gc_frozen():
        assert gc.get_freeze_count() > before  # kept and everything else alive is frozen
        assert gc.isenabled()  # cycles made during the run are still collected
    assert gc.get_freeze_count() == 0
    assert kept


def test_an_error_in_the_block_still_unfreezes() -> None:
    with pytest.raises(RuntimeError), gc_frozen():
        raise RuntimeError("run failed")
    assert gc.get_freeze_count() == 0
