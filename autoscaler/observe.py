"""What the autoscaler sees about one pool: PromQL over the recording rules in
``deploy/prometheus/autoscaler-rules.yaml``, turned into a policy :class:`Observation`.

The queries are plain selectors of recorded series (cheap, one series each), except the latency
percentiles: the SLO percentile is per Model, so ``histogram_quantile`` runs at query time over the
recorded bucket rates. Every input Prometheus cannot give (empty answer, NaN) stays ``None`` and is
listed in :attr:`PoolReading.missing`; only the absence of engines makes a load signal a known
zero (see :func:`build_observation`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from shoal.autoscaler.policy import Observation
from shoal.autoscaler.prometheus import PrometheusClient

# Recorded series names (deploy/prometheus/autoscaler-rules.yaml).
REQUEST_RATE = "shoal_pool:request_success:rate30s"
PROMPT_TOKENS_RATE = "shoal_pool:prompt_tokens:rate30s"
OUTPUT_TOKENS_RATE = "shoal_pool:generation_tokens:rate30s"
PROMPT_TOKENS_MEAN = "shoal_pool:request_prompt_tokens:mean30s"
OUTPUT_TOKENS_MEAN = "shoal_pool:request_generation_tokens:mean30s"
WAITING = "shoal_pool:num_requests_waiting:sum"
RUNNING = "shoal_pool:num_requests_running:sum"
KV_USAGE = "shoal_pool:kv_cache_usage:avg"
TTFT_BUCKETS = "shoal_pool:time_to_first_token_seconds_bucket:rate30s"
TPOT_BUCKETS = "shoal_pool:time_per_output_token_seconds_bucket:rate30s"
ENGINES_UP = "shoal_pool:engines_up:sum"
ROUTER_HELD = "shoal_model:router_held_requests:sum"

# The inputs, by the name they are exported under (shoal_autoscaler_observed{input=...}).
LOAD_INPUTS = ("request_rate", "waiting", "running")  # Observation.is_complete needs these
INPUTS = (
    "request_rate",
    "prompt_tokens_rate",
    "output_tokens_rate",
    "prompt_tokens_mean",
    "output_tokens_mean",
    "waiting",
    "running",
    "kv_usage",
    "ttft_s",
    "tpot_s",
    "engines_up",
    "router_held",
)


@dataclass(frozen=True, slots=True)
class PoolTarget:
    """Which pool to observe: the Model's namespace and name, the pool, the name clients send
    (the router's ``model`` label) and the SLO percentile to read latencies at."""

    namespace: str
    model: str
    pool: str
    served_name: str
    percentile: float = 90.0


def _quote(value: str) -> str:
    """A PromQL string literal (double quotes; backslash and quote escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pool_selector(target: PoolTarget) -> str:
    return (
        f"{{namespace={_quote(target.namespace)}, model={_quote(target.model)}, "
        f"pool={_quote(target.pool)}}}"
    )


def pool_queries(target: PoolTarget) -> dict[str, str]:
    """The PromQL of each input for one pool. ``sum(...)`` collapses the one recorded series (a
    re-labelled duplicate would otherwise make the answer ambiguous) and stays empty when there
    is none."""
    sel = pool_selector(target)
    q = target.percentile / 100.0

    def quantile(series: str) -> str:
        return f"histogram_quantile({q:g}, sum by (le) ({series}{sel}))"

    return {
        "request_rate": f"sum({REQUEST_RATE}{sel})",
        "prompt_tokens_rate": f"sum({PROMPT_TOKENS_RATE}{sel})",
        "output_tokens_rate": f"sum({OUTPUT_TOKENS_RATE}{sel})",
        "prompt_tokens_mean": f"sum({PROMPT_TOKENS_MEAN}{sel})",
        "output_tokens_mean": f"sum({OUTPUT_TOKENS_MEAN}{sel})",
        "waiting": f"sum({WAITING}{sel})",
        "running": f"sum({RUNNING}{sel})",
        "kv_usage": f"avg({KV_USAGE}{sel})",
        "ttft_s": quantile(TTFT_BUCKETS),
        "tpot_s": quantile(TPOT_BUCKETS),
        "engines_up": f"sum({ENGINES_UP}{sel})",
        "router_held": f"sum({ROUTER_HELD}{{model={_quote(target.served_name)}}})",
    }


@dataclass(frozen=True, slots=True)
class PoolReading:
    """An observation and the inputs that were missing from it."""

    observation: Observation
    values: Mapping[str, float | None]  # every input as read (None: unknown)
    missing: tuple[str, ...] = field(default=())  # load inputs that are unknown

    @property
    def complete(self) -> bool:
        return not self.missing and self.observation.is_complete()


def build_observation(
    values: Mapping[str, float | None],
    *,
    time_s: float,
    ready_replicas: int,
    desired_replicas: int,
) -> PoolReading:
    """Turn query answers into an :class:`Observation`.

    A pool with no replicas, wanted or ready, has no engines to scrape: its load signals are
    zero by definition, not unknown, and the router's held requests are what can wake it. In
    every other case an unknown load signal stays unknown, and the caller holds.
    """
    vals = dict(values)
    idle = desired_replicas == 0 and ready_replicas == 0
    if idle:
        for name in LOAD_INPUTS:
            if vals.get(name) is None:
                vals[name] = 0.0
    missing = tuple(n for n in LOAD_INPUTS if vals.get(n) is None)
    held = vals.get("router_held")
    obs = Observation(
        time_s=time_s,
        ready_replicas=ready_replicas,
        desired_replicas=desired_replicas,
        request_rate=vals.get("request_rate"),
        prompt_tokens_mean=vals.get("prompt_tokens_mean"),
        output_tokens_mean=vals.get("output_tokens_mean"),
        waiting=vals.get("waiting"),
        running=vals.get("running"),
        kv_usage=vals.get("kv_usage"),
        ttft_s=vals.get("ttft_s"),
        tpot_s=vals.get("tpot_s"),
        # No router series (no router, or not scraped) means nothing is held that we know of;
        # it is exported as unknown (NaN), and it can only ever add replicas.
        router_held=held if held is not None else 0.0,
    )
    return PoolReading(observation=obs, values=vals, missing=missing)


async def read_pool(
    prom: PrometheusClient,
    target: PoolTarget,
    *,
    time_s: float,
    ready_replicas: int,
    desired_replicas: int,
) -> PoolReading:
    """Query every input of one pool concurrently. Raises ``PrometheusError`` when Prometheus
    cannot answer (the caller holds the pool)."""
    queries = pool_queries(target)
    answers = await asyncio.gather(*(prom.query_value(q) for q in queries.values()))
    return build_observation(
        dict(zip(queries, answers, strict=True)),
        time_s=time_s,
        ready_replicas=ready_replicas,
        desired_replicas=desired_replicas,
    )
