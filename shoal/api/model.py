"""The ``Model`` custom resource (``shoal.dev/v1alpha1``): spec and status as pydantic models.

These classes are the single source of the CRD: ``shoal.api.crd`` turns their JSON schema into the
CRD's structural OpenAPI schema (field descriptions become ``kubectl explain`` text) and carries
the CEL rules declared here under ``x-kubernetes-validations``. ``shoal up`` parses the same YAML
locally, so one file runs on a laptop and on a cluster. Field names are snake_case in Python and
camelCase on the wire (``by_alias``), as Kubernetes resources are. The pydantic validators mirror
the CEL rules, with the same advice, so a bad file fails the same way in both places.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from shoal.sim.catalog import GPUS, get_gpu

GROUP = "shoal.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Model"
PLURAL = "models"

# Labels the operator puts on what it makes for a Model; the router's Kubernetes discovery and the
# scale subresource's selector rely on them.
MODEL_LABEL = "shoal.dev/model"
POOL_LABEL = "shoal.dev/pool"
COMPONENT_LABEL = "shoal.dev/component"
ENGINE_COMPONENT = "engine"

# Bounds that keep the CEL rules' estimated cost within the API server's budget: a rule over a list
# is priced at the list's maxItems, and string comparisons at the strings' maxLength.
MAX_POOLS = 16
MAX_NAME_LENGTH = 63

# The router's named strategies (presets of its one pipeline). Listed here rather than imported
# from the router so that the API, which the operator and CRD generator load, stays dependency-free.
RoutingStrategy = Literal[
    "random",
    "round-robin",
    "least-request",
    "least-kv",
    "power-of-two",
    "prefix",
    "kv-aware",
    "session",
]


def _cel(
    rule: str, message: str, *, field_path: str | None = None, message_expression: str | None = None
) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry. ``message`` is what kubectl prints when
    ``messageExpression`` is absent or fails to evaluate; ``field_path`` points the error at the
    offending field instead of the object holding the rule. A message expression may only quote
    strings: the API server prices ``string(int)`` as unbounded and rejects the whole CRD."""
    out = {"rule": rule, "message": message}
    if message_expression:
        out["messageExpression"] = message_expression
    if field_path:
        out["fieldPath"] = field_path
    return out


