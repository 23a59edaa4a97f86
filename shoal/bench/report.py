"""Summaries of a bench run: percentiles, throughput, goodput, SLO attainment; table, JSON, plot."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shoal.bench.client import RequestResult, RunResult

PERCENTILES = (50.0, 90.0, 99.0)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(slots=True)
class Summary:
    requests: int
    ok: int
    errors: dict[str, int]
    duration_s: float
    request_throughput: float  # completed requests per second
    output_throughput: float  # output tokens per second
    goodput: float  # requests per second that met every SLO given
    slo_attainment: float | None  # share of all requests that met every SLO (None: no SLO)
    ttft_ms: dict[str, float] = field(default_factory=dict)
    tpot_ms: dict[str, float] = field(default_factory=dict)
    e2e_ms: dict[str, float] = field(default_factory=dict)
    ttft_mean_ms: float = math.nan
    dispatch_lag_p99_ms: float = 0.0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v

        return {k: clean(v) for k, v in asdict(self).items()}


def _pcts(values: Sequence[float]) -> dict[str, float]:
    return {f"p{q:g}": percentile(values, q) * 1000.0 for q in PERCENTILES}


def meets_slo(r: RequestResult, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if not r.ok:
        return False
    if slo_ttft_ms is not None and (r.ttft_s is None or r.ttft_s * 1000 > slo_ttft_ms):
        return False
    tpot = r.tpot_s
    return slo_tpot_ms is None or tpot is None or tpot * 1000 <= slo_tpot_ms


def to_simulated_time(s: Summary, scale: float) -> Summary:
    """A summary measured in wall time against engines slowed by ``--time-scale`` (simulated
    seconds per wall second), converted to simulated time: latencies × scale, rates ÷ scale.
    Converts ``s`` in place and returns it."""
    for d in (s.ttft_ms, s.tpot_ms, s.e2e_ms):
        for k in d:
            d[k] *= scale
    s.output_throughput /= scale
    s.request_throughput /= scale
    return s


def summarize(
    run: RunResult, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None
) -> Summary:
    rs = run.results
    ok = [r for r in rs if r.ok]
    errors = Counter(r.error or f"HTTP {r.status}" for r in rs if not r.ok)
    dur = run.duration_s if run.duration_s > 0 else math.nan
    good = sum(1 for r in rs if meets_slo(r, slo_ttft_ms, slo_tpot_ms))
    has_slo = slo_ttft_ms is not None or slo_tpot_ms is not None
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    return Summary(
        requests=len(rs),
        ok=len(ok),
        errors=dict(errors),
        duration_s=run.duration_s,
        request_throughput=len(ok) / dur,
        output_throughput=sum(r.output_tokens for r in ok) / dur,
        goodput=good / dur,
        slo_attainment=(good / len(rs) if rs else math.nan) if has_slo else None,
        ttft_ms=_pcts(ttfts),
        tpot_ms=_pcts([t for r in ok if (t := r.tpot_s) is not None]),
        e2e_ms=_pcts([r.e2e_s for r in ok if r.e2e_s is not None]),
        ttft_mean_ms=(sum(ttfts) / len(ttfts) * 1000.0) if ttfts else math.nan,
        dispatch_lag_p99_ms=run.dispatch_lag_p99_s * 1000.0,
        slo_ttft_ms=slo_ttft_ms,
        slo_tpot_ms=slo_tpot_ms,
    )


def _f(v: float, digits: int = 1) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:,.{digits}f}"


def format_table(s: Summary) -> str:
    """A plain-text table for the terminal."""
    lines = [
        f"requests      {s.requests} sent, {s.ok} ok"
        + (f", errors: {', '.join(f'{k} ×{v}' for k, v in s.errors.items())}" if s.errors else ""),
        f"duration      {_f(s.duration_s, 2)} s",
        "",
        f"{'latency (ms)':<14}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name, d in (("TTFT", s.ttft_ms), ("TPOT", s.tpot_ms), ("end-to-end", s.e2e_ms)):
        lines.append(
            f"{name:<14}" + "".join(f"{_f(d.get(k, math.nan)):>10}" for k in ("p50", "p90", "p99"))
        )
    lines += [
        "",
        f"throughput    {_f(s.request_throughput, 2)} req/s, "
        f"{_f(s.output_throughput)} output tok/s",
    ]
    if s.slo_attainment is not None:
        slo = ", ".join(
            x
            for x in (
                f"TTFT ≤ {s.slo_ttft_ms:g} ms" if s.slo_ttft_ms is not None else "",
                f"TPOT ≤ {s.slo_tpot_ms:g} ms" if s.slo_tpot_ms is not None else "",
            )
            if x
        )
        lines.append(
            f"goodput       {_f(s.goodput, 2)} req/s meeting {slo} "
            f"(SLO attainment {_f(100 * s.slo_attainment)}%)"
        )
    if s.dispatch_lag_p99_ms > 50:
        lines.append(
            f"warning       the load generator ran {s.dispatch_lag_p99_ms:.0f} ms (p99) behind its "
            "schedule: the offered rate was not reached (machine too busy)"
        )
    return "\n".join(lines)


def plot(run: RunResult, path: str | Path, title: str = "shoal bench") -> None:
    """Latency CDFs (TTFT, TPOT, e2e) and TTFT over time, as one PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in run.results if r.ok]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    series = (
        ("TTFT", [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]),
        ("TPOT", [t * 1000 for r in ok if (t := r.tpot_s) is not None]),
        ("end-to-end", [r.e2e_s * 1000 for r in ok if r.e2e_s is not None]),
    )
    for ax, (name, vals) in zip(axes.flat[:3], series, strict=True):
        xs = sorted(vals)
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))])
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{name} CDF")
        ax.grid(alpha=0.3)
    ax = axes.flat[3]
    ax.scatter(
        [r.start_s for r in ok],
        [(r.ttft_s or 0) * 1000 for r in ok],
        s=4,
        alpha=0.5,
        label="ok",
    )
    bad = [r for r in run.results if not r.ok]
    if bad:
        ax.scatter(
            [r.start_s for r in bad], [0] * len(bad), s=8, c="red", marker="x", label="error"
        )
    ax.set_xlabel("send time (s)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("TTFT over time")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
