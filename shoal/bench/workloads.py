"""Open-loop workloads for ``shoal bench``: arrival times and request bodies fixed in advance.

Every generator is a pure function of its arguments (seeded ``random.Random``), so two runs with
the same flags send byte-identical requests at identical offsets, and strategies can be compared
on the same stream. Prompts are text of word tokens ``w<k>``: the engine simulator's tokenizer
counts one token per word, so a prompt of ``n`` words is ``n`` prompt tokens there (a real
tokenizer splits them differently, which only changes the sizes, not the sharing).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from shoal.sim.trace import TraceRequest, load_azure_trace

ArrivalKind = Literal["poisson", "gamma", "bursty", "constant"]
ARRIVAL_KINDS: tuple[str, ...] = ("poisson", "gamma", "bursty", "constant")

# Word ids for generated text; large enough that two random prompts share no prefix block.
_WORDS = 50_000


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request: when to send it (seconds after the start) and what to send."""

    arrival_s: float
    output_tokens: int
    prompt: str = ""
    # Chat requests carry messages instead of a prompt (multi-turn sessions).
    messages: tuple[tuple[str, str], ...] = ()
    prompt_tokens: int = 0
    # The model name to send; None means the bench's default model (an adapter name for LoRA).
    model: str | None = None
    session_id: str | None = None
    group: int | None = None
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)


def words(rng: random.Random, n: int) -> str:
    """``n`` word tokens drawn from ``rng``."""
    return " ".join(f"w{rng.randrange(_WORDS)}" for _ in range(n))


def arrival_times(
    rate_rps: float,
    n: int,
    *,
    kind: ArrivalKind = "poisson",
    seed: int = 0,
    cv: float = 2.0,
    burst_factor: float = 4.0,
    burst_period_s: float = 10.0,
    burst_len_s: float = 2.0,
) -> list[float]:
    """``n`` increasing arrival offsets with mean rate ``rate_rps``.

    * ``poisson``: exponential gaps.
    * ``gamma``: gamma gaps with coefficient of variation ``cv`` (cv > 1 is burstier than Poisson).
    * ``bursty``: Poisson whose rate is ``burst_factor`` × higher for ``burst_len_s`` out of every
      ``burst_period_s``; the base rate is lowered so the long-run mean stays ``rate_rps``.
    * ``constant``: evenly spaced.
    """
    if rate_rps <= 0:
        raise ValueError(f"rate must be > 0, got {rate_rps}")
    if n < 0:
        raise ValueError(f"number of requests must be ≥ 0, got {n}")
    rng = random.Random(seed)
    out: list[float] = []
    t = 0.0
    if kind == "constant":
        return [(i + 1) / rate_rps for i in range(n)]
    if kind == "poisson":
        for _ in range(n):
            t += rng.expovariate(rate_rps)
            out.append(t)
        return out
    if kind == "gamma":
        if cv <= 0:
            raise ValueError(f"cv must be > 0, got {cv}")
        shape = 1.0 / (cv * cv)
        scale = 1.0 / (rate_rps * shape)
        for _ in range(n):
            t += rng.gammavariate(shape, scale)
            out.append(t)
        return out
    if kind == "bursty":
        if not 0 < burst_len_s < burst_period_s or burst_factor < 1:
            raise ValueError("bursty arrivals need 0 < burst_len < burst_period and factor ≥ 1")
        share = burst_len_s / burst_period_s
        base = rate_rps / (1 - share + share * burst_factor)
        peak = base * burst_factor
        # Thinning (Lewis-Shedler): draw at the peak rate, keep with probability rate(t)/peak.
        while len(out) < n:
            t += rng.expovariate(peak)
            in_burst = (t % burst_period_s) < burst_len_s
            if in_burst or rng.random() < base / peak:
                out.append(t)
        return out
    raise ValueError(f"unknown arrival kind {kind!r}; valid: {', '.join(ARRIVAL_KINDS)}")


