"""The router's shared vocabulary: endpoints, what the router knows about them, and the request
being routed. Every other router module (discovery, scraping, the pipeline, the proxy, admission)
speaks in these types.

The routing pipeline has the shape of the Gateway API Inference Extension's endpoint picker:
*filters* drop endpoints that cannot serve the request, *scorers* rate the rest in [0, 1] and are
combined with per-model weights, a *picker* chooses one. A named strategy is a preset of filters,
weighted scorers and a picker (``router/strategies.py``), never a separate code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One engine replica reachable over HTTP (a pod IP and port, never a ClusterIP)."""

    url: str  # "http://10.244.1.5:8000"
    # Base model name(s) served; adapters come from the engine's /v1/models at run time.
    models: tuple[str, ...] = ()
    # Where its KV events are published ("tcp://10.244.1.5:5557"), if it publishes them.
    kv_events_endpoint: str | None = None
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class EngineMetrics:
    """The engine's own view, scraped from its ``/metrics`` (vLLM names)."""

    num_requests_running: float = 0.0
    num_requests_waiting: float = 0.0
    kv_cache_usage: float = 0.0  # 0..1
    prefix_cache_queries: float = 0.0
    prefix_cache_hits: float = 0.0
    # Adapters the engine reports via vllm:lora_requests_info (running ∪ waiting).
    active_loras: tuple[str, ...] = ()
    max_loras: int = 0
    scraped_at: float = 0.0  # monotonic seconds; 0 = never


@dataclass(slots=True)
class EndpointState:
    """Everything the router knows about one endpoint at decision time."""

    endpoint: Endpoint
    metrics: EngineMetrics = field(default_factory=EngineMetrics)
    # Metrics older than the staleness bound (or never scraped): treat as saturated.
    stale: bool = True
    healthy: bool = True
    # Router-local accounting of requests it sent there and has not seen finish.
    in_flight_requests: int = 0
    in_flight_tokens: int = 0  # prompt + expected output tokens of in-flight requests
    # Adapters loaded on the engine (from its /v1/models), name -> parent.
    loaded_adapters: frozenset[str] = frozenset()
    # Ejected after repeated failures until this monotonic time; probed back afterwards.
    ejected_until: float = 0.0

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def load(self) -> float:
        """One load number for bounded-load decisions: engine queue plus router in-flight."""
        return max(
            float(self.in_flight_requests),
            self.metrics.num_requests_running + self.metrics.num_requests_waiting,
        )


class Priority(IntEnum):
    """Admission classes, highest first (header ``x-shoal-priority`` or the API key's tenant)."""

    CRITICAL = 0
    STANDARD = 1
    SHEDDABLE = 2


@dataclass(slots=True)
class RoutingRequest:
    """A parsed client request as the pipeline sees it (the body is parsed exactly once)."""

    model: str  # the requested model name (a base model or an adapter)
    base_model: str  # the base model it runs on
    lora: str | None  # adapter name, or None for the base model
    prompt_token_ids: Sequence[int]  # tokenized prompt (chat template applied for chat)
    # Chained block hashes of the prompt (shoal.hashing), computed once by the proxy.
    block_hashes: Sequence[int]
    expected_output_tokens: int = 128
    session_id: str | None = None
    tenant: str = "default"
    priority: Priority = Priority.STANDARD
    stream: bool = False
    # Strategy override from the x-shoal-strategy header, validated by the proxy.
    strategy: str | None = None


class Filter(Protocol):
    """Drops endpoints that must not take the request. Must never return an empty list unless no
    endpoint qualifies; the proxy answers 503 then."""

    name: str

    def filter(
        self, request: RoutingRequest, candidates: Sequence[EndpointState]
    ) -> list[EndpointState]: ...


class Scorer(Protocol):
    """Rates each candidate in [0, 1] (higher is better), same order as ``candidates``."""

    name: str

    def score(
        self, request: RoutingRequest, candidates: Sequence[EndpointState]
    ) -> list[float]: ...


class Picker(Protocol):
    """Chooses one candidate from the combined scores (same order as ``candidates``)."""

    name: str

    def pick(
        self,
        request: RoutingRequest,
        candidates: Sequence[EndpointState],
        scores: Sequence[float],
    ) -> EndpointState: ...


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    endpoint: EndpointState
    strategy: str
    # The scorer whose weighted contribution decided the pick (for shoal_router_decisions_total).
    deciding_scorer: str
    scores: tuple[float, ...] = ()
