"""Admission control: who waits, who is refused, and in what order waiting requests go.

A request is admitted at once while the queue of its model is empty and at least one of the
model's endpoints has capacity (``has_capacity``). Otherwise it waits in the model's bounded
queue. Order in the queue:

1. priority first: critical, then standard, then sheddable;
2. within a priority, tenants share fairly by virtual token counters (VTC: Sheng et al.,
   "Fairness in Serving Large Language Models", OSDI 2024): the backlogged tenant with the
   smallest counter goes next; a tenant's counter advances by the weighted prompt and output
   tokens of its requests (divided by the tenant's weight). A tenant that becomes backlogged is
   lifted to the smallest counter among the backlogged ones, so time spent idle is not banked
   as credit to flood with later;
3. within a tenant, first come first served.

When the queue is full an arrival may displace the newest waiter of a *lower* priority (that one
is shed: 429); otherwise the arrival itself is refused (429). A waiter whose priority's timeout
passes is refused too (429). Sheddable requests have the shortest timeout, so under sustained
overload they are refused first on both counts.

One waiter at a time is "in transit": woken and about to dispatch. The next one is woken only
after it has dispatched (its in-flight count moved, so ``has_capacity`` sees it), which keeps a
single scrape that reports free capacity from releasing the whole queue at once.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from shoal.router.types import Priority

DEFAULT_INPUT_WEIGHT = 1.0
# The paper's default: an output token costs about twice an input token of service.
DEFAULT_OUTPUT_WEIGHT = 2.0


class Rejected(Exception):
    """The request was not admitted; answer 429 with ``Retry-After``."""

    def __init__(self, reason: str, retry_after_s: int) -> None:
        super().__init__(reason)
        self.reason = reason  # queue_full, shed, queue_timeout
        self.retry_after_s = retry_after_s


class VirtualTokenCounters:
    """Per-tenant virtual token counters of one model's queue; bounded to ``max_tenants``."""

    def __init__(
        self,
        input_weight: float = DEFAULT_INPUT_WEIGHT,
        output_weight: float = DEFAULT_OUTPUT_WEIGHT,
        max_tenants: int = 10_000,
    ) -> None:
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.max_tenants = max_tenants
        self._counters: dict[str, float] = {}
        self.last_served = 0.0  # counter of the tenant served last: the lift floor when idle

    def get(self, tenant: str) -> float:
        return self._counters.get(tenant, 0.0)

    def __len__(self) -> int:
        return len(self._counters)

    def _set(self, tenant: str, value: float, keep: Callable[[str], bool]) -> None:
        counters = self._counters
        counters.pop(tenant, None)
        counters[tenant] = value  # insertion order = recency: the oldest is evicted first
        if len(counters) > self.max_tenants:
            for name in list(counters):
                if name != tenant and not keep(name):
                    del counters[name]
                    if len(counters) <= self.max_tenants:
                        break

    def charge(
        self,
        tenant: str,
        prompt_tokens: int,
        output_tokens: int,
        weight: float,
        keep: Callable[[str], bool],
    ) -> None:
        cost = (self.input_weight * prompt_tokens + self.output_weight * output_tokens) / weight
        value = self.get(tenant) + cost
        self._set(tenant, value, keep)
        self.last_served = value

    def settle(self, tenant: str, expected_output: int, actual_output: int, weight: float) -> None:
        """Correct a charge made with the expected output length once the real one is known."""
        if tenant in self._counters:
            self._counters[tenant] += (
                self.output_weight * (actual_output - expected_output) / weight
            )

    def lift(self, tenant: str, floor: float, keep: Callable[[str], bool]) -> None:
        if self.get(tenant) < floor:
            self._set(tenant, floor, keep)


@dataclass(slots=True, eq=False)
class _Waiter:
    tenant: str
    priority: Priority
    prompt_tokens: int
    output_tokens: int
    weight: float
    seq: int
    future: asyncio.Future[None]


