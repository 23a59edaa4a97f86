"""The engine simulator's ``/metrics``: vLLM 0.32.0's Prometheus exposition, family for family.

Every family, TYPE, HELP text, label set and bucket boundary matches the recording of a real vLLM
server in ``shared/golden/vllm-0.32.0`` (checked by ``tests/unit/test_metrics.py``), so dashboards,
alert rules and the autoscaler cannot tell the simulator from vLLM. Families are registered in the
order vLLM registers them, so even the text reads the same.

Families the simulator has nothing to feed exist and stay at 0, exactly as on a vLLM server with
those features idle:

- ``vllm:estimated_{flops,read_bytes,write_bytes}_per_gpu_total`` (MFU estimation),
- ``vllm:external_prefix_cache_{queries,hits}_total`` (KV connector),
- ``vllm:mm_cache_{queries,hits}_total`` (multi-modal),
- ``vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}`` and the non-device
  sources of ``vllm:prompt_tokens_cached_by_source_total``,
- ``vllm:request_success_total{finished_reason="repetition"}``,
- ``vllm:num_requests_waiting_by_reason{reason="deferred"}`` (the core has no deferral reasons),
- ``vllm:engine_sleep_state`` other than awake, unless :meth:`VllmMetrics.set_sleep_level` says,
- ``vllm:admission_rejections_total`` unless the server reports rejections
  (:meth:`VllmMetrics.observe_admission_rejection`).

Hot path: ``observe_*`` run per step and per finished request, so every series they touch is
bound once in ``__init__``, and the ``vllm:`` histograms are lock-free pre-labelled collectors
(:class:`_FastHistogram`): a finished 100-token request costs about 25 us, 5x less than with
``prometheus_client.Histogram`` children, mostly because of one inter-token latency per token.
Counters that mirror engine totals are only touched at :meth:`VllmMetrics.update`.

DCGM GPU gauges (power, SM clock, utilisation) are not part of vLLM's ``/metrics``: on a real
cluster dcgm-exporter serves them. They live in a second registry and are appended to
:meth:`VllmMetrics.render` only after the first :meth:`VllmMetrics.observe_gpu`, so a simulator
that does not model GPUs serves exactly vLLM's 55 families; :meth:`VllmMetrics.render_dcgm` serves
them alone for a separate exporter endpoint.
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    Summary,
    generate_latest,
)
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from shoal.sim.types import EngineStats, FinishedRequestStats, StepResult

# Bucket boundaries, copied from the golden exposition (vLLM 0.32.0, max_model_len 2048: vLLM
# derives the token buckets as 1-2-5 steps up to max_model_len, so they are computed, see
# token_buckets()).
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_PARAM_BUCKETS = (1, 2, 5, 10, 20)
PREEMPTION_BUCKETS = (1, 2, 3, 4, 5, 10, 20)
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
HTTP_HIGHR_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0,
    7.5, 10.0, 30.0, 60.0,
)  # fmt: skip
HTTP_DURATION_BUCKETS = (0.1, 0.5, 1.0)

FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")

# prometheus-fastapi-instrumentator as vLLM configures it skips these handlers. The patterns are
# regular expressions searched anywhere in the raw request path, which is why vLLM's own
# /v1/load_lora_adapter never shows up (it contains "/load") and neither do /v1/health or
# /health_generate.
HTTP_EXCLUDED_HANDLERS = tuple(
    re.compile(p) for p in ("/metrics", "/health", "/load", "/ping", "/version", "/server_info")
)


def token_buckets(max_model_len: int) -> list[float]:
    """vLLM's 1-2-5 token buckets up to ``max_model_len`` (2048 gives 1, 2, 5, ... 1000, 2000)."""
    out: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return out
            out.append(float(value))
        exponent += 1