def zipf_weights(n: int, s: float) -> list[float]:
    """Shares of ``n`` items ranked by popularity: p_i ∝ 1 / i^s (s = 0: all equal)."""
    raw = [1.0 / (i**s) for i in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def prefix_groups(n: int, num_groups: int, *, seed: int = 0, skew: float = 0.0) -> list[int]:
    """The prefix group of each of ``n`` requests of ``shared_prefix`` (same seed, same groups).

    Groups are equally popular with ``skew`` 0; otherwise group ``g`` is picked with probability
    proportional to ``1 / (g + 1) ** skew`` (Zipf), so group 0 is a hot prefix.
    """
    if num_groups < 1:
        raise ValueError(f"need at least one prefix group, got {num_groups}")
    if skew < 0:
        raise ValueError(f"skew must be >= 0, got {skew}")
    rng = random.Random(f"{seed}/shared-prefix")
    if not skew:
        # randrange for the uniform case keeps its request streams as they were before skew.
        return [rng.randrange(num_groups) for _ in range(n)]
    cum_weights = list(itertools.accumulate(zipf_weights(num_groups, skew)))
    groups = range(num_groups)
    return [rng.choices(groups, cum_weights=cum_weights)[0] for _ in range(n)]


def shared_prefix_trace(
    rate: float,
    n: int,
    *,
    num_groups: int = 32,
    prefix_tokens: int = 4000,
    suffix_tokens: int = 256,
    output_tokens: int = 128,
    seed: int = 0,
    skew: float = 0.0,
) -> list[TraceRequest]:
    """The ``shared_prefix`` workload as the virtual-clock fleet takes it: Poisson arrivals at
    ``rate`` and the same groups for the same seed, with token counts instead of prompt text
    (the cluster simulator draws each group's prefix tokens itself)."""
    groups = prefix_groups(n, num_groups, seed=seed, skew=skew)
    return [
        TraceRequest(t, prefix_tokens + suffix_tokens, output_tokens, g, prefix_tokens)
        for t, g in zip(arrival_times(rate, n, seed=seed), groups, strict=True)
    ]


def shared_prefix(
    arrivals: Sequence[float],
    *,
    num_groups: int,
    prefix_tokens: int,
    suffix_tokens: int,
    output_tokens: int,
    seed: int = 0,
    skew: float = 0.0,
) -> list[BenchRequest]:
    """Requests that each pick a group and send its shared prefix plus a unique suffix.

    This is the system-prompt / few-shot pattern where prefix-aware routing pays: every request
    of a group can reuse the group's cached prefix blocks on the engine that served it before.
    Each request's group comes from ``prefix_groups`` (equally popular, or Zipf with ``skew``).
    """
    groups = prefix_groups(len(arrivals), num_groups, seed=seed, skew=skew)
    prefixes = [
        words(random.Random(f"{seed}/prefix/{g}"), prefix_tokens) for g in range(num_groups)
    ]
    out = []
    for i, (t, g) in enumerate(zip(arrivals, groups, strict=True)):
        suffix = words(random.Random(f"{seed}/suffix/{i}"), suffix_tokens)
        prompt = (
            f"{prefixes[g]} {suffix}" if prefix_tokens and suffix_tokens else prefixes[g] + suffix
        )
        out.append(
            BenchRequest(
                arrival_s=t,
                output_tokens=output_tokens,
                prompt=prompt,
                prompt_tokens=prefix_tokens + suffix_tokens,
                group=g,
            )
        )
    return out


def multi_turn(
    session_starts: Sequence[float],
    *,
    turns: int,
    system_tokens: int,
    user_tokens: int,
    output_tokens: int,
    turn_gap_s: float,
    seed: int = 0,
) -> list[BenchRequest]:
    """Chat sessions whose every turn resends the whole history (with ``x-session-id``).

    Open loop means a turn cannot wait for the previous answer, so the history carries a
    deterministic stand-in assistant reply of ``output_tokens`` words: what the engine sees is a
    conversation prefix that grows by one user and one assistant message per turn, as in real chat.
    """
    if turns < 1:
        raise ValueError(f"turns must be ≥ 1, got {turns}")
    out = []
    for s, start in enumerate(session_starts):
        rng = random.Random(f"{seed}/session/{s}")
        sid = f"session-{seed}-{s}"
        history: list[tuple[str, str]] = [("system", words(rng, system_tokens))]
        for k in range(turns):
            history.append(("user", words(rng, user_tokens)))
            out.append(
                BenchRequest(
                    arrival_s=start + k * turn_gap_s,
                    output_tokens=output_tokens,
                    messages=tuple(history),
                    prompt_tokens=system_tokens + (k + 1) * user_tokens + k * output_tokens,
                    session_id=sid,
                    group=s,
                    headers=(("x-session-id", sid),),
                )
            )
            history.append(("assistant", words(rng, output_tokens)))
    out.sort(key=lambda r: r.arrival_s)
    return out


def azure_trace(
    path: str | Path,
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
    rate_scale: float = 1.0,
    max_requests: int | None = None,
    max_prompt_tokens: int | None = None,
    max_output_tokens: int | None = None,
    seed: int = 0,
) -> list[BenchRequest]:
    """Requests from an Azure-format trace (``TIMESTAMP,ContextTokens,GeneratedTokens``).

    The trace has sizes only; prompts are unique word text of the recorded length (capped by
    ``max_prompt_tokens`` so that it fits the served model's context).
    """
    trace = load_azure_trace(
        path,
        start_s=start_s,
        duration_s=duration_s,
        rate_scale=rate_scale,
        max_requests=max_requests,
    )
    out = []
    for i, r in enumerate(trace):
        p = min(r.prompt_tokens, max_prompt_tokens) if max_prompt_tokens else r.prompt_tokens
        o = min(r.output_tokens, max_output_tokens) if max_output_tokens else r.output_tokens
        out.append(
            BenchRequest(
                arrival_s=r.arrival_s,
                output_tokens=max(1, o),
                prompt=words(random.Random(f"{seed}/trace/{i}"), max(1, p)),
                prompt_tokens=max(1, p),
            )
        )
    return out


def random_prompts(
    arrivals: Sequence[float], *, prompt_tokens: int, output_tokens: int, seed: int = 0
) -> list[BenchRequest]:
    """Unique prompts of a fixed size: no sharing at all (the baseline for router overhead)."""
    return [
        BenchRequest(
            arrival_s=t,
            output_tokens=output_tokens,
            prompt=words(random.Random(f"{seed}/random/{i}"), prompt_tokens),
            prompt_tokens=prompt_tokens,
        )
        for i, t in enumerate(arrivals)
    ]


def parse_lora_mix(text: str) -> list[tuple[str | None, float]]:
    """``"sql:3,chat:1,base:1"`` → [(name, weight)]; ``base`` (or empty) is the base model."""
    mix: list[tuple[str | None, float]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, w = part.partition(":")
        weight = float(w) if w else 1.0
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"LoRA weight for {name!r} must be a finite number ≥ 0, got {w}")
        mix.append((None if name in ("", "base") else name, weight))
    if not mix or sum(w for _, w in mix) <= 0:
        raise ValueError(f"LoRA mix {text!r} needs at least one positive weight")
    return mix


def with_lora_mix(
    requests: Iterable[BenchRequest], mix: Sequence[tuple[str | None, float]], seed: int = 0
) -> Iterator[BenchRequest]:
    """Assign each request a model (adapter) drawn by weight; a session keeps one adapter."""
    names = [n for n, _ in mix]
    weights = [w for _, w in mix]
    rng = random.Random(f"{seed}/lora")
    by_session: dict[str, str | None] = {}
    for r in requests:
        if r.session_id is not None:
            if r.session_id not in by_session:
                by_session[r.session_id] = rng.choices(names, weights)[0]
            name = by_session[r.session_id]
        else:
            name = rng.choices(names, weights)[0]
        yield replace(r, model=name)
