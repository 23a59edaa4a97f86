"""Discovery: where the engines are. Every source is an async iterator of endpoint *sets*.

A source yields the whole current set each time it changes (never deltas), so a consumer that
misses nothing but the latest value is still right; the engine state store diffs consecutive sets.

Sources: :class:`StaticDiscovery` (URLs from flags or config), :class:`LocalFleetDiscovery` (a
fleet a local supervisor such as ``shoal up`` changes at run time) and :class:`KubernetesDiscovery`.

Kubernetes: the router talks to pods directly (pod IP and container port from the EndpointSlice),
never to a Service's ClusterIP: kube-proxy would spread requests at random and defeat every
routing decision. Selection is by label on the slices: ``kubernetes.io/service-name=<svc>`` (set by
the EndpointSlice controller for a Service's slices) or ``shoal.dev/model=<name>`` (set by Shoal's
operator). Readiness is respected: an endpoint whose ``conditions.ready`` is false, or which is
terminating, is left out; ``ready`` absent means unknown, which the API says to treat as ready.
The slice's ``shoal.dev/model`` label names the ``Model`` *resource*, not the name its engines
serve (``spec.model.servedName``, which may not even be a valid label value, e.g. ``org/name``), so
served names come from each engine's ``/v1/models`` (the scraper); the
``shoal.dev/kv-events-port`` annotation, when present, says where each pod publishes KV events.
:func:`endpoints_from_slice` is the pure translation (unit-tested); :class:`KubernetesDiscovery`
lists, then watches, with the real ``kubernetes_asyncio`` client, relisting after any watch error
(including 410 Gone, when the resource version has been compacted away).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Protocol

from shoal.router.types import Endpoint


class Discovery(Protocol):
    """A source of endpoint sets. ``watch`` yields the full set now, then after every change."""

    def watch(self) -> AsyncIterator[frozenset[Endpoint]]: ...


class StaticDiscovery:
    """A fixed list (``--endpoints`` or the config file): yields it once and then stays quiet."""

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self._endpoints = frozenset(endpoints)

    async def watch(self) -> AsyncIterator[frozenset[Endpoint]]:
        yield self._endpoints
        # Never changes; park until the consumer cancels us.
        await asyncio.Event().wait()


class LocalFleetDiscovery:
    """A fleet that a local supervisor (``shoal up``) changes at run time with :meth:`set`.

    Only the newest set matters, so a pending set is replaced, not queued: memory stays bounded
    however fast the supervisor calls ``set``.
    """

    def __init__(self, endpoints: Iterable[Endpoint] = ()) -> None:
        self._current = frozenset(endpoints)
        self._changed = asyncio.Event()
        self._changed.set()

    def set(self, endpoints: Iterable[Endpoint]) -> None:
        self._current = frozenset(endpoints)
        self._changed.set()

    async def watch(self) -> AsyncIterator[frozenset[Endpoint]]:
        while True:
            await self._changed.wait()
            self._changed.clear()
            yield self._current


log = logging.getLogger(__name__)

MODEL_LABEL = "shoal.dev/model"
KV_EVENTS_PORT_ANNOTATION = "shoal.dev/kv-events-port"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def _get(obj: Mapping[str, Any], *keys: str) -> Any:
    """Nested lookup tolerant of both camelCase (API JSON) and snake_case (client models)."""
    cur: Any = obj
    for key in keys:
        if not isinstance(cur, Mapping):
            return None
        snake = "".join("_" + c.lower() if c.isupper() else c for c in key)
        cur = cur.get(key, cur.get(snake))
    return cur


def endpoints_from_slice(
    slice_obj: Mapping[str, Any], *, port_name: str | None = None, scheme: str = "http"
) -> list[Endpoint]:
    """Ready pod endpoints of one EndpointSlice (as the API's JSON dict)."""
    address_type = _get(slice_obj, "addressType")
    if address_type not in ("IPv4", "IPv6"):
        return []  # FQDN slices name things outside the cluster's pod network
    port: int | None = None
    for p in _get(slice_obj, "ports") or []:
        if not isinstance(p, Mapping):
            continue
        if port_name is None or p.get("name") == port_name:
            value = p.get("port")
            if isinstance(value, int) and 0 < value < 65536:
                port = value
                break
    if port is None:
        return []
    labels = _get(slice_obj, "metadata", "labels") or {}
    annotations = _get(slice_obj, "metadata", "annotations") or {}
    # Served model names are learned from the engines (see the module docstring).
    models: tuple[str, ...] = ()
    kv_port = (
        annotations.get(KV_EVENTS_PORT_ANNOTATION) if isinstance(annotations, Mapping) else None
    )
    label_pairs = tuple(sorted((str(k), str(v)) for k, v in labels.items())) if labels else ()
    out: list[Endpoint] = []
    for ep in _get(slice_obj, "endpoints") or []:
        if not isinstance(ep, Mapping):
            continue
        conditions = _get(ep, "conditions") or {}
        if conditions.get("ready") is False or conditions.get("terminating") is True:
            continue
        addresses = _get(ep, "addresses") or []
        if not addresses:
            continue
        # All addresses of one endpoint are the same pod; the API says to use the first.
        ip = str(addresses[0])
        host = f"[{ip}]" if address_type == "IPv6" else ip
        out.append(
            Endpoint(
                url=f"{scheme}://{host}:{port}",
                models=models,
                kv_events_endpoint=f"tcp://{host}:{kv_port}" if kv_port else None,
                labels=label_pairs,
            )
        )
    return out


async def load_kubernetes_client() -> Any:
    """A ``kubernetes_asyncio`` ApiClient from the in-cluster config, else ``~/.kube/config``."""
    from kubernetes_asyncio import client
    from kubernetes_asyncio import config as kube_config

    # The library's loaders are only partly typed.
    loaders: Any = kube_config
    try:
        loaders.load_incluster_config()
    except loaders.ConfigException:
        await loaders.load_kube_config()
    return client.ApiClient()


class KubernetesDiscovery:
    """Watches EndpointSlices in one namespace by label selector.

    ``api_client`` is a ``kubernetes_asyncio.client.ApiClient``; without one, the in-cluster
    config (or ``~/.kube/config``) is loaded when watching starts.
    """

    def __init__(
        self,
        namespace: str,
        label_selector: str,
        *,
        port_name: str | None = None,
        scheme: str = "http",
        api_client: Any = None,
        retry_backoff_s: float = 2.0,
        watch_timeout_s: int = 300,
    ) -> None:
        self.namespace = namespace
        self.label_selector = label_selector
        self.port_name = port_name
        self.scheme = scheme
        self._api_client = api_client
        self._backoff_s = retry_backoff_s
        self._watch_timeout_s = watch_timeout_s

    async def _client(self) -> Any:
        if self._api_client is None:
            self._api_client = await load_kubernetes_client()
        return self._api_client

    def _translate(self, api_client: Any, obj: Any) -> list[Endpoint]:
        raw = obj if isinstance(obj, Mapping) else api_client.sanitize_for_serialization(obj)
        return endpoints_from_slice(raw, port_name=self.port_name, scheme=self.scheme)

    async def watch(self) -> AsyncIterator[frozenset[Endpoint]]:
        from kubernetes_asyncio import client, watch

        api_client = await self._client()
        api = client.DiscoveryV1Api(api_client)
        by_slice: dict[str, list[Endpoint]] = {}
        last: frozenset[Endpoint] | None = None
        while True:
            try:
                listed = await api.list_namespaced_endpoint_slice(
                    self.namespace, label_selector=self.label_selector
                )
                by_slice = {
                    item.metadata.name: self._translate(api_client, item) for item in listed.items
                }
                current = frozenset(e for eps in by_slice.values() for e in eps)
                if current != last:
                    last = current
                    yield current
                stream = watch.Watch().stream(
                    api.list_namespaced_endpoint_slice,
                    self.namespace,
                    label_selector=self.label_selector,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=self._watch_timeout_s,
                )
                async for event in stream:
                    raw = event.get("raw_object") or {}
                    name = _get(raw, "metadata", "name")
                    if not isinstance(name, str):
                        continue
                    if event.get("type") == "DELETED":
                        by_slice.pop(name, None)
                    elif event.get("type") in ("ADDED", "MODIFIED"):
                        by_slice[name] = self._translate(api_client, raw)
                    else:
                        continue
                    current = frozenset(e for eps in by_slice.values() for e in eps)
                    if current != last:
                        last = current
                        yield current
                # The server closed the watch (timeout_seconds): relist and watch again.
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Keep the last known set: engines do not vanish because the API server did.
                log.warning("EndpointSlice watch in %s failed: %s; relisting", self.namespace, exc)
                await asyncio.sleep(self._backoff_s)
