"""The pooled upstream client against small real TCP servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from shoal.router.upstream import (
    MAX_CACHED_URLS,
    PooledUpstream,
    UpstreamConnectError,
    UpstreamError,
    header,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


async def _serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


class _KeepAliveServer:
    """Answers every request on a connection with ``respond(request)``; counts connections."""

    def __init__(self, respond: Callable[[bytes], Awaitable[bytes]]) -> None:
        self._respond = respond
        self.connections = 0

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                writer.write(await self._respond(await _read_request(reader)))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def _ok(body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def test_content_length_and_keep_alive_reuse() -> None:
    async def echo_length(request: bytes) -> bytes:
        return _ok(b'{"echo":' + str(len(request)).encode() + b"}")

    engine = _KeepAliveServer(echo_length)

    async def run() -> None:
        server, url = await _serve(engine.handler)
        pool = PooledUpstream()
        try:
            for _ in range(3):
                resp = await pool.post(
                    url, "/v1/x", b'{"a":1}', {"content-type": "application/json"}
                )
                assert resp.status_code == 200
                assert header(resp, b"content-type") == b"application/json"
                body = b"".join([c async for c in resp.aiter_raw()])
                assert body.startswith(b'{"echo":')
            assert engine.connections == 1  # one connection, reused
        finally:
            await pool.aclose()
            server.close()

    asyncio.run(run())


def test_chunked_stream_arrives_in_pieces() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        events = [f"data: {i}\n\n".encode() for i in range(3)]
        await _chunked(writer, events, gap_s=0.02, headers=b"content-type: text/event-stream\r\n")

    async def run() -> None:
        server, url = await _serve(handler)
        pool = PooledUpstream()
        try:
            resp = await pool.post(url, "/s", b"{}", {})
            chunks = [c async for c in resp.aiter_raw()]
            assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            assert len(chunks) >= 2  # streamed, not buffered to the end
        finally:
            await pool.aclose()
            server.close()

    asyncio.run(run())


def test_stale_pooled_connection_is_replaced_transparently() -> None:
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await _read_request(reader)
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # closes every connection after one response, keep-alive or not

    async def run() -> None:
        server, url = await _serve(handler)
        pool = PooledUpstream()
        try:
            for _ in range(3):
                resp = await pool.post(url, "/", b"{}", {})
                assert b"".join([c async for c in resp.aiter_raw()]) == b"ok"
            assert served == 3
        finally:
            await pool.aclose()
            server.close()

    asyncio.run(run())


def test_connection_refused_and_truncated_response_raise_upstream_error() -> None:
    async def truncating(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly-this")
        await writer.drain()
        writer.close()

    async def run() -> None:
        pool = PooledUpstream(connect_timeout_s=1)
        server, url = await _serve(truncating)
        port = server.sockets[0].getsockname()[1]
        try:
            resp = await pool.post(url, "/", b"{}", {})
            with pytest.raises(UpstreamError, match="mid-response"):
                _ = [c async for c in resp.aiter_raw()]
        finally:
            server.close()
            await server.wait_closed()
        with pytest.raises(UpstreamError, match="cannot connect"):
            await pool.post(f"http://127.0.0.1:{port}", "/", b"{}", {})
        await pool.aclose()

    asyncio.run(run())


def test_get_reads_whole_body_reuses_connection_and_times_out() -> None:
    exposition = b"vllm:num_requests_running 1.0\n" * 4000  # larger than one read

    async def metrics(request: bytes) -> bytes:
        if b"GET /slow " in request:
            await asyncio.sleep(5)
        return _ok(exposition, b"text/plain")

    engine = _KeepAliveServer(metrics)

    async def run() -> None:
        server, url = await _serve(engine.handler)
        port = server.sockets[0].getsockname()[1]
        pool = PooledUpstream(connect_timeout_s=1)
        try:
            for _ in range(2):
                status, body = await pool.get(url, "/metrics", timeout_s=2)
                assert status == 200
                assert body == exposition
            assert engine.connections == 1  # read to the end: back to the pool
            with pytest.raises(UpstreamError, match=r"longer than 0\.2s"):
                await pool.get(url, "/slow", timeout_s=0.2)
        finally:
            server.close()
            await server.wait_closed()
        with pytest.raises(UpstreamConnectError):
            await pool.get(f"http://127.0.0.1:{port}", "/metrics", timeout_s=1)
        await pool.aclose()

    asyncio.run(run())


async def _chunked(
    writer: asyncio.StreamWriter, chunks: list[bytes], gap_s: float = 0.0, headers: bytes = b""
) -> None:
    """A chunked 200 response, each chunk written (and drained) ``gap_s`` after the last."""
    writer.write(b"HTTP/1.1 200 OK\r\n" + headers + b"transfer-encoding: chunked\r\n\r\n")
    for chunk in chunks:
        if gap_s:
            await asyncio.sleep(gap_s)
        writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


def test_a_read_waiting_longer_than_the_read_timeout_fails_and_a_slow_stream_does_not() -> None:
    """The read timeout bounds each wait for the engine, not the whole response: a stream whose
    chunks come 0.1 s apart for 0.6 s passes a 0.3 s timeout, an engine that goes quiet after
    its headers does not, and the error says which wait it was."""

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await _read_request(reader)
        if b"/stall" in request:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n")
            await writer.drain()
            await asyncio.sleep(5)
        else:
            await _chunked(writer, [b"ab"] * 6, gap_s=0.1)
        writer.close()

    async def run() -> None:
        server, url = await _serve(respond)
        pool = PooledUpstream(read_timeout_s=0.3)
        loop = asyncio.get_running_loop()
        try:
            resp = await pool.post(url, "/slow", b"{}", {})
            assert b"".join([c async for c in resp.aiter_raw()]) == b"ab" * 6
            resp = await pool.post(url, "/stall", b"{}", {})
            started = loop.time()
            got = []
            with pytest.raises(UpstreamError, match=r"no data from the engine for 0.3s"):
                async for chunk in resp.aiter_raw():
                    got.append(chunk)
            assert got == [b"ab"]
            assert 0.25 < loop.time() - started < 2.0
        finally:
            await pool.aclose()
            server.close()

    asyncio.run(run())


def test_time_between_reads_does_not_count_against_the_read_timeout() -> None:
    """The router may wait on a slow client between two reads of the engine's response; the
    engine's bytes are already there, so that wait is no engine timeout."""

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await _chunked(writer, [b"ab"] * 2, gap_s=0.05)
        writer.close()

    async def run() -> None:
        server, url = await _serve(respond)
        pool = PooledUpstream(read_timeout_s=0.2)
        try:
            resp = await pool.post(url, "/x", b"{}", {})
            got = []
            async for chunk in resp.aiter_raw():
                got.append(chunk)
                await asyncio.sleep(0.5)  # a client slower than the timeout
            assert b"".join(got) == b"abab"
        finally:
            await pool.aclose()
            server.close()

    asyncio.run(run())


