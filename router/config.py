"""Router configuration: one validated object built from flags and an optional YAML file.

Every field has a working default, so ``shoal router --endpoints URL`` needs nothing else. The YAML
file (``--config``) holds the same fields plus what flags cannot express well: per-model routing,
API keys, per-priority queue timeouts. Flags given on the command line override the file.

API keys: when ``api_keys`` is empty and no ``api_keys_file`` is set, the router is *open*: every
request is accepted and belongs to the tenant named by the ``x-shoal-tenant`` header, else
``default``. With keys configured, requests must carry ``Authorization: Bearer <key>`` (401
otherwise) and the key decides the tenant and its default priority (router/api_keys.py).

Validation happens here, at start-up (unknown fields, strategies, scorers, negative limits), so a
bad config fails the process with a message instead of failing requests later.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shoal.router.scorers import DEFAULT_LOAD_FACTOR, DEFAULT_LOAD_SLACK
from shoal.router.strategies import SCORER_NAMES, check_strategy, merged_weights
from shoal.router.types import Priority


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which field and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_weights(weights: Mapping[str, float]) -> None:
    for name, weight in weights.items():
        if name not in SCORER_NAMES:
            raise ValueError(f"unknown scorer {name!r}; valid: {', '.join(SCORER_NAMES)}")
        if weight < 0:
            raise ValueError(f"weight of {name} must not be negative")


class ModelRoutingConfig(_Strict):
    """Routing for one model: a strategy preset and weight overrides for it."""

    strategy: str = "prefix"
    weights: dict[str, float] = Field(default_factory=dict)
    # Requests that may wait for this model's capacity (default: the router's queue_size).
    queue_size: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _valid(self) -> ModelRoutingConfig:
        check_strategy(self.strategy)
        merged_weights(self.strategy, self.weights)
        return self


class StaticEndpointConfig(_Strict):
    url: str
    models: tuple[str, ...] = ()
    kv_events_endpoint: str | None = None

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint URL must start with http:// or https://: {url!r}")
        return url


class KubernetesDiscoveryConfig(_Strict):
    """EndpointSlices in ``namespace`` matching ``label_selector`` (e.g.
    ``kubernetes.io/service-name=llama`` or ``shoal.dev/model=llama``)."""

    namespace: str = "default"
    label_selector: str = "shoal.dev/model"
    port_name: str | None = None  # the EndpointSlice port to use; None: the first one
    scheme: Literal["http", "https"] = "http"


class ApiKeyConfig(_Strict):
    tenant: str
    priority: Literal["critical", "standard", "sheddable"] = "standard"
    # Fair-share weight: a tenant with weight 2 gets twice the tokens of a weight-1 tenant
    # when both are backlogged.
    weight: float = Field(default=1.0, gt=0)


class SaturationConfig(_Strict):
    """When an endpoint counts as saturated (requests then wait in the admission queue)."""

    max_waiting: float = Field(default=32.0, ge=0)  # engine queue length
    max_kv_cache_usage: float = Field(default=0.98, gt=0, le=1.0)
    # Router-local bound: requests in flight from this router to one endpoint. 0 = unbounded.
    max_in_flight_per_endpoint: int = Field(default=512, ge=0)


class QueueTimeoutsConfig(_Strict):
    """How long a request of each priority may wait for capacity before it is refused (429)."""

    critical: float = Field(default=60.0, gt=0)
    standard: float = Field(default=30.0, gt=0)
    sheddable: float = Field(default=5.0, gt=0)

    def for_priority(self, priority: Priority) -> float:
        return {
            Priority.CRITICAL: self.critical,
            Priority.STANDARD: self.standard,
            Priority.SHEDDABLE: self.sheddable,
        }[priority]


class HoldConfig(_Strict):
    """Requests for a declared name that no engine serves yet wait instead of failing.

    Declared names: ``models`` and ``adapters`` (adapter -> base model) here, plus, with
    Kubernetes discovery and ``watch_resources``, the ``Model`` and ``LoraAdapter`` resources of
    the namespace. A Model at zero replicas or an adapter still loading then holds requests.
    """

    timeout_s: float = Field(default=120.0, gt=0)
    max_per_model: int = Field(default=256, ge=0)
    models: tuple[str, ...] = ()
    adapters: dict[str, str] = Field(default_factory=dict)
    watch_resources: bool = True
    resync_s: float = Field(default=2.0, gt=0)
    max_declared: int = Field(default=100_000, ge=1)


class RouterConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    log_level: str = "INFO"
    # The HTTP server: Shoal's own (router/http_server.py) or uvicorn, serving the same ASGI
    # app. Their CPU per request is within noise of each other (docs/benchmarks.md); Shoal's
    # makes the limits below explicit and answers malformed HTTP with OpenAI-shaped errors.
    http_server: Literal["shoal", "uvicorn"] = "shoal"
    keep_alive_s: float = Field(default=5.0, gt=0)  # an idle client connection closes after this
    max_head_bytes: int = Field(default=64 * 1024, ge=1024)  # request line + headers; more: 431
    graceful_shutdown_s: float = Field(default=30.0, ge=0)  # requests in flight may finish

    # Discovery: static endpoints (flags, config, or a local fleet), or Kubernetes.
    endpoints: tuple[StaticEndpointConfig, ...] = ()
    kubernetes: KubernetesDiscoveryConfig | None = None
    kv_events: Literal["auto", "off"] = "auto"

    # Routing.
    strategy: str = "prefix"
    weights: dict[str, float] = Field(default_factory=dict)
    models: dict[str, ModelRoutingConfig] = Field(default_factory=dict)
    # The affinity load bound: mean × factor + slack (router/scorers.py says why these defaults).
    load_factor: float = Field(default=DEFAULT_LOAD_FACTOR, ge=1.0)
    load_slack: float = Field(default=DEFAULT_LOAD_SLACK, ge=0)
    # Prompt tokenization for block hashing: "sim" for `shoal sim` engines; "hf" for real vLLM
    # engines, with each model's tokenizer files (tokenizer.json, tokenizer_config.json) in a
    # local directory, mapped per model root in tokenizer_dirs (router/hf_tokenizer.py).
    tokenizer: Literal["sim", "hf"] = "sim"
    tokenizer_dirs: dict[str, str] = Field(default_factory=dict)
    # "auto": a prompt is tokenized only when its routing reads the tokens (the prefix and
    # in-flight-tokens scorers); other strategies estimate its length from its characters.
    # "always": every prompt, so that every decision enters the approximate prefix history and
    # the estimated prefix hit ratio covers every strategy, at about 20% more router CPU per
    # request for strategies that would not read them.
    tokenize_prompts: Literal["auto", "always"] = "auto"
    default_block_size: int = Field(default=16, ge=1)
    prefix_index_max_entries: int = Field(default=500_000, ge=2)
    prefix_ttl_s: float = Field(default=600.0, gt=0)
    kv_index_max_blocks: int = Field(default=1_000_000, ge=1)
    max_sessions: int = Field(default=100_000, ge=1)

    # Engine state.
    # An engine is scraped every scrape_interval_ms while its metrics tell the router something
    # its own accounting does not (a queue, KV usage moving, load from elsewhere); while they do
    # not, the interval doubles up to scrape_interval_max_ms (default 4x; equal: no adaptation).
    # See router/scrape_cadence.py.
    scrape_interval_ms: int = Field(default=200, ge=10)
    scrape_interval_max_ms: int | None = Field(default=None, ge=10)
    stale_after_intervals: int = Field(default=5, ge=1)
    # A due scrape waits up to this share of its interval for the engine to have no request of
    # the router's in flight, so that the engine's /metrics render (milliseconds on its API
    # loop) holds no request up; under steady load it scrapes at the deadline. 0: never waits.
    scrape_idle_wait_share: float = Field(default=0.25, ge=0, le=1)
    models_refresh_s: float = Field(default=5.0, gt=0)

    # Limits and admission.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1)
    queue_size: int = Field(default=1024, ge=0)
    queue_timeouts: QueueTimeoutsConfig = Field(default_factory=QueueTimeoutsConfig)
    saturation: SaturationConfig = Field(default_factory=SaturationConfig)
    api_keys: dict[str, ApiKeyConfig] = Field(default_factory=dict)
    # Keys from a file (a mounted Secret), re-read when it changes: router/api_keys.py.
    api_keys_file: str | None = None
    api_keys_reload_s: float = Field(default=10.0, gt=0)
    max_tenants: int = Field(default=10_000, ge=1)
    expected_output_tokens: int = Field(default=128, ge=1)  # when a request sets no max_tokens
    hold: HoldConfig = Field(default_factory=HoldConfig)

    # Resilience.
    max_attempts: int = Field(default=3, ge=1)
    eject_after_failures: int = Field(default=3, ge=1)
    eject_seconds: float = Field(default=10.0, gt=0)
    connect_timeout_s: float = Field(default=2.0, gt=0)
    # No read timeout by default: a long generation may legitimately take minutes between bytes
    # only when the engine is stalled, which the client's own timeout handles.
    read_timeout_s: float | None = None
    max_connections: int = Field(default=1000, ge=1)

    # Shared state across router replicas.
    redis_url: str | None = None
    redis_timeout_ms: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _valid(self) -> RouterConfig:
        check_strategy(self.strategy)
        _check_weights(self.weights)
        merged_weights(self.strategy, self.weights)
        if self.endpoints and self.kubernetes is not None:
            raise ValueError("give either static endpoints or kubernetes discovery, not both")
        if (
            self.scrape_interval_max_ms is not None
            and self.scrape_interval_max_ms < self.scrape_interval_ms
        ):
            raise ValueError(
                f"scrape_interval_max_ms ({self.scrape_interval_max_ms}) must be at least "
                f"scrape_interval_ms ({self.scrape_interval_ms}); set them equal for a fixed "
                "interval"
            )
        return self

    @property
    def scrape_interval_s(self) -> float:
        return self.scrape_interval_ms / 1000.0

    @property
    def scrape_interval_max_s(self) -> float:
        if self.scrape_interval_max_ms is None:
            return 4 * self.scrape_interval_s
        return self.scrape_interval_max_ms / 1000.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RouterConfig:
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def with_overrides(self, overrides: Mapping[str, Any]) -> RouterConfig:
        """A copy with ``overrides`` applied, validated again (flags over the file)."""
        merged = self.model_dump()
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return RouterConfig.from_mapping(merged)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{where}: {err['msg']}")
    return "invalid router config: " + "; ".join(parts)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in ``path`` (not yet validated)."""
    return load_yaml_mapping(path, "router config")


