"""The ``LoraAdapter`` custom resource (``shoal.dev/v1alpha1``): spec and status.

A LoraAdapter names a base ``Model`` in the same namespace, where the adapter's files come from,
its rank and how many engine replicas should hold it. The operator places it on engine pods
(``shoal.operator.lora_placement``), fetches the files (``shoal.operator.lora_sources``), loads it
through the engines' ``/v1/load_lora_adapter`` and writes the status from what the engines'
``/v1/models`` report. Clients send the resource's name as the OpenAI ``model``.

What admission can check is checked with CEL (the source's scheme and shape, rank bounds,
replicas a positive number or ``all``); what needs the Model (its ``maxLoraRank``, whether it
exists, whether LoRA is enabled) is checked by the operator and reported as a condition.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, WithJsonSchema, field_validator

from shoal.api.model import (
    Condition,
    DnsName,
    ModelFileError,
    ObjectMeta,
    _Base,
    _cel,
    _validations,
)

LORA_KIND = "LoraAdapter"
LORA_PLURAL = "loraadapters"
LORA_SHORT_NAMES = ("lora",)

MAX_SOURCE_LENGTH = 2048
MAX_LORA_RANK = 512  # vLLM's largest supported max_lora_rank
# The sources the operator can fetch, one regular expression shared by CEL and pydantic (CEL's
# matches() is RE2; this pattern uses nothing RE2 lacks).
SOURCE_PATTERN = (
    r"^(hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^ ]*)?"
    r"|https://[^ /]+/[^ ]*"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^ ]*)?"
    r"|file:///[^ ]*)$"
)
_SOURCE_ADVICE = (
    "source must be hf://org/name[@revision], s3://bucket/prefix, https://host/archive, "
    "pvc://claim/path or file:///path"
)

Phase = Literal["Pending", "Loading", "Ready", "Failed"]


def _replicas_ok(value: int | str) -> int | str:
    if isinstance(value, str):
        if value != "all":
            raise ValueError(f"replicas must be a number ≥ 1 or 'all', got {value!r}")
        return value
    if value < 1:
        raise ValueError(f"replicas must be ≥ 1 or 'all', got {value}")
    return value


# int-or-string on the wire: one structural schema cannot say "integer or the word all", so the
# schema says int-or-string and a CEL rule says which values are allowed.
Replicas = Annotated[
    int | str,
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "description": "Engine replicas that hold the adapter: a number ≥ 1, or 'all' for "
            "every ready replica of the base Model.",
            "x-kubernetes-validations": [
                _cel(
                    "type(self) == int ? self >= 1 : self == 'all'",
                    "replicas must be a number ≥ 1 or 'all'",
                )
            ],
        }
    ),
]


class SecretKeyRef(_Base):
    """A Secret in the LoraAdapter's namespace holding the credentials for the source."""

    name: DnsName = Field(description="Name of the Secret.")


class LoraAdapterSpec(_Base):
    """Which base Model the adapter belongs to, where its files are, and how widely to load it."""

    base_model: DnsName = Field(
        description="Name of the Model (same namespace) whose engines serve this adapter."
    )
    source: str = Field(
        min_length=1,
        max_length=MAX_SOURCE_LENGTH,
        description="Where the adapter's files are: hf://org/name[@revision] (Hugging Face "
        "Hub), s3://bucket/prefix, https://host/path (a .tar.gz, .tgz or .zip archive), "
        "pvc://claim/path (a PersistentVolumeClaim mounted into the engines), or file:///path "
        "(a directory the engines can read; for tests and shared volumes).",
        json_schema_extra=_validations(
            _cel(f"self.matches('{SOURCE_PATTERN}')", _SOURCE_ADVICE),
        ),
    )
    rank: int | None = Field(
        default=None,
        ge=1,
        le=MAX_LORA_RANK,
        description="The adapter's LoRA rank; the operator refuses to load it when it exceeds "
        "the base Model's lora.maxLoraRank (condition reason RankTooLarge).",
    )
    replicas: Replicas = Field(default=1)
    credentials_secret: SecretKeyRef | None = Field(
        default=None,
        description="Secret with the source's credentials: AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL (s3), HF_TOKEN (hf), or AUTHORIZATION (the "
        "Authorization header for https).",
    )

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, v: int | str) -> int | str:
        return _replicas_ok(v)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not re.match(SOURCE_PATTERN, v):
            raise ValueError(f"{_SOURCE_ADVICE}; got {v!r}")
        return v


