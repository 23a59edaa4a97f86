"""The ``slo`` policy with other settings, on the same workload as ``bench/autoscaler.py``.

Each variant is ``name:key=value,key=value`` with ``SloPolicy`` keyword arguments (headroom,
hysteresis, scale_down_delay_s, trend_damping, scale_down_step_s, lead_time_s) and
``planning=`` for ``sizing.SEQS_PLANNING_LIMIT``. Prints one row per variant: the share of 60 s
windows meeting the SLO, the minutes that missed it, GPU-hours and churn. How the notes under the
autoscaler table in docs/benchmarks.md chose the policy's defaults:

    python bench/slo_variants.py --duration-s 3600 --copies 16 --jobs 2 --variant 'default:' \\
        --variant 'old:hysteresis=0.15,scale_down_delay_s=300,trend_damping=1'
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import shoal.autoscaler.sizing as sizing
from autoscaler import DEFAULT_TRACE, _replicas_per_minute, _workload, fleet_bounds, simulate_pool
from shoal.autoscaler.policies.slo import SloPolicy
from shoal.sim.cluster import EngineSpec

DEFAULT_PLANNING = sizing.SEQS_PLANNING_LIMIT
KWARGS = {
    "headroom",
    "hysteresis",
    "scale_down_delay_s",
    "trend_damping",
    "scale_down_step_s",
    "lead_time_s",
}


def parse_variant(text: str) -> tuple[str, dict[str, float]]:
    name, _, rest = text.partition(":")
    settings: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        key, _, val = item.partition("=")
        if key not in KWARGS | {"planning"}:
            raise SystemExit(f"unknown setting {key!r} in {text!r}")
        settings[key] = float(val)
    return name or "default", settings


def _run(job: tuple[str, dict[str, float], argparse.Namespace, int, int]) -> dict[str, Any]:
    name, settings, args, initial, max_replicas = job
    # A worker runs several variants: set the limit every time, not only when it differs.
    sizing.SEQS_PLANNING_LIMIT = settings.get("planning", DEFAULT_PLANNING)
    policy = SloPolicy(**{k: v for k, v in settings.items() if k in KWARGS})  # type: ignore[arg-type]
    rep = simulate_pool(
        _workload(args),
        policy,
        initial=initial,
        max_replicas=max_replicas,
        warmup_s=args.warmup_s,
    )
    return {
        "name": name,
        "settings": settings,
        "windows_ok": rep.attainment.windows_ok,
        "missed": [int(t // 60) for t in rep.attainment.missed_window_starts],
        "gpu_hours": rep.gpu_hours,
        "churn": rep.churn,
        "peak": rep.peak_replicas,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--copies", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=3600.0)
    parser.add_argument("--warmup-s", type=float, default=300.0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--variant", action="append", default=[], help="name:key=value,...")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant or ["default:"]]
    # The same starting fleet and maximum as bench/autoscaler.py, computed once for all variants.
    initial, max_replicas = fleet_bounds(
        _replicas_per_minute(_workload(args), EngineSpec()), args.warmup_s
    )
    jobs = [(n, s, args, initial, max_replicas) for n, s in variants]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(_run, jobs))
    print("| variant | settings | windows met | minutes missed | GPU-hours | churn | peak |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        settings = ", ".join(f"{k}={v:g}" for k, v in r["settings"].items()) or "defaults"
        missed = ", ".join(map(str, r["missed"])) or "-"
        print(
            f"| {r['name']} | {settings} | {r['windows_ok']:.1%} | {missed} | "
            f"{r['gpu_hours']:.2f} | {r['churn']} | {r['peak']} |"
        )
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
