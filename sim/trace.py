"""Workloads for the cluster simulator: a recorded trace or a synthetic stand-in.

A workload is an iterable of :class:`TraceRequest` in arrival order. Two sources:

* :func:`load_azure_trace` reads the Azure LLM inference trace 2023 (CSV with ``TIMESTAMP``,
  ``ContextTokens``, ``GeneratedTokens``), published with "Splitwise: Efficient generative LLM
  inference using phase splitting" (Patel et al., ISCA 2024) under CC-BY-4.0. The project never
  ships the data; callers pass the path of a copy.
* :func:`synthetic_workload` draws Poisson arrivals and lognormal prompt/output lengths whose
  defaults match the trace's conversation workload (mean 1,155 prompt and 211 output tokens), with
  optional shared-prefix groups (a system prompt shared by a share of requests). It is what runs
  when no trace is given, so nothing depends on the data being present.

The trace only gives token *counts*. :class:`PromptFactory` turns a request into deterministic
prompt token ids: requests of one prefix group share their first ``prefix_tokens`` ids (so the
engines' prefix caches see real sharing) and everything else is unique per request.
"""

from __future__ import annotations

import csv
import math
import random
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

# Moments of the Azure 2023 conversation trace (19,366 requests over one hour): mean prompt and
# output lengths, and the standard deviations of their natural logs, which a lognormal matches.
AZURE_CONV_RATE_RPS = 19366 / 3600.0
AZURE_CONV_PROMPT_MEAN = 1155.0
AZURE_CONV_PROMPT_LOG_SIGMA = 0.985
AZURE_CONV_OUTPUT_MEAN = 211.0
AZURE_CONV_OUTPUT_LOG_SIGMA = 0.859

