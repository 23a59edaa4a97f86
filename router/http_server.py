"""The router's HTTP/1.1 server: asyncio protocols over ``httptools`` that serve an ASGI app.

Why the router has its own server: uvicorn's per-request machinery is general-purpose
(header validation loops, an event and a keep-alive timer per request, a task done-callback,
its own flow-control object), and a proxy's cost per request is mostly what surrounds the
routing. Measured side by side (docs/benchmarks.md), the router's CPU per request under this
server was 0.03 ms lower to 0.01 ms higher than under uvicorn across four comparisons: within
noise, because the ASGI call pattern itself costs the same under both. What it adds is control:
every limit below is the router's own and explicit, malformed HTTP gets an OpenAI-shaped error,
and the inference routes skip ASGI: ``direct`` names, by method and path, the requests whose
handler takes the :class:`_Exchange` itself as an :class:`~shoal.router.exchange.HttpExchange`
(body read once, response head and body written without message dictionaries). It does only
what the router needs:

- HTTP/1.1 and 1.0, keep-alive, pipelined requests answered in order (reading pauses while a
  pipelined request waits);
- request bodies by length or chunked (``httptools`` decodes the chunks), ``Expect:
  100-continue`` answered when the app first reads the body;
- responses framed by the app's ``content-length``, else chunked (HTTP/1.1) or ended by
  closing (HTTP/1.0); a ``date`` header (cached per second);
- write flow control: ``send`` waits while the socket's buffer is over its high-water mark, and
  reading pauses while more than :data:`BODY_BUFFER_BYTES` of request body wait for the app;
- explicit limits: a request head over :attr:`ServerLimits.max_head_bytes` gets 431, a
  malformed request 400 (OpenAI-shaped JSON, then the connection closes), an idle connection
  closes after :attr:`ServerLimits.keep_alive_s`;
- a :class:`~shoal.router.server_protocol.ConnectionWatch` in every request's scope, so the
  gateway learns of a client leaving without a task per request;
- graceful shutdown on SIGINT or SIGTERM: stop accepting, close idle connections, let requests
  in flight finish for up to :attr:`ServerLimits.graceful_shutdown_s`, then the app's lifespan
  shutdown. A second signal cancels what is left at once.

Everything else (``/v1/models``, ``/health``, ``/metrics``, the lifespan) is the ASGI app's, and
tests that call the app in-process reach the same gateway through ASGI. ``http_server:
uvicorn`` in the router's config serves the same app with uvicorn, all of it through ASGI.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import logging
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote

import httptools
import orjson
from starlette.types import ASGIApp, Message

from shoal.router.errors import error_body
from shoal.router.exchange import BodyTooLarge, ClientGone, Headers, ScopeHead
from shoal.router.server_protocol import (
    DISCONNECT_EXTENSION,
    CoalescedWrites,
    ConnectionWatch,
)

log = logging.getLogger(__name__)

# Request body bytes buffered ahead of the app before reading from the socket pauses.
BODY_BUFFER_BYTES = 256 * 1024
_ASGI = {"version": "3.0", "spec_version": "2.4"}
_NO_BODY_STATUS = frozenset({204, 304})

# A request the app answers without ASGI: its handler, by method and path (None: the ASGI app).
DirectHandler = Callable[["_Exchange"], Awaitable[None]]
DirectRoutes = Callable[[str, str], DirectHandler | None]


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_head_bytes: int = 64 * 1024  # request line + headers; more gets 431
    keep_alive_s: float = 5.0  # an idle connection (no request in progress) closes after this
    graceful_shutdown_s: float = 30.0  # how long requests in flight may finish at shutdown


class _HeadTooLarge(Exception):
    pass


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("latin-1")
    except ValueError:
        return b""


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))
        if len(_STATUS_LINES) < 1000:  # statuses are a small set; keep the cache bounded anyway
            _STATUS_LINES[status] = line
    return line


class _DateHeader:
    """``date: ...\\r\\n``, formatted once per second rather than per response."""

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"date: %s\r\n" % email.utils.formatdate(now, usegmt=True).encode()
        return self._line


_DATE = _DateHeader()


def _error_response(status: int, message: str, type_: str = "invalid_request_error") -> bytes:
    """A whole response, OpenAI-shaped, for a request the server answers without the app."""
    body = orjson.dumps(error_body(status, message, type_))
    return (
        _status_line(status)
        + _DATE.line()
        + b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        % len(body)
        + body
    )


class _Exchange(ScopeHead):
    """One request and its response: the ASGI ``receive`` and ``send`` of one app call, or the
    same as an :class:`~shoal.router.exchange.HttpExchange` for a direct handler."""

    __slots__ = (
        "body",
        "body_delivered",
        "buffered",
        "chunked",
        "conn",
        "continue_sent",
        "done",
        "expect_continue",
        "head_only",
        "keep_alive",
        "remaining",
        "request_complete",
        "response_started",
        "scope",
        "waiter",
    )

    def __init__(
        self,
        conn: HttpConnection,
        scope: dict[str, Any],
        keep_alive: bool,
        expect_continue: bool,
    ) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.continue_sent = False
        self.body: list[bytes] = []
        self.buffered = 0
        self.request_complete = False
        self.body_delivered = False
        self.waiter: asyncio.Future[None] | None = None
        self.response_started = False
        self.done = False
        self.chunked = False
        self.head_only = scope["method"] == "HEAD"
        self.remaining: int | None = None  # bytes a fixed-length response still owes

    # --------------------------------------------------------------- the request side

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self.waiter = self.conn.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def _next_body(self) -> bytes | None:
        """The body bytes that came so far (waiting for some), or None if the client left
        before the body's end; ``body_delivered`` once the last bytes are taken."""
        conn = self.conn
        if self.expect_continue and not self.continue_sent and not self.body:
            self.continue_sent = True
            if not self.request_complete and not conn.lost:
                conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while not self.body and not self.request_complete and not conn.lost:
            await self._wait()
        if conn.lost and not self.request_complete:
            return None
        data = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        self.buffered = 0
        conn.body_taken()
        if self.request_complete:
            self.body_delivered = True
        return data

    async def receive(self) -> Message:
        if not self.body_delivered:
            data = await self._next_body()
            if data is None:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": data, "more_body": not self.body_delivered}
        await self.disconnected()
        return {"type": "http.disconnect"}

    # ------------------------------- the request side, without ASGI (see also ScopeHead)

    @property
    def connection(self) -> ConnectionWatch:
        return self.conn.watch

    async def read_body(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while not self.body_delivered:
            data = await self._next_body()
            if data is None:
                raise ClientGone
            size += len(data)
            if size > limit:
                raise BodyTooLarge
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def disconnected(self) -> None:
        # The body is delivered: what comes next is the client leaving or the response ending.
        while not self.conn.lost and not self.done:
            await self._wait()

    # --------------------------------------------------------------- the response side

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            await self.write_body(message.get("body", b""), more=message.get("more_body", False))
        elif kind == "http.response.start":
            await self.start_response(message["status"], message.get("headers", ()))
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    async def write_body(self, body: bytes, *, more: bool) -> None:
        conn = self.conn
        if not self.response_started:
            raise RuntimeError("response body before the response's start")
        if self.done:
            raise RuntimeError("response body after the response ended")
        if conn.lost:
            return  # as uvicorn does: the gateway learns of the disconnect from its watch
        if self.head_only:
            pass
        elif self.chunked:
            if body:
                conn.transport.write(b"%x\r\n%s\r\n" % (len(body), body))
            if not more:
                conn.transport.write(b"0\r\n\r\n")
        elif body:
            if self.remaining is not None:
                self.remaining -= len(body)
                if self.remaining < 0:
                    raise RuntimeError("response body longer than its content-length")
            conn.transport.write(body)
        if not more:
            if self.remaining:
                self.keep_alive = False  # shorter than announced: the framing is broken
            self.done = True
            self.wake()
            conn.response_complete(self)
        elif conn.write_paused:
            await conn.drain()

    async def start_response(self, status: int, headers: Headers) -> None:
        if self.response_started:
            raise RuntimeError("response started twice")
        self.response_started = True
        conn = self.conn
        if conn.lost:
            return
        head = [_status_line(status), _DATE.line()]
        length: int | None = None
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
                continue  # written below, once
            elif lower == b"connection":
                if value.lower() == b"close":
                    self.keep_alive = False
                continue  # written below, from what the server decided
            elif lower == b"transfer-encoding":
                continue  # the server frames the body itself
            head.append(b"%s: %s\r\n" % (name, value))
        if status in _NO_BODY_STATUS or status < 200:
            self.head_only = True
        elif length is not None:
            head.append(b"content-length: %d\r\n" % length)
            self.remaining = length
        elif self.head_only:
            pass
        elif self.scope["http_version"] == "1.1":
            self.chunked = True
            head.append(b"transfer-encoding: chunked\r\n")
        else:
            self.keep_alive = False  # HTTP/1.0 without a length: the close ends the body
        if conn.closing:
            self.keep_alive = False
        if not self.keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        conn.transport.write(b"".join(head))


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests, runs the app for one at a time, in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = server.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: CoalescedWrites = cast(CoalescedWrites, None)
        self.watch = ConnectionWatch()
        self.lost = False
        self.closing = False
        self.write_paused = False
        self.read_paused = False
        self._drain: asyncio.Future[None] | None = None
        self.last_active = time.monotonic()
        # The request being parsed, the one being answered, and those waiting behind it.
        self._parsing: _Exchange | None = None
        self.serving: _Exchange | None = None
        self._queue: deque[_Exchange] = deque()
        self._url: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._head_too_large = False
        # After an Upgrade request: no more HTTP on this connection; bytes still owed to that
        # request's body (content-length) are taken raw.
        self._upgraded = False
        self._latest: _Exchange | None = None
        self._raw_left = 0
        self._server_addr: tuple[str, int] | None = None
        self._client_addr: tuple[str, int] | None = None

    # ------------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        raw = cast(asyncio.Transport, transport)
        self.transport = CoalescedWrites(raw, self.loop)
        sock = raw.get_extra_info("sockname")
        peer = raw.get_extra_info("peername")
        self._server_addr = (str(sock[0]), int(sock[1])) if isinstance(sock, tuple) else None
        self._client_addr = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.connections.discard(self)
        for exchange in (self._parsing, self.serving, *self._queue):
            if exchange is not None:
                exchange.wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self.watch.connection_lost()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self._upgraded:
            self._take_raw_body(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded = True
            self._refuse_upgrade(data[exc.args[0] :] if exc.args else b"")
        except httptools.HttpParserError as exc:
            if self._head_too_large:
                limit = self.server.limits.max_head_bytes
                self._reject(431, f"request head larger than {limit} bytes")
            else:
                self._reject(400, f"invalid HTTP request: {exc}")

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drain(self) -> None:
        if self.write_paused and not self.lost:
            self._drain = self.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self._url = []
        self._headers = []
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        url = self._url[0] if len(self._url) == 1 else b"".join(self._url)
        if url[:1] == b"/":
            raw_path, _, query = url.partition(b"?")
        else:  # absolute form (a proxy-style request line)
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path or b"/", parsed.query or b""
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        expect_continue = False
        for name, value in self._headers:
            if name == b"expect" and value.lower() == b"100-continue":
                expect_continue = True
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": parser.get_http_version(),
            "server": self._server_addr,
            "client": self._client_addr,
            "scheme": "http",
            "method": parser.get_method().decode("ascii"),
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self._headers,
            "state": dict(self.server.lifespan_state),
            "extensions": {DISCONNECT_EXTENSION: self.watch},
        }
        exchange = _Exchange(self, scope, parser.should_keep_alive(), expect_continue)
        self._parsing = self._latest = exchange
        if self.serving is None:
            self._start(exchange)
        else:
            # A pipelined request: it is answered after the current one; read no further
            # until then so a client cannot queue without bound.
            self._queue.append(exchange)
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._add_body(self._parsing, body)

    def on_message_complete(self) -> None:
        exchange = self._parsing
        if exchange is None:
            return
        exchange.request_complete = True
        exchange.wake()
        self._parsing = None

    # ------------------------------------------------------------------ running requests

    def _refuse_upgrade(self, rest: bytes) -> None:
        """An Upgrade request (h2c, websocket): the router answers it in HTTP/1.1 and closes.

        httptools ends the message at the head and hands what follows over as the new
        protocol's bytes, a body included (``curl --http2`` on http:// sends its POST body
        with the upgrade request): those bytes are the request's body, up to its length.
        """
        exchange = self._latest
        if exchange is None:
            self.close()
            return
        exchange.keep_alive = False
        length = 0
        for name, value in exchange.scope["headers"]:
            if name == b"content-length" and value.isdigit():
                length = int(value)
        if length and not exchange.buffered and not exchange.body_delivered:
            exchange.request_complete = False
            self._raw_left = length
            self._take_raw_body(rest)
        else:
            self._pause_reading()  # nothing more to read: what follows is not HTTP

    def _take_raw_body(self, data: bytes) -> None:
        exchange = self._latest
        if exchange is None or self._raw_left <= 0:
            return  # the upgraded protocol's bytes: ignored, the connection closes soon
        take = data[: self._raw_left]
        self._raw_left -= len(take)
        if self._raw_left == 0:
            exchange.request_complete = True
            self._pause_reading()
        if take:
            self._add_body(exchange, take)
        else:
            exchange.wake()

    def _add_body(self, exchange: _Exchange, chunk: bytes) -> None:
        """Buffer body bytes for the app; stop reading while too many wait for it."""
        exchange.body.append(chunk)
        exchange.buffered += len(chunk)
        if exchange.buffered > BODY_BUFFER_BYTES:
            self._pause_reading()
        exchange.wake()

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.server.limits.max_head_bytes:
            self._head_too_large = True
            raise _HeadTooLarge  # httptools stops parsing and raises from feed_data

    def _start(self, exchange: _Exchange) -> None:
        self.serving = exchange
        self.server.start_app(self, exchange)

    def response_complete(self, exchange: _Exchange) -> None:
        """The app ended its response: close, or go on to the next request."""
        if exchange is not self.serving:
            return
        self.serving = None
        self.last_active = time.monotonic()
        if not exchange.keep_alive or self.closing or not exchange.request_complete:
            # (A request whose body was not read to its end leaves the parser mid-message.)
            self.close()
            return
        if self._queue:
            self._start(self._queue.popleft())
        elif self.read_paused and (self._parsing is None or self._parsing.buffered == 0):
            self._resume_reading()

    def body_taken(self) -> None:
        """The app took the buffered body: read more if reading was paused for it."""
        if self.read_paused and not self._queue:
            self._resume_reading()

    def app_ended(self, exchange: _Exchange, failed: bool) -> None:
        """The app call returned or raised; answer for it if it left the response unfinished."""
        if exchange.done or self.lost:
            if failed and not exchange.done:
                self.close()
            return
        if not exchange.response_started:
            log.error("the app ended without a response to %s", exchange.scope["path"])
            self.transport.write(
                _error_response(500, "internal router error", "internal_server_error")
            )
            exchange.done = True
        # A response cut short: closing is how the client learns that it is incomplete.
        self.serving = None
        self.close()

    def _pause_reading(self) -> None:
        if not self.read_paused and not self.lost:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.read_paused and not self.lost:
            self.read_paused = False
            self.transport.resume_reading()

    def _reject(self, status: int, message: str) -> None:
        """A request the app never sees: answer it (unless a response is under way) and close."""
        if self.serving is None and not self.lost:
            self.transport.write(_error_response(status, message))
        self.close()

    def close(self) -> None:
        if not self.lost and not self.transport.is_closing():
            self.transport.close()

    def shutdown(self) -> None:
        """Server shutdown: close now if idle, else after the response in progress."""
        self.closing = True
        if self.serving is None:
            self.close()


class HttpServer:
    """Serves an ASGI app: lifespan, listening socket, connections, shutdown."""

    def __init__(
        self,
        app: ASGIApp,
        limits: ServerLimits | None = None,
        direct: DirectRoutes | None = None,
    ) -> None:
        self.app = app
        self.limits = limits or ServerLimits()
        self.direct = direct
        self.loop = asyncio.get_running_loop()  # made inside the loop that serves
        self.connections: set[HttpConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.lifespan_state: dict[str, Any] = {}
        self._server: asyncio.AbstractServer | None = None
        self._stop = asyncio.Event()
        self._force = False
        self.port = 0

    # ------------------------------------------------------------------ requests

    def start_app(self, conn: HttpConnection, exchange: _Exchange) -> None:
        scope = exchange.scope
        handler = self.direct(scope["method"], scope["path"]) if self.direct is not None else None
        task = self.loop.create_task(self._run_app(conn, exchange, handler))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run_app(
        self, conn: HttpConnection, exchange: _Exchange, handler: DirectHandler | None
    ) -> None:
        failed = False
        try:
            if handler is not None:
                await handler(exchange)
            else:
                await self.app(exchange.scope, exchange.receive, exchange.send)
        except asyncio.CancelledError:
            failed = True
            raise
        except Exception:
            failed = True
            log.exception("error serving %s", exchange.scope["path"])
        finally:
            conn.app_ended(exchange, failed)

    # ------------------------------------------------------------------ lifecycle

    async def serve(self, host: str, port: int, *, ready: Callable[[], None] | None = None) -> bool:
        """Run until a signal (or :meth:`stop`); False if the app's startup failed."""
        lifespan = _Lifespan(self.app, self.lifespan_state)
        if not await lifespan.startup():
            return False
        try:
            self._server = await self.loop.create_server(
                lambda: HttpConnection(self), host, port, reuse_address=True, backlog=2048
            )
        except OSError as exc:  # the address is taken or not ours
            log.error("cannot listen on %s:%d: %s", host, port, exc)
            await lifespan.shutdown()
            return False
        self.port = int(self._server.sockets[0].getsockname()[1])  # the bound one, if port was 0
        sweeper = self.loop.create_task(self._close_idle(), name="keep-alive sweep")
        with contextlib.ExitStack() as handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    self.loop.add_signal_handler(sig, self.stop)
                    handlers.callback(self.loop.remove_signal_handler, sig)
            if ready is not None:
                ready()
            await self._stop.wait()
            sweeper.cancel()
            await self._shutdown()
        await lifespan.shutdown()
        return True

    def stop(self) -> None:
        """Begin a graceful shutdown; a second call cancels the requests still running."""
        if self._stop.is_set():
            self._force = True
            for task in list(self.tasks):
                task.cancel()
            return
        self._stop.set()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = self.loop.time() + self.limits.graceful_shutdown_s
        while self.tasks and not self._force and self.loop.time() < deadline:
            await asyncio.wait(list(self.tasks), timeout=deadline - self.loop.time())
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5.0)
        for conn in list(self.connections):
            conn.close()

    async def _close_idle(self) -> None:
        """Close connections with no request in progress for longer than the keep-alive."""
        keep_alive = self.limits.keep_alive_s
        while True:
            await asyncio.sleep(min(1.0, keep_alive))
            cutoff = time.monotonic() - keep_alive
            for conn in list(self.connections):
                if conn.serving is None and conn.last_active < cutoff:
                    conn.close()


class _Lifespan:
    """The ASGI lifespan protocol: startup before the socket opens, shutdown after it closes."""

    def __init__(self, app: ASGIApp, state: dict[str, Any]) -> None:
        self._app = app
        self._state = state
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._started = asyncio.Event()
        self._ended = asyncio.Event()
        self._failed: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._unsupported = False

    async def startup(self) -> bool:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._inbox.put({"type": "lifespan.startup"})
        started = asyncio.ensure_future(self._started.wait())
        await asyncio.wait([started, self._task], return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if self._failed is not None:
            log.error("router startup failed: %s", self._failed)
            return False
        return True

    async def shutdown(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30.0):
                await self._ended.wait()

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": _ASGI, "state": self._state}
        try:
            await self._app(scope, self._inbox.get, self._send)
        except Exception as exc:
            if not self._started.is_set():
                self._failed = repr(exc)
                log.exception("the app's lifespan failed")
        finally:
            self._started.set()
            self._ended.set()

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self._started.set()
        elif kind == "lifespan.startup.failed":
            self._failed = str(message.get("message", "startup failed"))
            self._started.set()
        elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            if kind == "lifespan.shutdown.failed":
                log.error("router shutdown failed: %s", message.get("message", ""))
            self._ended.set()


def run(
    app: ASGIApp,
    host: str,
    port: int,
    limits: ServerLimits | None = None,
    *,
    direct: DirectRoutes | None = None,
) -> bool:
    """Serve ``app`` on ``host:port`` until SIGINT or SIGTERM, on uvloop when it is installed;
    requests that ``direct`` names a handler for go to it instead of the app."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        pass

    async def main() -> bool:
        server = HttpServer(app, limits, direct)
        return await server.serve(host, port)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())
