"""Real-time engine simulator under load: how many concurrent streams one `shoal sim` keeps up with.

Acceptance line: one `shoal sim` process keeps up with real time at >= 500 concurrent streaming
requests. This starts one server pinned to CPU 0 (``taskset -c 0``), pins this load generator to
CPU 1, and for each concurrency N keeps N streaming completions in flight (closed loop: a stream
that ends is replaced at once; fixed prompt and output lengths, ``ignore_eos``). Per N it reports:

* the output-token rate the server produced (``generation_tokens`` from ``GET /admin/state``) and
  the one the client received;
* TTFT, TPOT and inter-chunk gap percentiles as the client saw them;
* the simulator's drift: ``(actual - modelled) / modelled`` step time over the window (the
  driver's ``DriftStats``, read from ``GET /admin/state`` at the window's start and end). A step
  whose Python work plus streaming takes longer than the modelled GPU step ends late; positive
  drift means the simulated GPU runs slower than the model says;
* the CPU share the server and the client used.

The client is raw asyncio streams (HTTP/1.1, ``Connection: close``) on uvloop when available,
counting tokens in the SSE bytes without JSON parsing, so that it is not the bottleneck.

    python bench/sim_realtime.py [--levels 100,250,500,750,1000] [--warmup-s 5] [--window-s 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from report import REPO, command_line, machine_facts, update_section

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
DRIFT_BOUND = 0.10


@dataclass
class RequestRecord:
    sent: float
    first: float = -1.0
    last: float = -1.0
    tokens: int = 0
    completion_tokens: int = -1
    gaps: list[float] = field(default_factory=list)


@dataclass
class Level:
    concurrency: int
    window_s: float
    server_tok_s: float
    client_tok_s: float
    drift: float
    drift_steps: int
    modelled_step_ms: float
    actual_step_ms: float
    server_cpu: float
    # Share of the server's CPU that other processes took during the window (shared machine).
    other_cpu: float
    client_cpu: float
    completed: int
    ttft_ms: tuple[float, float]
    tpot_ms: tuple[float, float]
    gap_ms: tuple[float, float]
    tokens_per_chunk: float
    errors: int


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_busy_s(cpu: int) -> float:
    """Busy (non-idle) seconds of one CPU, all processes together (Linux /proc/stat)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(parts[11]) + int(parts[12])) / ticks


