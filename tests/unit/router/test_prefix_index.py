"""ApproxPrefixIndex: prefix matching over chained hashes, hard bound, TTL, endpoint removal, and
the acceptance memory test (1,000,000 distinct prompts under a stated bound)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shoal.hashing import block_hashes
from shoal.router.prefix_index import DEFAULT_MAX_ENTRIES, ApproxPrefixIndex

A = "http://a:8000"
B = "http://b:8000"
C = "http://c:8000"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_longest_prefix_per_endpoint() -> None:
    idx = ApproxPrefixIndex(max_entries=1000, ttl_s=60)
    shared = list(range(64))
    p1 = block_hashes([*shared, *range(100, 132)], 16)  # 6 blocks, 4 shared
    p2 = block_hashes([*shared, *range(200, 232)], 16)
    idx.record(p1, A)
    idx.record(p2, B)
    assert idx.match(p1, [A, B, C]) == {A: 6, B: 4, C: 0}
    assert idx.match(p2, [A, B]) == {A: 4, B: 6}
    # Only the asked endpoints are reported.
    assert idx.match(p1, [B]) == {B: 4}


def test_same_prefix_on_two_endpoints_keeps_both() -> None:
    idx = ApproxPrefixIndex(max_entries=1000, ttl_s=60)
    p = block_hashes(list(range(48)), 16)
    idx.record(p, A)
    idx.record(p[:2], B)
    assert idx.match(p, [A, B]) == {A: 3, B: 2}


def test_unrelated_prompt_and_empty_inputs() -> None:
    idx = ApproxPrefixIndex(max_entries=1000, ttl_s=60)
    idx.record(block_hashes(list(range(32)), 16), A)
    assert idx.match(block_hashes(list(range(1, 33)), 16), [A]) == {A: 0}
    assert idx.match([], [A]) == {A: 0}
    idx.record([], A)
    assert len(idx) == 2


def test_lora_changes_the_hashes() -> None:
    idx = ApproxPrefixIndex(max_entries=1000, ttl_s=60)
    tokens = list(range(32))
    idx.record(block_hashes(tokens, 16, "sql-lora"), A)
    assert idx.match(block_hashes(tokens, 16), [A]) == {A: 0}
    assert idx.match(block_hashes(tokens, 16, "sql-lora"), [A]) == {A: 2}


def test_entries_expire_after_ttl() -> None:
    clock = FakeClock()
    idx = ApproxPrefixIndex(max_entries=1000, ttl_s=10, clock=clock)
    p = block_hashes(list(range(32)), 16)
    idx.record(p, A)
    clock.now += 9
    assert idx.match(p, [A]) == {A: 2}
    clock.now += 2
    assert idx.match(p, [A]) == {A: 0}
    # A write after expiry starts the endpoint set afresh.
    idx.record(p, B)
    assert idx.match(p, [A, B]) == {A: 0, B: 2}


def test_expired_generation_is_dropped_whole() -> None:
    clock = FakeClock()
    idx = ApproxPrefixIndex(max_entries=4, ttl_s=10, clock=clock)
    idx.record([1, 2], A)
    idx.record([3, 4], A)  # rotates: [1, 2] now in the previous generation
    assert len(idx) == 4
    clock.now += 11
    idx.record([5], A)
    assert len(idx) <= 3
    assert idx.evicted_entries >= 2


def test_hard_bound_is_never_exceeded_and_recent_entries_survive() -> None:
    idx = ApproxPrefixIndex(max_entries=100, ttl_s=600)
    rng = random.Random(7)
    hot = [rng.getrandbits(64) for _ in range(4)]
    for i in range(5000):
        idx.record([rng.getrandbits(64) for _ in range(rng.randint(1, 9))], A)
        assert len(idx) <= 100
        if i % 10 == 0:
            idx.record(hot, B)  # re-written often: must never be evicted
            assert idx.match(hot, [B]) == {B: 4}
    assert idx.rotations > 0


def test_prompt_longer_than_a_generation_keeps_its_head() -> None:
    idx = ApproxPrefixIndex(max_entries=10, ttl_s=600)
    p = list(range(1, 30))
    idx.record(p, A)
    assert len(idx) <= 10
    assert idx.match(p, [A]) == {A: 5}


def test_removed_endpoint_is_forgotten_and_id_not_reused_early() -> None:
    clock = FakeClock()
    idx = ApproxPrefixIndex(max_entries=1000, ttl_s=10, clock=clock)
    p = [11, 12, 13]
    idx.record(p, A)
    idx.remove_endpoint(A)
    assert idx.match(p, [A]) == {A: 0}
    # A newcomer must not inherit A's history through a recycled id.
    idx.record([99], B)
    assert idx.match(p, [B]) == {B: 0}
    # A write touching the block clears the dead endpoint's bit for good.
    idx.record(p[:1], C)
    assert idx.match(p, [B, C]) == {B: 0, C: 1}
    clock.now += 11
    idx.record([7], "http://d:8000")  # may reuse A's id now that A's entries expired
    assert idx.match(p, ["http://d:8000"]) == {"http://d:8000": 0}
    idx.remove_endpoint("http://unknown")  # no-op


def test_invalid_bounds_rejected() -> None:
    with pytest.raises(ValueError):
        ApproxPrefixIndex(max_entries=1)
    with pytest.raises(ValueError):
        ApproxPrefixIndex(ttl_s=0)


# --------------------------------------------------------------------------------------------------
# Acceptance: 1,000,000 distinct prompts, memory under a stated bound.
# --------------------------------------------------------------------------------------------------

# Stated bound: with the default max_entries (500,000 blocks) the index costs well under 100 MB,
# measured as the growth of peak RSS of a fresh interpreter (so allocator slack is included).
MEMORY_BOUND_MB = 100

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, random
    from shoal.router.prefix_index import ApproxPrefixIndex

    def peak_rss_mb():
        # VmHWM is this address space's peak; getrusage's ru_maxrss would also carry the peak of
        # the parent (pytest) that forked us.
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc/self/status")

    PROMPTS, BLOCKS = 1_000_000, 4
    urls = [f"http://10.0.0.{i}:8000" for i in range(8)]
    rng = random.Random(42)
    bits = rng.getrandbits
    base = peak_rss_mb()
    idx = ApproxPrefixIndex()
    bound = idx.max_entries
    most = 0
    for i in range(PROMPTS):
        hashes = [bits(64) for _ in range(BLOCKS)]
        idx.record(hashes, urls[i & 7])
        size = len(idx)
        if size > most:
            most = size
        if i & 15 == 0:
            idx.match(hashes, urls)
    last = hashes
    peak = peak_rss_mb()
    print(json.dumps({
        "rss_growth_mb": peak - base,
        "max_entries_seen": most,
        "bound": bound,
        "last_match": idx.match(last, urls)[urls[(PROMPTS - 1) & 7]],
    }))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_one_million_distinct_prompts_stay_under_memory_bound(tmp_path: Path) -> None:
    # A fresh interpreter, so the RSS growth is the index's alone; cwd outside the checkout so
    # the repository's operator/ folder cannot shadow the standard library.
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out.stdout)
    print(result)
    assert result["bound"] == DEFAULT_MAX_ENTRIES
    assert result["max_entries_seen"] <= DEFAULT_MAX_ENTRIES
    assert result["max_entries_seen"] >= DEFAULT_MAX_ENTRIES * 0.9  # the bound was reached
    assert result["last_match"] == 4  # still working at the end
    assert result["rss_growth_mb"] < MEMORY_BOUND_MB