class PodError(_Base):
    """The last error one engine pod answered for this adapter."""

    pod: str = Field(description="Engine pod name.")
    message: str = Field(max_length=4096, description="What went wrong, as the engine said it.")
    time: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="When (RFC 3339)."
    )


class LoraAdapterStatus(_Base):
    """What the engines report: written from their /v1/models, never from what was sent."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation the operator last acted on."
    )
    phase: Phase = Field(
        default="Pending",
        description="Pending: nothing loaded yet; Loading: loaded on fewer pods than desired; "
        "Ready: loaded on every desired pod; Failed: cannot be loaded as specified (see the "
        "Degraded condition).",
    )
    desired_replicas: int = Field(
        default=0,
        ge=0,
        description="Pods that should hold it now ('all' resolved, capped by "
        "the ready pods and their capacity).",
    )
    loaded_replicas: int = Field(
        default=0, ge=0, description="Pods whose /v1/models lists the adapter."
    )
    loaded_pods: list[str] = Field(
        default_factory=list, description="Names of the engine pods that have it loaded."
    )
    path: str | None = Field(
        default=None, description="Local path of the adapter's files the engines load from."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready and Degraded, each with a reason (UnknownBaseModel, LoraDisabled, "
        "RankTooLarge, SourceUnavailable, LoadFailed, InsufficientCapacity, Loaded, ...).",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    pod_errors: list[PodError] = Field(
        default_factory=list,
        description="The last error per engine pod, for pods where the load failed.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["pod"],
        },
    )


class LoraAdapterResource(_Base):
    """A whole ``LoraAdapter`` document."""

    api_version: Literal["shoal.dev/v1alpha1"] = "shoal.dev/v1alpha1"
    kind: Literal["LoraAdapter"] = "LoraAdapter"
    metadata: ObjectMeta
    spec: LoraAdapterSpec
    status: LoraAdapterStatus | None = None

    def to_manifest(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def parse_lora_adapter(doc: Any, source: str = "<document>") -> LoraAdapterResource:
    """Validate one parsed document as a ``LoraAdapter``; ModelFileError names the fields."""
    if not isinstance(doc, dict):
        raise ModelFileError(f"{source}: expected a mapping with apiVersion, kind, metadata, spec")
    if doc.get("kind", LORA_KIND) != LORA_KIND:
        raise ModelFileError(f"{source}: kind is {doc.get('kind')!r}, expected {LORA_KIND!r}")
    try:
        return LoraAdapterResource.model_validate(doc)
    except ValidationError as err:
        lines = [f"{source}: invalid LoraAdapter:"]
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(document)"
            lines.append(f"  {loc}: {str(e['msg']).removeprefix('Value error, ')}")
        raise ModelFileError("\n".join(lines)) from None


def load_lora_adapters_file(path: str | Path) -> list[LoraAdapterResource]:
    """Every ``LoraAdapter`` document of a YAML file (other kinds are skipped)."""
    p = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        raise ModelFileError(f"{p}: cannot read: {exc}") from None
    return [
        parse_lora_adapter(d, str(p))
        for d in docs
        if isinstance(d, dict) and d.get("kind") == LORA_KIND
    ]


__all__ = [
    "LORA_KIND",
    "LORA_PLURAL",
    "LORA_SHORT_NAMES",
    "SOURCE_PATTERN",
    "LoraAdapterResource",
    "LoraAdapterSpec",
    "LoraAdapterStatus",
    "PodError",
    "SecretKeyRef",
    "load_lora_adapters_file",
    "parse_lora_adapter",
]
