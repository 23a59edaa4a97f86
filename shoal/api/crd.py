"""CustomResourceDefinitions generated from the typed API models.

The pydantic models in :mod:`shoal.api.model` are the single source of truth; this module turns
their JSON schema (draft 2020-12, with ``$defs`` and ``anyOf`` for optionals) into the *structural*
OpenAPI v3 schema the API server requires:

* every ``$ref`` is inlined (structural schemas cannot reference), merging the referring site's
  description, default and ``x-kubernetes-*`` keys over the target's;
* ``anyOf: [X, null]`` (an optional field) becomes plain ``X``. The API server prunes ``null``
  from fields that are not ``nullable`` before defaulting and validation, so an omitted and a
  ``null`` field look the same to the CEL rules (``has()`` is false); ``nullable: true`` would
  instead let ``null`` reach rules such as ``self.minReplicas <= self.maxReplicas`` and fail them
  with a type error rather than the intended message;
* ``exclusiveMinimum: n`` (JSON schema) becomes ``minimum: n, exclusiveMinimum: true`` (OpenAPI
  3.0); ``additionalProperties: false`` (``extra="forbid"``) is dropped, since structural schemas
  prune unknown fields and forbid it next to ``properties``; titles are dropped;
* a nested object with a default factory gets its defaulted value as ``default``, so the API
  server fills it in (the Strategy printer column and the CEL rules see it);
* anything else the converter does not know raises :class:`SchemaConversionError`: a new pydantic
  construct must be handled here on purpose, never dropped silently.

``deploy/gen-crds.py`` writes the result into the Helm chart; ``tests/unit/test_crd.py`` fails
when the checked-in file and this generator disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel

from shoal.api.lora import (
    LORA_KIND,
    LORA_PLURAL,
    LORA_SHORT_NAMES,
    LoraAdapterSpec,
    LoraAdapterStatus,
)
from shoal.api.model import (
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    ModelSpec,
    ModelStatus,
)

SHORT_NAMES = ("mdl",)
CATEGORIES = ("shoal",)
MODEL_CRD_FILE = f"{PLURAL}.{GROUP}.yaml"
LORA_CRD_FILE = f"{LORA_PLURAL}.{GROUP}.yaml"

# Keys copied unchanged from the JSON schema: they mean the same in OpenAPI v3.0.
_PASSTHROUGH = frozenset(
    {
        "type",
        "description",
        "format",
        "enum",
        "pattern",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "required",
        "x-kubernetes-validations",
        "x-kubernetes-list-type",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-map-type",
        "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-int-or-string",
    }
)
_DROPPED = frozenset({"title", "additionalProperties"})
_KEY_ORDER = (
    "description",
    "type",
    "format",
    "enum",
    "default",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "items",
    "additionalProperties",
    "properties",
    "required",
)


class SchemaConversionError(ValueError):
    """A JSON-schema construct with no structural OpenAPI equivalent here."""


def _merge(site: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
    """``target`` (a resolved $ref or the non-null branch of an optional) with the referring
    site's keys on top; CEL rules from both places are kept."""
    merged = {**target, **{k: v for k, v in site.items() if k not in ("$ref", "anyOf", "allOf")}}
    rules = [*target.get("x-kubernetes-validations", []), *site.get("x-kubernetes-validations", [])]
    if rules:
        merged["x-kubernetes-validations"] = rules
    return merged


