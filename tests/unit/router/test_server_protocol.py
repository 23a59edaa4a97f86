"""The router's server protocol: writes within one event-loop step go out as one."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import uvicorn

from shoal.router.server_protocol import CoalescedWrites, RouterHttpProtocol


class _RecordingTransport(asyncio.Transport):
    """Stands in for a socket transport: records what would reach the socket."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0


def test_writes_in_one_step_reach_the_socket_as_one_write() -> None:
    async def run() -> None:
        inner = _RecordingTransport()
        t = CoalescedWrites(inner, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(b"")  # nothing to write is no write
        t.write(memoryview(b"body"))
        assert inner.writes == []  # not before the step ends
        assert t.get_write_buffer_size() == len(b"HTTP/1.1 200 OK\r\n\r\nbody")
        await asyncio.sleep(0)
        assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        t.write(b"next")  # a later step: a write of its own
        await asyncio.sleep(0)
        assert inner.writes[1:] == [b"next"]

    asyncio.run(run())


def test_close_writes_what_is_pending_first_and_abort_drops_it() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        inner = _RecordingTransport()
        t = CoalescedWrites(inner, loop)
        t.write(b"last words")
        t.close()
        assert inner.writes == [b"last words"] and inner.closed
        await asyncio.sleep(0)  # the scheduled flush finds nothing left
        assert inner.writes == [b"last words"]

        inner = _RecordingTransport()
        t = CoalescedWrites(inner, loop)
        t.write(b"never sent")
        t.abort()
        await asyncio.sleep(0)
        assert inner.writes == [] and inner.aborted

    asyncio.run(run())


def test_writes_to_a_transport_closed_by_the_peer_are_dropped() -> None:
    async def run() -> None:
        inner = _RecordingTransport()
        t = CoalescedWrites(inner, asyncio.get_running_loop())
        t.write(b"too late")
        inner.closed = True  # the client went away before the step ended
        await asyncio.sleep(0)
        assert inner.writes == []

    asyncio.run(run())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await asyncio.sleep(1.0)
        await send({"type": "http.response.body", "body": b"second", "more_body": False})
        return
    body = b'{"ok":true}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"11")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def test_uvicorn_serves_through_it_unchanged_and_streams_without_waiting() -> None:
    """A real uvicorn server with the protocol: keep-alive responses are whole, and a streamed
    chunk reaches the client when it is sent, not when the response ends."""

    async def run() -> None:
        port = _free_port()
        config = uvicorn.Config(
            _app, host="127.0.0.1", port=port, http=RouterHttpProtocol, log_level="error"
        )
        server = uvicorn.Server(config)
        serving = asyncio.get_running_loop().create_task(server.serve())
        try:
            for _ in range(500):  # uvicorn has no start event to wait on
                if server.started:
                    break
                await asyncio.sleep(0.01)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(2):  # the same connection twice
                writer.write(b"GET /json HTTP/1.1\r\nhost: x\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 11" in head
                assert await reader.readexactly(11) == b'{"ok":true}'
            writer.write(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
            assert b"transfer-encoding: chunked" in head
            first = await asyncio.wait_for(reader.readuntil(b"first\r\n"), 0.5)
            assert first == b"5\r\nfirst\r\n"
            writer.close()
        finally:
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await serving

    asyncio.run(run())