async def _get_json(port: int, path: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read(-1)
    writer.close()
    body = data.split(b"\r\n\r\n", 1)[1]
    result: dict[str, Any] = json.loads(body)
    return result


class LoadGenerator:
    def __init__(self, port: int, prompt_tokens: int, output_tokens: int, seed: int) -> None:
        self.port = port
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.rng = random.Random(seed)
        self.records: list[RequestRecord] = []
        self.errors = 0
        self.tokens_received = 0

    def _request_bytes(self) -> bytes:
        # Distinct prompts, so prefix caching does not turn prefills into no-ops.
        ids = [self.rng.randrange(4, 60000) for _ in range(self.prompt_tokens)]
        body = json.dumps(
            {
                "model": MODEL,
                "prompt": ids,
                "max_tokens": self.output_tokens,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            separators=(",", ":"),
        ).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n"
        ).encode()
        return head + body

    async def one(self) -> None:
        loop = asyncio.get_running_loop()
        rec = RequestRecord(sent=loop.time())
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            self.errors += 1
            await asyncio.sleep(0.1)
            return
        try:
            writer.write(self._request_bytes())
            tail = b""
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                now = loop.time()
                buf = tail + data
                # Each generated token is one " w<id>" word in a chunk's text (the simulator's
                # tokenizer); a read may hold several chunks, a chunk several merged tokens.
                n = buf.count(b" w") - tail.count(b" w")
                if n > 0:
                    if rec.first < 0:
                        rec.first = now
                    else:
                        rec.gaps.append(now - rec.last)
                    rec.last = now
                    rec.tokens += n
                    self.tokens_received += n
                tail = buf[-256:]
            i = tail.find(b'"completion_tokens":')
            if i >= 0:
                j = i + len(b'"completion_tokens":')
                k = j
                while k < len(tail) and tail[k : k + 1].isdigit():
                    k += 1
                rec.completion_tokens = int(tail[j:k])
            else:
                self.errors += 1
        except OSError:
            self.errors += 1
        finally:
            writer.close()
        self.records.append(rec)

    async def worker(self, stop: asyncio.Event, delay: float) -> None:
        await asyncio.sleep(delay)
        while not stop.is_set():
            await self.one()


async def run_level(port: int, server_pid: int, n: int, args: argparse.Namespace) -> Level:
    loop = asyncio.get_running_loop()
    gen = LoadGenerator(port, args.prompt_tokens, args.output_tokens, seed=n)
    stop = asyncio.Event()
    # Stagger the first requests over a second so that the ramp is not one giant prefill.
    tasks = [asyncio.create_task(gen.worker(stop, i / n)) for i in range(n)]
    await asyncio.sleep(args.warmup_s)
    s0 = await _get_json(port, "/admin/state")
    c0_srv = _proc_cpu_s(server_pid)
    b0 = _cpu_busy_s(args.server_cpu)
    c0_cli = time.process_time()
    tok0 = gen.tokens_received
    w0 = loop.time()
    await asyncio.sleep(args.window_s)
    w1 = loop.time()
    tok1 = gen.tokens_received
    c1_srv = _proc_cpu_s(server_pid)
    b1 = _cpu_busy_s(args.server_cpu)
    c1_cli = time.process_time()
    s1 = await _get_json(port, "/admin/state")
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # Let the server notice the closed streams and abort their requests before the next level.
    for _ in range(100):
        st = await _get_json(port, "/admin/state")
        if st["engine"]["num_running"] == 0 and st["engine"]["num_waiting"] == 0:
            break
        await asyncio.sleep(0.1)

    wall = w1 - w0
    d0, d1 = s0["drift"], s1["drift"]
    modelled = d1["modelled_s"] - d0["modelled_s"]
    actual = d1["actual_s"] - d0["actual_s"]
    steps = d1["steps"] - d0["steps"]
    # Requests that completed inside the window (at high N a request outlives a short window).
    in_window = [r for r in gen.records if w0 <= r.last < w1 and r.completion_tokens > 0]
    ttft = [(r.first - r.sent) * 1e3 for r in in_window if r.first >= 0]
    tpot = [
        (r.last - r.first) * 1e3 / (r.completion_tokens - 1)
        for r in in_window
        if r.completion_tokens > 1 and r.first >= 0
    ]
    gaps = [g * 1e3 for r in in_window for g in r.gaps]
    chunks = sum(len(r.gaps) + 1 for r in in_window if r.first >= 0)
    toks = sum(r.tokens for r in in_window)
    mismatched = sum(1 for r in in_window if r.tokens != r.completion_tokens)
    return Level(
        concurrency=n,
        window_s=wall,
        server_tok_s=(s1["engine"]["generation_tokens"] - s0["engine"]["generation_tokens"]) / wall,
        client_tok_s=(tok1 - tok0) / wall,
        drift=(actual - modelled) / modelled if modelled > 0 else 0.0,
        drift_steps=steps,
        modelled_step_ms=modelled / steps * 1e3 if steps else 0.0,
        actual_step_ms=actual / steps * 1e3 if steps else 0.0,
        server_cpu=(c1_srv - c0_srv) / wall,
        other_cpu=max(0.0, (b1 - b0) - (c1_srv - c0_srv)) / wall,
        client_cpu=(c1_cli - c0_cli) / wall,
        completed=len(in_window),
        ttft_ms=(_pct(ttft, 0.5), _pct(ttft, 0.99)),
        tpot_ms=(_pct(tpot, 0.5), _pct(tpot, 0.99)),
        gap_ms=(_pct(gaps, 0.5), _pct(gaps, 0.99)),
        tokens_per_chunk=toks / chunks if chunks else 0.0,
        errors=gen.errors + mismatched,
    )


def start_server(port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    shoal = REPO / ".venv" / "bin" / "shoal"
    exe = [str(shoal)] if shoal.exists() else [sys.executable, "-m", "shoal.cli"]
    cmd = [
        *exe,
        "--log-level",
        "WARNING",
        "sim",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        MODEL,
        "--gpu",
        args.gpu,
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--event-loop",
        args.event_loop,
    ]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", str(args.server_cpu), *cmd]
    # Not from the repository root: a top-level `operator/` folder there shadows the stdlib.
    return subprocess.Popen(cmd, cwd="/tmp", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def wait_ready(port: int, proc: subprocess.Popen[bytes], wait_s: float = 30.0) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {err[-2000:]}")
        try:
            await _get_json(port, "/admin/state")
            return
        except (OSError, IndexError, ValueError):
            await asyncio.sleep(0.2)
    raise RuntimeError("server did not become ready")


async def main_async(args: argparse.Namespace) -> list[Level]:
    port = _free_port()
    proc = start_server(port, args)
    levels: list[Level] = []
    try:
        await wait_ready(port, proc)
        for n in args.levels:
            lvl = await run_level(port, proc.pid, n, args)
            levels.append(lvl)
            print(
                f"N={n:5d}: server {lvl.server_tok_s:8.0f} tok/s, client {lvl.client_tok_s:8.0f} "
                f"tok/s, drift {lvl.drift:+.1%} over {lvl.drift_steps} steps "
                f"(modelled {lvl.modelled_step_ms:.1f} ms, actual {lvl.actual_step_ms:.1f} ms), "
                f"server CPU {lvl.server_cpu:.0%} (others {lvl.other_cpu:.0%}), "
                f"client CPU {lvl.client_cpu:.0%}, "
                f"TTFT p50/p99 {lvl.ttft_ms[0]:.0f}/{lvl.ttft_ms[1]:.0f} ms, "
                f"TPOT p50/p99 {lvl.tpot_ms[0]:.1f}/{lvl.tpot_ms[1]:.1f} ms, "
                f"tokens/chunk {lvl.tokens_per_chunk:.2f}, errors {lvl.errors}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return levels


def render(levels: list[Level], args: argparse.Namespace, facts: str) -> str:
    ok = [lv for lv in levels if lv.drift < DRIFT_BOUND and lv.errors == 0]
    best = max(ok, key=lambda lv: lv.concurrency) if ok else None
    lines = [
        "## Real-time engine simulator under load (`bench/sim_realtime.py`)",
        "",
        f"- Command: `{command_line()}`",
        f"- Machine: {facts}. Server pinned to CPU {args.server_cpu} "
        f"(`taskset -c {args.server_cpu}`), load generator to CPU {args.client_cpu}.",
        f"- Server: one `shoal sim` process, {MODEL} on 1x {args.gpu}, "
        f"`--max-num-seqs {args.max_num_seqs}`, default batching (8192 tokens per step).",
        f"- Load: N concurrent streaming `/v1/completions` (closed loop), {args.prompt_tokens} "
        f"random prompt tokens, {args.output_tokens} output tokens (`ignore_eos`); "
        f"{args.warmup_s:g} s warm-up, then a {args.window_s:g} s measurement window per N.",
        "- Drift: `(actual - modelled) / modelled` step time over the window, from the driver's "
        "`DriftStats` via `GET /admin/state`. Client latencies are over requests that completed "
        f"in the window. Server event loop: `--event-loop {args.event_loop}`; server GC: start-up "
        "objects frozen, young-generation threshold 20,000 (`sim/serve.py`).",
        "",
        "| N | server out tok/s | client tok/s | drift | modelled / actual step | server CPU | "
        "others on its CPU | client CPU | TTFT p50 / p99 | TPOT p50 / p99 | chunk gap p50 / p99 | "
        "tok/chunk | reqs | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for lv in levels:
        lines.append(
            f"| {lv.concurrency} | {lv.server_tok_s:,.0f} | {lv.client_tok_s:,.0f} | "
            f"{lv.drift:+.1%} | {lv.modelled_step_ms:.1f} / {lv.actual_step_ms:.1f} ms | "
            f"{lv.server_cpu:.0%} | {lv.other_cpu:.0%} | {lv.client_cpu:.0%} | "
            f"{lv.ttft_ms[0]:.0f} / {lv.ttft_ms[1]:.0f} ms | "
            f"{lv.tpot_ms[0]:.1f} / {lv.tpot_ms[1]:.1f} ms | "
            f"{lv.gap_ms[0]:.1f} / {lv.gap_ms[1]:.1f} ms | {lv.tokens_per_chunk:.2f} | "
            f"{lv.completed} | {lv.errors} |"
        )
    lines.append("")
    if best is not None:
        lines.append(
            f"Largest concurrency within {DRIFT_BOUND:.0%} drift: **N = {best.concurrency}**, "
            f"{best.server_tok_s:,.0f} output tok/s on one core, drift {best.drift:+.1%}."
        )
    else:
        lines.append(f"No tested concurrency stayed within {DRIFT_BOUND:.0%} drift.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--levels",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[100, 250, 500, 750, 1000],
    )
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--window-s", type=float, default=15.0)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--gpu", default="H100")
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    facts = machine_facts()  # before pinning, so that it reports every core
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.client_cpu})
    try:
        import uvloop

        levels = uvloop.run(main_async(args))
    except ImportError:
        levels = asyncio.run(main_async(args))
    body = render(levels, args, facts)
    print(body)
    if not args.no_write:
        update_section("sim_realtime", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
