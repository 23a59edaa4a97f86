"""The ``Model`` custom resource (``shoal.dev/v1alpha1``): spec and status as pydantic models.

The CRD YAML is generated from these classes, and ``shoal up`` parses the same YAML document
locally, so one file runs on a laptop and on a cluster. Field names are snake_case in Python and
camelCase on the wire (``by_alias``), as Kubernetes resources are. Validation here mirrors the
CEL rules of the CRD and its messages say what to change.
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

from shoal.sim.catalog import get_gpu

GROUP = "shoal.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Model"

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


GpuType = Annotated[str, AfterValidator(_known_gpu)]
DnsName = Annotated[
    str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
]


class ObjectMeta(_Base):
    name: DnsName
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None


class ModelSource(_Base):
    """Where the weights come from and the name clients send in ``model``."""

    name: str = Field(min_length=1, description="Hugging Face id or path of the weights")
    served_name: str | None = Field(
        default=None, description="name clients use in requests (default: the source name)"
    )
    revision: str | None = None

    @property
    def client_name(self) -> str:
        return self.served_name or self.name


class EngineKind(StrEnum):
    VLLM = "vllm"
    SGLANG = "sglang"
    SIM = "sim"


class EngineSpec(_Base):
    kind: EngineKind = EngineKind.VLLM
    image: str | None = Field(default=None, description="container image (default per kind)")
    args: list[str] = Field(default_factory=list, description="extra engine arguments")
    env: dict[str, str] = Field(default_factory=dict)
    port: int = Field(default=8000, ge=1, le=65535)
    enable_prefix_caching: bool = True


class Toleration(_Base):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class GpuPool(_Base):
    """Replicas of the model on one GPU type: the unit the operator makes a Deployment of."""

    name: DnsName
    gpu_type: GpuType = Field(description="GPU type, a name from the catalog (H100, A10G, L4, ...)")
    gpus_per_replica: int = Field(default=1, ge=1, le=16, description="tensor parallel size")
    replicas: int = Field(default=1, ge=0)
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int | None = Field(default=None, ge=0)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    price_per_hour: float | None = Field(
        default=None, ge=0, description="per replica; default: the catalog price × GPUs"
    )
    power_priority: Literal["high", "low"] = "high"

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

    ttft_ms: float | None = Field(default=None, gt=0)
    tpot_ms: float | None = Field(default=None, gt=0)
    percentile: float = Field(default=90.0, gt=0, lt=100)


class AutoscalingPolicy(_Base):
    enabled: bool = False
    policy: Literal["slo", "kpa", "concurrency"] = "slo"
    target_concurrency: float | None = Field(default=None, gt=0)
    stable_window_s: float = Field(default=60.0, gt=0)
    panic_window_s: float = Field(default=6.0, gt=0)
    panic_threshold: float = Field(default=2.0, gt=1)
    scale_down_delay_s: float = Field(default=300.0, ge=0)
    heterogeneous: bool = Field(default=True, description="place replicas on the cheapest GPU mix")

    @model_validator(mode="after")
    def _windows(self) -> AutoscalingPolicy:
        if self.panic_window_s > self.stable_window_s:
            raise ValueError(
                f"panicWindowS ({self.panic_window_s}) must not exceed "
                f"stableWindowS ({self.stable_window_s})"
            )
        return self


class RoutingSpec(_Base):
    strategy: RoutingStrategy = "kv-aware"
    weights: dict[str, float] = Field(default_factory=dict, description="scorer name → weight")

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if w < 0}
        if bad:
            raise ValueError(f"routing weights must be ≥ 0, got {bad}")
        return v


class LoraLimits(_Base):
    enabled: bool = False
    max_loras: int = Field(default=4, ge=1, description="adapters resident on GPU per replica")
    max_lora_rank: int = Field(default=16, ge=1, le=512)
    max_cpu_loras: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _cpu(self) -> LoraLimits:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"maxCpuLoras ({self.max_cpu_loras}) must be ≥ maxLoras ({self.max_loras})"
            )
        return self


class KVCacheRef(_Base):
    """A ``KVCache`` resource in the same namespace that this model's engines offload to."""

    name: DnsName


class ModelSpec(_Base):
    model: ModelSource
    engine: EngineSpec = Field(default_factory=EngineSpec)
    pools: list[GpuPool] = Field(min_length=1)
    slo: SloTargets = Field(default_factory=SloTargets)
    autoscaling: AutoscalingPolicy = Field(default_factory=AutoscalingPolicy)
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    lora: LoraLimits = Field(default_factory=LoraLimits)
    kv_cache: KVCacheRef | None = None
    max_model_len: int | None = Field(default=None, ge=16)

    @field_validator("pools")
    @classmethod
    def _unique_pools(cls, pools: list[GpuPool]) -> list[GpuPool]:
        names = [p.name for p in pools]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate pool names {dup}: every pool needs its own name")
        return pools

    @property
    def total_replicas(self) -> int:
        return sum(p.replicas for p in self.pools)


class Condition(_Base):
    """A Kubernetes-style condition: ``Ready``, ``Progressing`` or ``Degraded``."""

    type: Literal["Ready", "Progressing", "Degraded"]
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(min_length=1, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class PoolStatus(_Base):
    name: str
    gpu_type: str
    desired_replicas: int = Field(default=0, ge=0)
    ready_replicas: int = Field(default=0, ge=0)


class ModelStatus(_Base):
    observed_generation: int | None = None
    replicas: int = Field(default=0, ge=0, description="total ready replicas (scale subresource)")
    conditions: list[Condition] = Field(default_factory=list)
    pools: list[PoolStatus] = Field(default_factory=list)
    endpoints: list[str] = Field(default_factory=list)

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


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
