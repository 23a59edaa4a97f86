"""The router's own HTTP/1.1 server (router/http_server.py), over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from shoal.router.exchange import BodyTooLarge, ClientGone, HttpExchange
from shoal.router.http_server import DirectRoutes, HttpServer, ServerLimits
from shoal.router.server_protocol import DISCONNECT_EXTENSION, ConnectionWatch

Scope = dict[str, Any]
HOST = "127.0.0.1"


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client left")
        chunks.append(message["body"])
        if not message["more_body"]:
            return b"".join(chunks)


class App:
    """Routes by path; records what it saw."""

    def __init__(self) -> None:
        self.watches: list[ConnectionWatch] = []
        self.finished: list[str] = []
        self.fail_startup = False

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            if self.fail_startup:
                await send({"type": "lifespan.startup.failed", "message": "no config"})
                return
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if path == "/echo":
            body = await _read_body(receive)
            await _json(
                send,
                {"len": len(body), "method": scope["method"], "q": scope["query_string"].decode()},
            )
        elif path.startswith("/sleep/"):
            await _read_body(receive)
            await asyncio.sleep(float(path.rsplit("/", 1)[1]))
            await _json(send, {"slept": path})
        elif path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            await asyncio.sleep(0.5)
            await send({"type": "http.response.body", "body": b"second", "more_body": False})
        elif path == "/big":
            size = 8 * 1024 * 1024
            headers = [(b"content-length", str(size).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for _ in range(size // 65536):
                await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif path == "/hold":
            self.watches.append(scope["extensions"][DISCONNECT_EXTENSION])
            await asyncio.sleep(30)
        elif path == "/raise-before":
            raise RuntimeError("boom")
        elif path == "/raise-after":
            headers = [(b"content-length", b"100")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            raise RuntimeError("boom")
        self.finished.append(path)


async def _json(send: Any, payload: Any) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


@contextlib.asynccontextmanager
async def serving(
    app: App | None = None, limits: ServerLimits | None = None, direct: DirectRoutes | None = None
) -> AsyncIterator[tuple[HttpServer, int, App]]:
    app = app or App()
    server = HttpServer(
        app, limits or ServerLimits(keep_alive_s=5.0, graceful_shutdown_s=5.0), direct
    )
    ready = asyncio.Event()
    task = asyncio.get_running_loop().create_task(server.serve(HOST, 0, ready=ready.set))
    await asyncio.wait_for(ready.wait(), 5)
    port = server.port
    try:
        yield server, port, app
    finally:
        server.stop()
        await asyncio.wait_for(task, 10)


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one response framed by content-length or chunks."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return head, body
            body += chunk[:-2]
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return head, await asyncio.wait_for(reader.readexactly(int(line.split(b":")[1])), 10)
    return head, await asyncio.wait_for(reader.read(), 5)  # ended by the close


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def test_keep_alive_serves_requests_in_turn_with_length_and_date() -> None:
    async def test() -> None:
        async with serving() as (_, port, _app):
            reader, writer = await asyncio.open_connection(HOST, port)
            for i in range(3):
                writer.write(
                    b"POST /echo?i=%d HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello" % i
                )
                head, body = await read_response(reader)
                assert head.startswith(b"HTTP/1.1 200 OK\r\n")
                assert b"\r\ndate: " in head and b"connection: close" not in head
                assert head.count(b"content-length:") == 1
                assert json.loads(body) == {"len": 5, "method": "POST", "q": f"i={i}"}
            writer.close()

    run(test)


def test_a_stream_is_chunked_and_each_chunk_leaves_when_sent() -> None:
    async def test() -> None:
        async with serving() as (_, port, _app):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert b"transfer-encoding: chunked" in head
            first = await asyncio.wait_for(reader.readuntil(b"first\r\n"), 0.4)  # before the end
            assert first == b"5\r\nfirst\r\n"
            rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 2)
            assert rest == b"6\r\nsecond\r\n0\r\n\r\n"
            writer.close()

    run(test)


def test_pipelined_requests_are_answered_in_order() -> None:
    async def test() -> None:
        async with serving() as (_, port, _app):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(
                b"GET /sleep/0.3 HTTP/1.1\r\nhost: x\r\n\r\n"
                b"GET /sleep/0 HTTP/1.1\r\nhost: x\r\n\r\n"
                b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi"
            )
            bodies = [json.loads((await read_response(reader))[1]) for _ in range(3)]
            assert bodies == [
                {"slept": "/sleep/0.3"},
                {"slept": "/sleep/0"},
                {"len": 2, "method": "POST", "q": ""},
            ]
            writer.close()

    run(test)


def test_chunked_and_large_request_bodies_arrive_whole() -> None:
    async def test() -> None:
        async with serving() as (_, port, _app):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
            assert json.loads((await read_response(reader))[1])["len"] == 7
            size = 3 * 1024 * 1024  # over the server's body buffer: reading pauses and resumes
            writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % size)
            for _ in range(size // 65536):
                writer.write(b"y" * 65536)
                await writer.drain()
            assert json.loads((await read_response(reader))[1])["len"] == size
            writer.close()

    run(test)


def test_a_large_response_to_a_slow_reader_arrives_whole() -> None:
    async def test() -> None:
        async with serving() as (_, port, _app):
            reader, writer = await asyncio.open_connection(HOST, port, limit=2**20)
            writer.write(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
            await asyncio.sleep(0.3)  # the server meets a full socket buffer and must wait
            head, body = await read_response(reader)
            assert b"content-length: 8388608" in head
            assert len(body) == 8 * 1024 * 1024 and body.count(b"x") == len(body)
            writer.close()

    run(test)


def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    async def test() -> None:
        async with serving() as (_, port, _app):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(
                b"POST /echo HTTP/1.1\r\nhost: x\r\n"
                b"expect: 100-continue\r\ncontent-length: 4\r\n\r\n"
            )
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"body")
            assert json.loads((await read_response(reader))[1])["len"] == 4
            writer.close()

    run(test)


@pytest.mark.parametrize(
    ("request_bytes", "status", "says"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "invalid HTTP request"),
        (b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "larger than"),
    ],
)
def test_bad_requests_get_an_openai_shaped_error_and_a_close(
    request_bytes: bytes, status: int, says: str
) -> None:
    async def test() -> None:
        async with serving() as (_, port, app):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(request_bytes)
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 %d " % status)
            assert b"connection: close" in head
            assert says in json.loads(body)["error"]["message"]
            assert await asyncio.wait_for(reader.read(), 2) == b""  # closed
            assert app.finished == []  # the app never saw it
            writer.close()

    run(test)


def test_http_1_0_without_length_ends_the_body_with_the_close() -> None:
    async def test() -> None:
        async with serving() as (_, port, _app):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"GET /stream HTTP/1.0\r\n\r\n")
            head, body = await read_response(reader)
            assert b"connection: close" in head and b"transfer-encoding" not in head
            assert body == b"firstsecond"
            writer.close()

    run(test)


def test_app_errors_give_a_500_before_the_response_and_a_cut_after() -> None:
    async def test() -> None:
        async with serving() as (_, port, _app):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"GET /raise-before HTTP/1.1\r\nhost: x\r\n\r\n")
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 500 ")
            assert json.loads(body)["error"]["message"] == "internal router error"
            writer.close()

            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"GET /raise-after HTTP/1.1\r\nhost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"content-length: 100" in head
            # The body stops short and the connection closes: the client sees it incomplete.
            assert await asyncio.wait_for(reader.read(), 2) == b"partial"
            writer.close()

    run(test)


def test_a_client_leaving_mid_request_reaches_the_watch() -> None:
    async def test() -> None:
        async with serving() as (_, port, app):
            called = asyncio.Event()
            _, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"GET /hold HTTP/1.1\r\nhost: x\r\n\r\n")
            for _ in range(100):
                if app.watches:
                    break
                await asyncio.sleep(0.01)
            app.watches[0].listeners.add(called.set)
            writer.close()
            await asyncio.wait_for(called.wait(), 2)
            assert app.watches[0].lost

    run(test)


def test_idle_connections_close_after_the_keep_alive() -> None:
    async def test() -> None:
        async with serving(limits=ServerLimits(keep_alive_s=0.3)) as (_, port, _app):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
            await read_response(reader)
            assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the server
            writer.close()

    run(test)


def test_shutdown_lets_a_request_in_flight_finish_and_refuses_new_ones() -> None:
    async def test() -> None:
        app = App()
        server = HttpServer(app, ServerLimits(graceful_shutdown_s=5.0))
        ready = asyncio.Event()
        serve = asyncio.get_running_loop().create_task(server.serve(HOST, 0, ready=ready.set))
        await ready.wait()
        port = server.port
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"GET /sleep/0.5 HTTP/1.1\r\nhost: x\r\n\r\n")
        await asyncio.sleep(0.1)
        server.stop()
        await asyncio.sleep(0.1)
        with pytest.raises(OSError):
            await asyncio.open_connection(HOST, port)
        head, body = await read_response(reader)
        assert json.loads(body) == {"slept": "/sleep/0.5"}
        assert b"connection: close" in head  # shutting down: no keep-alive
        assert await asyncio.wait_for(serve, 5) is True
        writer.close()

    run(test)


def test_a_failed_startup_stops_the_server_before_it_listens() -> None:
    async def test() -> None:
        app = App()
        app.fail_startup = True
        server = HttpServer(app)
        assert await asyncio.wait_for(server.serve(HOST, 0), 5) is False

    run(test)


def test_an_upgrade_request_is_answered_in_http_1_1_with_its_body_then_closed() -> None:
    """``curl --http2`` on http:// asks for h2c with its POST body in the same request; the
    router speaks HTTP/1.1 only, so it answers that request as such (the body included) and
    closes the connection."""

    async def test() -> None:
        async with serving() as (_, port, _app):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(
                b"POST /echo HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, HTTP2-Settings\r\n"
                b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
                b"content-length: 10\r\n\r\nhello"
            )
            await asyncio.sleep(0.05)
            writer.write(b"world")  # the rest of the body, in a later packet
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head
            assert json.loads(body)["len"] == 10
            assert await asyncio.wait_for(reader.read(), 2) == b""
            writer.close()

    run(test)


class Direct:
    """Handlers for ``/direct/...`` paths, served without ASGI; records what they saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes | None, bool]] = []
        self.errors: list[str] = []

    def route(self, method: str, path: str) -> Callable[[HttpExchange], Awaitable[None]] | None:
        return self.handle if path.startswith("/direct/") else None

    async def handle(self, exchange: HttpExchange) -> None:
        try:
            body = await exchange.read_body(limit=16)
        except (BodyTooLarge, ClientGone) as exc:
            self.errors.append(type(exc).__name__)
            if not isinstance(exc, ClientGone):
                await exchange.start_response(413, [(b"content-length", b"0")])
                await exchange.write_body(b"", more=False)
            return
        headers = dict(exchange.headers)
        self.seen.append(
            (exchange.method, exchange.path, headers.get(b"x-tag"), exchange.connection is not None)
        )
        if exchange.path == "/direct/stream":
            await exchange.start_response(200, [(b"x-kind", b"stream")])
            await exchange.write_body(b"<" + body, more=True)
            await exchange.write_body(b">", more=False)
        else:
            await exchange.start_response(201, [(b"content-length", b"%d" % len(body))])
            await exchange.write_body(body, more=False)


