"""LoRA placement: TTFT and throughput of three ways to place 200 adapters on 8 engines.

8 simulated Llama-3.1-8B engines on H100 (``shoal sim``, LoRA on, ``--max-loras 8`` GPU slots,
``--max-cpu-loras 64`` host-memory slots), 200 rank-16 adapters, a Zipf-popular request mix
(s = 1.0: the most popular adapter gets ~17% of requests, the least ~0.09%), Poisson arrivals,
the Shoal router (``prefix`` preset, which includes the LoRA filter and LoRA-affinity scorer) in
front. Three placements, applied through the engines' ``/v1/load_lora_adapter`` and verified
through their ``/v1/models`` before any request is sent:

* ``everywhere``: every adapter on every engine (the router may pick any engine);
* ``shoal``: ``shoal.operator.lora_placement.place`` with replicas 2 and each adapter's request
  rate, so hot adapters get extra replicas (``rate_per_replica`` = total rate × ``--hot-share``);
* ``first-n``: the peers' placement, every adapter on the first N engines by name.

The simulator models the swap cost: a step that uses an adapter not in a GPU slot pays a copy
from host memory (``sim/perf.py``: 2 ms + size / 20 GB/s, ~6 ms for rank 16 on Llama-8B) or a
load from disk when it was evicted from host memory too (30 ms + size / 1.5 GB/s, ~86 ms), both
LRU (``sim/lora.py``); a batch mixes at most ``max_loras`` adapters, others wait
(``sim/engine.py``). The engines run on a slowed clock (``--time-scale``) so this machine can
drive them; figures are converted back to simulated time, as in ``router_quality.py``.

Writes the ``lora-placement`` section of docs/benchmarks.md.

    python bench/lora_placement.py                        # full run (3 placements x 2 repeats)
    python bench/lora_placement.py --duration-s 20 --repeats 1 --no-write
"""

# ruff: noqa: E501  (report prose and table rows read better unwrapped)
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleet
from report import command_line, machine_facts, update_section

from shoal.bench import workloads as wl
from shoal.bench.client import get_json, run_open_loop
from shoal.bench.peers import RouterUnderTest, router_process
from shoal.bench.report import Summary, summarize, to_simulated_time
from shoal.local import ManagedProcess, free_port
from shoal.operator.lora_placement import AdapterDemand, PodSlots, place

MODEL = "llama-8b"
PLACEMENTS = ("everywhere", "shoal", "first-n")
# engine name -> adapters it holds
Layout = dict[str, list[str]]


def layouts(
    kind: str, adapters: Sequence[str], shares: Sequence[float], args: argparse.Namespace
) -> tuple[Layout, dict[str, int]]:
    """The placement ``kind``: engine -> adapters, and replicas that found no room (shoal only)."""
    engines = [f"engine-{i}" for i in range(args.engines)]
    if kind == "everywhere":
        return {e: list(adapters) for e in engines}, {}
    if kind == "first-n":
        first = sorted(engines)[: args.first_n]
        return {e: (list(adapters) if e in first else []) for e in engines}, {}
    if kind == "shoal":
        rate = args.rate
        demands = [
            AdapterDemand(a, replicas=args.replicas, request_rate=share * rate)
            for a, share in zip(adapters, shares, strict=True)
        ]
        pods = [PodSlots(e, capacity=args.max_cpu_loras) for e in engines]
        placed = place(demands, pods, rate_per_replica=rate * args.hot_share)
        out: Layout = {e: [] for e in engines}
        for a, holders in placed.assignment.items():
            for e in holders:
                out[e].append(a)
        return out, dict(placed.unplaced)
    raise ValueError(f"unknown placement {kind!r}; valid: {', '.join(PLACEMENTS)}")


def start_engines(
    args: argparse.Namespace, log_dir: Path
) -> tuple[list[ManagedProcess], list[str]]:
    extra = [
        "--gpu", "H100", "--time-scale", str(args.time_scale), "--enable-lora",
        "--max-loras", str(args.max_loras), "--max-cpu-loras", str(args.max_cpu_loras),
        "--max-lora-rank", "16",
    ]  # fmt: skip
    return fleet.start_engines(
        args.engines,
        log_dir,
        model="meta-llama/Llama-3.1-8B-Instruct",
        served_name=MODEL,
        extra_args=extra,
        per_engine_args=[("--seed", str(i)) for i in range(args.engines)],
        ready_timeout_s=120,
    )