def _resolve(node: Mapping[str, Any], defs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Strip references and optional wrappers until a concrete schema is left."""
    out = dict(node)
    while True:
        if "$ref" in out:
            name = str(out["$ref"]).rsplit("/", 1)[-1]
            if name not in defs:
                raise SchemaConversionError(f"{where}: unresolvable $ref {out['$ref']!r}")
            out = _merge(out, defs[name])
        elif "allOf" in out:
            if len(out["allOf"]) != 1:
                raise SchemaConversionError(f"{where}: allOf with several schemas")
            out = _merge(out, out["allOf"][0])
        elif "anyOf" in out:
            branches = [b for b in out["anyOf"] if b != {"type": "null"}]
            if len(branches) != 1:
                raise SchemaConversionError(
                    f"{where}: a union of several types cannot be a structural schema"
                )
            out = _merge(out, branches[0])
        else:
            return out


def _convert(node: Mapping[str, Any], defs: Mapping[str, Any], where: str) -> dict[str, Any]:
    src = _resolve(node, defs, where)
    out: dict[str, Any] = {}
    for key, value in src.items():
        if key in _PASSTHROUGH:
            out[key] = value
        elif key in _DROPPED:
            continue
        elif key == "default":
            if value is not None:
                out["default"] = value
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        elif key == "items":
            out["items"] = _convert(value, defs, f"{where}[]")
        elif key == "properties":
            out["properties"] = {
                name: _convert(sub, defs, f"{where}.{name}") for name, sub in value.items()
            }
        else:
            raise SchemaConversionError(f"{where}: unsupported JSON-schema keyword {key!r}")
    extra = src.get("additionalProperties")
    if isinstance(extra, Mapping):
        out["additionalProperties"] = _convert(extra, defs, f"{where}.*")
    if "type" not in out and not out.get("x-kubernetes-int-or-string"):
        if "enum" in out:
            out["type"] = "string"
        elif not out.get("x-kubernetes-preserve-unknown-fields"):
            # `Any` in a model: free-form by declaration, the only place it is allowed.
            out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("type") == "object" and "properties" in out:
        required = set(out.get("required", ()))
        for name, sub in out["properties"].items():
            # A nested model with a default factory: let the API server default it. The default
            # is spelled out in full because the API server checks a default against the CEL
            # rules as written, without defaulting inside it first.
            if (
                name not in required
                and sub.get("type") == "object"
                and "properties" in sub
                and "default" not in sub
                and not _is_optional(src["properties"][name])
            ):
                sub["default"] = _implied_default(sub)
    return {k: out[k] for k in sorted(out, key=_order)}


def _implied_default(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The object an empty ``{}`` becomes after defaulting (children were converted first)."""
    return {
        name: sub["default"]
        for name, sub in schema.get("properties", {}).items()
        if "default" in sub
    }


def _is_optional(node: Mapping[str, Any]) -> bool:
    """Declared ``X | None``: JSON schema says so with a null branch."""
    return any(b == {"type": "null"} for b in node.get("anyOf", ()))


def _order(key: str) -> tuple[int, str]:
    try:
        return (_KEY_ORDER.index(key), key)
    except ValueError:
        return (len(_KEY_ORDER), key)


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one pydantic model, camelCase field names."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _convert(raw, defs, model.__name__)


def _condition_column(name: str, type_: str, field: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "string",
        "jsonPath": f'.status.conditions[?(@.type=="{type_}")].{field}',
        "description": description,
    }


def _crd(
    *,
    kind: str,
    plural: str,
    short_names: tuple[str, ...],
    description: str,
    spec_model: type[BaseModel],
    status_model: type[BaseModel],
    columns: list[dict[str, Any]],
    subresources: dict[str, Any],
) -> dict[str, Any]:
    """One namespaced ``shoal.dev`` CRD from the typed spec and status of its kind."""
    root = {
        "description": description,
        "type": "object",
        "properties": {
            "apiVersion": {
                "description": f"APIVersion of this representation: {GROUP}/{VERSION}.",
                "type": "string",
            },
            "kind": {"description": f"Kind of this resource: {kind}.", "type": "string"},
            "metadata": {"type": "object"},
            "spec": structural_schema(spec_model),
            "status": structural_schema(status_model),
        },
        "required": ["spec"],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "shoal"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": list(short_names),
                "categories": list(CATEGORIES),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def model_crd() -> dict[str, Any]:
    """The ``models.shoal.dev`` CustomResourceDefinition."""
    columns = [
        _condition_column("Ready", "Ready", "status", "Whether every desired replica serves."),
        {
            "name": "Replicas",
            "type": "integer",
            "jsonPath": ".status.readyReplicas",
            "description": "Replicas ready to serve, over all pools.",
        },
        {
            "name": "Desired",
            "type": "integer",
            "jsonPath": ".status.desiredReplicas",
            "description": "Replicas asked for, over all pools.",
            "priority": 1,
        },
        {
            "name": "GPUs",
            "type": "string",
            "jsonPath": ".status.gpus",
            "description": "Desired replicas x GPU type of each pool.",
        },
        {
            "name": "Strategy",
            "type": "string",
            "jsonPath": ".spec.routing.strategy",
            "description": "Routing strategy.",
        },
        {
            "name": "Model",
            "type": "string",
            "jsonPath": ".spec.model.name",
            "description": "Weights the engines load.",
            "priority": 1,
        },
        {
            **_condition_column(
                "Reason", "Degraded", "reason", "Why the Model is degraded, when it is."
            ),
            "priority": 1,
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return _crd(
        kind=KIND,
        plural=PLURAL,
        short_names=SHORT_NAMES,
        description=(
            "Model: an LLM served by Shoal. The operator runs the engine on one Deployment per "
            "GPU pool, keeps the replicas within each pool's bounds, and the router sends every "
            "request to the replica where it finishes soonest."
        ),
        spec_model=ModelSpec,
        status_model=ModelStatus,
        columns=columns,
        subresources={
            "status": {},
            # kubectl scale and HorizontalPodAutoscalers act on the total; the
            # operator writes status.selector (engine pods of this Model).
            "scale": {
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            },
        },
    )


def lora_adapter_crd() -> dict[str, Any]:
    """The ``loraadapters.shoal.dev`` CustomResourceDefinition."""
    columns = [
        {
            "name": "Base",
            "type": "string",
            "jsonPath": ".spec.baseModel",
            "description": "The Model whose engines serve the adapter.",
        },
        {
            "name": "Desired",
            "type": "integer",
            "jsonPath": ".status.desiredReplicas",
            "description": "Pods that should hold the adapter ('all' resolved).",
        },
        {
            "name": "Loaded",
            "type": "integer",
            "jsonPath": ".status.loadedReplicas",
            "description": "Pods whose /v1/models lists the adapter.",
        },
        {
            "name": "Phase",
            "type": "string",
            "jsonPath": ".status.phase",
            "description": "Pending, Loading, Ready or Failed.",
        },
        {
            **_condition_column(
                "Reason", "Degraded", "reason", "Why the adapter is degraded, when it is."
            ),
            "priority": 1,
        },
        {
            "name": "Source",
            "type": "string",
            "jsonPath": ".spec.source",
            "description": "Where the adapter's files come from.",
            "priority": 1,
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return _crd(
        kind=LORA_KIND,
        plural=LORA_PLURAL,
        short_names=LORA_SHORT_NAMES,
        description=(
            "LoraAdapter: a LoRA adapter served on top of a Model. The operator places it on "
            "engine replicas within the Model's lora.maxLoras, loads it through the engines' "
            "API and reports where it is loaded, as the engines say."
        ),
        spec_model=LoraAdapterSpec,
        status_model=LoraAdapterStatus,
        columns=columns,
        subresources={"status": {}},
    )


def render_yaml(crd: Mapping[str, Any], source: str = "shoal/api/model.py") -> str:
    """Deterministic YAML for a CRD, with a header saying where it comes from."""
    header = (
        f"# Generated by deploy/gen-crds.py from {source}: do not edit by hand.\n"
        "# Regenerate with: .venv/bin/python deploy/gen-crds.py\n"
    )
    body = yaml.safe_dump(dict(crd), sort_keys=False, width=100, allow_unicode=True)
    return header + body


__all__ = [
    "CATEGORIES",
    "LORA_CRD_FILE",
    "MODEL_CRD_FILE",
    "SHORT_NAMES",
    "SchemaConversionError",
    "lora_adapter_crd",
    "model_crd",
    "render_yaml",
    "structural_schema",
]