def test_direct_routes_get_the_exchange_and_the_rest_the_asgi_app() -> None:
    async def test() -> None:
        direct = Direct()
        async with serving(direct=direct.route) as (_, port, app):
            reader, writer = await asyncio.open_connection(HOST, port)
            # A chunked body arrives whole; the same connection then serves an ASGI route.
            writer.write(
                b"POST /direct/echo HTTP/1.1\r\nhost: x\r\nx-tag: a\r\n"
                b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 201 Created\r\n") and body == b"hello world"
            writer.write(b"POST /direct/stream HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nab")
            head, body = await read_response(reader)
            assert b"transfer-encoding: chunked" in head and b"x-kind: stream" in head
            assert body == b"<ab>"
            writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc")
            head, body = await read_response(reader)
            assert json.loads(body)["len"] == 3
            writer.close()
        assert direct.seen == [
            ("POST", "/direct/echo", b"a", True),
            ("POST", "/direct/stream", None, True),
        ]
        assert app.finished == ["/echo"]

    run(test)


def test_a_direct_body_over_its_limit_or_cut_by_the_client_is_an_error_not_a_hang() -> None:
    async def test() -> None:
        direct = Direct()
        async with serving(direct=direct.route) as (_, port, _app):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"POST /direct/x HTTP/1.1\r\nhost: x\r\ncontent-length: 20\r\n\r\n")
            writer.write(b"x" * 20)
            head, _ = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 413 ")
            writer.close()
            # A client that leaves before its body's end.
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"POST /direct/x HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()
            for _ in range(100):
                if len(direct.errors) == 2:
                    break
                await asyncio.sleep(0.02)
        assert direct.errors == ["BodyTooLarge", "ClientGone"]

    run(test)