def vllm_cache_config(
    *,
    block_size: int,
    num_gpu_blocks: int,
    max_model_len: int,
    num_gpu_blocks_override: int | None = None,
    gpu_memory_utilization: float = 0.92,
    kv_cache_memory_bytes: int | None = None,
    enable_prefix_caching: bool = True,
    cache_dtype: str = "auto",
) -> dict[str, str]:
    """The label set of ``vllm:cache_config_info`` as vLLM 0.32.0 renders it (str() of each field;
    the fields the simulator does not model keep the recorded defaults)."""
    tokens = block_size * num_gpu_blocks
    return {
        "_block_size_resolved": "True",
        "block_size": str(block_size),
        "cache_dtype": cache_dtype,
        "cache_hit_alignment_tokens": "None",
        "effective_attention_block_size": str(block_size),
        "enable_mamba_shared_prefix_checkpoint": "False",
        "enable_prefix_caching": str(enable_prefix_caching),
        "gpu_memory_utilization": str(gpu_memory_utilization),
        "hash_block_size": "None",
        "is_attention_free": "False",
        "kv_cache_dtype_skip_layers": "[]",
        "kv_cache_layout": "None",
        "kv_cache_max_concurrency": str(round(tokens / max_model_len, 2)),
        "kv_cache_memory_bytes": str(kv_cache_memory_bytes),
        "kv_cache_size_tokens": str(tokens),
        "kv_offloading_backend": "native",
        "kv_offloading_size": "None",
        "kv_sharing_fast_prefill": "False",
        "mamba_block_size": "None",
        "mamba_cache_dtype": "auto",
        "mamba_cache_mode": "none",
        "mamba_page_size_padded": "None",
        "mamba_ssm_cache_dtype": "float32",
        "num_cpu_blocks": "None",
        "num_gpu_blocks": str(num_gpu_blocks),
        "num_gpu_blocks_override": str(num_gpu_blocks_override),
        "prefix_cache_retention_interval": "0",
        "prefix_caching_hash_algo": "sha256",
        "prefix_match_unit": "None",
        "replayssm_buffer_len": "16",
        "skip_page_size_padded": "None",
        "sliding_window": "None",
        "swa_bounded_replay": "True",
        "use_kda_recoverssm": "False",
        "use_replayssm": "False",
        "user_specified_block_size": "True",
    }


# prometheus_client's own float formatting for "le" values (untyped upstream, hence the alias).
_go_float: Callable[[float], str] = floatToGoString


class _FastHistogram(Collector):
    """One pre-labelled histogram series, exposed exactly like a ``prometheus_client.Histogram``
    child (``_bucket``/``_count``/``_sum`` plus the ``_created`` gauge).

    Why not ``Histogram``: its ``observe`` takes a lock and walks the buckets (~1 us), and a
    finished request brings one inter-token latency per generated token. Here an observation is a
    bisect and two additions on plain Python numbers. Not thread-safe: every caller runs on the
    server's event-loop thread, which is also where ``render`` runs.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: dict[str, str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._doc = documentation
        self._labels = labels
        self._bounds = [float(b) for b in buckets]
        self._le = [_go_float(b) for b in self._bounds] + ["+Inf"]
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        self._created = time.time()
        registry.register(self)

    def observe(self, value: float) -> None:
        # bisect_left finds the first bound >= value: Prometheus buckets are "le", inclusive.
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def observe_many(self, values: Iterable[float]) -> None:
        bounds, counts = self._bounds, self._counts
        total = 0.0
        for value in values:
            counts[bisect_left(bounds, value)] += 1
            total += value
        self._sum += total

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self._name, self._doc, labels=list(self._labels))]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=list(self._labels))
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for le, count in zip(self._le, self._counts, strict=True):
            cumulative += count
            buckets.append((le, float(cumulative)))
        family.add_metric(list(self._labels.values()), buckets, self._sum)
        family.add_sample(self._name + "_created", dict(self._labels), self._created)
        yield family


class _TotalMirror:
    """A counter child driven from an engine total: adds the increase since the last update, so
    the exported counter stays monotone even if the engine's total is reset or goes backwards."""

    __slots__ = ("_child", "_last")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._last = 0.0

    def set_total(self, total: float) -> None:
        if total > self._last:
            self._child.inc(total - self._last)
            self._last = total
        elif total < self._last:
            # Engine restarted its count: follow it from here without going backwards.
            self._last = total


