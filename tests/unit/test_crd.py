"""The ``Model`` CRD generated from the typed models: no drift from the checked-in file, a valid
structural schema, the CEL rules that reject nonsense, and the spread of ``spec.replicas``.

What the API server does with the CRD (admission messages, printer columns, explain, scale) is
tested against a real one in ``tests/integration/k8s/test_crd_admission.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from shoal.api.crd import MODEL_CRD_FILE, SchemaConversionError, model_crd, render_yaml
from shoal.api.model import (
    GPU_TYPES,
    AutoscalingPolicy,
    EngineSpec,
    LoraLimits,
    ModelFileError,
    RoutingSpec,
    SloTargets,
    load_model_file,
    parse_model,
)
from shoal.sim.catalog import GPUS

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO / "charts" / "shoal" / "crds" / MODEL_CRD_FILE
EXAMPLES = sorted((REPO / "deploy" / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return model_crd()


def _root(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}.*")


def test_checked_in_crd_matches_the_models() -> None:
    assert CHECKED_IN.read_text() == render_yaml(model_crd()), (
        f"{CHECKED_IN} is stale: run .venv/bin/python deploy/gen-crds.py"
    )


def test_gen_script_check_mode() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "gen-crds.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_crd_passes_kubernetes_validate(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, "1.31", strict=True)


def test_schema_is_structural(crd: dict[str, Any]) -> None:
    for path, node in _walk(_root(crd)):
        # JSON-schema constructs a structural schema may not have.
        assert not {"$ref", "anyOf", "allOf", "oneOf", "not", "title", "const"} & node.keys(), path
        assert "nullable" not in node, path
        assert node.get("additionalProperties") is not False, path
        assert not ("properties" in node and "additionalProperties" in node), path
        # Every node says its type (free-form only where declared so, which is nowhere yet).
        assert "type" in node, path
        assert "x-kubernetes-preserve-unknown-fields" not in node, path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
        for name in node.get("required", ()):
            assert name in node["properties"], (path, name)
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert set(keys) <= set(node["items"].get("required", ())), path


def test_every_field_is_documented_for_kubectl_explain(crd: dict[str, Any]) -> None:
    undocumented = [
        path
        for path, node in _walk(_root(crd))
        if path not in ("", ".metadata")
        and not path.endswith(".*")
        and not path.endswith("[]")
        and not node.get("description")
    ]
    assert undocumented == []


def test_nested_defaults_agree_with_pydantic(crd: dict[str, Any]) -> None:
    spec = _root(crd)["properties"]["spec"]["properties"]
    for field, model in (
        ("engine", EngineSpec),
        ("slo", SloTargets),
        ("autoscaling", AutoscalingPolicy),
        ("routing", RoutingSpec),
        ("lora", LoraLimits),
    ):
        default = spec[field]["default"]
        # Empty collections from default factories are left out: absent means empty.
        expected = {
            k: v
            for k, v in model().model_dump(by_alias=True, exclude_none=True, mode="json").items()
            if v not in ([], {})
        }
        assert default == expected, field
        for path, node in _walk(spec[field]):
            if "default" in node and path:
                assert node["default"] == default[path.lstrip(".")], (field, path)


def _rules(node: dict[str, Any]) -> list[str]:
    return [v["rule"] for v in node.get("x-kubernetes-validations", [])]


def test_cel_rules(crd: dict[str, Any]) -> None:
    spec = _root(crd)["properties"]["spec"]
    pool = spec["properties"]["pools"]["items"]
    assert "self.pools.all(p, self.pools.exists_one(q, q.name == p.name))" in _rules(spec)
    assert any("self.minReplicas <= self.maxReplicas" in r for r in _rules(pool))
    assert any("self.replicas >= self.minReplicas" in r for r in _rules(pool))
    assert pool["properties"]["gpusPerReplica"]["minimum"] == 1
    assert spec["properties"]["engine"]["properties"]["kind"]["enum"] == ["vllm", "sglang", "sim"]
    (gpu_rule,) = pool["properties"]["gpuType"]["x-kubernetes-validations"]
    assert gpu_rule["rule"] == "self in [" + ", ".join(f"'{g}'" for g in sorted(GPUS)) + "]"
    assert set(GPU_TYPES) == set(GPUS)
    # CEL cost estimation needs bounds on whatever a rule iterates or compares.
    assert spec["properties"]["pools"]["maxItems"] <= 16
    assert pool["properties"]["name"]["maxLength"] == 63
    assert pool["properties"]["gpuType"]["maxLength"] == 63
    for _, node in _walk(_root(crd)):
        for v in node.get("x-kubernetes-validations", []):
            assert v["message"] and "string(" not in v.get("messageExpression", "")
            assert v.get("fieldPath", ".x").startswith("."), v


def test_names_subresources_and_columns(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == "models.shoal.dev"
    names = crd["spec"]["names"]
    assert names["kind"] == "Model" and names["plural"] == "models"
    assert "mdl" in names["shortNames"] and "shoal" in names["categories"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    status = _root(crd)["properties"]["status"]["properties"]
    for path in (".spec.replicas", ".status.replicas", ".status.selector"):
        section, field = path.strip(".").split(".")
        assert field in _root(crd)["properties"][section]["properties"], path
    assert {"conditions", "pools", "endpoints", "observedGeneration"} <= status.keys()
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Ready", "Replicas", "GPUs", "Strategy", "Age"]


def test_unsupported_schema_constructs_fail_loudly() -> None:
    from pydantic import BaseModel

    from shoal.api.crd import structural_schema

    class Union(BaseModel):
        x: int | str

    with pytest.raises(SchemaConversionError, match=r"Union\.x"):
        structural_schema(Union)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_parse_and_use_canonical_gpu_names(path: Path) -> None:
    model = load_model_file(path)
    # The cluster accepts only canonical names; the local parser would canonicalise an alias.
    raw = yaml.safe_load(path.read_text())
    assert [p["gpuType"] for p in raw["spec"]["pools"]] == [p.gpu_type for p in model.spec.pools]


def _spec(replicas: int | None, *pools: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"name": "m"}, "pools": list(pools)}
    if replicas is not None:
        spec["replicas"] = replicas
    return {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "Model",
        "metadata": {"name": "m"},
        "spec": spec,
    }


def _pool(name: str, replicas: int, lo: int = 0, hi: int | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {"name": name, "gpuType": "H100", "replicas": replicas, "minReplicas": lo}
    if hi is not None:
        p["maxReplicas"] = hi
    return p


@pytest.mark.parametrize(
    ("total", "pools", "expected"),
    [
        (None, [_pool("a", 2), _pool("b", 1)], {"a": 2, "b": 1}),
        (3, [_pool("a", 2), _pool("b", 1)], {"a": 2, "b": 1}),  # the sum: unchanged
        (6, [_pool("a", 2), _pool("b", 1)], {"a": 4, "b": 2}),  # proportional
        (6, [_pool("a", 2, hi=3), _pool("b", 1)], {"a": 3, "b": 3}),  # capped, rest elsewhere
        (1, [_pool("a", 2), _pool("b", 1, lo=1)], {"a": 0, "b": 1}),  # minimums first
        (4, [_pool("a", 0), _pool("b", 0)], {"a": 2, "b": 2}),  # no weights: equal
        (3, [_pool("a", 1, hi=1), _pool("b", 0)], {"a": 1, "b": 2}),  # zero weight takes the rest
        (0, [_pool("a", 1), _pool("b", 1)], {"a": 0, "b": 0}),
    ],
)
def test_spec_replicas_spread_over_pools(
    total: int | None, pools: list[dict[str, Any]], expected: dict[str, int]
) -> None:
    spec = parse_model(_spec(total, *pools)).spec
    assert spec.pool_replicas() == expected
    assert spec.total_replicas == sum(expected.values())


@pytest.mark.parametrize(
    ("total", "pools", "needle"),
    [
        (1, [_pool("a", 1, lo=1), _pool("b", 1, lo=1)], "below the pools' total minReplicas (2)"),
        (9, [_pool("a", 1, hi=4), _pool("b", 1, hi=4)], "exceeds the pools' total maxReplicas (8)"),
    ],
)
def test_spec_replicas_bounds(total: int, pools: list[dict[str, Any]], needle: str) -> None:
    with pytest.raises(ModelFileError, match=re.escape(needle)):
        parse_model(_spec(total, *pools))


def test_reference_page_matches_the_crd() -> None:
    """docs/model-reference.md is generated from the same schema; regenerate on drift."""
    from shoal.api.reference import model_reference_markdown

    page = Path(__file__).resolve().parents[2] / "docs" / "model-reference.md"
    assert page.read_text() == model_reference_markdown(), "run deploy/gen-crds.py"
    assert "`spec.pools[].gpuType`" in page.read_text()
