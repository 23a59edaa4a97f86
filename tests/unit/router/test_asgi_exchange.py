"""The gateway's exchange over an ASGI call (router/exchange.py): what uvicorn and the
in-process tests use, so it must read bodies and frame responses as the server's own does."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shoal.router.exchange import AsgiExchange, BodyTooLarge, ClientGone
from shoal.router.server_protocol import DISCONNECT_EXTENSION, ConnectionWatch


def _exchange(messages: list[dict[str, Any]], scope: dict[str, Any] | None = None) -> Any:
    sent: list[dict[str, Any]] = []
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    base = {"method": "POST", "path": "/v1/completions", "headers": [(b"x-a", b"1")]}
    return AsgiExchange({**base, **(scope or {})}, receive, send), sent


def test_reads_a_body_in_parts_and_frames_the_response_as_asgi_messages() -> None:
    async def run() -> None:
        ex, sent = _exchange(
            [
                {"type": "http.request", "body": b"hel", "more_body": True},
                {"type": "http.request", "body": b"lo", "more_body": False},
            ]
        )
        assert (ex.method, ex.path, list(ex.headers)) == (
            "POST",
            "/v1/completions",
            [(b"x-a", b"1")],
        )
        assert ex.connection is None  # no watch from a plain ASGI server
        assert await ex.read_body(limit=5) == b"hello"
        assert not ex.response_started
        await ex.start_response(200, [(b"content-length", b"2")])
        await ex.write_body(b"ok", more=False)
        assert ex.response_started
        assert sent == [
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]},
            {"type": "http.response.body", "body": b"ok", "more_body": False},
        ]

    asyncio.run(run())


def test_a_body_over_the_limit_and_a_client_gone_mid_body_are_errors() -> None:
    async def run() -> None:
        ex, _ = _exchange(
            [
                {"type": "http.request", "body": b"abcd", "more_body": True},
                {"type": "http.request", "body": b"ef", "more_body": False},
            ]
        )
        with pytest.raises(BodyTooLarge):
            await ex.read_body(limit=5)
        ex, _ = _exchange(
            [
                {"type": "http.request", "body": b"ab", "more_body": True},
                {"type": "http.disconnect"},
            ]
        )
        with pytest.raises(ClientGone):
            await ex.read_body(limit=100)

    asyncio.run(run())


def test_the_connection_watch_comes_from_the_scope_extension_and_disconnect_is_awaited() -> None:
    async def run() -> None:
        watch = ConnectionWatch()
        ex, _ = _exchange(
            [
                {"type": "http.request", "body": b"", "more_body": False},
                {"type": "http.disconnect"},
            ],
            {"extensions": {DISCONNECT_EXTENSION: watch}},
        )
        assert ex.connection is watch
        assert await ex.read_body(limit=1) == b""
        await asyncio.wait_for(ex.disconnected(), 1)

    asyncio.run(run())