class VllmMetrics:
    """vLLM's metric families in a private registry, fed by the simulator's engine core.

    ``model_name`` and ``engine`` become the ``model_name``/``engine`` labels on every ``vllm:``
    series. ``cache_config`` is the label set of ``vllm:cache_config_info`` (see
    :func:`vllm_cache_config`). ``max_model_len`` sets the token-count bucket boundaries the way
    vLLM does.

    With ``live_token_timings`` the server reports TTFT and inter-token latencies as tokens are
    produced (:meth:`observe_first_token`, :meth:`observe_inter_token_latency`), as vLLM does per
    engine step; otherwise :meth:`observe_finished` records them from the finished request's stats,
    which is identical once the request is done but lags while it streams.
    """

    def __init__(
        self,
        model_name: str,
        *,
        cache_config: dict[str, str],
        max_loras: int,
        engine: str = "0",
        gpu_count: int = 1,
        max_model_len: int = 2048,
        live_token_timings: bool = False,
        gpu_model_name: str = "NVIDIA H100 80GB HBM3",
        hostname: str | None = None,
    ) -> None:
        self.model_name = model_name
        self.engine = engine
        self.max_loras = max_loras
        self.live_token_timings = live_token_timings
        reg = self.registry = CollectorRegistry(auto_describe=True)
        # Default collectors in the order vLLM's process exposes them: gc, platform, process.
        GCCollector(registry=reg)
        PlatformCollector(registry=reg)
        ProcessCollector(registry=reg)

        common = ["model_name", "engine"]
        lv = (model_name, engine)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, common, registry=reg).labels(*lv)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, common, registry=reg).labels(*lv)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> _FastHistogram:
            return _FastHistogram(name, doc, dict(zip(common, lv, strict=True)), buckets, reg)

        mfu = "(for Model Flops Utilization calculations)."
        counter(
            "vllm:estimated_flops_per_gpu",
            f"Estimated number of floating point operations per GPU {mfu}",
        )
        counter(
            "vllm:estimated_read_bytes_per_gpu",
            f"Estimated number of bytes read from memory per GPU {mfu}",
        )
        counter(
            "vllm:estimated_write_bytes_per_gpu",
            f"Estimated number of bytes written to memory per GPU {mfu}",
        )

        self._running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        )
        self._waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        )
        waiting_by_reason = Gauge(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for "
            "scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV "
            "transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
            [*common, "reason"],
            registry=reg,
        )
        self._waiting_capacity = waiting_by_reason.labels(*lv, "capacity")
        waiting_by_reason.labels(*lv, "deferred")
        sleep_state = Gauge(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is "
            "awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep "
            "level 2.",
            [*common, "sleep_state"],
            registry=reg,
        )
        self._sleep_children = [sleep_state.labels(*lv, s) for s in SLEEP_STATES]
        self._sleep_children[0].set(1)
        self._kv_usage = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        )

        self._prefix_queries = _TotalMirror(
            counter(
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
            )
        )
        self._prefix_hits = _TotalMirror(
            counter(
                "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
            )
        )
        kvc = "from KV connector cross-instance cache sharing, in terms of number of"
        counter(
            "vllm:external_prefix_cache_queries",
            f"External prefix cache queries {kvc} queried tokens.",
        )
        counter(
            "vllm:external_prefix_cache_hits", f"External prefix cache hits {kvc} cached tokens."
        )
        counter(
            "vllm:mm_cache_queries",
            "Multi-modal cache queries, in terms of number of queried items.",
        )
        counter("vllm:mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items.")
        self._preemptions = _TotalMirror(
            counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        )
        self._prompt_tokens = _TotalMirror(
            counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        )
        by_source = Counter(
            "vllm:prompt_tokens_by_source",
            "Number of prompt tokens by source.",
            [*common, "source"],
            registry=reg,
        )
        self._prompt_local_compute = _TotalMirror(by_source.labels(*lv, "local_compute"))
        self._prompt_local_cache_hit = _TotalMirror(by_source.labels(*lv, "local_cache_hit"))
        by_source.labels(*lv, "external_kv_transfer")
        self._prompt_cached = _TotalMirror(
            counter(
                "vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external)."
            )
        )
        cached_by_source = Counter(
            "vllm:prompt_tokens_cached_by_source",
            "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), "
            "host (offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or "
            "external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + "
            "vllm:external_prefix_cache_hits.",
            [*common, "source"],
            registry=reg,
        )
        self._cached_device = _TotalMirror(cached_by_source.labels(*lv, "device"))
        for source in ("host", "p2p", "disk", "external_unspecified"):
            cached_by_source.labels(*lv, source)
        self._generation_tokens = _TotalMirror(
            counter("vllm:generation_tokens", "Number of generation tokens processed.")
        )
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*common, "finished_reason"],
            registry=reg,
        )
        self._success = {r: success.labels(*lv, r) for r in FINISHED_REASONS}
        # vLLM labels admission rejections by model only (the queue limit is per API server).
        rejections = Counter(
            "vllm:admission_rejections",
            "Number of admission attempts rejected by a queue limit, by reason.",
            ["model_name", "reason"],
            registry=reg,
        )
        self._rejections = {
            r: rejections.labels(model_name, r)
            for r in ("max_num_queued_reqs", "max_num_queued_tokens")
        }

        tok = token_buckets(max_model_len)
        self._h_prompt = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", tok
        )
        self._h_generation = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", tok
        )
        self._h_iteration = histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_TOKENS_BUCKETS,
        )
        self._h_max_gen = histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            tok,
        )
        self._h_n = histogram(
            "vllm:request_params_n", "Histogram of the n request parameter.", N_PARAM_BUCKETS
        )
        self._h_max_tokens = histogram(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", tok
        )
        self._h_ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self._h_itl = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        self._h_tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS,
        )
        self._h_e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._h_queue = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._h_inference = histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._h_prefill = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._h_decode = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._h_preempt = histogram(
            "vllm:request_num_preemptions",
            "Histogram of the number of times a request was preempted.",
            PREEMPTION_BUCKETS,
        )
        self._h_kv_computed = histogram(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            tok,
        )

        # One series per (running, waiting) combination, never removed: vLLM leaves stale
        # combinations behind and readers take the series with the largest value (a timestamp).
        self._lora_info = Gauge(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            registry=reg,
        )
        self._lora_children: dict[tuple[str, str], Any] = {}
        self._active_since_update = False

        cache_labels = dict(cache_config)
        cache_labels["engine"] = engine
        Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            list(cache_labels),
            registry=reg,
        ).labels(**cache_labels).set(1)

        # prometheus-fastapi-instrumentator's default metrics, with vLLM's defaults. The labelled
        # families get their children on first use, so they show no series before traffic.
        self._http_requests = Counter(
            "http_requests",
            "Total number of requests by method, status and handler.",
            ["method", "status", "handler"],
            registry=reg,
        )
        self._http_req_size = Summary(
            "http_request_size_bytes",
            "Content length of incoming requests by handler. Only value of header is respected. "
            "Otherwise ignored. No percentile calculated. ",
            ["handler"],
            registry=reg,
        )
        self._http_resp_size = Summary(
            "http_response_size_bytes",
            "Content length of outgoing responses by handler. Only value of header is respected. "
            "Otherwise ignored. No percentile calculated. ",
            ["handler"],
            registry=reg,
        )
        self._http_highr = Histogram(
            "http_request_duration_highr_seconds",
            "Latency with many buckets but no API specific labels. Made for more accurate "
            "percentile calculations. ",
            buckets=HTTP_HIGHR_BUCKETS,
            registry=reg,
        )
        self._http_duration = Histogram(
            "http_request_duration_seconds",
            "Latency with only few buckets by handler. Made to be only used if aggregation by "
            "handler is important. ",
            ["method", "handler"],
            buckets=HTTP_DURATION_BUCKETS,
            registry=reg,
        )
        self._http_children: dict[tuple[str, str, str], tuple[Any, Any, Any, Any]] = {}

        # Parents of n > 1 requests: parent id -> [children still running, max generation tokens].
        self._parents: dict[str, list[int]] = {}

        self._init_dcgm(gpu_count, gpu_model_name, hostname)

    # ------------------------------------------------------------------------------ engine feed

    def observe_step(self, step: StepResult) -> None:
        """One engine step: ``vllm:iteration_tokens_total`` gets the tokens it computed.

        vLLM counts computed prompt tokens (cache hits excluded) plus tokens generated, so this
        uses ``num_prefill_tokens`` (the prompt tokens the step scheduled, which never include
        cache hits) plus the tokens the step's outputs carry. An idle step records nothing.
        """
        generated = 0
        for out in step.outputs:
            generated += len(out.new_token_ids)
        total = step.num_prefill_tokens + generated
        if total == 0 and step.duration == 0.0:
            return
        self._h_iteration.observe(total)
        self._active_since_update = True

    def observe_first_token(self, ttft_s: float) -> None:
        """Live TTFT (only with ``live_token_timings``)."""
        self._h_ttft.observe(ttft_s)

    def observe_inter_token_latency(self, latency_s: float) -> None:
        """Live inter-token latency (only with ``live_token_timings``)."""
        self._h_itl.observe(latency_s)

    def observe_finished(
        self,
        stats: FinishedRequestStats,
        *,
        max_tokens_param: int,
        n_param: int,
        parent_id: str | None = None,
    ) -> None:
        """One finished request (one choice of an ``n > 1`` call): the per-request histograms and
        ``vllm:request_success_total``.

        ``vllm:request_params_n`` and ``vllm:request_max_num_generation_tokens`` are per client
        call, as in vLLM: for ``n_param > 1`` all choices of a call must share a ``parent_id``; both
        are recorded when the last choice finishes (the max is over the choices' generation
        counts). Without ``parent_id`` the parent is the request id up to its last ``-``, the
        server's ``<call id>-<choice index>`` naming.
        """
        self._success[stats.finish_reason.value].inc()
        gen = stats.num_generation_tokens
        self._h_prompt.observe(stats.num_prompt_tokens)
        self._h_generation.observe(gen)
        self._h_kv_computed.observe(max(stats.num_prompt_tokens - stats.num_cached_tokens, 0))
        self._h_preempt.observe(stats.num_preemptions)
        if max_tokens_param:
            self._h_max_tokens.observe(max_tokens_param)
        # Phase durations; a request aborted before it was scheduled or before its first token
        # has no such phase, which clamps to 0 instead of a negative observation.
        decode = max(stats.decode_time, 0.0) if gen else 0.0
        self._h_e2e.observe(max(stats.e2e, 0.0))
        self._h_queue.observe(max(stats.queue_time, 0.0))
        self._h_prefill.observe(max(stats.prefill_time, 0.0) if gen else 0.0)
        self._h_inference.observe(max(stats.inference_time, 0.0))
        self._h_decode.observe(decode)
        self._h_tpot.observe(decode / (gen - 1) if gen > 1 else 0.0)
        if not self.live_token_timings and gen:
            self._h_ttft.observe(max(stats.ttft, 0.0))
            self._h_itl.observe_many(stats.inter_token_latencies)

        if n_param <= 1:
            self._h_n.observe(1)
            self._h_max_gen.observe(gen)
            return
        if parent_id is None:
            parent_id = stats.request_id.rpartition("-")[0] or stats.request_id
        state = self._parents.get(parent_id)
        if state is None:
            state = self._parents[parent_id] = [n_param, 0]
        state[0] -= 1
        state[1] = max(state[1], gen)
        if state[0] <= 0:
            del self._parents[parent_id]
            self._h_n.observe(n_param)
            self._h_max_gen.observe(state[1])

    def observe_admission_rejection(self, reason: str) -> None:
        """``reason`` is ``max_num_queued_reqs`` or ``max_num_queued_tokens``."""
        self._rejections[reason].inc()

    def set_sleep_level(self, level: int) -> None:
        """0 = awake, 1 = weights offloaded, 2 = all discarded (vLLM's sleep mode)."""
        self._sleep_children[0].set(1 if level == 0 else 0)
        self._sleep_children[1].set(1 if level == 1 else 0)
        self._sleep_children[2].set(1 if level == 2 else 0)

    def update(self, stats: EngineStats, now: float) -> None:
        """Mirror the engine's gauges and running totals; call per step or before each render.

        ``now`` (unix seconds) is the value of the current ``vllm:lora_requests_info`` series.
        vLLM refreshes that series each time the engine logs a busy step, so it is refreshed only
        if a step did work since the previous update or requests are in flight; before any traffic
        the family has no sample at all.
        """
        self._running.set(stats.num_running)
        self._waiting.set(stats.num_waiting)
        self._waiting_capacity.set(stats.num_waiting)
        self._kv_usage.set(stats.kv_cache_usage)

        self._prefix_queries.set_total(stats.prefix_cache_queries)
        self._prefix_hits.set_total(stats.prefix_cache_hits)
        self._cached_device.set_total(stats.prefix_cache_hits)
        self._prompt_tokens.set_total(stats.prompt_tokens)
        self._prompt_cached.set_total(stats.prompt_tokens_cached)
        self._prompt_local_cache_hit.set_total(stats.prompt_tokens_cached)
        self._prompt_local_compute.set_total(stats.prompt_tokens - stats.prompt_tokens_cached)
        self._generation_tokens.set_total(stats.generation_tokens)
        self._preemptions.set_total(stats.num_preemptions)

        if self._active_since_update or stats.num_running or stats.num_waiting:
            self._active_since_update = False
            key = (",".join(stats.running_loras), ",".join(stats.waiting_loras))
            child = self._lora_children.get(key)
            if child is None:
                child = self._lora_children[key] = self._lora_info.labels(
                    max_lora=str(self.max_loras),
                    running_lora_adapters=key[0],
                    waiting_lora_adapters=key[1],
                )
            child.set(now)

    # -------------------------------------------------------------------------------------- http

    @staticmethod
    def http_excluded(path: str) -> bool:
        """Whether vLLM's instrumentator leaves this raw request path out of the http_* metrics."""
        return any(p.search(path) for p in HTTP_EXCLUDED_HANDLERS)

    def observe_http(
        self,
        method: str,
        handler: str,
        status: int,
        duration_s: float,
        request_bytes: int,
        response_bytes: int,
        *,
        path: str | None = None,
    ) -> None:
        """One HTTP exchange, as prometheus-fastapi-instrumentator records it for vLLM.

        ``handler`` is the matched route template, or ``"none"`` when no route matched fully
        (unknown path, or a known path with the wrong method). ``path`` is the raw request path;
        the exclusion patterns are matched against it (against ``handler`` if omitted), and
        excluded requests are not recorded. ``request_bytes``/``response_bytes`` are the
        Content-Length header values, 0 when the header is absent (streamed responses).
        """
        if self.http_excluded(path if path is not None else handler):
            return
        key = (method, handler, f"{status // 100}xx")
        children = self._http_children.get(key)
        if children is None:
            children = self._http_children[key] = (
                self._http_requests.labels(method=method, status=key[2], handler=handler),
                self._http_req_size.labels(handler=handler),
                self._http_resp_size.labels(handler=handler),
                self._http_duration.labels(method=method, handler=handler),
            )
        requests, req_size, resp_size, duration = children
        requests.inc()
        req_size.observe(request_bytes)
        resp_size.observe(response_bytes)
        self._http_highr.observe(duration_s)
        duration.observe(duration_s)

    # -------------------------------------------------------------------------------------- dcgm

    def _init_dcgm(self, gpu_count: int, model: str, hostname: str | None) -> None:
        # dcgm-exporter's names, units and identifying labels (gpu index, UUID, device, modelName,
        # Hostname), so dashboards and the power controller query the simulator like a real node.
        self._dcgm_registry = CollectorRegistry(auto_describe=True)
        self._gpu_seen = False
        self._gpu_model = model
        self._hostname = hostname if hostname is not None else socket.gethostname()
        labels = ["gpu", "UUID", "device", "modelName", "Hostname"]
        self._dcgm_power = Gauge(
            "DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", labels, registry=self._dcgm_registry
        )
        self._dcgm_clock = Gauge(
            "DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", labels,
            registry=self._dcgm_registry,
        )  # fmt: skip
        self._dcgm_util = Gauge(
            "DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", labels, registry=self._dcgm_registry
        )
        self._gpu_children: dict[int, tuple[Any, Any, Any]] = {}
        for index in range(gpu_count):
            self._gpu_child(index)

    def _gpu_child(self, index: int) -> tuple[Any, Any, Any]:
        children = self._gpu_children.get(index)
        if children is None:
            # A stable fake UUID per (host, engine, index) so series survive restarts.
            gpu_uuid = "GPU-" + str(
                uuid.uuid5(uuid.NAMESPACE_DNS, f"{self._hostname}/{self.engine}/{index}")
            )
            values = (str(index), gpu_uuid, f"nvidia{index}", self._gpu_model, self._hostname)
            children = self._gpu_children[index] = (
                self._dcgm_power.labels(*values),
                self._dcgm_clock.labels(*values),
                self._dcgm_util.labels(*values),
            )
        return children

    def observe_gpu(
        self, gpu_index: int, power_watts: float, sm_clock_mhz: float, utilization_pct: float
    ) -> None:
        power, clock, util = self._gpu_child(gpu_index)
        power.set(power_watts)
        clock.set(sm_clock_mhz)
        util.set(utilization_pct)
        self._gpu_seen = True

    # ------------------------------------------------------------------------------------ render

    def render(self) -> tuple[bytes, str]:
        """``(body, content_type)`` of ``GET /metrics``; the content type is the one vLLM sends."""
        body = generate_latest(self.registry)
        if self._gpu_seen:
            body += generate_latest(self._dcgm_registry)
        return body, CONTENT_TYPE_LATEST

    def render_dcgm(self) -> tuple[bytes, str]:
        """The DCGM gauges alone, for serving them the way a dcgm-exporter would."""
        return generate_latest(self._dcgm_registry), CONTENT_TYPE_LATEST


__all__ = [
    "VllmMetrics",
    "token_buckets",
    "vllm_cache_config",
]
