"""Which ``pvc://`` claims a Model's LoraAdapters read, so its engine pods can mount them.

The Model reconciler asks this each round: an adapter with a new claim changes the engine pod
template (a rolling update of the Model's engines, one surge pod at a time), an adapter whose
claim nobody else uses any more removes the mount the same way. Adapters being deleted still
count until they are gone, so a pod is not rolled while it still serves them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from shoal.api.lora import LORA_PLURAL
from shoal.api.model import GROUP, VERSION
from shoal.operator.lora_sources import PvcSource, SourceError, parse_source


def pvc_claims(adapters: Iterable[Mapping[str, Any]], model: str) -> tuple[str, ...]:
    """Sorted claims of the ``pvc://`` sources of ``model``'s adapters; bad sources are skipped
    (the LoRA reconciler reports them on the adapter)."""
    claims: set[str] = set()
    for obj in adapters:
        spec = obj.get("spec") or {}
        if spec.get("baseModel") != model:
            continue
        try:
            source = parse_source(str(spec.get("source", "")))
        except SourceError:
            continue
        if isinstance(source, PvcSource):
            claims.add(source.claim)
    return tuple(sorted(claims))


async def model_pvc_claims(api: client.ApiClient, ns: str, model: str) -> tuple[str, ...]:
    """:func:`pvc_claims` of the LoraAdapters in ``ns`` (none when the CRD is not installed)."""
    try:
        res = await client.CustomObjectsApi(api).list_namespaced_custom_object(
            GROUP, VERSION, ns, LORA_PLURAL
        )
    except ApiException as exc:
        if exc.status == 404:
            return ()
        raise
    return pvc_claims(res.get("items") or [], model)


__all__ = ["model_pvc_claims", "pvc_claims"]
