"""Assembles a router from its configuration: the Starlette app and its background tasks.

``create_router_app(config)`` builds every component (engine state, indexes, pipelines,
admission, metrics, shared state), passes each the others it needs, and starts discovery,
scraping, KV event subscriptions and shared state in the app's lifespan. No global state: two
apps in one process are two independent routers (the tests run replicas that way).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from shoal.router.admission import AdmissionController
from shoal.router.api_keys import ApiKeyTable
from shoal.router.catalog import DeclaredCatalog, KubernetesCatalogSource
from shoal.router.config import RouterConfig
from shoal.router.discovery import Discovery, KubernetesDiscovery, StaticDiscovery
from shoal.router.engine_state import EngineStateStore, SaturationPolicy
from shoal.router.hf_tokenizer import HfTokenizers
from shoal.router.holding import HoldQueue
from shoal.router.kv_index import KvEventIndex
from shoal.router.kv_subscriber import KvEventSubscriber
from shoal.router.metrics import EndpointView, RouterMetrics
from shoal.router.pipeline import FallbackRecorder
from shoal.router.prefix_index import ApproxPrefixIndex
from shoal.router.proxy import Gateway
from shoal.router.request_body import SimTokenizers, TokenizerProvider
from shoal.router.scorers import SessionTable
from shoal.router.scrape_cadence import ScrapeCadence
from shoal.router.scraper import ScraperPool
from shoal.router.shared_state import SharedState
from shoal.router.strategies import ModelRouting, PipelineSet
from shoal.router.types import Endpoint
from shoal.router.upstream import HttpxUpstream, PooledUpstream, Upstream

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RouterComponents:
    """Everything one router is made of (``app.state.router``), for tests and embedding."""

    config: RouterConfig
    store: EngineStateStore
    approx_index: ApproxPrefixIndex
    kv_index: KvEventIndex
    sessions: SessionTable
    fallbacks: FallbackRecorder
    pipelines: PipelineSet
    saturation: SaturationPolicy
    admission: AdmissionController
    metrics: RouterMetrics
    client: httpx.AsyncClient | None  # a test's own upstream client, closed at shutdown
    scrapers: ScraperPool
    subscriber: KvEventSubscriber | None
    shared: SharedState | None
    discovery: Discovery
    gateway: Gateway
    catalog: DeclaredCatalog
    holds: HoldQueue
    catalog_source: KubernetesCatalogSource | None


def default_discovery(config: RouterConfig) -> Discovery:
    if config.kubernetes is not None:
        k = config.kubernetes
        return KubernetesDiscovery(
            k.namespace, k.label_selector, port_name=k.port_name, scheme=k.scheme
        )
    return StaticDiscovery(
        Endpoint(url=e.url, models=e.models, kv_events_endpoint=e.kv_events_endpoint)
        for e in config.endpoints
    )


def build_components(
    config: RouterConfig,
    *,
    discovery: Discovery | None = None,
    tokenizers: TokenizerProvider | None = None,
    http_client: httpx.AsyncClient | None = None,
) -> RouterComponents:
    store = EngineStateStore(
        scrape_interval_s=config.scrape_interval_s,
        stale_after_intervals=config.stale_after_intervals,
        eject_after_failures=config.eject_after_failures,
        eject_seconds=config.eject_seconds,
        default_block_size=config.default_block_size,
    )
    approx_index = ApproxPrefixIndex(config.prefix_index_max_entries, config.prefix_ttl_s)
    kv_index = KvEventIndex(config.kv_index_max_blocks)
    sessions = SessionTable(config.max_sessions)
    fallbacks = FallbackRecorder()
    pipelines = PipelineSet(
        ModelRouting(config.strategy, config.weights),
        {name: ModelRouting(m.strategy, m.weights) for name, m in config.models.items()},
        approx_index=approx_index,
        kv_index=kv_index,
        sessions=sessions,
        fallbacks=fallbacks,
        load_factor=config.load_factor,
        load_slack=config.load_slack,
        max_waiting=config.saturation.max_waiting,
    )
    sat = config.saturation
    saturation = SaturationPolicy(
        sat.max_waiting, sat.max_kv_cache_usage, sat.max_in_flight_per_endpoint
    )
    api_keys = ApiKeyTable(config.api_keys, config.api_keys_file)

    def has_capacity(model: str) -> bool:
        return saturation.has_capacity(store.candidates_for(model), store.now())

    admission = AdmissionController(
        has_capacity,
        max_queue=config.queue_size,
        queue_limits={
            name: m.queue_size for name, m in config.models.items() if m.queue_size is not None
        },
        timeout_s=config.queue_timeouts.for_priority,
        tenant_weight=api_keys.tenant_weight,
        max_tenants=config.max_tenants,
    )
    metrics = RouterMetrics()
    if tokenizers is None and config.tokenizer == "hf":
        tokenizers = HfTokenizers(
            config.tokenizer_dirs,
            fallback=SimTokenizers(),
            on_fallback=lambda model: metrics.tokenizer_fallbacks.labels(model).inc(),
            is_served=store.serves_root,
        )
    holds = HoldQueue(max_per_name=config.hold.max_per_model, timeout_s=config.hold.timeout_s)

    def on_fresh_metrics() -> None:
        admission.pump_all()
        if holds.waiting:
            holds.notify()

    subscriber = KvEventSubscriber(kv_index) if config.kv_events == "auto" else None
    # Requests and scrapes share one lean pooled client, unless a test hands in its own httpx
    # client (for example over an ASGI transport).
    upstream: Upstream = (
        HttpxUpstream(http_client)
        if http_client is not None
        else PooledUpstream(
            connect_timeout_s=config.connect_timeout_s,
            read_timeout_s=config.read_timeout_s,
            max_idle_per_endpoint=config.max_connections,
        )
    )
    scrapers = ScraperPool(
        upstream,
        store,
        cadence=ScrapeCadence(config.scrape_interval_s, config.scrape_interval_max_s),
        models_refresh_s=config.models_refresh_s,
        idle_wait_share=config.scrape_idle_wait_share,
        discover_kv_sources=subscriber is not None,
        on_kv_source=subscriber.add if subscriber is not None else None,
        # Fresh metrics may mean free capacity (let the queues try) or a newly servable
        # endpoint (let held requests re-check).
        on_update=lambda _url: on_fresh_metrics(),
    )
    shared = (
        SharedState(
            config.redis_url,
            approx_index,
            store,
            timeout_s=config.redis_timeout_ms / 1000.0,
            ttl_s=config.prefix_ttl_s,
            sync_interval_s=config.scrape_interval_s,
        )
        if config.redis_url
        else None
    )
    hold = config.hold
    catalog = DeclaredCatalog(hold.max_declared)
    catalog.set_source("config", {**dict.fromkeys(hold.models), **dict(hold.adapters.items())})
    store.on_models_changed = holds.notify
    catalog_source = (
        KubernetesCatalogSource(catalog, config.kubernetes.namespace, resync_s=hold.resync_s)
        if config.kubernetes is not None and hold.watch_resources and discovery is None
        else None
    )
    gateway = Gateway(
        config,
        store,
        pipelines,
        admission,
        metrics,
        upstream,
        tokenizers=tokenizers,
        approx_index=approx_index,
        kv_index=kv_index,
        shared=shared,
        catalog=catalog,
        holds=holds,
        api_keys=api_keys,
    )
    metrics.watch_state(
        admission.depths,
        lambda: {
            s.url: EndpointView(
                s.stale, store.is_ejected(s.url), s.in_flight_requests, store.scrape_interval(s.url)
            )
            for s in store.states()
        },
        lambda: dict(fallbacks.counts),
        lambda: None if shared is None else (1.0 if shared.up else 0.0),
        holds.depths,
        lambda: None if api_keys.open else (len(api_keys), api_keys.reload_errors),
    )
    return RouterComponents(
        config=config,
        store=store,
        approx_index=approx_index,
        kv_index=kv_index,
        sessions=sessions,
        fallbacks=fallbacks,
        pipelines=pipelines,
        saturation=saturation,
        admission=admission,
        metrics=metrics,
        client=http_client,
        scrapers=scrapers,
        subscriber=subscriber,
        shared=shared,
        discovery=discovery if discovery is not None else default_discovery(config),
        gateway=gateway,
        catalog=catalog,
        holds=holds,
        catalog_source=catalog_source,
    )


async def _follow_discovery(c: RouterComponents) -> None:
    async for endpoints in c.discovery.watch():
        added, removed = c.store.set_endpoints(endpoints)
        for url in removed:
            c.scrapers.remove(url)
            if c.subscriber is not None:
                c.subscriber.remove(url)
            c.approx_index.remove_endpoint(url)
            c.sessions.forget_endpoint(url)
            c.metrics.forget_endpoint(url)
        for endpoint in added:
            c.scrapers.add(endpoint)
            if c.subscriber is not None and endpoint.kv_events_endpoint is not None:
                c.subscriber.add(endpoint.url, endpoint.kv_events_endpoint)
        if added or removed:
            log.info("fleet: %d endpoints (+%d -%d)", len(c.store), len(added), len(removed))


async def _sweep(c: RouterComponents) -> None:
    """Marks endpoints stale even if their scraper is stuck, and retries queued requests."""
    while True:
        await asyncio.sleep(c.config.scrape_interval_s)
        c.store.refresh_all_staleness()
        c.admission.pump_all()


class RouterApp(Starlette):
    """The router's ASGI app: inference requests go straight to the gateway (its hot path);
    everything else (models, health, metrics, lifespan) through Starlette as usual. Shoal's
    own HTTP server skips ASGI for the inference routes too (``Gateway.direct_route``)."""

    def __init__(self, gateway: Gateway, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and await self.gateway.serve(scope, receive, send):
            return
        await super().__call__(scope, receive, send)


def create_router_app(
    config: RouterConfig,
    *,
    discovery: Discovery | None = None,
    tokenizers: TokenizerProvider | None = None,
    http_client: httpx.AsyncClient | None = None,
) -> RouterApp:
    """The router as an ASGI app; ``http_client`` (the upstream client) is for tests that
    reach engines in-process. The app closes it at shutdown either way."""
    components = build_components(
        config, discovery=discovery, tokenizers=tokenizers, http_client=http_client
    )
    g = components.gateway

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(_follow_discovery(components), name="discovery"),
            loop.create_task(_sweep(components), name="sweep"),
        ]
        if components.catalog_source is not None:
            tasks.append(loop.create_task(components.catalog_source.run(), name="catalog"))
        keys = g.api_keys
        if keys.file is not None:
            reload_s = components.config.api_keys_reload_s
            tasks.append(loop.create_task(keys.watch(reload_s), name="api-keys"))
        if components.shared is not None:
            await components.shared.start()
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await components.scrapers.close()
            if components.subscriber is not None:
                await components.subscriber.close()
            if components.shared is not None:
                await components.shared.forget()
                await components.shared.close()
            await components.gateway.upstream.aclose()
            if components.client is not None:
                await components.client.aclose()

    app = RouterApp(
        g,
        routes=[
            Route("/v1/models", g.models, methods=["GET"]),
            Route("/health", g.health, methods=["GET"]),
            Route("/metrics", g.metrics_endpoint, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.router = components
    return app