# Generated prompt ids stay in the 16-bit range above the special tokens (0..3): cheap to draw
# in bulk from random bytes, and every vocabulary in the catalog is larger.
_FIRST_ID = 4


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a workload: its arrival (seconds from the workload's start) and size."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    # Requests with the same group share their first ``prefix_tokens`` prompt tokens.
    prefix_group: int | None = None
    prefix_tokens: int = 0


def _parse_timestamp(text: str) -> tuple[int, float]:
    """(day ordinal, seconds into the day) of ``YYYY-MM-DD HH:MM:SS[.fffffff]``.

    Parsed by hand: the trace has 7 fractional digits, more than ``datetime`` keeps. Days and
    seconds stay apart so that differences keep sub-microsecond precision (seconds since year 1
    as one float would not).
    """
    day, _, clock = text.strip().partition(" ")
    hh, mm, ss = clock.split(":")
    return date.fromisoformat(day).toordinal(), int(hh) * 3600 + int(mm) * 60 + float(ss)


def load_azure_trace(
    path: str | Path,
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
    rate_scale: float = 1.0,
    max_requests: int | None = None,
) -> list[TraceRequest]:
    """Read an Azure LLM inference trace (2023 format) into requests sorted by arrival.

    Arrival times are relative to the first row, divided by ``rate_scale`` (2.0 replays the trace
    twice as fast, i.e. at twice the request rate), then windowed on that scaled clock:
    requests arriving in ``[start_s, start_s + duration_s)`` are kept and shifted to start at 0.
    Token counts are clamped to at least 1 (an engine cannot take an empty prompt).
    """
    if rate_scale <= 0:
        raise ValueError(f"rate_scale must be > 0, got {rate_scale}")
    if start_s < 0:
        raise ValueError(f"start_s must be >= 0, got {start_s}")
    if duration_s is not None and duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    rows: list[tuple[tuple[int, float], int, int]] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not an Azure LLM trace, missing columns {sorted(missing)}")
        for row in reader:
            rows.append(
                (
                    _parse_timestamp(row["TIMESTAMP"]),
                    int(row["ContextTokens"]),
                    int(row["GeneratedTokens"]),
                )
            )
    if not rows:
        return []
    # The published files are in timestamp order; sort (stably) in case a copy is not.
    rows.sort(key=lambda r: r[0])
    day0, sec0 = rows[0][0]
    end = math.inf if duration_s is None else start_s + duration_s
    out: list[TraceRequest] = []
    for (day, sec), prompt, output in rows:
        arrival = ((day - day0) * 86400 + (sec - sec0)) / rate_scale
        if arrival < start_s:
            continue
        if arrival >= end:
            break
        out.append(TraceRequest(arrival - start_s, max(1, prompt), max(1, output)))
        if max_requests is not None and len(out) >= max_requests:
            break
    return out


def _lognormal_mu(mean: float, sigma: float) -> float:
    """The lognormal location whose distribution has the given mean: mean = exp(mu + sigma²/2)."""
    return math.log(mean) - sigma * sigma / 2.0


def synthetic_workload(
    rate_rps: float,
    duration_s: float,
    seed: int = 0,
    *,
    prompt_mean: float = AZURE_CONV_PROMPT_MEAN,
    prompt_log_sigma: float = AZURE_CONV_PROMPT_LOG_SIGMA,
    output_mean: float = AZURE_CONV_OUTPUT_MEAN,
    output_log_sigma: float = AZURE_CONV_OUTPUT_LOG_SIGMA,
    max_prompt_tokens: int = 16384,
    max_output_tokens: int = 2048,
    num_prefix_groups: int = 0,
    prefix_share: float = 0.0,
    prefix_tokens: int = 512,
) -> Iterator[TraceRequest]:
    """Poisson arrivals at ``rate_rps`` for ``duration_s`` seconds with lognormal lengths.

    With ``num_prefix_groups > 0``, a share ``prefix_share`` of requests belongs to one of that many
    groups (uniformly), and shares the group's first ``prefix_tokens`` tokens (capped below the
    request's prompt length): a system prompt common to an application's requests. The stream is a
    pure function of its arguments.
    """
    if rate_rps <= 0 or duration_s <= 0:
        raise ValueError(f"rate_rps and duration_s must be > 0, got {rate_rps}, {duration_s}")
    if not 0.0 <= prefix_share <= 1.0:
        raise ValueError(f"prefix_share must be in [0, 1], got {prefix_share}")
    rng = random.Random(seed)
    p_mu = _lognormal_mu(prompt_mean, prompt_log_sigma)
    o_mu = _lognormal_mu(output_mean, output_log_sigma)
    t = 0.0
    while True:
        t += rng.expovariate(rate_rps)
        if t >= duration_s:
            return
        prompt = min(max_prompt_tokens, max(1, round(rng.lognormvariate(p_mu, prompt_log_sigma))))
        output = min(max_output_tokens, max(1, round(rng.lognormvariate(o_mu, output_log_sigma))))
        group: int | None = None
        shared = 0
        # Draw unconditionally so that the lengths do not depend on the prefix settings.
        u = rng.random()
        v = rng.random()
        if num_prefix_groups > 0 and u < prefix_share:
            group = min(int(v * num_prefix_groups), num_prefix_groups - 1)
            # The prompt needs at least one token of its own after the shared prefix.
            shared = max(0, min(prefix_tokens, prompt - 1))
            if shared == 0:
                group = None
        yield TraceRequest(t, prompt, output, group, shared)


def scale_workload(requests: Iterable[TraceRequest], rate_scale: float) -> Iterator[TraceRequest]:
    """Compress (``rate_scale`` > 1) or stretch arrival times; sizes are unchanged."""
    if rate_scale <= 0:
        raise ValueError(f"rate_scale must be > 0, got {rate_scale}")
    for r in requests:
        yield TraceRequest(
            r.arrival_s / rate_scale,
            r.prompt_tokens,
            r.output_tokens,
            r.prefix_group,
            r.prefix_tokens,
        )


class PromptFactory:
    """Deterministic prompt token ids for a workload's requests.

    Request ``index`` gets ids drawn from a generator seeded by ``(seed, index)``, so a request's
    prompt does not depend on which other requests were generated before it. Group prefixes are
    drawn from ``(seed, group)`` and memoised per group; the memo is bounded by the number of groups
    a workload uses.
    """

    def __init__(self, seed: int = 0, vocab_size: int = 65536) -> None:
        self.seed = seed
        self._id_limit = min(vocab_size, 1 << 16)
        if self._id_limit <= _FIRST_ID + 1:
            raise ValueError(f"vocab_size must be > {_FIRST_ID + 1}, got {vocab_size}")
        self._prefixes: dict[int, array[int]] = {}

    def _draw(self, key: int, n: int) -> array[int]:
        # randbytes of a multiple of 4 bytes is a prefix of any longer draw from the same seed
        # (whole 32-bit words), so a group prefix drawn long once serves every shorter request.
        even = n + (n & 1)
        ids = array("H", random.Random(key).randbytes(2 * even))
        del ids[n:]
        limit = self._id_limit
        if limit < 1 << 16:
            ids = array("H", (x % (limit - _FIRST_ID) + _FIRST_ID for x in ids))
        elif min(ids, default=_FIRST_ID) < _FIRST_ID:
            # Rare (4 in 65,536 per id): move special-token ids into the word range.
            ids = array("H", (x if x >= _FIRST_ID else x + _FIRST_ID for x in ids))
        return ids

    def _prefix(self, group: int, n: int) -> array[int]:
        have = self._prefixes.get(group)
        if have is None or len(have) < n:
            # Keyed apart from request keys (odd vs even) so a group never equals a request.
            have = self._draw((self.seed << 33) ^ (group << 1) ^ 1, max(n, 1024))
            self._prefixes[group] = have
        return have

    def prompt_ids(self, index: int, req: TraceRequest) -> list[int]:
        n = req.prompt_tokens
        shared = min(req.prefix_tokens, n - 1) if req.prefix_group is not None else 0
        own = self._draw((self.seed << 33) ^ (index << 1), n - shared)
        if shared > 0:
            assert req.prefix_group is not None
            head = self._prefix(req.prefix_group, shared)[:shared]
            head.extend(own)
            own = head
        return own.tolist()
