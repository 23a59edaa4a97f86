"""A light open-loop load generator: raw asyncio HTTP/1.1 with keep-alive, no HTTP library.

The load generator shares a small machine with the engines and the router it measures, so every
microsecond it spends per request is taken from the system under test. A plain stream reader
with a connection pool costs a fraction of what a full HTTP client does per request, and the
measured latencies (TTFT at the first token-bearing SSE event) are taken as bytes arrive.

Open loop: every request is started at its scheduled offset whether or not earlier ones have
finished; a slow server sees a growing number of concurrent requests, as it would in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from shoal.bench.workloads import BenchRequest


@dataclass(slots=True)
class RequestResult:
    """What one request did. Times are seconds; ``start_s`` is relative to the run's start."""

    index: int
    start_s: float
    status: int = 0  # HTTP status; 0 when the request failed before a status line arrived
    error: str = ""
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    endpoint: str = ""  # the router's x-shoal-endpoint header, when present
    group: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(slots=True)
class RunResult:
    results: list[RequestResult]
    duration_s: float  # from the first send to the last completion
    # How late the dispatcher started requests behind schedule (p99, seconds): a large value
    # means the load generator itself could not keep up and the offered rate was not achieved.
    dispatch_lag_p99_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class HttpError(Exception):
    pass


class HttpPool:
    """Keep-alive HTTP/1.1 connections to one host; unbounded growth up to ``max_connections``."""

    def __init__(self, url: str, max_connections: int = 4096, timeout_s: float = 600.0) -> None:
        u = urlsplit(url)
        if u.scheme != "http":
            raise ValueError(f"only http:// URLs are supported, got {url!r}")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.base_path = u.path.rstrip("/")
        self.timeout_s = timeout_s
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def _connect(self) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        return _Conn(reader, writer)

    async def close(self) -> None:
        for c in self._idle:
            c.close()
        self._idle.clear()

    async def request(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: Sequence[tuple[str, str]],
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request; body chunks go to ``on_chunk`` as they arrive (else returned)."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._connect()
            reuse = False
            try:
                status, hdrs, data, reuse = await asyncio.wait_for(
                    self._exchange(conn, method, path, body, headers, on_chunk), self.timeout_s
                )
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                # A kept-alive connection the server closed meanwhile: retry once on a fresh one,
                # but only if nothing was received (so the request cannot have been processed).
                conn.close()
                if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                    raise
                conn = await self._connect()
                status, hdrs, data, reuse = await asyncio.wait_for(
                    self._exchange(conn, method, path, body, headers, on_chunk), self.timeout_s
                )
            finally:
                if reuse:
                    self._idle.append(conn)
                else:
                    conn.close()
            return status, hdrs, data

    async def _exchange(
        self,
        conn: _Conn,
        method: str,
        path: str,
        body: bytes,
        headers: Sequence[tuple[str, str]],
        on_chunk: Callable[[bytes], None] | None,
    ) -> tuple[int, dict[str, str], bytes, bool]:
        head = [f"{method} {self.base_path}{path} HTTP/1.1", f"host: {self.host}:{self.port}"]
        head += [f"{k}: {v}" for k, v in headers]
        head.append(f"content-length: {len(body)}")
        conn.writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await conn.writer.drain()
        r = conn.reader
        status_line = await r.readuntil(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HttpError(f"bad status line {status_line[:80]!r}")
        status = int(parts[1])
        hdrs: dict[str, str] = {}
        while True:
            line = await r.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            k, _, v = line.decode("latin-1").partition(":")
            hdrs[k.strip().lower()] = v.strip()
        keep = hdrs.get("connection", "").lower() != "close"
        chunks: list[bytes] = []
        emit = on_chunk if on_chunk is not None else chunks.append
        if hdrs.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await r.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0], 16)
                if size == 0:
                    # Trailers (none in practice) end with an empty line.
                    while await r.readuntil(b"\r\n") != b"\r\n":
                        pass
                    break
                data = await r.readexactly(size + 2)
                emit(data[:-2])
        elif "content-length" in hdrs:
            n = int(hdrs["content-length"])
            if n:
                emit(await r.readexactly(n))
        else:
            emit(await r.read())
            keep = False
        return status, hdrs, b"".join(chunks), keep