@dataclass(slots=True)
class _ModelQueue:
    counters: VirtualTokenCounters
    # priority -> tenant -> FIFO of waiters (empty deques are removed at once: bounded).
    classes: dict[Priority, dict[str, deque[_Waiter]]] = field(
        default_factory=lambda: {p: {} for p in Priority}
    )
    size: int = 0
    in_transit: int = 0
    # Mean gap between releases of waiters (an exponentially weighted moving average, seconds):
    # its inverse is the drain rate that Retry-After is estimated from. 0: nothing released yet.
    release_gap_s: float = 0.0
    last_release: float | None = None

    def note_release(self, now: float) -> None:
        if self.last_release is not None:
            gap = max(now - self.last_release, 1e-3)
            old = self.release_gap_s
            self.release_gap_s = gap if old == 0.0 else 0.8 * old + 0.2 * gap
        self.last_release = now

    def backlogged(self, tenant: str) -> bool:
        return any(tenant in tenants for tenants in self.classes.values())

    def push(self, w: _Waiter) -> None:
        self.classes[w.priority].setdefault(w.tenant, deque()).append(w)
        self.size += 1

    def remove(self, w: _Waiter) -> bool:
        tenants = self.classes[w.priority]
        fifo = tenants.get(w.tenant)
        if fifo is None:
            return False
        try:
            fifo.remove(w)
        except ValueError:
            return False
        if not fifo:
            del tenants[w.tenant]
        self.size -= 1
        return True

    def pop_next(self) -> _Waiter | None:
        for priority in Priority:  # CRITICAL first
            tenants = self.classes[priority]
            if not tenants:
                continue
            counters = self.counters
            tenant = min(tenants, key=lambda t: (counters.get(t), tenants[t][0].seq))
            fifo = tenants[tenant]
            w = fifo.popleft()
            if not fifo:
                del tenants[tenant]
            self.size -= 1
            return w
        return None

    def newest_below(self, priority: Priority) -> _Waiter | None:
        """The newest waiter of the lowest priority class that is lower than ``priority``."""
        for p in reversed(Priority):
            if p <= priority:
                return None
            tenants = self.classes[p]
            if tenants:
                return max((fifo[-1] for fifo in tenants.values()), key=lambda w: w.seq)
        return None

    def min_backlogged_counter(self, exclude: str) -> float | None:
        values = [
            self.counters.get(t)
            for tenants in self.classes.values()
            for t in tenants
            if t != exclude
        ]
        return min(values) if values else None


class Ticket:
    """An admitted request. ``dispatched()`` once its in-flight count has moved (or it gave up),
    so the queue may wake the next waiter."""

    __slots__ = ("_controller", "_done", "_model", "queued_s")

    def __init__(self, controller: AdmissionController | None, model: str, queued_s: float):
        self._controller = controller
        self._model = model
        self._done = controller is None
        self.queued_s = queued_s

    def dispatched(self) -> None:
        if not self._done:
            self._done = True
            assert self._controller is not None
            self._controller._transit_done(self._model)


