"""State shared by router replicas through Redis: prefix history and in-flight counts.

Without it each replica learns prefix affinity from its own decisions only, and with N replicas
behind a load balancer a prefix group's requests are spread over up to N engines. With it:

- **Prefix history** is a Redis stream (``<prefix>prefix``): every decision is appended (replica
  id, endpoint URL, packed block hashes), and every replica tails the stream into its local
  :class:`ApproxPrefixIndex`. Bounded on the Redis side by ``MAXLEN ~ max_stream_len`` and by a
  key expiry renewed on every write (an idle fleet's history goes away after the TTL); entries
  older than the TTL are skipped when read (the stream id is a timestamp). A replica that starts
  late reads the stream's tail first, so it inherits the fleet's history.
- **In-flight counts**: each replica writes its per-endpoint in-flight map to its own hash key
  every ``sync_interval_s`` with a short expiry, and registers in a sorted set by time. Others sum
  the live replicas' maps. A replica that dies stops refreshing its key and its counts expire
  with it: no leaked increments, which plain INCR/DECR would leave behind after a crash.

Nothing here is on the request path: decisions are read from the local index (always current
with what has arrived), and writes go to a bounded queue drained by a background task. When
Redis is unreachable the replica keeps routing on local state, logs it once, reports
``up == False`` (``shoal_router_shared_state_up 0``), and reconnects with back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from shoal.router.engine_state import EngineStateStore
from shoal.router.prefix_index import ApproxPrefixIndex

log = logging.getLogger(__name__)

# Prompts share their leading blocks; a longer tail adds bytes to Redis and little affinity.
MAX_SHARED_BLOCKS = 512


class SharedState:
    def __init__(
        self,
        url: str,
        index: ApproxPrefixIndex,
        store: EngineStateStore,
        *,
        replica_id: str | None = None,
        key_prefix: str = "shoal:router:",
        timeout_s: float = 0.1,
        ttl_s: float = 600.0,
        max_stream_len: int = 100_000,
        warm_entries: int = 10_000,
        sync_interval_s: float = 0.2,
        max_pending: int = 10_000,
        block_ms: int = 500,
        reconnect_backoff_s: float = 0.5,
    ) -> None:
        self.url = url
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self._index = index
        self._store = store
        self._stream = key_prefix + "prefix"
        self._replicas = key_prefix + "replicas"
        self._inflight_prefix = key_prefix + "inflight:"
        self._ttl_ms = int(ttl_s * 1000)
        self._max_stream_len = max_stream_len
        self._warm_entries = warm_entries
        self._sync_s = sync_interval_s
        self._block_ms = block_ms
        self._backoff_s = reconnect_backoff_s
        self._pending: deque[tuple[str, bytes]] = deque(maxlen=max_pending)
        self._wake = asyncio.Event()
        # Fail fast: a command that cannot reach Redis must not hold anything up; the tasks
        # retry on their own schedule.
        no_retry = Retry(NoBackoff(), 0)
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=no_retry
        )
        self._reader_redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s + block_ms / 1000.0,
            socket_connect_timeout=timeout_s,
            retry=no_retry,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._task_up: dict[str, bool] = {"writer": False, "reader": False, "sync": False}
        self.up = False
        self.dropped = 0  # records dropped because the pending queue was full
        self.applied = 0  # remote records applied to the local index

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._loop("writer", self._write_pending), name="shared writer"),
            loop.create_task(self._loop("reader", self._read_stream), name="shared reader"),
            loop.create_task(self._loop("sync", self._sync_in_flight), name="shared sync"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for client in (self._redis, self._reader_redis):
            with contextlib.suppress(Exception):
                await client.aclose()

    # ------------------------------------------------------------------------------ hot path

    def record(self, block_hashes: Sequence[int], endpoint_url: str) -> None:
        """Queue a decision for the other replicas. Never awaits; drops the oldest when full."""
        if not block_hashes:
            return
        hashes = block_hashes[:MAX_SHARED_BLOCKS]
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1
        self._pending.append((endpoint_url, struct.pack(f"<{len(hashes)}Q", *hashes)))
        self._wake.set()

    # ------------------------------------------------------------------------------- tasks

    def _mark(self, task: str, up: bool, exc: BaseException | None = None) -> None:
        self._task_up[task] = up
        now_up = all(self._task_up.values())
        if now_up != self.up:
            self.up = now_up
            if now_up:
                log.info("shared state: connected to Redis at %s", self.url)
            else:
                log.warning(
                    "shared state: Redis at %s unreachable (%r); serving on local state",
                    self.url,
                    exc,
                )

    async def _loop(self, name: str, step: Any) -> None:
        while True:
            try:
                await step(name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._mark(name, False, exc)
                await asyncio.sleep(self._backoff_s)

    async def _write_pending(self, name: str) -> None:
        await self._redis.ping()
        self._mark(name, True)
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            batch = [self._pending.popleft() for _ in range(min(256, len(self._pending)))]
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for url, packed in batch:
                        pipe.xadd(
                            self._stream,
                            {"r": self.replica_id, "u": url, "h": packed},
                            maxlen=self._max_stream_len,
                            approximate=True,
                        )
                    pipe.pexpire(self._stream, self._ttl_ms)
                    await pipe.execute()
            except Exception:
                # Put them back (oldest first) so a blip loses nothing but what overflows.
                self._pending.extendleft(reversed(batch))
                raise
            self._mark(name, True)

    def _apply(self, entry_id: bytes, fields: dict[bytes, bytes], cutoff_ms: int) -> None:
        if fields.get(b"r", b"").decode() == self.replica_id:
            return  # our own decision, already in the local index
        if int(entry_id.split(b"-", 1)[0]) < cutoff_ms:
            return
        url = fields.get(b"u", b"").decode()
        packed = fields.get(b"h", b"")
        if not url or not packed or len(packed) % 8 or self._store.get(url) is None:
            return
        hashes = struct.unpack(f"<{len(packed) // 8}Q", packed)
        self._index.record(hashes, url)
        self.applied += 1

    async def _read_stream(self, name: str) -> None:
        client = self._reader_redis
        # Warm up from the tail, oldest first, then follow new entries.
        tail: list[Any] = await client.xrevrange(self._stream, count=self._warm_entries) or []
        self._mark(name, True)
        cutoff = int(time.time() * 1000) - self._ttl_ms
        for entry_id, fields in reversed(tail):
            self._apply(entry_id, fields, cutoff)
        last: Any = tail[0][0] if tail else b"0-0"
        while True:
            reply: Any = await client.xread({self._stream: last}, count=1000, block=self._block_ms)
            self._mark(name, True)
            cutoff = int(time.time() * 1000) - self._ttl_ms
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    self._apply(entry_id, fields, cutoff)
                    last = entry_id

    async def _sync_in_flight(self, name: str) -> None:
        redis = self._redis
        ours = self._inflight_prefix + self.replica_id
        expiry_ms = max(1000, int(self._sync_s * 5000))
        while True:
            now_ms = int(time.time() * 1000)
            counts = {url: n for url, n in self._store.local_in_flight().items() if n > 0}
            async with redis.pipeline(transaction=True) as pipe:
                pipe.delete(ours)
                if counts:
                    pipe.hset(ours, mapping=counts)  # type: ignore[arg-type]
                    pipe.pexpire(ours, expiry_ms)
                pipe.zadd(self._replicas, {self.replica_id: now_ms})
                pipe.zremrangebyscore(self._replicas, 0, now_ms - expiry_ms)
                pipe.pexpire(self._replicas, expiry_ms * 10)
                pipe.zrange(self._replicas, 0, -1)
                results = await pipe.execute()
            others = [r.decode() for r in results[-1] if r.decode() != self.replica_id]
            remote: dict[str, int] = {}
            if others:
                async with redis.pipeline(transaction=False) as pipe:
                    for rid in others:
                        pipe.hgetall(self._inflight_prefix + rid)
                    maps = await pipe.execute()
                for m in maps:
                    for url, n in m.items():
                        key = url.decode()
                        remote[key] = remote.get(key, 0) + int(n)
            self._store.set_remote_in_flight(remote)
            self._mark(name, True)
            await asyncio.sleep(self._sync_s)

    async def forget(self) -> None:
        """Remove this replica's in-flight key at shutdown (best effort)."""
        with contextlib.suppress(Exception):
            await self._redis.delete(self._inflight_prefix + self.replica_id)
            await self._redis.zrem(self._replicas, self.replica_id)
