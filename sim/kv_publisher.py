"""KV cache event publisher: vLLM's ZMQ PUB stream plus its replay service.

A router subscribes to ``endpoint`` (ZMQ SUB) and receives one multipart message per engine step
that changed the prefix cache: ``[topic, seq (8-byte big-endian), payload]`` with the msgpack
payload of :func:`shoal.kv_events.encode_payload`. Sequence numbers start at 0 and have no gaps,
so a subscriber that sees a jump knows it missed batches and can ask the replay service
(``replay_endpoint``, ZMQ ROUTER) for everything from a given sequence number on:

- request (DEALER):  ``[b"", start_seq (8-byte big-endian)]``
- replies:           ``[b"", topic, seq, payload]`` for each buffered batch with ``seq >= start``,
- then the end mark: ``[b"", b"", (-1 as 8-byte signed big-endian), b""]``.

Threading model: no background thread. The engine step loop runs on the asyncio thread and ZMQ
sockets are not thread-safe, so every socket call happens on the caller's thread and none of them
waits: :meth:`KvEventPublisher.publish` sends with ``NOBLOCK`` (PUB drops for a slow subscriber
once its high-water mark is reached; we count what ZMQ refuses), and
:meth:`KvEventPublisher.poll_replay` answers only the replay requests already queued. The server
must call ``poll_replay()`` regularly, including while the engine is idle (for example from a task
that ticks every few tens of milliseconds); when nothing is pending it costs one failed
non-blocking receive.

Differences from vLLM that a subscriber cannot observe: vLLM hands batches to a publisher thread
through a queue of ``max_queue_size``; here the send is immediate, so ``max_queue_size`` is only
reported by :meth:`describe`. Like current vLLM, the PUB socket always binds (older vLLM connected
when the endpoint had an explicit host).
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

import zmq

from shoal.kv_events import EventBatch, encode_payload

_SEQ = struct.Struct(">Q")
# vLLM ends a replay with sequence number -1 packed as a signed 64-bit big-endian integer.
REPLAY_END_SEQ = struct.pack(">q", -1)


class KvEventPublisher:
    def __init__(
        self,
        endpoint: str = "tcp://*:5557",
        replay_endpoint: str | None = None,
        topic: str = "",
        buffer_steps: int = 10000,
        *,
        hwm: int = 100000,
        max_queue_size: int = 100000,
    ) -> None:
        if buffer_steps < 1:
            raise ValueError("buffer_steps must be at least 1")
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.buffer_steps = buffer_steps
        self.hwm = hwm
        self.max_queue_size = max_queue_size

        self._topic_bytes = topic.encode("utf-8")
        self._next_seq = 0
        # (seq frame, payload) of the last buffer_steps batches; frames are kept pre-encoded so a
        # replay costs only sends.
        self._buffer: deque[tuple[int, bytes, bytes]] = deque(maxlen=buffer_steps)
        self.published = 0
        self.dropped = 0
        self.replays_served = 0
        self.bad_replay_requests = 0
        self._closed = False

        # A private context: close() can terminate it without touching sockets other code owns.
        self._ctx = zmq.Context()
        self._pub: zmq.Socket[bytes] = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._replay: zmq.Socket[bytes] | None = None
        try:
            self._pub.bind(endpoint)
            if replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                # A ROUTER silently drops messages to a peer whose pipe is full. One replay can be
                # a whole buffer, so size the pipe to hold one complete answer (+ the end mark).
                self._replay.setsockopt(zmq.SNDHWM, buffer_steps + 1)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(replay_endpoint)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------------------------- endpoints

    @property
    def bound_endpoint(self) -> str:
        """The PUB address actually bound (resolves a ``*`` port to the one the OS picked)."""
        return str(self._pub.getsockopt_string(zmq.LAST_ENDPOINT))

    @property
    def bound_replay_endpoint(self) -> str | None:
        if self._replay is None:
            return None
        return str(self._replay.getsockopt_string(zmq.LAST_ENDPOINT))

    @property
    def next_seq(self) -> int:
        """Sequence number the next published batch will carry."""
        return self._next_seq

    def describe(self) -> dict[str, Any]:
        """The resolved config, shaped like one value of vLLM's ``GET /kv_event_sources``."""
        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": self.endpoint,
            "replay_endpoint": self.replay_endpoint,
            "buffer_steps": self.buffer_steps,
            "hwm": self.hwm,
            "max_queue_size": self.max_queue_size,
            "topic": self.topic,
        }

    # ----------------------------------------------------------------------------------- publish

    def publish(self, batch: EventBatch) -> int | None:
        """Send one step's events; returns the sequence number used, or None if nothing was sent.

        Never blocks. A batch without events is not published and consumes no sequence number,
        as in vLLM, which only publishes steps that changed the cache. After :meth:`close` this is
        a no-op so a shutting-down loop may still call it.
        """
        if self._closed or not batch.events:
            return None
        payload = encode_payload(batch)  # may raise ValueError; no sequence number consumed then
        seq = self._next_seq
        self._next_seq += 1
        seq_frame = _SEQ.pack(seq)
        self._buffer.append((seq, seq_frame, payload))
        try:
            self._pub.send_multipart([self._topic_bytes, seq_frame, payload], flags=zmq.NOBLOCK)
            self.published += 1
        except zmq.Again:
            # The batch stays in the replay buffer, so a subscriber that notices the gap recovers.
            self.dropped += 1
        return seq

    # ------------------------------------------------------------------------------------ replay

    def poll_replay(self, max_requests: int = 16) -> int:
        """Answer up to ``max_requests`` pending replay requests without waiting; returns how many.

        The cap bounds how long one call can hold the event loop when many clients ask at once.
        """
        if self._replay is None or self._closed:
            return 0
        served = 0
        while served < max_requests:
            try:
                frames = self._replay.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            # ROUTER prefixes the DEALER's identity: [identity, b"", start_seq].
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                self.bad_replay_requests += 1
                continue
            identity = frames[0]
            (start,) = _SEQ.unpack(frames[2])
            self._answer(identity, start)
            served += 1
        self.replays_served += served
        return served

    def _answer(self, identity: bytes, start: int) -> None:
        assert self._replay is not None
        try:
            for seq, seq_frame, payload in self._buffer:
                if seq >= start:
                    self._replay.send_multipart(
                        [identity, b"", self._topic_bytes, seq_frame, payload], flags=zmq.NOBLOCK
                    )
            self._replay.send_multipart(
                [identity, b"", b"", REPLAY_END_SEQ, b""], flags=zmq.NOBLOCK
            )
        except zmq.Again:
            # Only possible if the peer vanished mid-answer; it will ask again.
            pass

    # ------------------------------------------------------------------------------------- close

    def close(self) -> None:
        """Close both sockets and the private context (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> KvEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
