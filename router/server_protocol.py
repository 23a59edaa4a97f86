"""The router's HTTP server protocol: uvicorn's httptools protocol with two additions.

**One socket write per event-loop step.** uvicorn writes a response's status line and headers in
one ``transport.write`` and each body part in another, so a non-streamed response costs the
router two ``write`` system calls where one would do. On loopback a write is not cheap (the
sender's call also runs the receiver's side of TCP): a native profile of the router at 200 req/s
put about 30 µs on each, and the three writes of a proxied request (client head, client body,
upstream request) were a fifth of the router's CPU. :class:`CoalescedWrites` joins what is
written within one event-loop step and writes it once at the end of that step, so head and body
go out together. A streamed response's chunks arrive in separate steps and still go out one by
one, as they must.

**A disconnect callback.** The gateway must cancel a request whose client leaves (the engine
then aborts the generation). The ASGI way is a task per request that waits on ``receive()`` for
``http.disconnect``: a task, an event and a cancellation per request, about 10 µs of the
router's in-process work of about 70. The protocol knows when its connection is lost, so it puts
a :class:`ConnectionWatch` in the request's scope (``scope["extensions"]["shoal.disconnect"]``)
and calls the listeners registered there. Under another ASGI server the extension is absent and
the gateway falls back to the task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

DISCONNECT_EXTENSION = "shoal.disconnect"


class CoalescedWrites(asyncio.Transport):
    """A transport that passes everything to ``transport`` but joins the writes made within one
    event-loop step into one write, made when that step ends (or before a close)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._flush_scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._pending.append(bytes(data))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Write what is pending now (the scheduled call, or before closing)."""
        self._flush_scheduled = False
        pending = self._pending
        if not pending:
            return
        self._pending = []
        if self._transport.is_closing():
            return  # the peer is gone: as the transport itself would, drop the data
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(d) for d in self._pending)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)


class ConnectionWatch:
    """Whether a client connection is lost, and who to tell when it is (the requests in flight
    on it register a callback and remove it when they are done)."""

    __slots__ = ("listeners", "lost")

    def __init__(self) -> None:
        self.lost = False
        self.listeners: set[Callable[[], None]] = set()

    def connection_lost(self) -> None:
        self.lost = True
        listeners, self.listeners = self.listeners, set()
        for listener in listeners:
            try:
                listener()
            except Exception:
                log.exception("disconnect listener failed")


class RouterHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over :class:`CoalescedWrites`, with a
    :class:`ConnectionWatch` in every request's scope (``uvicorn.run(http=...)``)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connection_watch = ConnectionWatch()
        # uvloop's transports implement asyncio.Transport without subclassing it.
        super().connection_made(CoalescedWrites(cast(asyncio.Transport, transport), self.loop))

    def on_headers_complete(self) -> None:
        # The scope of this request exists now, and its ASGI task has not started yet.
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions[DISCONNECT_EXTENSION] = self.connection_watch
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.connection_watch.connection_lost()
