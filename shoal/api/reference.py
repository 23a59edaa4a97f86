"""The ``Model`` reference page (``docs/model-reference.md``), rendered from the generated CRD.

One source for three readers: the API server (the CRD schema), ``kubectl explain`` (its
descriptions) and people (this page). A test fails when the checked-in page drifts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from shoal.api.crd import lora_adapter_crd, model_crd


def _type(node: Mapping[str, Any]) -> str:
    kind = str(node.get("type", "object"))
    if kind == "array":
        return f"[]{_type(node.get('items', {}))}"
    if "enum" in node:
        choices = ", ".join(str(v) for v in node["enum"])
        return f"{kind} ({choices})"
    return kind


def _rows(node: Mapping[str, Any], path: str) -> Iterator[tuple[str, str, str, str, str]]:
    required = set(node.get("required", ()))
    for name, child in (node.get("properties") or {}).items():
        field = f"{path}.{name}"
        default = json.dumps(child["default"]) if "default" in child else ""
        rules = "; ".join(
            str(r.get("message", r.get("rule", "")))
            for r in child.get("x-kubernetes-validations", ())
        )
        description = " ".join(str(child.get("description", "")).split())
        if rules:
            description = f"{description} *Validation:* {rules}".strip()
        yield (
            f"`{field}`",
            _type(child),
            "yes" if name in required else "",
            f"`{default}`" if default else "",
            description.replace("|", "\\|"),
        )
        target = child.get("items", child) if child.get("type") == "array" else child
        suffix = "[]" if child.get("type") == "array" else ""
        if target.get("properties"):
            yield from _rows(target, field + suffix)


def model_reference_markdown() -> str:
    return reference_markdown(model_crd(), "shoal/api/model.py")


def lora_adapter_reference_markdown() -> str:
    """``docs/loraadapter-reference.md``: the same page for the LoraAdapter kind."""
    return reference_markdown(lora_adapter_crd(), "shoal/api/lora.py")


def reference_markdown(crd: Mapping[str, Any], source: str) -> str:
    """The reference page of one generated CRD: a table of fields per spec and status."""
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    names = crd["spec"]["names"]
    lines = [
        f"# `{crd['spec']['names']['kind']}` reference",
        "",
        f"`{crd['spec']['group']}/{version['name']}`, kind `{names['kind']}`, short name "
        f"`{', '.join(names.get('shortNames', ()))}`. Generated from `{source}` by "
        "`deploy/gen-crds.py`; do not edit by hand. "
        f"`kubectl explain {names['singular']}.spec` shows the same descriptions.",
        "",
    ]
    for section in ("spec", "status"):
        node = schema["properties"][section]
        lines += [
            f"## `{section}`",
            "",
            " ".join(str(node.get("description", "")).split()),
            "",
            "| field | type | required | default | description |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in _rows(node, section)]
        rules = node.get("x-kubernetes-validations", ())
        if rules:
            lines += ["", f"Rules on `{section}` as a whole:", ""]
            lines += [f"- {r.get('message', r.get('rule'))}" for r in rules]
        lines.append("")
    return "\n".join(lines)