def test_no_read_timeout_timer_outlives_its_exchange() -> None:
    """A pooled connection between requests has no timer that could abort it later."""
    engine = _KeepAliveServer(lambda request: _const(_ok(b"{}")))

    async def run() -> None:
        server, url = await _serve(engine.handler)
        pool = PooledUpstream(read_timeout_s=0.2)
        try:
            resp = await pool.post(url, "/x", b"{}", {})
            assert b"".join([c async for c in resp.aiter_raw()]) == b"{}"
            await asyncio.sleep(0.5)  # past the timeout while idle in the pool
            resp = await pool.post(url, "/x", b"{}", {})
            assert b"".join([c async for c in resp.aiter_raw()]) == b"{}"
            assert engine.connections == 1  # the idle connection was not aborted
        finally:
            await pool.aclose()
            server.close()

    asyncio.run(run())


async def _const(value: bytes) -> bytes:
    return value


def test_a_slow_client_pauses_reading_and_loses_nothing() -> None:
    """An engine that writes faster than the client reads: the connection stops reading once
    its buffer limit is waiting, and every byte still arrives, in order."""
    piece = bytes(range(256)) * 256  # 64 KiB
    pieces = 64  # 4 MiB in all

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await _chunked(writer, [piece] * pieces)

    async def run() -> None:
        server, url = await _serve(respond)
        pool = PooledUpstream()
        try:
            resp = await pool.post(url, "/x", b"{}", {})
            conn = resp._conn  # type: ignore[attr-defined]
            got = bytearray()
            most_buffered = 0
            paused = False
            async for chunk in resp.aiter_raw():
                got += chunk
                most_buffered = max(most_buffered, conn.buffered)
                paused = paused or conn.paused
                await asyncio.sleep(0.002)  # a slow client
            assert got == piece * pieces
            assert paused
            # The limit plus what one socket read can add on top of it.
            assert most_buffered <= conn.MAX_BUFFERED_BYTES + 512 * 1024
        finally:
            await pool.aclose()
            server.close()

    asyncio.run(run())


def test_parsed_engine_urls_are_cached_within_a_bound() -> None:
    pool = PooledUpstream()
    assert pool._key("http://10.0.0.1:8000") == ("10.0.0.1", 8000)
    assert pool._key("http://engine") == ("engine", 80)
    for i in range(MAX_CACHED_URLS + 10):
        pool._key(f"http://10.1.{i // 256}.{i % 256}:8000")
    assert len(pool._keys) <= MAX_CACHED_URLS
    with pytest.raises(UpstreamError, match="unsupported engine URL"):
        pool._key("https://10.0.0.1:8000")