def _validations(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


class _Base(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors (typos surface)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )


def _known_gpu(name: str) -> str:
    """Canonical GPU name; an unknown one fails with the catalog's list of known GPUs."""
    try:
        return get_gpu(name).name
    except KeyError as exc:
        raise ValueError(str(exc.args[0])) from None


# On a cluster only the catalog's canonical names are accepted (what the printer column and the
# operator's node affinity use); locally the aliases and node-label spellings are canonicalised too.
GPU_TYPES: tuple[str, ...] = tuple(sorted(GPUS))
_GPU_LIST = ", ".join(GPU_TYPES)
_GPU_CEL = _cel(
    "self in [" + ", ".join(f"'{g}'" for g in GPU_TYPES) + "]",
    f"unknown gpuType: use one of the catalog GPU types {_GPU_LIST} (exact spelling)",
    message_expression=(
        f"'unknown gpuType ' + self + ': use one of the catalog GPU types {_GPU_LIST} "
        "(exact spelling)'"
    ),
)

GpuType = Annotated[str, AfterValidator(_known_gpu)]
DnsName = Annotated[
    str,
    Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
]


class ObjectMeta(_Base):
    """The parts of Kubernetes object metadata Shoal reads; the rest (uid, resourceVersion,
    managedFields, ...) is ignored so that objects read back from the API server parse too."""

    model_config = ConfigDict(extra="ignore")

    name: DnsName
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None


class ModelSource(_Base):
    """Where the weights come from and the name clients send in ``model``."""

    name: str = Field(
        min_length=1,
        description="Hugging Face model id or a path to the weights, e.g. "
        "meta-llama/Llama-3.1-8B-Instruct.",
    )
    served_name: str | None = Field(
        default=None,
        description="Name clients put in the OpenAI 'model' field (default: the source name).",
    )
    revision: str | None = Field(
        default=None, description="Model revision (branch, tag or commit) to load."
    )

    @property
    def client_name(self) -> str:
        return self.served_name or self.name


class EngineKind(StrEnum):
    VLLM = "vllm"
    SGLANG = "sglang"
    SIM = "sim"


class EngineSpec(_Base):
    """The inference engine every replica runs."""

    kind: EngineKind = Field(
        default=EngineKind.VLLM,
        description="Engine: vllm, sglang, or sim (Shoal's vLLM-compatible simulator).",
    )
    image: str | None = Field(
        default=None, description="Container image of the engine (default: one per kind)."
    )
    args: list[str] = Field(
        default_factory=list,
        description="Extra engine command-line arguments, appended last so they override "
        "what the operator sets.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables of the engine container."
    )
    port: int = Field(
        default=8000, ge=1, le=65535, description="Port of the engine's OpenAI API and /metrics."
    )
    enable_prefix_caching: bool = Field(
        default=True, description="Turn on the engine's automatic prefix caching."
    )


class Toleration(_Base):
    """A Kubernetes toleration for the pool's pods (GPU nodes are usually tainted)."""

    key: str | None = Field(default=None, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] = Field(
        default="Equal", description="Exists or Equal (then value must match)."
    )
    value: str | None = Field(default=None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty tolerates every effect."
    )


class GpuPool(_Base):
    """Replicas of the model on one GPU type: the unit the operator makes a Deployment of."""

    model_config = ConfigDict(
        json_schema_extra=_validations(
            _cel(
                "!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
                "minReplicas is greater than maxReplicas: lower minReplicas or raise maxReplicas",
                field_path=".minReplicas",
            ),
            _cel(
                "self.replicas >= self.minReplicas && "
                "(!has(self.maxReplicas) || self.replicas <= self.maxReplicas)",
                "replicas must lie within minReplicas..maxReplicas: change replicas or the bounds",
                field_path=".replicas",
            ),
        )
    )

    name: DnsName = Field(
        description="Pool name, unique within the Model (a DNS label); names the pool's Deployment."
    )
    gpu_type: GpuType = Field(
        max_length=MAX_NAME_LENGTH,
        description=f"GPU type of the pool's nodes, a catalog name: {_GPU_LIST}.",
        json_schema_extra=_validations(_GPU_CEL),
    )
    gpus_per_replica: int = Field(
        default=1,
        ge=1,
        le=16,
        description="GPUs per replica; the engine's tensor-parallel size.",
    )
    replicas: int = Field(
        default=1,
        ge=0,
        description="Replicas of this pool while spec.replicas is unset; when spec.replicas is "
        "set, the pools' replicas are the proportions the total is spread by.",
    )
    min_replicas: int = Field(
        default=0, ge=0, description="Fewest replicas the autoscaler or a scale may leave."
    )
    max_replicas: int | None = Field(
        default=None,
        ge=0,
        description="Most replicas the autoscaler or a scale may set (default: unbounded).",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Extra node labels the pool's pods require (the GPU product label is "
        "added by the operator).",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations for the pool's pods."
    )
    price_per_hour: float | None = Field(
        default=None,
        ge=0,
        description="Price of one replica per hour, for placement by cost (default: the "
        "catalog's GPU price times gpusPerReplica).",
    )
    power_priority: Literal["high", "low"] = Field(
        default="high",
        description="Under a power cap, low-priority pools have their GPU clocks capped first.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> GpuPool:
        hi = self.max_replicas
        if hi is not None and self.min_replicas > hi:
            raise ValueError(
                f"pool {self.name!r}: minReplicas ({self.min_replicas}) is greater than "
                f"maxReplicas ({hi}); lower minReplicas or raise maxReplicas"
            )
        if self.replicas < self.min_replicas or (hi is not None and self.replicas > hi):
            raise ValueError(
                f"pool {self.name!r}: replicas ({self.replicas}) must lie within "
                f"minReplicas..maxReplicas ({self.min_replicas}..{hi if hi is not None else '∞'})"
            )
        return self

    @property
    def effective_price_per_hour(self) -> float:
        if self.price_per_hour is not None:
            return self.price_per_hour
        return get_gpu(self.gpu_type).price_per_hour * self.gpus_per_replica


class SloTargets(_Base):
    """Latency targets at a percentile; the autoscaler sizes pools to meet them."""

    ttft_ms: float | None = Field(
        default=None, gt=0, description="Time-to-first-token target in milliseconds."
    )
    tpot_ms: float | None = Field(
        default=None, gt=0, description="Time-per-output-token target in milliseconds."
    )
    percentile: float = Field(
        default=90.0, gt=0, lt=100, description="Percentile the targets apply to, e.g. 90 or 99."
    )


class AutoscalingPolicy(_Base):
    """How the autoscaler sizes the pools."""

    model_config = ConfigDict(
        json_schema_extra=_validations(
            _cel(
                "self.panicWindowS <= self.stableWindowS",
                "panicWindowS must not exceed stableWindowS",
                field_path=".panicWindowS",
            )
        )
    )

    enabled: bool = Field(
        default=False, description="Let the autoscaler change replicas (else they stay as set)."
    )
    policy: Literal["slo", "kpa", "apa", "hpa"] = Field(
        default="slo",
        description="slo: size per SLO from modelled latency and a forecast; kpa: Knative-style "
        "stable/panic windows; apa: AIBrix-style fluctuation tolerance; hpa: a queue target "
        "per replica (KEDA-style).",
    )
    target_concurrency: float | None = Field(
        default=None, gt=0, description="Requests in flight per replica (policies kpa/apa)."
    )
    target_queue_depth: float | None = Field(
        default=None, gt=0, description="Waiting requests per replica (policy hpa; default 5)."
    )
    stable_window_s: float = Field(
        default=60.0, gt=0, description="Averaging window in seconds for normal scaling."
    )
    panic_window_s: float = Field(
        default=6.0, gt=0, description="Short window in seconds that reacts to bursts."
    )
    panic_threshold: float = Field(
        default=2.0, gt=1, description="Load over capacity ratio that enters panic mode."
    )
    scale_down_delay_s: float = Field(
        default=300.0,
        ge=0,
        description=(
            "Seconds the load must stay low before scaling down. The slo policy uses one pool "
            "start-up time instead when this is not set."
        ),
    )
    heterogeneous: bool = Field(
        default=True, description="Place replicas on the cheapest GPU mix that meets the SLO."
    )

    @model_validator(mode="after")
    def _windows(self) -> AutoscalingPolicy:
        if self.panic_window_s > self.stable_window_s:
            raise ValueError(
                f"panicWindowS ({self.panic_window_s}) must not exceed "
                f"stableWindowS ({self.stable_window_s})"
            )
        return self


class RoutingSpec(_Base):
    """How the router picks an engine for this model's requests."""

    strategy: RoutingStrategy = Field(
        default="kv-aware", description="Named routing strategy (a preset of scorer weights)."
    )
    # Non-negativity as a schema minimum rather than CEL: a CEL rule over an unbounded map would
    # be priced at the largest possible request and blow the API server's cost budget.
    weights: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict,
        description="Scorer name to weight, overriding the strategy's preset (weights ≥ 0; "
        "0 switches a scorer off).",
    )

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if w < 0}
        if bad:
            raise ValueError(f"routing weights must be ≥ 0, got {bad}")
        return v


