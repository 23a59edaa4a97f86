"""Declared models and adapters: names the router waits for instead of answering 404.

What the engines serve (their ``/v1/models``) is the truth about where a request can go, but not
about which names exist: a ``Model`` scaled to zero has no engine serving its name, and an adapter
that a ``LoraAdapter`` declares may not be loaded anywhere yet. A request for such a name should
wait (bounded, see ``router.holding``) for the scale-up or the load, not fail; a name nobody
declared still gets 404.

Declarations come from sources, each replacing its own set whole: the router's configuration
(``hold.models`` / ``hold.adapters``) and, on Kubernetes, the ``Model`` and ``LoraAdapter``
resources in the router's namespace (:class:`KubernetesCatalogSource`). The catalog is bounded:
entries beyond ``max_entries`` are dropped with a log line and a counter, never silently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shoal.router.discovery import load_kubernetes_client

log = logging.getLogger(__name__)

GROUP = "shoal.dev"
VERSION = "v1alpha1"


@dataclass(frozen=True, slots=True)
class Declared:
    """A servable name: a base model (``parent`` None) or an adapter of ``parent``."""

    name: str
    parent: str | None = None

    @property
    def base(self) -> str:
        return self.parent if self.parent is not None else self.name


class DeclaredCatalog:
    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._sources: dict[str, dict[str, str | None]] = {}
        self._merged: dict[str, Declared] = {}
        self.dropped = 0  # entries refused because the catalog was full (exported as a metric)

    def set_source(self, source: str, entries: Mapping[str, str | None]) -> None:
        """Replace everything ``source`` declares with ``entries`` (name -> parent or None)."""
        others = sum(len(v) for k, v in self._sources.items() if k != source)
        room = max(0, self.max_entries - others)
        kept = dict(list(entries.items())[:room])
        if len(kept) < len(entries):
            self.dropped += len(entries) - len(kept)
            log.warning(
                "declared-name catalog full (%d entries): dropped %d names from %s",
                self.max_entries,
                len(entries) - len(kept),
                source,
            )
        self._sources[source] = kept
        merged: dict[str, Declared] = {}
        for declared in self._sources.values():
            for name, parent in declared.items():
                merged.setdefault(name, Declared(name, parent))
        self._merged = merged

    def get(self, name: str) -> Declared | None:
        return self._merged.get(name)

    def entries(self) -> list[Declared]:
        return sorted(self._merged.values(), key=lambda d: d.name)

    def __len__(self) -> int:
        return len(self._merged)


def served_name_of_model(obj: Mapping[str, Any]) -> str | None:
    """The name clients send for a ``Model`` resource (``spec.model.servedName`` or the source)."""
    spec = obj.get("spec")
    model = spec.get("model") if isinstance(spec, Mapping) else None
    if not isinstance(model, Mapping):
        return None
    name = model.get("servedName") or model.get("name")
    return str(name) if name else None


def declarations_from_resources(
    models: list[Mapping[str, Any]], adapters: list[Mapping[str, Any]]
) -> dict[str, str | None]:
    """Pure translation: ``Model`` and ``LoraAdapter`` objects to name -> parent.

    An adapter is served under its resource name, as a child of its base ``Model``'s served
    name; an adapter whose base Model does not exist is not declared (the operator reports it).
    """
    served_by_resource: dict[str, str] = {}
    out: dict[str, str | None] = {}
    for obj in models:
        meta = obj.get("metadata")
        served = served_name_of_model(obj)
        if not isinstance(meta, Mapping) or served is None:
            continue
        served_by_resource[str(meta.get("name"))] = served
        out[served] = None
    for obj in adapters:
        meta = obj.get("metadata")
        spec = obj.get("spec")
        if not isinstance(meta, Mapping) or not isinstance(spec, Mapping):
            continue
        base = served_by_resource.get(str(spec.get("baseModel")))
        if base is not None and meta.get("name"):
            out.setdefault(str(meta["name"]), base)
    return out


class KubernetesCatalogSource:
    """Keeps the catalog's ``kubernetes`` source equal to the namespace's Models and adapters.

    A relist every ``resync_s`` (the sets are small: one entry per resource) rather than a watch:
    it cannot miss an event or hold a stale resource version. Errors (RBAC, API server down, the
    CRD not installed) keep the last good set and are logged once per kind of error.
    """

    def __init__(
        self,
        catalog: DeclaredCatalog,
        namespace: str,
        *,
        api_client: Any = None,
        resync_s: float = 2.0,
    ) -> None:
        self.catalog = catalog
        self.namespace = namespace
        self.resync_s = resync_s
        self._api_client = api_client
        self._last_error: str | None = None
        self.errors = 0

    async def _list(self, api: Any, plural: str) -> list[Mapping[str, Any]]:
        listed = await api.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, plural, _request_timeout=max(self.resync_s * 5, 10.0)
        )
        items = listed.get("items", []) if isinstance(listed, Mapping) else []
        return [i for i in items if isinstance(i, Mapping)]

    async def refresh(self, api: Any) -> None:
        models = await self._list(api, "models")
        try:
            adapters = await self._list(api, "loraadapters")
        except Exception as exc:  # the LoraAdapter CRD may not be installed: models still count
            if getattr(exc, "status", None) != 404:
                raise
            adapters = []
        before = {d.name for d in self.catalog.entries()}
        self.catalog.set_source("kubernetes", declarations_from_resources(models, adapters))
        after = {d.name for d in self.catalog.entries()}
        if after != before:
            log.info(
                "declared names: %d (+%s -%s)",
                len(after),
                ",".join(sorted(after - before)[:10]) or "none",
                ",".join(sorted(before - after)[:10]) or "none",
            )

    async def run(self) -> None:
        from kubernetes_asyncio import client

        if self._api_client is None:
            self._api_client = await load_kubernetes_client()
        api = client.CustomObjectsApi(self._api_client)
        while True:
            try:
                await self.refresh(api)
                if self._last_error is not None:
                    log.info("declared models: listing works again")
                self._last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                text = f"{type(exc).__name__}: {exc}"[:300]
                if text != self._last_error:
                    log.warning("declared models: cannot list Models/LoraAdapters: %s", text)
                self._last_error = text
            await asyncio.sleep(self.resync_s)
