"""bench/router_overhead.py: the report's arithmetic (added latency, the Shoal / peer ratio,
CPU per request) and the rules it judges a rate by, on results made up for the purpose."""

from __future__ import annotations

import argparse
import math
import os
import time
from types import ModuleType

import pytest
from bench_scripts import load_bench_script

from shoal.bench.peers import RouterUnderTest
from shoal.bench.report import Summary


@pytest.fixture(scope="module")
def overhead() -> ModuleType:
    return load_bench_script("router_overhead")


def summary(p50: float, p99: float, *, ok: int = 100, rate: float = 200.0) -> Summary:
    return Summary(
        requests=100,
        ok=ok,
        errors={} if ok == 100 else {"HTTP 503": 100 - ok},
        duration_s=0.5,
        request_throughput=rate,
        output_throughput=0.0,
        goodput=rate,
        slo_attainment=None,
        e2e_ms={"p50": p50, "p99": p99},
    )


def args(**extra: object) -> argparse.Namespace:
    base = {"engines": 2, "duration_s": 10.0, "repeats": 2, "p99_bound_ms": 100.0}
    return argparse.Namespace(**{**base, **extra, "max_rate_steps": "400,800"})


def test_added_latency_and_the_ratio_to_the_better_peer(overhead: ModuleType) -> None:
    shoal = RouterUnderTest.parse("shoal:round-robin")
    peer = RouterUnderTest.parse("vllm:round_robin")
    direct = [float(x) for x in range(1, 101)]  # ms, pooled over the repeats
    results = {
        "direct": {200.0: [summary(3.0, 5.0), summary(3.2, 5.2)]},
        shoal.label: {200.0: [summary(4.0, 8.0), summary(4.4, 9.2)]},
        peer.label: {200.0: [summary(3.5, 6.0), summary(3.6, 6.2)]},
    }
    pooled = {
        "direct": {200.0: direct},
        shoal.label: {200.0: [x + 3.0 for x in direct]},  # adds 3 ms everywhere
        peer.label: {200.0: [x + 1.0 for x in direct]},  # adds 1 ms everywhere
    }
    cpu = {shoal.label: {200.0: [0.6, 0.7, 0.5]}, peer.label: {200.0: [0.3, 0.3]}}
    wait = {shoal.label: {200.0: [0.3, 0.4]}, peer.label: {200.0: [0.2, 0.25, 0.21]}}
    text = overhead.render(
        args(), [200.0], results, pooled, {shoal.label: 1300.0}, cpu, wait, {}, [shoal, peer]
    )
    lines = text.splitlines()

    def row(label: str) -> str:  # the latency table's row (the CPU table's has no rate column)
        return next(line for line in lines if line.startswith(f"| {label} | 200 |"))

    # pooled p50 and p99 added 3 ms; per run, median [range] of run-by-run differences
    assert row(shoal.label) == (
        f"| {shoal.label} | 200 | 3.00 | 3.00 | 1.10 [1.00, 1.20] | 3.50 [3.00, 4.00] | 3.00× |"
    )
    assert row(peer.label).endswith("| 1.00 | 1.00 | 0.45 [0.40, 0.50] | 1.00 [1.00, 1.00] |  |")
    assert f"| {shoal.label} | 0.60 [0.50, 0.70] |" in text  # CPU per request, median [range]
    # run-queue wait per request, in its own table after the CPU one
    assert text.index("run-queue wait per request") > text.index("Router CPU per request")
    assert f"| {shoal.label} | 0.35 [0.30, 0.40] |" in text
    assert f"| {peer.label} | 0.21 [0.20, 0.25] |" in text
    assert f"- {shoal.label}: 1300 req/s" in text


def test_a_peer_that_adds_nothing_gives_no_ratio(overhead: ModuleType) -> None:
    shoal = RouterUnderTest.parse("shoal:round-robin")
    peer = RouterUnderTest.parse("sglang:round_robin")
    direct = [1.0, 2.0, 3.0]
    runs = {200.0: [summary(2.0, 3.0)]}
    results = {"direct": runs, shoal.label: runs, peer.label: runs}
    pooled = {
        "direct": {200.0: direct},
        shoal.label: {200.0: [x + 1 for x in direct]},
        peer.label: {200.0: [x - 0.5 for x in direct]},  # faster than direct: noise
    }
    text = overhead.render(args(), [200.0], results, pooled, {}, {}, {}, {"vllm": "not installed"},
                           [shoal, peer])  # fmt: skip
    assert "n/a (peer ≤ 0)" in text
    assert "- vllm: could not run: `not installed`" in text


def test_a_rate_is_sustained_only_without_errors_at_throughput_and_within_the_bound(
    overhead: ModuleType,
) -> None:
    assert overhead.sustained(summary(3.0, 20.0, rate=196.0), 200.0, 100.0)
    assert not overhead.sustained(summary(3.0, 20.0, rate=180.0), 200.0, 100.0)  # < 95%
    assert not overhead.sustained(summary(3.0, 120.0), 200.0, 100.0)  # p99 over the bound
    assert not overhead.sustained(summary(3.0, 20.0, ok=99), 200.0, 100.0)  # an error


def test_cpu_seconds_reads_this_process_from_proc(overhead: ModuleType) -> None:
    before = overhead.cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:
        math.sqrt(2.0)
    spent = overhead.cpu_seconds(os.getpid()) - before
    assert 0.05 <= spent < 5.0
