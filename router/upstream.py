"""Sending a request to an engine and streaming its response back: the proxy's hot path.

``Upstream`` is the one interface the proxy uses. ``PooledUpstream`` is the production client:
an asyncio protocol per connection that feeds ``httptools``, and a LIFO stack of idle keep-alive
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


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to an engine and the response being read on it.

    A protocol rather than a stream pair: the transport hands each read straight to the
    response parser, and a reader waits on one future only when nothing new has arrived. The
    stream pair did the same work through a ``StreamReader`` buffer, a ``read()`` coroutine and a
    future per read (with the writer's drain machinery beside it): about 0.07 ms of the
    router's CPU per request in a side-by-side run of two otherwise equal proxies.

    The read timeout (a read that waits ``read_timeout_s`` for the engine) is one timer per
    exchange rather than an ``asyncio.timeout`` around every read: that context costs a Timeout
    object, a timer and, on Python 3.11, two ``getpid()`` system calls per read. When the timer
    fires it looks at the read in progress: one that has waited the whole timeout aborts the
    connection, which ends it; otherwise the timer re-arms for when the current (or next) read
    would have waited that long. Time between reads (the router sending to a slow client) does
    not count, as it did not with a timeout around each read.

    Flow control: a response the client reads more slowly than the engine writes stops the
    socket's reading once ``MAX_BUFFERED_BYTES`` are waiting, and resumes when they are taken.
    """

    MAX_BUFFERED_BYTES = 256 * 1024

    __slots__ = (
        "buffered",
        "chunks",
        "closed",
        "complete",
        "failure",
        "got_bytes",
        "headers",
        "headers_done",
        "idle_timer",
        "in_exchange",
        "keep_alive",
        "loop",
        "lost_with",
        "parser",
        "paused",
        "progress",
        "read_started_at",
        "read_timeout_s",
        "reading",
        "timed_out",
        "transport",
        "waiter",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.headers_done = False
        self.keep_alive = False
        self.complete = False
        self.got_bytes = False
        self.in_exchange = False
        # Something happened since the reader last looked (bytes parsed, EOF, a failure).
        self.progress = False
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False  # EOF or connection lost: nothing more will arrive
        self.lost_with: Exception | None = None
        self.failure: UpstreamError | None = None  # a malformed response
        self.read_timeout_s: float | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.read_started_at = 0.0
        self.reading = False
        self.timed_out = False

    # asyncio protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.in_exchange:
            # Bytes while idle in the pool: nothing to answer, and nothing to trust after it.
            self.close()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - engines never upgrade
            self._fail(UpstreamError("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed response from the engine: {exc}"))
        if self.buffered > self.MAX_BUFFERED_BYTES and not self.paused and not self.closed:
            self.paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        # Responses without a length end at EOF; the parser needs to hear about it.
        if self.in_exchange and self.headers_done and not self.complete:
            with contextlib.suppress(httptools.HttpParserError):
                self.parser.feed_data(b"")
        self.closed = True
        self._wake()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost_with = exc
        self.stop_read_timer()
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        # llhttp answers this only while parsing a message, not after it completed.
        self.keep_alive = bool(self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        self.complete = True

    def _wake(self) -> None:
        self.progress = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        self.failure = error
        self.close()

    def take_chunks(self) -> list[bytes]:
        chunks, self.chunks, self.buffered = self.chunks, [], 0
        if self.paused and not self.closed and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunks

    @property
    def usable(self) -> bool:
        """Still open and idle-clean: may carry the next request."""
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def send(self, request: bytes) -> None:
        """Start an exchange: write the request (the transport buffers what the socket does
        not take at once; a request body is bounded by the router's body limit)."""
        assert self.transport is not None
        self.in_exchange = True
        if self.transport.is_closing():  # closed since it was picked: wait_for_progress says so
            self.closed = True
            self._wake()
            return
        self.transport.write(request)

    def reset(self) -> None:
        """After a complete response: ready for the next exchange."""
        self.stop_read_timer()
        self.parser = httptools.HttpResponseParser(self)
        self.headers = []
        self.chunks = []
        self.buffered = 0
        self.headers_done = False
        self.keep_alive = False
        self.complete = False
        self.got_bytes = False
        self.in_exchange = False
        self.progress = False

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
        if self.transport is not None:
            self.transport.abort()  # the pending read ends, and wait_for_progress says why

    async def wait_for_progress(self) -> None:
        """Wait until the response has moved on (bytes parsed, its end, the connection's end);
        a connection that ended before the response did raises ``UpstreamError``."""
        if not self.progress:
            self.read_started_at = self.loop.time()
            self.reading = True
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.reading = False
                self.waiter = None
        self.progress = False
        if self.timed_out:
            raise UpstreamError(f"no data from the engine for {self.read_timeout_s}s")
        if self.failure is not None:
            raise self.failure
        if self.closed and not self.complete:
            if not self.got_bytes:
                raise _StaleConnection("the engine closed the connection before answering")
            if self.lost_with is not None:
                raise UpstreamError(f"connection failed: {self.lost_with!r}")
            raise UpstreamError("the engine closed the connection mid-response")

    def close(self) -> None:
        self.stop_read_timer()
        self.closed = True
        if self.transport is not None:
            self.transport.close()


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
            # More may arrive while a chunk is being sent on (the transport feeds the parser).
            while conn.chunks:
                for chunk in conn.take_chunks():
                    yield chunk
            if conn.complete:
                self._release(reusable=conn.keep_alive)
                return
            await conn.wait_for_progress()

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


# Engine URLs whose parsed (host, port) is kept: far more than any fleet's endpoints.
MAX_CACHED_URLS = 4096


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
        # base URL -> (host, port): parsing the URL was a dozen calls on every request.
        self._keys: dict[str, tuple[str, int]] = {}

    def _key(self, base_url: str) -> tuple[str, int]:
        key = self._keys.get(base_url)
        if key is not None:
            return key
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise UpstreamError(f"unsupported engine URL {base_url!r} (expected http://host:port)")
        if len(self._keys) >= MAX_CACHED_URLS:
            self._keys.clear()  # a fleet that churns through this many URLs: start over
        key = self._keys[base_url] = (parts.hostname, parts.port or 80)
        return key

    def _put_idle(self, key: tuple[str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, deque())
        if self._closed or len(idle) >= self._max_idle or not conn.usable:
            conn.close()
            return
        conn.reset()
        idle.append(conn)

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(lambda: _Connection(loop), key[0], key[1])
        except (OSError, TimeoutError) as exc:
            raise UpstreamConnectError(f"cannot connect to {key[0]}:{key[1]}: {exc!r}") from exc
        return conn

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
            if not conn.usable:
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
            conn.send(request)
            while not conn.headers_done:
                await conn.wait_for_progress()
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
