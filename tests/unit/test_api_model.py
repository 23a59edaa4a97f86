"""The typed ``Model`` resource: parsing, camelCase round trips, validation messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shoal.api import ModelResource, load_model_file, parse_model
from shoal.api.model import ModelFileError

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "model-llama-8b.yaml"


def _doc(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": "llama"},
        "pools": [{"name": "h100", "gpuType": "H100", "replicas": 2}],
    }
    base.update(spec)
    return {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "Model",
        "metadata": {"name": "m"},
        "spec": base,
    }


def test_example_file_parses() -> None:
    m = load_model_file(EXAMPLE)
    assert m.metadata.name == "llama-8b"
    assert [p.name for p in m.spec.pools] == ["h100", "a10g"]
    assert m.spec.pools[0].gpu_type == "H100"
    assert m.spec.total_replicas == 4
    assert m.spec.routing.strategy == "kv-aware"
    assert m.spec.lora.max_loras == 4


def test_round_trip_uses_camel_case() -> None:
    m = parse_model(_doc(slo={"ttftMs": 300, "tpotMs": 40}))
    manifest = m.to_manifest()
    pool = manifest["spec"]["pools"][0]
    assert pool["gpuType"] == "H100" and "gpu_type" not in pool
    assert manifest["spec"]["slo"]["ttftMs"] == 300
    assert ModelResource.model_validate(manifest) == m


def test_gpu_aliases_are_canonicalised() -> None:
    m = parse_model(_doc(pools=[{"name": "a", "gpuType": "NVIDIA-A10G"}]))
    assert m.spec.pools[0].gpu_type == "A10G"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (
            {"pools": [{"name": "a", "gpuType": "H100", "minReplicas": 3, "maxReplicas": 1}]},
            "minReplicas (3) is greater than maxReplicas (1)",
        ),
        (
            {"pools": [{"name": "a", "gpuType": "H100"}, {"name": "a", "gpuType": "L4"}]},
            "duplicate pool names ['a']",
        ),
        ({"pools": [{"name": "a", "gpuType": "TPUv9"}]}, "unknown GPU 'TPUv9'; known GPUs:"),
        ({"pools": []}, "spec.pools"),
        (
            {"pools": [{"name": "a", "gpuType": "H100", "replicas": 9, "maxReplicas": 4}]},
            "replicas (9) must lie within",
        ),
        ({"routing": {"strategy": "fastest"}}, "spec.routing.strategy"),
        ({"engine": {"kind": "tgi"}}, "spec.engine.kind"),
        ({"lora": {"maxLoras": 0}}, "spec.lora.maxLoras"),
        ({"typo": 1}, "spec.typo"),
    ],
)
def test_invalid_specs_say_what_to_fix(spec: dict[str, Any], needle: str) -> None:
    with pytest.raises(ModelFileError) as err:
        parse_model(_doc(**spec))
    assert needle in str(err.value)


def test_wrong_kind_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="expected 'Model'"):
        parse_model({"kind": "Pod"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed")
    with pytest.raises(ModelFileError, match="not valid YAML"):
        load_model_file(bad)
    with pytest.raises(ModelFileError, match="cannot read"):
        load_model_file(tmp_path / "missing.yaml")


def test_multi_document_file_picks_the_model(tmp_path: Path) -> None:
    f = tmp_path / "all.yaml"
    f.write_text("kind: ConfigMap\nmetadata: {name: x}\n---\n" + EXAMPLE.read_text())
    assert load_model_file(f).metadata.name == "llama-8b"


def test_status_conditions() -> None:
    doc = _doc()
    doc["status"] = {
        "observedGeneration": 2,
        "replicas": 2,
        "conditions": [{"type": "Ready", "status": "True", "reason": "AllReplicasReady"}],
        "pools": [{"name": "h100", "gpuType": "H100", "desiredReplicas": 2, "readyReplicas": 2}],
    }
    m = parse_model(doc)
    assert m.status is not None
    ready = m.status.condition("Ready")
    assert ready is not None and ready.reason == "AllReplicasReady"
    assert m.status.condition("Degraded") is None