def load_yaml_mapping(
    path: str | Path,
    what: str,
    *,
    shape: str = "must be a mapping at the top level",
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """The YAML mapping in ``path`` ({} for an empty file); ConfigError naming ``what`` and the
    problem otherwise."""
    return parse_yaml_mapping(read_config_bytes(path, what, max_bytes), path, what, shape)


def read_config_bytes(path: str | Path, what: str, max_bytes: int | None = None) -> bytes:
    """The bytes of ``path``; ConfigError naming ``what`` if unreadable or over ``max_bytes``."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    if max_bytes is not None and len(raw) > max_bytes:
        raise ConfigError(f"{what} {path} is over {max_bytes} bytes")
    return raw


def parse_yaml_mapping(
    raw: bytes, path: str | Path, what: str, shape: str = "must be a mapping at the top level"
) -> dict[str, Any]:
    """``raw`` (read from ``path``) as a YAML mapping ({} when empty); ConfigError otherwise."""
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} {shape}")
    return data


def parse_endpoint_urls(value: str) -> tuple[dict[str, str], ...]:
    """``--endpoints URL[,URL...]`` into endpoint mappings."""
    return tuple({"url": u.strip()} for u in value.split(",") if u.strip())


def priority_from_name(name: str) -> Priority:
    try:
        return Priority[name.strip().upper()]
    except KeyError:
        raise ValueError(
            f"unknown priority {name!r}; valid: critical, standard, sheddable"
        ) from None
