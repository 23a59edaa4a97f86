"""The autoscaler's writes to Kubernetes: pool replicas and state on the Model, and Events.

The autoscaler never touches Deployments: it changes ``spec.pools[i].replicas`` and the operator
applies that, so one writer owns each object. The change is a JSON patch that first *tests* the
pool's name at its index (a concurrent edit that reorders or removes pools fails the patch with
422 instead of scaling the wrong pool; the next tick reads the new spec) and writes the state
annotation in the same request, so state and replicas never disagree. When ``spec.replicas`` is
set (``kubectl scale``), the pools' replicas are proportions of it; the patch then also sets it to
the new total, which spreads back to exactly the pools' replicas (see ``ModelSpec.pool_replicas``).
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Mapping
from typing import Any

from kubernetes_asyncio import client

from shoal.api.model import GROUP, KIND, PLURAL, VERSION
from shoal.autoscaler.state import STATE_ANNOTATION

COMPONENT = "shoal-autoscaler"
_JSON_PATCH: dict[str, Any] = {"_content_type": "application/json-patch+json"}


def _pointer(key: str) -> str:
    """One JSON-pointer segment (RFC 6901: ``~`` -> ``~0``, ``/`` -> ``~1``)."""
    return key.replace("~", "~0").replace("/", "~1")


def scale_patch(
    obj: Mapping[str, Any], replicas: Mapping[str, int], state_text: str | None
) -> list[dict[str, Any]]:
    """The JSON patch that sets the named pools' replicas (and the state annotation) on ``obj``.

    Raises ``KeyError`` for a pool the object does not have."""
    spec = obj.get("spec") or {}
    pools: list[dict[str, Any]] = list(spec.get("pools") or [])
    index = {p.get("name"): i for i, p in enumerate(pools)}
    ops: list[dict[str, Any]] = []
    new_counts = {p.get("name"): int(p.get("replicas", 1)) for p in pools}
    for name, count in replicas.items():
        i = index[name]
        ops.append({"op": "test", "path": f"/spec/pools/{i}/name", "value": name})
        ops.append({"op": "add", "path": f"/spec/pools/{i}/replicas", "value": int(count)})
        new_counts[name] = int(count)
    if replicas and spec.get("replicas") is not None:
        ops.append({"op": "replace", "path": "/spec/replicas", "value": sum(new_counts.values())})
    if state_text is not None:
        if not (obj.get("metadata") or {}).get("annotations"):
            ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
        ops.append(
            {
                "op": "add",
                "path": f"/metadata/annotations/{_pointer(STATE_ANNOTATION)}",
                "value": state_text,
            }
        )
    return ops


class ModelActuator:
    """Reads Models and writes replicas, state and Events through one ``ApiClient``."""

    def __init__(self, api: client.ApiClient, identity: str = COMPONENT) -> None:
        self.api = api
        self.identity = identity  # the Events' reportingInstance (the pod name)
        self.crd = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    async def list_models(self, namespace: str | None) -> list[dict[str, Any]]:
        """Every Model in ``namespace`` (all namespaces when ``None``), as plain dicts."""
        if namespace is None:
            res = await self.crd.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        else:
            res = await self.crd.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        return list(res.get("items") or [])

    async def patch(self, obj: Mapping[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
        meta = obj["metadata"]
        res = await self.crd.patch_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], ops, **_JSON_PATCH
        )
        return dict(res)

    async def event(
        self, obj: Mapping[str, Any], reason: str, message: str, *, warning: bool = False
    ) -> None:
        """A core/v1 Event on the Model (what ``kubectl describe model`` shows)."""
        meta = obj["metadata"]
        now = datetime.datetime.now(datetime.UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                name=f"{meta['name']}.{uuid.uuid4().hex[:16]}", namespace=meta["namespace"]
            ),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind=KIND,
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion"),
            ),
            reason=reason,
            message=message[:1024],
            type="Warning" if warning else "Normal",
            source=client.V1EventSource(component=COMPONENT),
            reporting_component=COMPONENT,
            reporting_instance=self.identity,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        await self.core.create_namespaced_event(meta["namespace"], body)