class AdmissionController:
    def __init__(
        self,
        has_capacity: Callable[[str], bool],
        *,
        max_queue: int = 1024,
        queue_limits: Mapping[str, int] | None = None,
        timeout_s: Callable[[Priority], float] = lambda p: 30.0,
        tenant_weight: Callable[[str], float] = lambda t: 1.0,
        input_weight: float = DEFAULT_INPUT_WEIGHT,
        output_weight: float = DEFAULT_OUTPUT_WEIGHT,
        max_tenants: int = 10_000,
        max_models: int = 4096,
        retry_after_s: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._has_capacity = has_capacity
        self.max_queue = max_queue
        self._queue_limits = dict(queue_limits or {})
        self._timeout_s = timeout_s
        self._tenant_weight = tenant_weight
        self._input_weight = input_weight
        self._output_weight = output_weight
        self._max_tenants = max_tenants
        self._max_models = max_models
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._queues: dict[str, _ModelQueue] = {}
        self._seq = itertools.count()

    def _queue(self, model: str) -> _ModelQueue:
        q = self._queues.get(model)
        if q is None:
            if len(self._queues) >= self._max_models:
                # Forget an idle model's queue (its counters restart at 0: harmless when idle).
                for name, other in list(self._queues.items()):
                    if other.size == 0 and other.in_transit == 0:
                        del self._queues[name]
                        break
            q = self._queues[model] = _ModelQueue(
                VirtualTokenCounters(self._input_weight, self._output_weight, self._max_tenants)
            )
        return q

    def queue_limit(self, model: str) -> int:
        """How many requests may wait for ``model`` (its own limit, else the default)."""
        return self._queue_limits.get(model, self.max_queue)

    def retry_after(self, model: str) -> int:
        """Seconds a refused client should wait: the time the queue takes to drain at its
        recent release rate, within [default, 60]; the default when nothing drained yet."""
        q = self._queues.get(model)
        if q is None or q.release_gap_s <= 0.0:
            return self._retry_after_s
        return max(self._retry_after_s, min(60, math.ceil(q.size * q.release_gap_s)))

    def depth(self, model: str) -> int:
        q = self._queues.get(model)
        return 0 if q is None else q.size

    def depths(self) -> dict[str, int]:
        return {model: q.size for model, q in self._queues.items()}

    def counter(self, model: str, tenant: str) -> float:
        q = self._queues.get(model)
        return 0.0 if q is None else q.counters.get(tenant)

    async def admit(
        self,
        model: str,
        tenant: str,
        priority: Priority,
        prompt_tokens: int,
        output_tokens: int,
    ) -> Ticket:
        """Returns once the request may dispatch; raises :class:`Rejected` to refuse it."""
        q = self._queue(model)
        weight = self._tenant_weight(tenant)
        if q.size == 0 and q.in_transit == 0 and self._has_capacity(model):
            q.counters.charge(tenant, prompt_tokens, output_tokens, weight, q.backlogged)
            return Ticket(None, model, 0.0)
        if q.size >= self.queue_limit(model):
            victim = q.newest_below(priority)
            if victim is None:
                raise Rejected("queue_full", self.retry_after(model))
            q.remove(victim)
            victim.future.set_exception(Rejected("shed", self.retry_after(model)))
        if not q.backlogged(tenant):
            floor = q.min_backlogged_counter(tenant)
            q.counters.lift(
                tenant, q.counters.last_served if floor is None else floor, q.backlogged
            )
        loop = asyncio.get_running_loop()
        w = _Waiter(
            tenant,
            priority,
            prompt_tokens,
            output_tokens,
            weight,
            next(self._seq),
            loop.create_future(),
        )
        q.push(w)
        started = self._clock()
        self.pump(model)
        try:
            await asyncio.wait_for(asyncio.shield(w.future), self._timeout_s(priority))
        except TimeoutError:
            if q.remove(w):
                raise Rejected("queue_timeout", self.retry_after(model)) from None
            if w.future.done() and w.future.exception() is None:
                # Woken in the same instant the timeout fired: it holds the transit slot.
                return Ticket(self, model, self._clock() - started)
            raise Rejected("queue_timeout", self.retry_after(model)) from None
        except asyncio.CancelledError:
            # The client went away while waiting.
            if not q.remove(w) and w.future.done() and w.future.exception() is None:
                self._transit_done(model)
            raise
        return Ticket(self, model, self._clock() - started)

    def pump(self, model: str) -> None:
        """Wake the next waiter if the model has capacity and nobody is already in transit."""
        q = self._queues.get(model)
        if q is None:
            return
        while q.size and q.in_transit == 0 and self._has_capacity(model):
            w = q.pop_next()
            if w is None or w.future.done():
                continue
            q.counters.charge(w.tenant, w.prompt_tokens, w.output_tokens, w.weight, q.backlogged)
            q.in_transit += 1
            q.note_release(self._clock())
            w.future.set_result(None)

    def pump_all(self) -> None:
        for model in list(self._queues):
            self.pump(model)

    def settle(self, model: str, tenant: str, expected_output: int, actual_output: int) -> None:
        q = self._queues.get(model)
        if q is not None:
            q.counters.settle(tenant, expected_output, actual_output, self._tenant_weight(tenant))

    def _transit_done(self, model: str) -> None:
        q = self._queues.get(model)
        if q is not None:
            q.in_transit = max(0, q.in_transit - 1)
            self.pump(model)