class LoraLimits(_Base):
    """LoRA adapters served on top of the base model."""

    model_config = ConfigDict(
        json_schema_extra=_validations(
            _cel(
                "!has(self.maxCpuLoras) || self.maxCpuLoras >= self.maxLoras",
                "maxCpuLoras must be ≥ maxLoras",
                field_path=".maxCpuLoras",
            )
        )
    )

    enabled: bool = Field(default=False, description="Start the engines with LoRA support.")
    max_loras: int = Field(
        default=4, ge=1, description="Adapters resident in GPU memory per replica at once."
    )
    max_lora_rank: int = Field(default=16, ge=1, le=512, description="Largest adapter rank.")
    max_cpu_loras: int | None = Field(
        default=None, ge=1, description="Adapters cached in CPU memory per replica (≥ maxLoras)."
    )

    @model_validator(mode="after")
    def _cpu(self) -> LoraLimits:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"maxCpuLoras ({self.max_cpu_loras}) must be ≥ maxLoras ({self.max_loras})"
            )
        return self


class KVCacheRef(_Base):
    """A ``KVCache`` resource in the same namespace that this model's engines offload to."""

    name: DnsName = Field(description="Name of the KVCache resource.")


def _spec_rules() -> dict[str, Any]:
    names = "self.pools.map(p, p.name)"
    return _validations(
        _cel(
            "self.pools.all(p, self.pools.exists_one(q, q.name == p.name))",
            "pool names must be unique: give every entry of pools its own name",
            field_path=".pools",
            message_expression=(
                f"'pool name ' + {names}.filter(n, {names}.filter(m, m == n).size() > 1)[0] + "
                "' appears more than once: give every entry of pools its own name'"
            ),
        ),
        _cel(
            "!has(self.replicas) || self.replicas >= self.pools.map(p, p.minReplicas).sum()",
            "replicas is below the pools' total minReplicas: raise replicas or lower minReplicas",
            field_path=".replicas",
        ),
        _cel(
            "!has(self.replicas) || self.pools.exists(p, !has(p.maxReplicas)) || "
            "self.replicas <= self.pools.map(p, p.maxReplicas).sum()",
            "replicas exceeds the pools' total maxReplicas: lower replicas or raise maxReplicas",
            field_path=".replicas",
        ),
    )


