"""The chart's LoRA adapter cache: the operator mounts it at ``--lora-cache-dir`` (a created or
existing ReadWriteMany claim, a hostPath fallback, else an emptyDir) and passes the same volume
to the engine pods through its flags; the values schema refuses bad paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from test_chart import CHART, HELM, K8S_VERSIONS, _render, _run


@pytest.fixture(scope="module")
def helm_bin() -> Path:
    if not HELM.exists():
        pytest.fail(f"helm not found at {HELM}: run deploy/local-cluster/build (fetches helm)")
    return HELM


def _operator(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    dep = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")
    )
    pod = dep["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    (cache,) = [v for v in pod["volumes"] if v["name"] == "lora-cache"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["lora-cache"] == "/var/lib/shoal/lora"
    assert "--lora-cache-dir=/var/lib/shoal/lora" in args
    assert "--lora-pvc-root=/mnt/shoal/pvc" in args
    assert "--lora-replacement-grace=60" in args
    return dep, args, cache


def _claims(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == "PersistentVolumeClaim"]


def test_default_has_no_shared_cache_and_says_nothing_false(helm_bin: Path) -> None:
    docs = _render(helm_bin, [])
    _, args, cache = _operator(docs)
    assert cache == {"name": "lora-cache", "emptyDir": {}}
    assert not any(a.startswith(("--lora-cache-claim", "--lora-cache-host-path")) for a in args)
    assert _claims(docs) == []


def test_created_claim_is_read_write_many_kept_and_passed_to_the_engines(helm_bin: Path) -> None:
    created = "operator.lora.cache.create=true,operator.lora.cache.size=20Gi"
    docs = _render(helm_bin, ["--set", created])
    _, args, cache = _operator(docs)
    (pvc,) = _claims(docs)
    name = pvc["metadata"]["name"]
    assert name == "shoal-lora-cache"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert cache["persistentVolumeClaim"] == {"claimName": name}
    assert f"--lora-cache-claim={name}" in args
    for doc in (pvc, _operator(docs)[0]):
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_existing_claim_and_host_path_fallback(helm_bin: Path) -> None:
    docs = _render(helm_bin, ["--set", "operator.lora.cache.claimName=team-lora"])
    _, args, cache = _operator(docs)
    assert _claims(docs) == []  # an existing claim is not created
    assert cache["persistentVolumeClaim"] == {"claimName": "team-lora"}
    assert "--lora-cache-claim=team-lora" in args
    docs = _render(helm_bin, ["--set", "operator.lora.cache.hostPath=/srv/lora"])
    _, args, cache = _operator(docs)
    assert cache["hostPath"] == {"path": "/srv/lora", "type": "DirectoryOrCreate"}
    assert "--lora-cache-host-path=/srv/lora" in args
    assert not any(a.startswith("--lora-cache-claim") for a in args)


@pytest.mark.parametrize(
    "bad",
    [
        "operator.lora.cacheDir=relative/dir",
        "operator.lora.cache.hostPath=srv",
        "operator.lora.cache.claimName=Bad_Name",
        "operator.lora.replacementGrace=-1",
        "operator.lora.cache.sise=1Gi",
    ],
)
def test_values_schema_refuses_bad_lora_cache_values(helm_bin: Path, bad: str) -> None:
    proc = _run(helm_bin, "template", "x", str(CHART), "--set", bad)
    assert proc.returncode != 0, bad
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