class _StreamMeter:
    """Finds the first token-bearing SSE event and the usage record without parsing every event."""

    __slots__ = ("buf", "done", "first_token_at", "output_tokens", "prompt_tokens", "t0")

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.first_token_at: float | None = None
        self.output_tokens = 0
        self.prompt_tokens = 0
        self.buf = b""
        self.done = False

    def feed(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buf += data
        while True:
            i = self.buf.find(b"\n\n")
            if i < 0:
                return
            event, self.buf = self.buf[:i], self.buf[i + 2 :]
            self._event(event, now)

    def _event(self, event: bytes, now: float) -> None:
        if not event.startswith(b"data: "):
            return
        payload = event[6:]
        if payload == b"[DONE]":
            self.done = True
            return
        if self.first_token_at is None:
            # Only events before the first token are parsed: a chat stream opens with an
            # empty role-only delta that must not count as the first token.
            try:
                obj = json.loads(payload)
            except ValueError:
                return
            for ch in obj.get("choices") or ():
                text = ch.get("text")
                if text is None:
                    text = (ch.get("delta") or {}).get("content")
                if text:
                    self.first_token_at = now
                    break
            self._usage(obj)
        elif b'"usage"' in payload and b'"choices":[]' in payload:
            with contextlib.suppress(ValueError):
                self._usage(json.loads(payload))

    def _usage(self, obj: dict[str, Any]) -> None:
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.output_tokens = int(usage.get("completion_tokens") or 0)
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)


