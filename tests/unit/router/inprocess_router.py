"""A Shoal router run in-process with its real lifespan, in front of stub engines that are an
ASGI app reached through the router's own HTTP client (an ``httpx.ASGITransport``): no process
or port. Each instance owns its event loop, so synchronous tests (hypothesis included) drive it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from shoal.router.app import create_router_app
from shoal.router.config import RouterConfig
from shoal.router.request_body import TokenizerProvider

METRICS = (
    'vllm:num_requests_running{engine="0",model_name="tiny"} 0.0\n'
    'vllm:num_requests_waiting{engine="0",model_name="tiny"} 0.0\n'
    'vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.0\n'
    'vllm:cache_config_info{block_size="16",engine="0"} 1.0\n'
)


async def _metrics(request: Request) -> Response:
    return PlainTextResponse(METRICS)


async def _models(request: Request) -> Response:
    return JSONResponse({"data": [{"id": "tiny", "root": "tiny", "parent": None}]})


async def _complete(request: Request) -> Response:
    await request.body()
    return JSONResponse({"choices": [{"text": "ok"}], "usage": {"completion_tokens": 1}})


# Every engine URL the router is given answers as this one engine serving model ``tiny``.
ENGINE = Starlette(
    routes=[
        Route("/metrics", _metrics),
        Route("/v1/models", _models),
        Route("/v1/completions", _complete, methods=["POST"]),
        Route("/v1/chat/completions", _complete, methods=["POST"]),
    ]
)


class InProcessRouter:
    def __init__(
        self, config: dict[str, Any], *, tokenizers: TokenizerProvider | None = None
    ) -> None:
        self.loop = asyncio.new_event_loop()
        upstream = httpx.AsyncClient(transport=httpx.ASGITransport(app=ENGINE))
        self.app = create_router_app(
            RouterConfig.from_mapping(config), tokenizers=tokenizers, http_client=upstream
        )
        self._lifespan = self.app.router.lifespan_context(self.app)
        self.loop.run_until_complete(self._lifespan.__aenter__())
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://router"
        )
        self.loop.run_until_complete(self._until_ready())

    async def _until_ready(self) -> None:
        for _ in range(200):
            if (await self.client.get("/v1/models")).json()["data"]:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("router never saw the stub engine")

    def post(self, path: str, body: bytes, hdrs: dict[str, str]) -> httpx.Response:
        return self.loop.run_until_complete(self.client.post(path, content=body, headers=hdrs))

    def get(self, path: str) -> httpx.Response:
        return self.loop.run_until_complete(self.client.get(path))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.run_until_complete(self._lifespan.__aexit__(None, None, None))
        self.loop.close()
