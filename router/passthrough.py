"""The response side of a proxied request: the engine's bytes passed through to the client.

:class:`PassthroughResponse` streams the engine's response to the client as it arrives, and
:class:`DisconnectWatch` cancels the request when its client leaves, from the moment its body is
read to the response's last byte, so that the engine aborts the generation. What the response
was (status, first-chunk time, output tokens, who ended it) goes to the gateway's accounting as
a :class:`StreamOutcome`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from shoal.router.exchange import HttpExchange
from shoal.router.server_protocol import ConnectionWatch
from shoal.router.upstream import UpstreamError, UpstreamResponse, header

log = logging.getLogger(__name__)

ENDPOINT_HEADER = "x-shoal-endpoint"
_USAGE_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_TAIL_BYTES = 512
# Headers of the engine's response that the router must not copy (hop-by-hop, or set by the
# router's own server). content-length is kept for a non-streamed body (see PassthroughResponse).
_DROP_RESPONSE_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"date", b"server", b"content-length"}
)


class DisconnectWatch:
    """Cancels the request's task when the client disconnects, from the moment its body is read
    until the response's last byte: a non-streamed request spends its whole generation waiting
    for the engine's response headers, and a client that leaves then must abort it too.

    Under Shoal's own servers the connection says when it is lost
    (:class:`~shoal.router.server_protocol.ConnectionWatch`, the exchange's ``connection``).
    Under any other ASGI server a task waits for the exchange's ``disconnected()`` (a
    ``receive()`` of ``http.disconnect``; the body reader owns ``receive`` before it). Servers
    also report a disconnect after a complete response, so the task is cancelled only while it
    is guarded. ``task`` is the request's
    task, which serves the request from its body to its last byte (the response is sent from it
    too).
    """

    def __init__(
        self,
        wait_disconnect: Callable[[], Awaitable[object]],
        task: asyncio.Task[Any] | None,
        connection: ConnectionWatch | None = None,
    ) -> None:
        self.task = task
        self._guarded = False
        self.cancelled_request = False  # True once the client left mid-request
        # Where the request had got to, for counting a disconnect before the engine answered.
        self.model = ""
        self.endpoint = ""
        self._connection = connection
        self._watcher: asyncio.Task[None] | None = None
        if connection is not None:
            # Bound methods compare equal per instance, so close() can discard this one.
            connection.listeners.add(self._client_left)
        else:
            # Through the task's loop: asyncio.get_running_loop() costs a getpid() system call
            # per call on Python 3.11.
            loop = task.get_loop() if task is not None else asyncio.get_running_loop()
            self._watcher = loop.create_task(self._watch(wait_disconnect))

    def guard(self, on: bool) -> None:
        """Cancel the request's task on disconnect (False: the response is complete)."""
        self._guarded = on and self.task is not None
        if self._guarded and self._connection is not None and self._connection.lost:
            self._client_left()  # it left before we listened

    def _client_left(self) -> None:
        if self._guarded and self.task is not None:
            self.cancelled_request = True
            self.task.cancel()

    async def _watch(self, wait_disconnect: Callable[[], Awaitable[object]]) -> None:
        await wait_disconnect()
        self._client_left()

    def absorb_cancellation(self) -> bool:
        """After the request's task caught a CancelledError: True, with the cancellation taken
        back, if this watch caused it (the client left); False if it came from elsewhere
        (shutdown), and the caller must re-raise it."""
        if not self.cancelled_request or self.task is None:
            return False
        self.task.uncancel()
        return True

    async def close(self) -> None:
        self._guarded = False
        if self._connection is not None:
            self._connection.listeners.discard(self._client_left)
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(BaseException):
                await self._watcher


@dataclass(slots=True)
class StreamOutcome:
    status: int
    first_chunk_at: float | None = None
    output_tokens: int | None = None
    client_disconnected: bool = False
    upstream_error: bool = False


class GatewayResponse(Protocol):
    """What the gateway answers an inference request with."""

    async def send_to(self, exchange: HttpExchange) -> None: ...