class ModelSpec(_Base):
    """What to serve, on which GPUs, and how to scale and route it."""

    model_config = ConfigDict(json_schema_extra=_spec_rules())

    model: ModelSource = Field(description="The weights and the name clients use.")
    engine: EngineSpec = Field(
        default_factory=EngineSpec, description="The engine every replica runs."
    )
    replicas: int | None = Field(
        default=None,
        ge=0,
        description="Total replicas over all pools (what kubectl scale sets). When set, the "
        "operator spreads it over the pools within each pool's minReplicas..maxReplicas, in "
        "proportion to the pools' replicas; when unset, every pool runs its own replicas and the "
        "operator fills in their sum, so that the scale subresource has a value to read.",
    )
    pools: list[GpuPool] = Field(
        min_length=1,
        max_length=MAX_POOLS,
        description="GPU pools: one Deployment of the engine per pool, each on one GPU type.",
    )
    slo: SloTargets = Field(
        default_factory=SloTargets, description="Latency targets the autoscaler sizes for."
    )
    autoscaling: AutoscalingPolicy = Field(
        default_factory=AutoscalingPolicy, description="Autoscaling policy."
    )
    routing: RoutingSpec = Field(
        default_factory=RoutingSpec, description="Routing strategy and weights."
    )
    lora: LoraLimits = Field(default_factory=LoraLimits, description="LoRA adapter limits.")
    kv_cache: KVCacheRef | None = Field(
        default=None, description="KV cache tier the engines offload KV blocks to."
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="Context length limit passed to the engine."
    )

    @field_validator("pools")
    @classmethod
    def _unique_pools(cls, pools: list[GpuPool]) -> list[GpuPool]:
        names = [p.name for p in pools]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate pool names {dup}: every pool needs its own name")
        return pools

    @model_validator(mode="after")
    def _total_within_bounds(self) -> ModelSpec:
        if self.replicas is None:
            return self
        lo = sum(p.min_replicas for p in self.pools)
        if self.replicas < lo:
            raise ValueError(
                f"replicas ({self.replicas}) is below the pools' total minReplicas ({lo}); "
                "raise replicas or lower minReplicas"
            )
        highs = [p.max_replicas for p in self.pools]
        if all(h is not None for h in highs):
            hi = sum(h for h in highs if h is not None)
            if self.replicas > hi:
                raise ValueError(
                    f"replicas ({self.replicas}) exceeds the pools' total maxReplicas ({hi}); "
                    "lower replicas or raise maxReplicas"
                )
        return self

    @property
    def total_replicas(self) -> int:
        return sum(self.pool_replicas().values())

    def pool_replicas(self) -> dict[str, int]:
        """Replicas per pool: each pool's own ``replicas`` when ``spec.replicas`` is unset, else
        ``spec.replicas`` spread over the pools within their bounds, in proportion to the pools'
        ``replicas`` (equal shares when those are all 0).

        Water-filling one replica at a time keeps it exact and deterministic (ties go to the
        earlier pool); totals are small, so the O(replicas × pools) loop costs nothing.
        """
        if self.replicas is None:
            return {p.name: p.replicas for p in self.pools}
        alloc = {p.name: p.min_replicas for p in self.pools}
        weighted = any(p.replicas > 0 for p in self.pools)
        left = self.replicas - sum(alloc.values())
        while left > 0:
            open_pools = [
                p for p in self.pools if p.max_replicas is None or alloc[p.name] < p.max_replicas
            ]
            if not open_pools:
                break

            def deficit(p: GpuPool) -> float:
                weight = p.replicas if weighted else 1
                # Pools without weight only take what the weighted ones cannot.
                return (alloc[p.name] + 1) / weight if weight else float("inf")

            best = min(open_pools, key=deficit)
            alloc[best.name] += 1
            left -= 1
        return alloc


class ConditionType(StrEnum):
    READY = "Ready"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"


class ConditionReason(StrEnum):
    """The reasons the operator sets; clients may match on them."""

    ALL_REPLICAS_READY = "AllReplicasReady"
    REPLICAS_NOT_READY = "ReplicasNotReady"
    SCALED_TO_ZERO = "ScaledToZero"
    ROLLING_OUT = "RollingOut"
    ROLLOUT_COMPLETE = "RolloutComplete"
    RECONCILED = "Reconciled"
    INVALID_SPEC = "InvalidSpec"
    RECONCILE_FAILED = "ReconcileFailed"
    UNSCHEDULABLE = "Unschedulable"


