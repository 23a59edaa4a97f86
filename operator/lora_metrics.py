"""The operator's LoRA metrics (``shoal_operator_lora_*``), on the operator's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class LoraMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry or CollectorRegistry()
        self.registry = reg
        self.reconciles = Counter(
            "shoal_operator_lora_reconciles_total",
            "LoRA reconciles of one base Model's adapters, by result (ok, error)",
            ["result"],
            registry=reg,
        )
        self.duration = Histogram(
            "shoal_operator_lora_reconcile_duration_seconds",
            "Time one LoRA reconcile of a base Model's adapters took",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=reg,
        )
        self.engine_calls = Counter(
            "shoal_operator_lora_engine_calls_total",
            "Adapter loads and unloads sent to engines, by operation and result "
            "(ok, refused: the engine said no, unreachable: retries exhausted)",
            ["operation", "result"],
            registry=reg,
        )
        self.fetches = Counter(
            "shoal_operator_lora_source_fetches_total",
            "Adapter source fetches by scheme and result (ok, or the failure reason)",
            ["scheme", "result"],
            registry=reg,
        )
        self.adapters = Gauge(
            "shoal_operator_lora_adapters",
            "LoraAdapters per phase, as of each base Model's last reconcile",
            ["namespace", "model", "phase"],
            registry=reg,
        )
        self.unplaced = Gauge(
            "shoal_operator_lora_unplaced_replicas",
            "Adapter replicas that found no room within the engines' maxLoras",
            ["namespace", "model"],
            registry=reg,
        )
        self.unreachable_engines = Gauge(
            "shoal_operator_lora_unreachable_engines",
            "Ready engine pods whose /v1/models did not answer in the last reconcile",
            ["namespace", "model"],
            registry=reg,
        )
        self.reserved_slots = Gauge(
            "shoal_operator_lora_reserved_slots",
            "Vanished engine pods whose adapters are kept for their replacement pod",
            ["namespace", "model"],
            registry=reg,
        )
        self.reservations = Counter(
            "shoal_operator_lora_reservations_total",
            "Reserved slots by outcome: opened (a pod vanished), claimed (its replacement took "
            "its adapters), expired (no replacement in time), released (its pool scaled down)",
            ["outcome"],
            registry=reg,
        )