class _ClientLeft:
    """The answer to a request whose client left: a 499 that nobody reads (the server drops
    writes to a lost connection), so that the exchange still ends with a response."""

    async def send_to(self, exchange: HttpExchange) -> None:
        await exchange.start_response(499, [(b"content-length", b"0")])
        await exchange.write_body(b"", more=False)


CLIENT_LEFT = _ClientLeft()


class PassthroughResponse:
    """Sends the engine's response to the client chunk by chunk as it arrives.

    The request's :class:`DisconnectWatch` keeps guarding while it streams: on disconnect the
    send loop is cancelled and the upstream response closed, which closes its connection, and the
    engine aborts the request (vLLM and ``shoal sim`` abort on disconnect). Waiting for the next
    ``send`` to fail would leave a stalled generation running until it produced another token.
    """

    def __init__(
        self,
        upstream: UpstreamResponse,
        endpoint_url: str,
        watch: DisconnectWatch,
        on_done: Callable[[StreamOutcome], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.status_code = upstream.status_code
        self.endpoint_url = endpoint_url
        self._watch = watch
        self._on_done = on_done
        self._clock = clock
        self._streaming = b"text/event-stream" in (header(upstream, b"content-type") or b"")
        self.raw_headers = [(k, v) for k, v in upstream.headers if k not in _DROP_RESPONSE_HEADERS]
        # A non-streamed body goes out with the engine's length, as it came (the bytes are not
        # changed), so a client can tell a body cut short from a complete one; it also spares
        # the chunk framing, one socket write per response (within noise of the router's CPU
        # per request side by side: median 0.53 ms both ways).
        length = None if self._streaming else header(upstream, b"content-length")
        if length is not None:
            self.raw_headers.append((b"content-length", length))
        self.raw_headers.append((ENDPOINT_HEADER.encode(), endpoint_url.encode()))

    async def send_to(self, exchange: HttpExchange) -> None:
        outcome = StreamOutcome(status=self.status_code)
        # The body is pumped in the request's task (no task of its own: two fewer event-loop
        # hops per request), which the watch cancels if the client leaves mid-response.
        self._watch.guard(True)
        try:
            await self._pump(exchange, outcome)
        except asyncio.CancelledError:
            if not self._watch.absorb_cancellation():
                raise  # the server is shutting down, not the client leaving
            # Ours: go on to clean up.
            outcome.client_disconnected = True
        finally:
            await self._watch.close()
            with contextlib.suppress(BaseException):
                await self.upstream.aclose()
            try:
                self._on_done(outcome)
            except Exception:
                log.exception("request accounting failed")

    async def _pump(self, exchange: HttpExchange, outcome: StreamOutcome) -> None:
        await exchange.start_response(self.status_code, self.raw_headers)
        events = 0
        tail = b""
        try:
            async for chunk in self.upstream.aiter_raw():
                if not chunk:
                    continue
                if outcome.first_chunk_at is None:
                    outcome.first_chunk_at = self._clock()
                if self._streaming:
                    events += chunk.count(b"data: ")
                tail = (tail + chunk)[-_TAIL_BYTES:]
                await exchange.write_body(chunk, more=True)
        except UpstreamError as exc:
            # The engine failed mid-response: nothing to retry (bytes already went out).
            # Returning without the last message makes the server close the connection, which
            # is how the client learns that the body is incomplete, rather than a hang; ending
            # it normally would pass a truncated body (or a stream without [DONE]) as complete.
            outcome.upstream_error = True
            log.warning("upstream %s failed mid-response: %r", self.endpoint_url, exc)
            return
        except OSError:
            outcome.client_disconnected = True
            return
        usage = _USAGE_TOKENS.findall(tail)
        if usage:
            outcome.output_tokens = int(usage[-1])
        elif self._streaming and events:
            outcome.output_tokens = max(0, events - 1)  # minus the closing [DONE]
        self._watch.guard(False)  # complete: a disconnect from here on is the normal end
        await exchange.write_body(b"", more=False)
