"""The operator's own metrics (``shoal_operator_*``), served on ``--metrics-port``."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "shoal_operator_reconciles_total",
            "Model reconciles by result (ok, error: the API refused; kopf retries it)",
            ["result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "shoal_operator_reconcile_duration_seconds",
            "Time one Model reconcile took",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )

    async def timed(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run one reconcile, counting and timing it."""
        started = time.monotonic()
        try:
            await work()
        except BaseException:
            self.reconciles.labels("error").inc()
            raise
        else:
            self.reconciles.labels("ok").inc()
        finally:
            self.duration.observe(time.monotonic() - started)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose /metrics on a background thread (prometheus_client's own server)."""
        start_http_server(port, addr=addr, registry=self.registry)
