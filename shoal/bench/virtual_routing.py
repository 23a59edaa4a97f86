"""Shoal's production routing pipeline on the virtual-clock fleet.

``PipelineRouter`` runs a named strategy from ``router/strategies.py`` (the same filters, scorers,
picker, approximate prefix index and KV-event index the gateway uses) as a router of
``sim.cluster.ClusterSimulator``, so a routing policy is measured on hours of simulated traffic in
seconds, with no HTTP, no sockets and no time scaling between the router and the engines.

What the pipeline sees, and how that differs from the HTTP router:

- Endpoint state is read at each decision: the engine's running and waiting counts and KV cache
  usage, as fresh as a scrape that happened just now (the HTTP router scrapes every 200-800 ms),
  and the in-flight count is the engine's unfinished requests (the HTTP router counts what it
  sent and has not seen finish: the same number, less the network).
- KV events reach the precise index at the end of the engine step that produced them (over ZMQ
  they arrive a little later).
- Prompts are the simulator's token ids, hashed as the gateway hashes them
  (``shoal.hashing.block_hashes`` over at most ``MAX_ROUTING_BLOCKS`` blocks).

The ``in-flight-tokens`` scorer needs each request's token count from the gateway's accounting,
which the virtual fleet does not keep; a strategy or weight that uses it is refused.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from shoal.hashing import block_hashes
from shoal.kv_events import EventBatch, KvEvent
from shoal.router.kv_index import KvEventIndex
from shoal.router.pipeline import FallbackRecorder
from shoal.router.prefix_index import ApproxPrefixIndex
from shoal.router.request_body import MAX_ROUTING_BLOCKS
from shoal.router.scorers import DEFAULT_LOAD_FACTOR, DEFAULT_LOAD_SLACK, SessionTable
from shoal.router.strategies import build_pipeline, merged_weights
from shoal.router.types import Endpoint, EndpointState, EngineMetrics, RoutingRequest
from shoal.sim.cluster import EngineView
from shoal.sim.trace import TraceRequest


def engine_url(index: int) -> str:
    """The endpoint name of engine ``index`` (never dialled: the fleet is in-process)."""
    return f"http://virtual-engine-{index}"


class PipelineRouter:
    """A ``PromptRouter`` and ``KvEventSink`` that decides with Shoal's routing pipeline."""

    def __init__(
        self,
        strategy: str,
        weights: Mapping[str, float] | None = None,
        *,
        load_factor: float = DEFAULT_LOAD_FACTOR,
        load_slack: float = DEFAULT_LOAD_SLACK,
        seed: int = 0,
    ) -> None:
        if "in-flight-tokens" in merged_weights(strategy, weights):
            raise ValueError(
                "the in-flight-tokens scorer reads the gateway's per-request token accounting, "
                "which the virtual fleet does not keep; run it against `shoal sim` engines "
                "over HTTP"
            )
        self.now = 0.0
        clock = self.clock
        self.approx_index = ApproxPrefixIndex(clock=clock)
        self.kv_index = KvEventIndex()
        self.fallbacks = FallbackRecorder(clock=clock)
        self.pipeline = build_pipeline(
            strategy,
            weights,
            approx_index=self.approx_index,
            kv_index=self.kv_index,
            sessions=SessionTable(clock=clock),
            fallbacks=self.fallbacks,
            rng=random.Random(seed),
            clock=clock,
            load_factor=load_factor,
            load_slack=load_slack,
        )
        self._states: list[EndpointState] = []
        self._index_of: dict[str, int] = {}
        self._event_seq: dict[int, int] = {}  # engine -> next KV-event batch number

    def clock(self) -> float:
        """The virtual time of the decision being made (indexes expire entries by it)."""
        return self.now

    def _endpoint_states(self, engines: Sequence[EngineView]) -> list[EndpointState]:
        if len(self._states) != len(engines):
            self._states = [
                EndpointState(Endpoint(engine_url(v.index), models=(v.model,))) for v in engines
            ]
            self._index_of = {state.url: i for i, state in enumerate(self._states)}
        for state, view in zip(self._states, engines, strict=True):
            state.metrics = EngineMetrics(
                num_requests_running=float(view.num_running),
                num_requests_waiting=float(view.num_waiting),
                kv_cache_usage=view.kv_cache_usage,
                scraped_at=self.now,
            )
            state.stale = False
            state.in_flight_requests = view.num_unfinished
        return self._states

    def route_prompt(
        self, request: TraceRequest, prompt_ids: Sequence[int], engines: Sequence[EngineView]
    ) -> int:
        self.now = request.arrival_s
        states = self._endpoint_states(engines)
        size = engines[0].block_size
        model = engines[0].model
        routing = RoutingRequest(
            model=model,
            base_model=model,
            lora=None,
            prompt_token_ids=prompt_ids,
            block_hashes=block_hashes(prompt_ids[: MAX_ROUTING_BLOCKS * size], size),
            expected_output_tokens=request.output_tokens,
        )
        decision = self.pipeline.decide(routing, states)
        if decision is None:
            raise RuntimeError(f"strategy {self.pipeline.name!r} left no engine for a request")
        return self._index_of[decision.endpoint.url]

    def on_kv_events(self, engine: int, at_s: float, events: list[KvEvent]) -> None:
        # A publisher numbers its batches without gaps, one batch per step, as vLLM does.
        seq = self._event_seq.get(engine, 0)
        self._event_seq[engine] = seq + 1
        self.kv_index.apply(engine_url(engine), seq, EventBatch(at_s, events))
