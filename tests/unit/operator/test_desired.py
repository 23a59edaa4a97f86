"""Desired objects for a Model: a Deployment per pool, a Service, owner refs, replica spread."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.api.model import GpuPool, ModelResource
from shoal.operator.desired import (
    AdapterVolumes,
    UnrealisableSpec,
    claim_volume_name,
    desired_state,
    selector_string,
    spread_replicas,
    stale_deployments,
)
from shoal.operator.lora_claims import pvc_claims

UID = "0b8c1a9e-1111-2222-3333-444455556666"


def model(**spec_over: Any) -> ModelResource:
    spec: dict[str, Any] = {
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": "llama-8b"},
        "engine": {
            "kind": "vllm",
            "image": "vllm/vllm-openai:v0.10.1",
            "env": {"B": "2", "A": "1"},
        },
        "pools": [
            {
                "name": "h100",
                "gpuType": "H100",
                "gpusPerReplica": 2,
                "replicas": 3,
                "nodeSelector": {"zone": "a"},
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm"}],
            },
            {"name": "a10g", "gpuType": "A10G", "replicas": 1},
        ],
    }
    spec.update(spec_over)
    return ModelResource.model_validate(
        {"metadata": {"name": "llama", "namespace": "ml", "generation": 4}, "spec": spec}
    )


def pools(*specs: tuple[int, int, int | None]) -> list[GpuPool]:
    return [
        GpuPool.model_validate(
            {
                "name": f"p{i}",
                "gpuType": "H100",
                "replicas": r,
                "minReplicas": lo,
                "maxReplicas": hi,
            }
        )
        for i, (r, lo, hi) in enumerate(specs)
    ]


def test_one_deployment_per_pool_with_labels_and_owner() -> None:
    d = desired_state(model(), UID)
    names = [x["metadata"]["name"] for x in d.deployments]
    assert names == ["llama-h100", "llama-a10g"]
    dep = d.deployments[0]
    labels = dep["metadata"]["labels"]
    assert labels == {
        "shoal.dev/model": "llama",
        "shoal.dev/pool": "h100",
        "shoal.dev/component": "engine",
        "app.kubernetes.io/managed-by": "shoal",
    }
    assert dep["metadata"]["namespace"] == "ml"
    assert dep["spec"]["template"]["metadata"]["labels"] == labels
    assert dep["spec"]["selector"]["matchLabels"] == {
        "shoal.dev/model": "llama",
        "shoal.dev/pool": "h100",
    }
    (owner,) = dep["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "Model",
        "name": "llama",
        "uid": UID,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert d.service["metadata"]["ownerReferences"] == [owner]
    assert d.replicas == {"h100": 3, "a10g": 1}
    assert [x["spec"]["replicas"] for x in d.deployments] == [3, 1]


def test_pod_spec_gpu_affinity_tolerations_and_container() -> None:
    dep = desired_state(model(), UID).deployments[0]
    pod = dep["spec"]["template"]["spec"]
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (expr,) = term["nodeSelectorTerms"][0]["matchExpressions"]
    assert expr["key"] == "nvidia.com/gpu.product" and expr["operator"] == "In"
    assert "NVIDIA-H100-80GB-HBM3" in expr["values"]
    assert pod["tolerations"][0] == {
        "key": "nvidia.com/gpu",
        "operator": "Exists",
        "effect": "NoSchedule",
    }
    assert {"key": "dedicated", "operator": "Equal", "value": "llm"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"zone": "a"}
    (c,) = pod["containers"]
    assert c["name"] == "engine" and c["image"] == "vllm/vllm-openai:v0.10.1"
    assert c["command"] == ["vllm", "serve"]
    assert c["args"][c["args"].index("--tensor-parallel-size") + 1] == "2"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8000, "kv-events": 5557}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["livenessProbe"]["initialDelaySeconds"] > 0
    env = c["env"]
    assert env[0] == {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    assert [e["name"] for e in env[2:]] == ["A", "B"]  # sorted: stable objects, no churn


def test_a10g_pool_selects_a10g_nodes_without_node_selector() -> None:
    dep = desired_state(model(), UID).deployments[1]
    pod = dep["spec"]["template"]["spec"]
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["NVIDIA-A10G"]
    assert "nodeSelector" not in pod


def test_service_selects_every_engine_of_the_model() -> None:
    svc = desired_state(model(), UID).service
    assert svc["metadata"]["name"] == "llama"
    assert svc["spec"]["selector"] == {"shoal.dev/model": "llama", "shoal.dev/component": "engine"}
    assert svc["spec"]["clusterIP"] == "None"
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
    assert ports == {"http": (8000, "http"), "kv-events": (5557, "kv-events")}
    assert svc["metadata"]["labels"]["shoal.dev/model"] == "llama"
    assert selector_string("llama") == "shoal.dev/component=engine,shoal.dev/model=llama"


def test_desired_state_is_deterministic() -> None:
    assert desired_state(model(), UID) == desired_state(model(), UID)


def test_invalid_engine_args_are_unrealisable() -> None:
    m = model(engine={"kind": "vllm", "args": ["--tensor-parallel-size", "8"]})
    with pytest.raises(UnrealisableSpec) as err:
        desired_state(m, UID)
    assert err.value.reason == "InvalidEngineArgs"
    assert "--tensor-parallel-size" in err.value.message


def test_sim_engine_has_no_shm_volume() -> None:
    dep = desired_state(model(engine={"kind": "sim"}), UID).deployments[0]
    pod = dep["spec"]["template"]["spec"]
    assert "volumes" not in pod
    assert pod["containers"][0]["command"] == ["shoal", "sim"]


def test_stale_deployments_of_removed_pools() -> None:
    d = desired_state(model(), UID)
    assert stale_deployments(["llama-h100", "llama-l4", "llama-a10g"], d) == ["llama-l4"]


# -- replica spreading ------------------------------------------------------------------------


def test_without_total_each_pool_keeps_its_replicas() -> None:
    assert spread_replicas(pools((3, 0, None), (1, 0, None)), None) == {"p0": 3, "p1": 1}


def test_total_spread_proportionally() -> None:
    assert spread_replicas(pools((3, 0, None), (1, 0, None)), 8) == {"p0": 6, "p1": 2}
    assert spread_replicas(pools((3, 0, None), (1, 0, None)), 5) == {"p0": 4, "p1": 1}


def test_largest_remainder_ties_go_to_earlier_pool() -> None:
    assert spread_replicas(pools((1, 0, None), (1, 0, None)), 3) == {"p0": 2, "p1": 1}
    assert spread_replicas(pools((1, 0, None), (1, 0, None), (1, 0, None)), 4) == {
        "p0": 2,
        "p1": 1,
        "p2": 1,
    }


def test_spread_respects_max_and_respreads_excess() -> None:
    assert spread_replicas(pools((3, 0, 4), (1, 0, None)), 10) == {"p0": 4, "p1": 6}


def test_spread_respects_min() -> None:
    assert spread_replicas(pools((3, 0, None), (2, 2, None)), 4) == {"p0": 2, "p1": 2}


def test_spread_all_zero_weights_equal_shares() -> None:
    assert spread_replicas(pools((0, 0, None), (0, 0, None)), 3) == {"p0": 2, "p1": 1}


def test_total_outside_bounds_pins_pools_to_bounds() -> None:
    assert spread_replicas(pools((1, 1, 2), (1, 1, 2)), 0) == {"p0": 1, "p1": 1}
    assert spread_replicas(pools((1, 1, 2), (1, 1, 2)), 9) == {"p0": 2, "p1": 2}


@pytest.mark.parametrize("total", range(0, 25))
def test_spread_sums_to_total_within_bounds(total: int) -> None:
    ps = pools((5, 1, 6), (2, 0, None), (2, 2, 3), (1, 0, 1))
    out = spread_replicas(ps, total)
    lo_sum = sum(p.min_replicas for p in ps)
    for p in ps:
        assert p.min_replicas <= out[p.name]
        assert p.max_replicas is None or out[p.name] <= p.max_replicas
    if total >= lo_sum:
        assert sum(out.values()) == total
    assert spread_replicas(ps, total) == out


def test_model_total_replicas_when_the_api_has_it() -> None:
    m = model()
    if "replicas" not in type(m.spec).model_fields:
        pytest.skip("spec.replicas not in the typed Model yet")
    m = model(replicas=8)
    assert desired_state(m, UID).replicas == {"h100": 6, "a10g": 2}


# --------------------------------------------------------------------------------------------------
# LoRA adapter files: the cache volume and pvc:// claims


def _lora_model() -> ModelResource:
    return model(lora={"enabled": True, "maxLoras": 8})


def _volumes(dep: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    pod = dep["spec"]["template"]["spec"]
    return pod.get("volumes", []), pod["containers"][0].get("volumeMounts", [])


def test_lora_engines_mount_the_adapter_cache_claim_and_pvc_claims_read_only() -> None:
    vols = AdapterVolumes(
        cache_dir="/var/lib/shoal/lora",
        cache_claim="shoal-lora-cache",
        pvc_root="/mnt/shoal/pvc/",
        claims=("team-adapters", "a" * 253),
    )
    for dep in desired_state(_lora_model(), UID, vols).deployments:
        volumes, mounts = _volumes(dep)
        by_name = {v["name"]: v for v in volumes}
        assert "dshm" in by_name  # the engine's own volumes stay
        assert by_name["lora-cache"]["persistentVolumeClaim"] == {
            "claimName": "shoal-lora-cache",
            "readOnly": True,
        }
        paths = {m["mountPath"]: m for m in mounts}
        assert paths["/var/lib/shoal/lora"]["name"] == "lora-cache"  # the operator's path
        team = paths["/mnt/shoal/pvc/team-adapters"]
        assert by_name[team["name"]]["persistentVolumeClaim"]["claimName"] == "team-adapters"
        assert paths["/mnt/shoal/pvc/" + "a" * 253]["readOnly"] is True
        assert all(m.get("readOnly") for m in mounts if m["name"] != "dshm")
        for v in volumes:  # volume names are DNS labels
            assert len(v["name"]) <= 63 and v["name"].replace("-", "").isalnum()
        assert len(by_name) == len(volumes)


def test_claim_volume_names_do_not_depend_on_the_other_claims() -> None:
    one = desired_state(_lora_model(), UID, AdapterVolumes("/c", claims=("x",))).deployments[0]
    two = desired_state(_lora_model(), UID, AdapterVolumes("/c", claims=("w", "x"))).deployments[0]
    name = claim_volume_name("x")
    assert name in {v["name"] for v in _volumes(one)[0]} & {v["name"] for v in _volumes(two)[0]}
    assert desired_state(_lora_model(), UID, AdapterVolumes("/c", claims=("x",))) == (
        desired_state(_lora_model(), UID, AdapterVolumes("/c", claims=("x", "x")))
    )


def test_host_path_is_the_cache_fallback() -> None:
    vols = AdapterVolumes("/var/lib/shoal/lora", cache_host_path="/srv/lora")
    volumes, mounts = _volumes(desired_state(_lora_model(), UID, vols).deployments[1])
    cache = next(v for v in volumes if v["name"] == "lora-cache")
    assert cache["hostPath"] == {"path": "/srv/lora", "type": "DirectoryOrCreate"}
    assert {"name": "lora-cache", "mountPath": "/var/lib/shoal/lora", "readOnly": True} in mounts


def test_no_adapter_mounts_without_lora_or_without_volumes() -> None:
    vols = AdapterVolumes("/c", cache_claim="cache", claims=("x",))
    plain = desired_state(model(), UID, vols)
    assert plain == desired_state(model(), UID)  # LoRA off: volumes ignored
    assert all(not v["name"].startswith("lora") for d in plain.deployments for v in _volumes(d)[0])
    bare = desired_state(_lora_model(), UID, AdapterVolumes("/c")).deployments[0]
    assert [v["name"] for v in _volumes(bare)[0]] == ["dshm"]
    with pytest.raises(ValueError, match="not both"):
        AdapterVolumes("/c", cache_claim="a", cache_host_path="/b")


def test_pvc_claims_of_a_models_adapters() -> None:
    def adapter(base: str, source: str) -> dict[str, Any]:
        return {"spec": {"baseModel": base, "source": source}}

    adapters = [
        adapter("llama", "pvc://team-b/adapters/sql"),
        adapter("llama", "pvc://team-a/x"),
        adapter("llama", "pvc://team-a/y"),
        adapter("llama", "pvc://Bad_Claim/x"),  # invalid: reported on the adapter, not mounted
        adapter("llama", "hf://org/name"),
        adapter("other", "pvc://team-c/x"),
        {"spec": {}},
    ]
    assert pvc_claims(adapters, "llama") == ("team-a", "team-b")
    assert pvc_claims([], "llama") == ()
