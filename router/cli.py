"""``shoal router``: flags, config file, and serving the app (router/http_server.py).

Flags override the ``--config`` YAML file, which overrides the defaults (``RouterConfig``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
from typing import Any

from shoal.router.config import (
    ConfigError,
    RouterConfig,
    load_config_file,
    parse_endpoint_urls,
)
from shoal.router.strategies import STRATEGIES

log = logging.getLogger(__name__)


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 8080)")
    parser.add_argument(
        "--endpoints", default=None, metavar="URL[,URL...]", help="engine URLs (static discovery)"
    )
    parser.add_argument(
        "--kv-events",
        choices=["auto", "off"],
        default=None,
        help="auto: subscribe to engines' KV events found via /kv_event_sources (default auto)",
    )
    parser.add_argument(
        "--strategy",
        default=None,
        choices=STRATEGIES,
        help="default routing strategy (default prefix)",
    )
    parser.add_argument(
        "--weights",
        default=None,
        metavar="JSON",
        help='scorer weight overrides: {"queue-depth": 2}',
    )
    parser.add_argument("--config", default=None, metavar="FILE", help="router config YAML")
    parser.add_argument("--redis-url", default=None, help="share state across router replicas")
    parser.add_argument(
        "--scrape-interval-ms", type=int, default=None, help="fastest /metrics interval (200)"
    )
    parser.add_argument(
        "--scrape-interval-max-ms",
        type=int,
        default=None,
        help="slowest /metrics interval, while an engine is calm (default 4x the fastest)",
    )
    parser.add_argument("--max-body-bytes", type=int, default=None, help="default 8 MiB")
    parser.add_argument("--queue-size", type=int, default=None, help="per-model queue bound")
    # --log-level may already exist on the parent parser (`shoal --log-level`).
    if not any("--log-level" in a.option_strings for a in parser._actions):
        parser.add_argument("--log-level", default=None, help="logging level (default INFO)")


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    base: dict[str, Any] = load_config_file(args.config) if args.config else {}
    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "kv_events": args.kv_events,
        "strategy": args.strategy,
        "redis_url": args.redis_url,
        "scrape_interval_ms": args.scrape_interval_ms,
        "scrape_interval_max_ms": args.scrape_interval_max_ms,
        "max_body_bytes": args.max_body_bytes,
        "queue_size": args.queue_size,
        "log_level": getattr(args, "log_level", None),
    }
    if args.endpoints:
        overrides["endpoints"] = parse_endpoint_urls(args.endpoints)
    if args.weights:
        try:
            weights = json.loads(args.weights)
        except ValueError as exc:
            raise ConfigError(f"--weights is not valid JSON: {exc}") from None
        if not isinstance(weights, dict):
            raise ConfigError("--weights must be a JSON object of scorer -> weight")
        overrides["weights"] = weights
    merged = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    return RouterConfig.from_mapping(merged)


def run_router(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    from shoal.router.app import create_router_app
    from shoal.router.http_server import ServerLimits
    from shoal.router.http_server import run as serve

    try:
        app = create_router_app(config)
    except ConfigError as exc:  # an unreadable or invalid API keys file
        log.error("%s", exc)
        return 2
    if not config.endpoints and config.kubernetes is None:
        log.warning("no engine endpoints configured: every request will get 503")
    if app.state.router.gateway.api_keys.open:
        log.info("no API keys configured: the router is open to every caller")
    log.info(
        "shoal router on http://%s:%d (strategy %s)", config.host, config.port, config.strategy
    )
    # Start-up objects live as long as the router: keep full collections from walking them on
    # every pass, and collect the young generation less often (the same reasoning as the engine
    # simulator's serve loop; vLLM freezes its start-up heap too). Collector pauses land directly
    # in the router's tail latency.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    if config.http_server == "uvicorn":
        import uvicorn

        from shoal.router.server_protocol import RouterHttpProtocol

        uvicorn.run(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level.lower(),
            access_log=False,
            loop="auto",
            http=RouterHttpProtocol,
            timeout_keep_alive=int(config.keep_alive_s),
            timeout_graceful_shutdown=int(config.graceful_shutdown_s),
            # The router reads no client address (tenants come from keys or headers), so it
            # skips uvicorn's X-Forwarded-For rewriting, one more layer around every request.
            proxy_headers=False,
        )
        return 0
    limits = ServerLimits(
        max_head_bytes=config.max_head_bytes,
        keep_alive_s=config.keep_alive_s,
        graceful_shutdown_s=config.graceful_shutdown_s,
    )
    if not serve(app, config.host, config.port, limits, direct=app.gateway.direct_route):
        return 1
    return 0
