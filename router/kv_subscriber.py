"""KV event subscriber: one asyncio task per engine, feeding a :class:`KvEventIndex`.

Each task holds a ZMQ SUB socket (``zmq.asyncio``, so receiving never blocks the event loop)
connected to the engine's KV events PUB address, decodes every message with
:func:`shoal.kv_events.decode_frames` and applies it to the index. ZMQ reconnects a dropped TCP
connection by itself; what it cannot hide is lost messages (PUB drops at its high-water mark, and
whatever was published before we connected never reaches us). The index notices those as sequence
gaps, and the task then asks the engine's replay socket (vLLM's protocol, over a DEALER socket):

- request ``[b"", start_seq (8-byte big-endian)]``;
- replies ``[b"", topic, seq, payload]`` for every buffered batch from ``start_seq`` on;
- the end ``[b"", b"", seq -1 (8-byte signed big-endian), b""]``.

Malformed messages are counted (``counters["malformed"]``) and skipped; nothing an engine sends
can end a task. Socket errors close the socket and reconnect after a back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import zmq
import zmq.asyncio

from shoal.kv_events import decode_frames
from shoal.router.kv_index import KvEventIndex

log = logging.getLogger(__name__)

_SEQ = struct.Struct(">Q")
REPLAY_END_SEQ = struct.pack(">q", -1)

# Called as on_gap(endpoint_url, first_missing_seq, seq_received) for each gap seen.
GapHook = Callable[[str, int, int], None]


@dataclass(frozen=True, slots=True)
class _Source:
    events_endpoint: str
    replay_endpoint: str | None


class KvEventSubscriber:
    """Subscribes to many engines' KV events; ``add``/``remove`` as discovery sees them come and go.

    Must be used from a running event loop. ``counters`` holds received, malformed, gaps, replays,
    replayed_batches, replay_failures, socket_errors and errors, summed over endpoints.
    """

    def __init__(
        self,
        index: KvEventIndex,
        *,
        on_gap: GapHook | None = None,
        context: zmq.asyncio.Context | None = None,
        topic: str = "",
        replay_timeout_s: float = 5.0,
        reconnect_backoff_s: float = 1.0,
        rcvhwm: int = 100_000,
    ) -> None:
        self.index = index
        self._on_gap = on_gap
        self._own_context = context is None
        self._ctx = context if context is not None else zmq.asyncio.Context()
        self._topic = topic.encode("utf-8")
        self._replay_timeout_s = replay_timeout_s
        self._backoff_s = reconnect_backoff_s
        self._rcvhwm = rcvhwm
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._sources: dict[str, _Source] = {}
        self.counters: Counter[str] = Counter()
        self._closed = False

    @property
    def endpoints(self) -> list[str]:
        return list(self._tasks)

    def add(self, url: str, events_endpoint: str, replay_endpoint: str | None = None) -> None:
        """Start following an engine (idempotent; a changed address restarts its task)."""
        if self._closed:
            raise RuntimeError("subscriber is closed")
        source = _Source(events_endpoint, replay_endpoint)
        if self._sources.get(url) == source and url in self._tasks:
            return
        self.remove(url)
        self._sources[url] = source
        self._tasks[url] = asyncio.get_running_loop().create_task(
            self._follow(url, source), name=f"kv-events {url}"
        )

    def remove(self, url: str) -> None:
        """Stop following an engine and forget its blocks (it left the fleet)."""
        task = self._tasks.pop(url, None)
        self._sources.pop(url, None)
        if task is not None:
            # Cancelled at its next await: it applies nothing more.
            task.cancel()
        self.index.remove_endpoint(url)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._sources.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._own_context:
            self._ctx.term()

    # ------------------------------------------------------------------------------------ tasks

    async def _follow(self, url: str, source: _Source) -> None:
        while True:
            sub = self._ctx.socket(zmq.SUB)
            try:
                sub.setsockopt(zmq.LINGER, 0)
                sub.setsockopt(zmq.RCVHWM, self._rcvhwm)
                sub.setsockopt(zmq.RECONNECT_IVL, 100)
                sub.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
                sub.setsockopt(zmq.SUBSCRIBE, self._topic)
                sub.connect(source.events_endpoint)
                while True:
                    frames = await sub.recv_multipart()
                    await self._handle(url, source, frames)
            except zmq.ZMQError as exc:
                self.counters["socket_errors"] += 1
                log.warning("KV events from %s: %s; reconnecting", url, exc)
            finally:
                sub.close(linger=0)
            await asyncio.sleep(self._backoff_s)

    async def _handle(self, url: str, source: _Source, frames: Sequence[bytes]) -> None:
        try:
            _topic, seq, batch = decode_frames(frames)
        except ValueError as exc:
            self.counters["malformed"] += 1
            log.debug("malformed KV event message from %s: %s", url, exc)
            return
        self.counters["received"] += 1
        try:
            missing = self.index.apply(url, seq, batch)
            if missing is None:
                return
            self.counters["gaps"] += 1
            if self._on_gap is not None:
                self._on_gap(url, missing, seq)
            if source.replay_endpoint is not None:
                await self._replay(url, source.replay_endpoint, missing)
            # Now either a duplicate of what the replay delivered, or a loss we have to accept.
            self.index.apply(url, seq, batch, accept_gap=True)
        except Exception:
            # A bug in applying one batch must not stop the feed for this engine.
            self.counters["errors"] += 1
            log.exception("applying KV events from %s failed", url)

    async def _replay(self, url: str, replay_endpoint: str, start: int) -> bool:
        """Fetch and apply buffered batches from ``start`` on; False if it did not finish."""
        self.counters["replays"] += 1
        dealer = self._ctx.socket(zmq.DEALER)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._replay_timeout_s
        try:
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.RCVHWM, 0)  # a replay is bounded by the engine's buffer
            dealer.connect(replay_endpoint)
            await dealer.send_multipart([b"", _SEQ.pack(start)])
            while True:
                remaining_ms = (deadline - loop.time()) * 1000
                # poll() waits for POLLIN by default.
                if remaining_ms <= 0 or not await dealer.poll(remaining_ms):
                    self.counters["replay_failures"] += 1
                    log.warning("KV event replay from %s timed out", url)
                    return False
                frames = await dealer.recv_multipart()
                body = frames[1:] if frames and frames[0] == b"" else frames
                if len(body) == 3 and body[1] == REPLAY_END_SEQ:
                    self.index.replay_finished(url)
                    return True
                try:
                    _topic, seq, batch = decode_frames(body)
                except ValueError:
                    self.counters["malformed"] += 1
                    continue
                self.counters["replayed_batches"] += 1
                self.index.apply(url, seq, batch, replay=True)
        except zmq.ZMQError as exc:
            self.counters["replay_failures"] += 1
            log.warning("KV event replay from %s failed: %s", url, exc)
            return False
        finally:
            dealer.close(linger=0)