async def apply_layout(
    urls: Mapping[str, str], layout: Layout, adapter_dir: Path
) -> dict[str, set[str]]:
    """Load every engine's adapters through its API; return what each ``/v1/models`` lists."""
    limit = asyncio.Semaphore(32)
    async with httpx.AsyncClient(timeout=30) as http:

        async def load(url: str, name: str) -> None:
            async with limit:
                body = {"lora_name": name, "lora_path": str(adapter_dir / name)}
                r = await http.post(f"{url}/v1/load_lora_adapter", json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"{url} refused {name}: {r.status_code} {r.text[:200]}")

        await asyncio.gather(*(load(urls[e], a) for e, names in layout.items() for a in names))
        truth: dict[str, set[str]] = {}
        for e, url in urls.items():
            cards = (await http.get(f"{url}/v1/models")).json()["data"]
            truth[e] = {c["id"] for c in cards if c.get("parent")}
    return truth


async def wait_router_knows(url: str, adapters: set[str], timeout_s: float = 60.0) -> None:
    """The router learns adapters from the engines' /v1/models every few seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        cards = (await get_json(url, "/v1/models"))["data"]
        missing = adapters - {c["id"] for c in cards}
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"router does not list {len(missing)} adapters after {timeout_s}s")
        await asyncio.sleep(0.5)


def run_one(
    kind: str,
    reqs: list[wl.BenchRequest],
    adapters: list[str],
    shares: list[float],
    args: argparse.Namespace,
    log_dir: Path,
    adapter_dir: Path,
) -> Summary:
    layout, unplaced = layouts(kind, adapters, shares, args)
    if unplaced:
        raise RuntimeError(f"{kind}: {sum(unplaced.values())} replicas found no room")
    engines, kv = start_engines(args, log_dir)
    urls = {f"engine-{i}": e.url for i, e in enumerate(engines)}
    router = router_process(
        RouterUnderTest("shoal", args.strategy),
        list(urls.values()),
        kv,
        port=free_port(),
        log_dir=log_dir,
        served_model=MODEL,
    )
    try:
        truth = asyncio.run(apply_layout(urls, layout, adapter_dir))
        for e, names in layout.items():
            if truth[e] != set(names):
                raise RuntimeError(
                    f"{kind}: {e} lists {len(truth[e])} adapters, expected {len(names)}"
                )
        router.start()
        router.wait_healthy(timeout_s=120)
        asyncio.run(wait_router_knows(router.url, set(adapters)))
        run = asyncio.run(run_open_loop(router.url, reqs, model=MODEL, progress=not args.quiet))
        return to_simulated_time(summarize(run), args.time_scale)
    finally:
        router.stop()
        for proc in engines:
            proc.stop()


def workload(
    args: argparse.Namespace, adapters: list[str], shares: list[float]
) -> list[wl.BenchRequest]:
    rate_wall = args.rate * args.time_scale
    n = int(rate_wall * args.duration_s)
    base = wl.random_prompts(
        wl.arrival_times(rate_wall, n, seed=args.seed),
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        seed=args.seed,
    )
    mix: list[tuple[str | None, float]] = list(zip(adapters, shares, strict=True))
    return list(wl.with_lora_mix(base, mix, seed=args.seed))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--placements", default=",".join(PLACEMENTS))
    ap.add_argument("--engines", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=200)
    ap.add_argument("--zipf-s", type=float, default=1.0)
    ap.add_argument("--max-loras", type=int, default=8, help="GPU adapter slots per engine")
    ap.add_argument("--max-cpu-loras", type=int, default=64, help="host-memory adapter slots")
    ap.add_argument("--replicas", type=int, default=2, help="shoal placement: base replicas")
    ap.add_argument(
        "--hot-share",
        type=float,
        default=1 / 32,
        help="shoal placement: rate_per_replica as a share of the total rate",
    )
    ap.add_argument("--first-n", type=int, default=2, help="first-n placement: N")
    ap.add_argument("--strategy", default="prefix", help="Shoal router preset")
    ap.add_argument("--rate", type=float, default=40.0, help="simulated req/s offered")
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--time-scale", type=float, default=0.1, help="simulated s per wall s")
    ap.add_argument("--duration-s", type=float, default=60.0, help="wall seconds of arrivals")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    kinds = [k for k in args.placements.split(",") if k]
    for k in kinds:
        if k not in PLACEMENTS:
            ap.error(f"unknown placement {k!r}; valid: {', '.join(PLACEMENTS)}")

    adapters = [f"adapter-{i:03d}" for i in range(args.adapters)]
    shares = wl.zipf_weights(args.adapters, args.zipf_s)
    log_dir = Path(tempfile.mkdtemp(prefix="shoal-bench-lora-placement-"))
    adapter_dir = log_dir / "adapters"
    for a in adapters:
        (adapter_dir / a).mkdir(parents=True)
        (adapter_dir / a / "adapter_config.json").write_text('{"r": 16}')
    reqs = workload(args, adapters, shares)

    rows: list[tuple[str, Layout, list[Summary]]] = []
    errors: dict[str, str] = {}
    for k in kinds:
        sums: list[Summary] = []
        for rep in range(args.repeats):
            try:
                s = run_one(k, reqs, adapters, shares, args, log_dir, adapter_dir)
            except Exception as exc:
                errors[k] = f"{type(exc).__name__}: {exc}"[:600]
                break
            sums.append(s)
            print(
                f"{k:<11} run {rep + 1}: TTFT p50 {s.ttft_ms['p50']:8.1f} p90 {s.ttft_ms['p90']:8.1f} ms  "
                f"{s.output_throughput:7.0f} tok/s  ok {s.ok}/{s.requests}",
                file=sys.stderr,
            )
        if sums:
            rows.append((k, layouts(k, adapters, shares, args)[0], sums))
    body = render(args, len(reqs), rows, errors, log_dir)
    print(body)
    if not args.no_write and rows:
        update_section("lora-placement", body)
    return 0 if not errors else 1


def _rng(xs: list[float], fmt: str = "{:.0f}") -> str:
    xs = sorted(xs)
    mid = xs[len(xs) // 2]
    return fmt.format(mid) + (f" [{fmt.format(xs[0])}–{fmt.format(xs[-1])}]" if len(xs) > 1 else "")


def _per_engine(layout: Layout) -> str:
    sizes = sorted(len(v) for v in layout.values())
    return f"{sizes[0]}–{sizes[-1]}" if sizes[0] != sizes[-1] else str(sizes[0])


def render(
    args: argparse.Namespace,
    n: int,
    rows: list[tuple[str, Layout, list[Summary]]],
    errors: dict[str, str],
    log_dir: Path,
) -> str:
    label = {
        "everywhere": "every adapter on every engine",
        "shoal": f"Shoal `place()` (replicas {args.replicas} + hot extras)",
        "first-n": f"first {args.first_n} engines by name (peers)",
    }
    lines = [
        "## LoRA placement",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine_facts()}",
        "",
        f"{args.engines} `shoal sim` engines (Llama-3.1-8B on H100, `--max-loras {args.max_loras}` GPU "
        f"slots, `--max-cpu-loras {args.max_cpu_loras}` host slots); {args.adapters} rank-16 adapters; "
        f"Zipf request mix (s = {args.zipf_s:g}); {args.prompt_tokens}-token unique prompts, "
        f"{args.output_tokens} output tokens (streamed, `ignore_eos`); Poisson arrivals at "
        f"{args.rate:g} req/s, {n} requests per run, the same stream for every placement; fresh "
        f"engines per run; the Shoal router (`{args.strategy}` preset: LoRA filter + LoRA-affinity "
        "scorer) in front. Adapters are loaded through `/v1/load_lora_adapter` and checked against "
        f"every engine's `/v1/models` before the run. Time scale {args.time_scale:g} (simulated s per "
        "wall s); figures are in simulated time. "
        f"{args.repeats} run(s) per placement: median [range].",
        "",
        "| placement | adapters per engine | TTFT p50 (ms) | TTFT p90 (ms) | output tok/s | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k, layout, sums in rows:
        lines.append(
            f"| {label[k]} | {_per_engine(layout)} | {_rng([s.ttft_ms['p50'] for s in sums])} | "
            f"{_rng([s.ttft_ms['p90'] for s in sums])} | {_rng([s.output_throughput for s in sums])} | "
            f"{sum(s.requests - s.ok for s in sums)} |"
        )
    for k, layout, _ in rows:
        if k == "shoal":
            held: dict[str, int] = {}
            for names in layout.values():
                for a in names:
                    held[a] = held.get(a, 0) + 1
            hot = ", ".join(f"{a} on {c}" for a, c in sorted(held.items()) if c > args.replicas)
            lines += ["", f"Hot extras in Shoal's placement: {hot or 'none'}."]
    lines += [
        "",
        "Shoal's placement here gives each engine at most `--max-cpu-loras` adapters (the capacity "
        "passed to `place()`), not the Model's `maxLoras` as the operator does: 200 adapters × 2 "
        f"replicas cannot fit in {args.engines} × {args.max_loras} GPU slots, so with the operator's "
        "capacity most adapters would be left unplaced (`InsufficientCapacity`).",
        "",
        "What the simulator models: bringing an adapter into a GPU slot costs a host-to-GPU copy "
        "(~6 ms for rank 16 on Llama-8B) or, when it was also evicted from host memory, a disk load "
        "(~86 ms), LRU at both levels (`sim/lora.py`, `sim/perf.py`); a batch mixes at most "
        "`max_loras` adapters and the rest wait (`sim/engine.py`); each adapter in a batch adds "
        "a kernel overhead. It does not expose a swap counter as a metric, so swaps are seen only "
        "through TTFT.",
    ]
    for what, err in errors.items():
        lines.append(f"\n- {what}: could not run: `{err}` (logs in `{log_dir}`)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
