"""Sending a request to an engine and streaming its response back: the proxy's hot path.

``Upstream`` is the one interface the proxy uses. ``PooledUpstream`` is the production client:
plain asyncio streams, ``httptools`` to parse responses, and a LIFO stack of idle keep-alive
connections per endpoint, so picking a connection is O(1). A general-purpose client costs more
here: in a profile of the router at 300 req/s, httpx's connection pool alone (scanning every
pooled connection per request) was the largest item after the server's own socket writes.
``HttpxUpstream`` adapts an ``httpx.AsyncClient``, which lets in-process tests route to an ASGI
app through ``httpx.ASGITransport``.

Only what the engines speak is supported: HTTP/1.1 over TCP, requests with a body, responses
with ``content-length`` or chunked transfer encoding (SSE streams).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Protocol
from urllib.parse import urlsplit

import httptools
import httpx


class UpstreamError(Exception):
    """The engine could not be reached, or its connection broke or timed out."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made: the engine is not listening (or not reachable) at all."""


class _StaleConnection(UpstreamError):
    """A kept-alive connection the engine had closed: no byte of the response came back."""


class UpstreamResponse(Protocol):
    status_code: int
    # Lower-cased header names, raw values, in the engine's order.
    headers: list[tuple[bytes, bytes]]

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives (transfer encoding removed); raises ``UpstreamError``."""
        ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    async def post(
        self, base_url: str, path: str, body: bytes, headers: dict[str, str]
    ) -> UpstreamResponse: ...

    async def get(self, base_url: str, path: str, timeout_s: float) -> tuple[int, bytes]:
        """Status and whole body of a small GET (scrapes); ``UpstreamError`` on failure or
        when it takes longer than ``timeout_s``, ``UpstreamConnectError`` if nothing listens."""
        ...

    async def aclose(self) -> None: ...


def header(response: UpstreamResponse, name: bytes) -> bytes | None:
    for key, value in response.headers:
        if key == name:
            return value
    return None


# --------------------------------------------------------------------------- pooled asyncio client


class _Connection:
    """One keep-alive HTTP/1.1 connection and the response being read on it.

    The read timeout (a read that waits ``read_timeout_s`` for the engine) is one timer per
    exchange rather than an ``asyncio.timeout`` around every read: that context costs a Timeout
    object, a timer and, on Python 3.11, two ``getpid()`` system calls per read. When the timer
    fires it looks at the read in progress: one that has waited the whole timeout aborts the
    connection, which ends it; otherwise the timer re-arms for when the current (or next) read
    would have waited that long. Time between reads (the router sending to a slow client) does
    not count, as it did not with a timeout around each read.
    """

    __slots__ = (
        "chunks",
        "complete",
        "got_bytes",
        "headers",
        "headers_done",
        "idle_timer",
        "keep_alive",
        "loop",
        "parser",
        "read_started_at",
        "read_timeout_s",
        "reader",
        "reading",
        "timed_out",
        "writer",
    )

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.headers_done = False
        self.keep_alive = False
        self.complete = False
        self.got_bytes = False
        self.read_timeout_s: float | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.read_started_at = 0.0
        self.reading = False
        self.timed_out = False

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        # llhttp answers this only while parsing a message, not after it completed.
        self.keep_alive = bool(self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True

    def reset(self) -> None:
        self.stop_read_timer()
        self.parser = httptools.HttpResponseParser(self)
        self.headers = []
        self.chunks = []
        self.headers_done = False
        self.keep_alive = False
        self.complete = False
        self.got_bytes = False

    # the read timeout
    def start_read_timer(self, read_timeout_s: float | None) -> None:
        self.stop_read_timer()
        self.read_timeout_s = read_timeout_s
        self.timed_out = False
        if read_timeout_s is None:
            return
        self.idle_timer = self.loop.call_at(self.loop.time() + read_timeout_s, self._check_idle)

    def stop_read_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _check_idle(self) -> None:
        assert self.read_timeout_s is not None
        now = self.loop.time()
        # The earliest a read could time out: this one's start + the timeout, or a read that
        # starts from now on.
        due = (self.read_started_at if self.reading else now) + self.read_timeout_s
        if now < due:
            self.idle_timer = self.loop.call_at(due, self._check_idle)
            return
        self.idle_timer = None
        self.timed_out = True
        self.writer.transport.abort()  # the pending read ends, and feed_once says why

    async def feed_once(self) -> None:
        """Read what the socket has and parse it; EOF before the end is an ``UpstreamError``."""
        self.read_started_at = self.loop.time()
        self.reading = True
        try:
            data = await self.reader.read(65536)
        except OSError as exc:
            if self.timed_out:
                raise UpstreamError(f"no data from the engine for {self.read_timeout_s}s") from exc
            raise UpstreamError(f"connection failed: {exc!r}") from exc
        finally:
            self.reading = False
        if self.timed_out:
            raise UpstreamError(f"no data from the engine for {self.read_timeout_s}s")
        if not data:
            if not self.got_bytes:
                raise _StaleConnection("the engine closed the connection before answering")
            # Responses without a length end at EOF; the parser needs to hear about it.
            if self.headers_done and not self.complete:
                with contextlib.suppress(httptools.HttpParserError):
                    self.parser.feed_data(b"")
            if not self.complete:
                raise UpstreamError("the engine closed the connection mid-response")
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:  # pragma: no cover - engines never upgrade
            raise UpstreamError("unexpected protocol upgrade") from exc
        except httptools.HttpParserError as exc:
            raise UpstreamError(f"malformed response from the engine: {exc}") from exc

    def close(self) -> None:
        self.stop_read_timer()
        with contextlib.suppress(Exception):
            self.writer.close()


class _PooledResponse:
    def __init__(self, pool: PooledUpstream, key: tuple[str, int], conn: _Connection) -> None:
        self._pool = pool
        self._key = key
        self._conn = conn
        self.status_code: int = conn.parser.get_status_code()
        self.headers = conn.headers
        self._released = False

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.chunks:
                chunks, conn.chunks = conn.chunks, []
                for chunk in chunks:
                    yield chunk
            if conn.complete:
                self._release(reusable=conn.keep_alive)
                return
            await conn.feed_once()

    async def aclose(self) -> None:
        # A response not read to its end leaves the connection mid-message: close it (which
        # also tells the engine to abort the request).
        self._release(reusable=False)

    def _release(self, reusable: bool) -> None:
        if self._released:
            return
        self._released = True
        self._conn.stop_read_timer()
        if reusable and self._conn.complete:
            self._pool._put_idle(self._key, self._conn)
        else:
            self._conn.close()


class PooledUpstream:
    def __init__(
        self,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float | None = 600.0,
        max_idle_per_endpoint: int = 256,
    ) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._max_idle = max_idle_per_endpoint
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}
        self._closed = False

    @staticmethod
    def _key(base_url: str) -> tuple[str, int]:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise UpstreamError(f"unsupported engine URL {base_url!r} (expected http://host:port)")
        return parts.hostname, parts.port or 80

    def _put_idle(self, key: tuple[str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, deque())
        if self._closed or len(idle) >= self._max_idle or conn.writer.is_closing():
            conn.close()
            return
        conn.reset()
        idle.append(conn)

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                reader, writer = await asyncio.open_connection(key[0], key[1])
        except (OSError, TimeoutError) as exc:
            raise UpstreamConnectError(f"cannot connect to {key[0]}:{key[1]}: {exc!r}") from exc
        return _Connection(reader, writer)

    async def post(
        self, base_url: str, path: str, body: bytes, headers: dict[str, str]
    ) -> UpstreamResponse:
        key = self._key(base_url)
        head = [f"POST {path} HTTP/1.1\r\nhost: {key[0]}:{key[1]}\r\n"]
        head.extend(f"{name}: {value}\r\n" for name, value in headers.items())
        head.append(f"content-length: {len(body)}\r\n\r\n")
        return await self._send(key, "".join(head).encode("latin-1") + body)

    async def get(self, base_url: str, path: str, timeout_s: float) -> tuple[int, bytes]:
        key = self._key(base_url)
        request = f"GET {path} HTTP/1.1\r\nhost: {key[0]}:{key[1]}\r\n\r\n".encode("latin-1")
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._send(key, request)
                try:
                    body = b"".join([chunk async for chunk in response.aiter_raw()])
                finally:
                    await response.aclose()  # no-op once read to the end and pooled
        except TimeoutError as exc:
            raise UpstreamError(f"GET {path} took longer than {timeout_s}s") from exc
        return response.status_code, body

    async def _send(self, key: tuple[str, int], request: bytes) -> UpstreamResponse:
        idle = self._idle.get(key)
        # A pooled connection may have been closed by the engine while idle; that shows as EOF
        # before any response byte, and the request is safe to send again on a fresh one.
        while idle:
            conn = idle.pop()
            if conn.writer.is_closing() or conn.reader.at_eof():
                conn.close()
                continue
            try:
                return await self._exchange(key, conn, request, reused=True)
            except _StaleConnection:
                continue  # _exchange closed it; nothing reached the engine's handler
        return await self._exchange(key, await self._connect(key), request)

    async def _exchange(
        self, key: tuple[str, int], conn: _Connection, request: bytes, reused: bool = False
    ) -> UpstreamResponse:
        try:
            conn.start_read_timer(self._read_timeout_s)
            conn.writer.write(request)
            if len(request) > 65536:
                await conn.writer.drain()
            while not conn.headers_done:
                await conn.feed_once()
        except OSError as exc:
            conn.close()
            if reused:
                raise _StaleConnection(repr(exc)) from exc
            raise UpstreamError(f"sending to {key[0]}:{key[1]} failed: {exc!r}") from exc
        except _StaleConnection as exc:
            conn.close()
            if reused:
                raise
            raise UpstreamError(
                f"{key[0]}:{key[1]} closed the connection before answering"
            ) from exc
        except BaseException:
            conn.close()
            raise
        return _PooledResponse(self, key, conn)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()


# --------------------------------------------------------------------------- httpx adapter


class _HttpxResponse:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code = response.status_code
        self.headers = [(k.lower(), v) for k, v in response.headers.raw]

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise UpstreamError(repr(exc)) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxUpstream:
    """An ``Upstream`` over an ``httpx.AsyncClient`` (tests route it to an ASGI app)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def post(
        self, base_url: str, path: str, body: bytes, headers: dict[str, str]
    ) -> UpstreamResponse:
        request = self._client.build_request("POST", base_url + path, content=body, headers=headers)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
        return _HttpxResponse(response)

    async def get(self, base_url: str, path: str, timeout_s: float) -> tuple[int, bytes]:
        try:
            response = await self._client.get(base_url + path, timeout=timeout_s)
        except httpx.ConnectError as exc:
            raise UpstreamConnectError(f"{type(exc).__name__}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
        return response.status_code, response.content

    async def aclose(self) -> None:
        pass  # the client belongs to whoever passed it in, and they close it
