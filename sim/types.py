"""The engine core's vocabulary: what goes in (requests), what comes out (outputs, stats).

The core is clock-agnostic: ``EngineCore.step(now)`` schedules one batch, returns how long that
step takes on the simulated GPU and what it produced. A real-time server sleeps that long; the
virtual-clock cluster simulator schedules an event that far ahead. Both drive the same core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from shoal.kv_events import KvEvent


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    # Distinguishes the n choices of one request so their texts differ, deterministically.
    seed: int = 0


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    lora_name: str | None = None
    arrival_time: float = 0.0
    # Requests of one client call (n > 1) share a parent; stats count the prompt once per choice
    # as vLLM does.
    priority: int = 0


@dataclass(slots=True)
class RequestOutput:
    """What one request produced in one step (or its end)."""

    request_id: str
    new_token_ids: list[int]
    # Text released to the client in this step; held back while it may still start a stop string.
    new_text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    # The stop string that ended the request, or None (EOS, length, abort).
    stop_reason: str | None = None
    num_prompt_tokens: int = 0
    # Prompt tokens served from the prefix cache (a multiple of the block size); known after the
    # first scheduled step.
    num_cached_tokens: int = 0
    num_output_tokens: int = 0


@dataclass(slots=True)
class FinishedRequestStats:
    """Per-request timings (simulated seconds) that the vLLM histograms observe."""

    request_id: str
    finish_reason: FinishReason
    lora_name: str | None
    num_prompt_tokens: int
    num_generation_tokens: int
    num_cached_tokens: int
    max_tokens: int
    arrival_time: float
    queued_time: float  # first time scheduled
    first_token_time: float
    finish_time: float
    num_preemptions: int
    # Gaps between consecutive output tokens.
    inter_token_latencies: list[float] = field(default_factory=list)

    @property
    def queue_time(self) -> float:
        return self.queued_time - self.arrival_time

    @property
    def ttft(self) -> float:
        return self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float:
        return self.finish_time - self.arrival_time

    @property
    def prefill_time(self) -> float:
        return self.first_token_time - self.queued_time

    @property
    def decode_time(self) -> float:
        return self.finish_time - self.first_token_time

    @property
    def inference_time(self) -> float:
        return self.finish_time - self.queued_time


@dataclass(slots=True)
class StepResult:
    # Simulated seconds the step takes; 0.0 when nothing was scheduled.
    duration: float
    outputs: list[RequestOutput]
    finished: list[FinishedRequestStats]
    kv_events: list[KvEvent]
    num_scheduled_tokens: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0


@dataclass(slots=True)
class EngineStats:
    """Counters and gauges since start, read by the metrics exporter at scrape time."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    prefix_cache_queries: int = 0  # tokens
    prefix_cache_hits: int = 0  # tokens
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    # Adapters with running / waiting requests right now.
    running_loras: tuple[str, ...] = ()
    waiting_loras: tuple[str, ...] = ()
