"""Holding requests for declared names that no engine serves yet (scale from zero, adapter loads).

A request for a ``Model`` at zero replicas, or for an adapter not loaded anywhere yet, waits here
until some engine serves the name, bounded twice: at most ``max_per_name`` requests wait per
name (more get 503 at once) and each waits at most ``timeout_s`` (then 503 with ``Retry-After``).
The count of waiting requests per base model is exported as ``shoal_router_held_requests``: it is
the signal the autoscaler reads to scale a Model up from zero, since a Model with no engines has
no engine metrics at all.

Waiters wake when the engine state store's name map changes (``notify``), not by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class HoldFull(Exception):
    """Too many requests already wait for this name."""


class NoLongerDeclared(Exception):
    """The name was undeclared (its resource deleted) while the request waited."""


class HoldTimeout(Exception):
    """No engine came to serve the name within the hold timeout."""


class HoldQueue:
    def __init__(self, *, max_per_name: int, timeout_s: float) -> None:
        self.max_per_name = max_per_name
        self.timeout_s = timeout_s
        self._held: dict[str, int] = {}  # base model -> requests waiting
        self._changed = asyncio.Event()

    def notify(self) -> None:
        """The set of served names changed: every waiter re-checks its name."""
        self._changed.set()
        # Waiters already woken hold a reference to the old event; new waits use a fresh one.
        self._changed = asyncio.Event()

    @property
    def waiting(self) -> bool:
        return bool(self._held)

    def depths(self) -> dict[str, int]:
        return dict(self._held)

    async def wait(
        self,
        name: str,
        base: str,
        resolve: Callable[[str], T | None],
        still_declared: Callable[[str], bool] = lambda _name: True,
        recheck_s: float = 1.0,
    ) -> T:
        """What ``resolve(name)`` returns once it is not None; raises HoldFull, HoldTimeout, or
        NoLongerDeclared when the name's Model or adapter was deleted meanwhile (re-checked on
        every change and at least every ``recheck_s``)."""
        found = resolve(name)
        if found is not None:
            return found
        if self._held.get(base, 0) >= self.max_per_name:
            raise HoldFull(base)
        self._held[base] = self._held.get(base, 0) + 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise HoldTimeout(name)
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(remaining, recheck_s))
                found = resolve(name)
                if found is not None:
                    return found
                if not still_declared(name):
                    raise NoLongerDeclared(name)
        finally:
            left = self._held[base] - 1
            if left:
                self._held[base] = left
            else:
                del self._held[base]
