"""The autoscaler's own metrics (``shoal_autoscaler_*``), served on ``--metrics-port``.

Series are per pool (``namespace``, ``model``, ``pool``) and removed when the pool or its Model
goes, so cardinality is bounded by the pools that exist. The decision reason is a label of an
info-style gauge (1 for the current reason, the previous reason's series removed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

POOL_LABELS = ["namespace", "model", "pool"]


class AutoscalerMetrics:
    def __init__(self) -> None:
        reg = self.registry = CollectorRegistry()
        self.desired = Gauge(
            "shoal_autoscaler_desired_replicas",
            "Replicas the autoscaler wants for the pool (after min/max and the missing-data guard)",
            POOL_LABELS,
            registry=reg,
        )
        self.reason = Gauge(
            "shoal_autoscaler_decision_reason",
            "1 for the reason of the pool's latest decision",
            [*POOL_LABELS, "policy", "reason"],
            registry=reg,
        )
        self.decisions = Counter(
            "shoal_autoscaler_decisions",
            "Decisions taken, by reason",
            [*POOL_LABELS, "reason"],
            registry=reg,
        )
        self.observed = Gauge(
            "shoal_autoscaler_observed",
            "Inputs read from Prometheus for the pool's latest decision (NaN: unknown)",
            [*POOL_LABELS, "input"],
            registry=reg,
        )
        self.holds = Counter(
            "shoal_autoscaler_data_missing_holds",
            "Ticks the pool's replicas were held because load data was missing or stale "
            "(Prometheus down, NaN, no samples)",
            [*POOL_LABELS, "cause"],
            registry=reg,
        )
        self.scale_changes = Counter(
            "shoal_autoscaler_scale_changes",
            "Replica changes written to the Model, by direction",
            [*POOL_LABELS, "direction"],
            registry=reg,
        )
        self.errors = Counter(
            "shoal_autoscaler_errors",
            "Errors by stage (prometheus, kubernetes, policy, state)",
            ["stage"],
            registry=reg,
        )
        self.leader = Gauge(
            "shoal_autoscaler_leader", "1 while this replica holds the lease and acts", registry=reg
        )
        self.tick_duration = Histogram(
            "shoal_autoscaler_tick_duration_seconds",
            "Time one pass over every autoscaled Model took",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=reg,
        )
        for stage in ("prometheus", "kubernetes", "policy", "state"):
            self.errors.labels(stage)
        self._reasons: dict[tuple[str, str, str], tuple[str, str]] = {}
        self._inputs: dict[tuple[str, str, str], set[str]] = {}

    def record_decision(
        self, pool: tuple[str, str, str], policy: str, reason: str, replicas: int
    ) -> None:
        self.desired.labels(*pool).set(replicas)
        self.decisions.labels(*pool, reason).inc()
        old = self._reasons.get(pool)
        if old is not None and old != (policy, reason):
            self.reason.remove(*pool, *old)
        self.reason.labels(*pool, policy, reason).set(1)
        self._reasons[pool] = (policy, reason)

    def record_inputs(self, pool: tuple[str, str, str], values: Mapping[str, float | None]) -> None:
        for name, value in values.items():
            self.observed.labels(*pool, name).set(float("nan") if value is None else value)
        self._inputs.setdefault(pool, set()).update(values)

    def forget_pool(self, pool: tuple[str, str, str]) -> None:
        """Drop every series of a pool that no longer exists (or stopped autoscaling)."""
        for metric in (self.desired,):
            _remove(metric, pool)
        old = self._reasons.pop(pool, None)
        if old is not None:
            _remove(self.reason, (*pool, *old))
        for name in self._inputs.pop(pool, set()):
            _remove(self.observed, (*pool, name))

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose /metrics on a background thread (prometheus_client's own server)."""
        start_http_server(port, addr=addr, registry=self.registry)


def _remove(metric: Gauge, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