class Condition(_Base):
    """A Kubernetes-style condition: ``Ready``, ``Progressing`` or ``Degraded``."""

    type: Literal["Ready", "Progressing", "Degraded"] = Field(
        description="Ready: every desired replica serves; Progressing: a rollout or scale is "
        "under way; Degraded: something needs attention (see reason and message)."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="CamelCase reason, e.g. AllReplicasReady, RollingOut, InvalidSpec.",
    )
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    last_transition_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When the status last changed (RFC 3339).",
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation this condition describes."
    )


class PoolStatus(_Base):
    """Replicas of one pool."""

    name: str = Field(description="Pool name.")
    gpu_type: str = Field(description="GPU type of the pool.")
    desired_replicas: int = Field(default=0, ge=0, description="Replicas the operator asks for.")
    ready_replicas: int = Field(default=0, ge=0, description="Replicas ready to serve.")


class ModelStatus(_Base):
    """What the operator observed; written through the status subresource."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation the operator last acted on."
    )
    replicas: int = Field(
        default=0,
        ge=0,
        description="Replicas that exist over all pools (the scale subresource's current count).",
    )
    desired_replicas: int = Field(default=0, ge=0, description="Replicas asked for over all pools.")
    ready_replicas: int = Field(default=0, ge=0, description="Replicas ready to serve.")
    gpus: str | None = Field(
        default=None,
        max_length=1024,
        description="The pools at a glance, desired replicas x GPU type, e.g. 3xH100,1xA10G "
        "(a printer column: server-side printing shows one value of a list, so it is a string).",
    )
    selector: str | None = Field(
        default=None,
        description="Label selector of the model's engine pods, as a string (for the scale "
        "subresource and HorizontalPodAutoscalers).",
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Progressing and Degraded, each with a reason.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    pools: list[PoolStatus] = Field(
        default_factory=list,
        description="Desired and ready replicas per pool.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )
    endpoints: list[str] = Field(
        default_factory=list, description="URLs of the engine replicas that are ready."
    )

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


def gpu_summary(pools: list[PoolStatus]) -> str:
    """``status.gpus``: ``3xH100,1xA10G`` from the pools' desired replicas."""
    return ",".join(f"{p.desired_replicas}x{p.gpu_type}" for p in pools)


def engine_selector(model_name: str) -> str:
    """The ``status.selector`` string of a Model: its engine pods' labels."""
    return f"{MODEL_LABEL}={model_name},{COMPONENT_LABEL}={ENGINE_COMPONENT}"


class ModelResource(_Base):
    """A whole ``Model`` document: apiVersion, kind, metadata, spec, status."""

    api_version: Literal["shoal.dev/v1alpha1"] = "shoal.dev/v1alpha1"
    kind: Literal["Model"] = "Model"
    metadata: ObjectMeta
    spec: ModelSpec
    status: ModelStatus | None = None

    def to_manifest(self) -> dict[str, Any]:
        """The document as a plain dict with camelCase keys, ready for YAML or the API server."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ModelFileError(ValueError):
    """A Model file that cannot be read or does not validate; the message names the fields."""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid Model:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(document)"
        msg = str(e["msg"]).removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_model(doc: Any, source: str = "<document>") -> ModelResource:
    """Validate one parsed YAML/JSON document as a ``Model``."""
    if not isinstance(doc, dict):
        raise ModelFileError(f"{source}: expected a mapping with apiVersion, kind, metadata, spec")
    if doc.get("kind", KIND) != KIND:
        raise ModelFileError(f"{source}: kind is {doc.get('kind')!r}, expected {KIND!r}")
    try:
        return ModelResource.model_validate(doc)
    except ValidationError as err:
        raise ModelFileError(_format_errors(err, source)) from None


def load_model_file(path: str | Path) -> ModelResource:
    """Parse the first ``Model`` document of a YAML file (other kinds in the file are skipped)."""
    p = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
    except OSError as exc:
        raise ModelFileError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ModelFileError(f"{p}: not valid YAML: {exc}") from None
    models = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if not models:
        if len(docs) == 1:
            return parse_model(docs[0], str(p))
        raise ModelFileError(f"{p}: no document of kind {KIND!r}")
    return parse_model(models[0], str(p))