def request_body(req: BenchRequest, model: str, stream: bool) -> tuple[str, bytes]:
    """(path, JSON body) of one request; ``ignore_eos`` + ``max_tokens`` fix the output length."""
    body: dict[str, Any] = {
        "model": req.model or model,
        "max_tokens": req.output_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if req.is_chat:
        body["messages"] = [{"role": r, "content": c} for r, c in req.messages]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = req.prompt
        path = "/v1/completions"
    return path, json.dumps(body, separators=(",", ":")).encode()


async def send_one(
    pool: HttpPool,
    index: int,
    req: BenchRequest,
    model: str,
    t_run0: float,
    extra_headers: Sequence[tuple[str, str]] = (),
    stream: bool = True,
) -> RequestResult:
    path, body = request_body(req, model, stream)
    headers = [("content-type", "application/json"), *extra_headers, *req.headers]
    t0 = time.perf_counter()
    res = RequestResult(index=index, start_s=t0 - t_run0, group=req.group)
    meter = _StreamMeter(t0)
    try:
        status, hdrs, data = await pool.request(
            "POST", path, body, headers, meter.feed if stream else None
        )
    except (OSError, asyncio.IncompleteReadError, HttpError, ValueError) as exc:
        res.error = type(exc).__name__
        return res
    except TimeoutError:
        res.error = "Timeout"
        return res
    end = time.perf_counter()
    res.status = status
    res.endpoint = hdrs.get("x-shoal-endpoint", "")
    res.e2e_s = end - t0
    if status != 200:
        res.error = f"HTTP {status}"
        return res
    if stream:
        if meter.buf.strip():
            meter.feed(b"\n\n")
        res.ttft_s = (meter.first_token_at or end) - t0
        res.output_tokens = meter.output_tokens
        res.prompt_tokens = meter.prompt_tokens
    else:
        # Without streaming the whole answer is the first token's arrival too.
        res.ttft_s = res.e2e_s
        with contextlib.suppress(ValueError, AttributeError):
            usage = json.loads(data).get("usage") or {}
            res.output_tokens = int(usage.get("completion_tokens") or 0)
            res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    return res


class Progress:
    """One status line on stderr, redrawn in place on a terminal, every few seconds otherwise."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total = total
        self.sent = 0
        self.done = 0
        self.errors = 0
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._t0 = time.perf_counter()

    def line(self) -> str:
        el = time.perf_counter() - self._t0
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        rate = self.done / el if el > 0 else 0.0
        return (
            f"[{bar}] {self.done}/{self.total} done, {self.sent - self.done} in flight, "
            f"{self.errors} errors, {rate:.1f} req/s, {el:.0f}s"
        )

    async def run(self, stop: asyncio.Event) -> None:
        if not self.enabled:
            return
        period = 0.5 if self.tty else 5.0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period)
            self.draw()
        if self.tty:
            sys.stderr.write("\n")

    def draw(self) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + self.line())
        else:
            sys.stderr.write(self.line() + "\n")
        sys.stderr.flush()


@contextlib.contextmanager
def gc_frozen() -> Iterator[None]:
    """Collect once, then move every object to the permanent generation until the block ends.

    A full collection walks every live object: in this process (the workload, earlier runs'
    results, imported modules) one took 11–22 ms in a router-overhead run (measured with
    ``gc.callbacks``), stalling every request in flight, so it landed on whichever router was
    being measured. Frozen objects are not walked; collections during the run see only what the
    run allocates.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def run_open_loop(
    url: str | Sequence[str],
    requests: Sequence[BenchRequest],
    *,
    model: str,
    headers: Sequence[tuple[str, str]] = (),
    stream: bool = True,
    max_connections: int = 4096,
    timeout_s: float = 600.0,
    progress: bool = True,
    on_result: Callable[[RequestResult], None] | None = None,
) -> RunResult:
    """Send ``requests`` at their arrival offsets (open loop) and collect per-request results.

    With several URLs, request ``i`` goes to ``urls[i % len(urls)]`` (calling engines directly,
    round-robin, as the baseline that router overhead is measured against).
    """
    urls = [url] if isinstance(url, str) else list(url)
    pools = [HttpPool(u, max_connections=max_connections, timeout_s=timeout_s) for u in urls]
    bar = Progress(len(requests), enabled=progress)
    stop = asyncio.Event()
    bar_task = asyncio.create_task(bar.run(stop))
    results: list[RequestResult] = []
    lags: list[float] = []
    tasks: set[asyncio.Task[RequestResult]] = set()

    def finished(task: asyncio.Task[RequestResult]) -> None:
        tasks.discard(task)
        if task.cancelled():
            return
        r = task.result()
        results.append(r)
        bar.done += 1
        if not r.ok:
            bar.errors += 1
        if on_result is not None:
            on_result(r)

    loop = asyncio.get_running_loop()
    try:
        with gc_frozen():
            t0 = time.perf_counter()  # after the collection, which would make the first ones late
            for i, req in enumerate(requests):
                delay = t0 + req.arrival_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                lags.append(max(0.0, -delay))
                pool = pools[i % len(pools)]
                task = loop.create_task(send_one(pool, i, req, model, t0, headers, stream))
                task.add_done_callback(finished)
                tasks.add(task)
                bar.sent += 1
            if tasks:
                await asyncio.wait(set(tasks))
    finally:
        for task in tasks:
            task.cancel()
        stop.set()
        await bar_task
        for p in pools:
            await p.close()
    end = max(
        (r.start_s + (r.e2e_s or 0.0) for r in results),
        default=0.0,
    )
    lags.sort()
    lag_p99 = lags[min(len(lags) - 1, int(0.99 * len(lags)))] if lags else 0.0
    results.sort(key=lambda r: r.index)
    return RunResult(results=results, duration_s=end, dispatch_lag_p99_s=lag_p99)


async def get_json(url: str, path: str, timeout_s: float = 10.0) -> Any:
    """GET a JSON document (for ``/v1/models``) with the same light client."""
    pool = HttpPool(url, max_connections=1, timeout_s=timeout_s)
    try:
        status, _, data = await pool.request("GET", path, b"", [])
    finally:
        await pool.close()
    if status != 200:
        raise HttpError(f"GET {path}: HTTP {status}")
    return json.loads(data)


async def get_text(url: str, path: str, timeout_s: float = 10.0) -> str:
    pool = HttpPool(url, max_connections=1, timeout_s=timeout_s)
    try:
        status, _, data = await pool.request("GET", path, b"", [])
    finally:
        await pool.close()
    if status != 200:
        raise HttpError(f"GET {path}: HTTP {status}")
    return data.decode()
