"""Workload generators of ``shoal bench``: deterministic, right rates, prefixes really shared."""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

import pytest

from shoal.bench import workloads as wl


@pytest.mark.parametrize("kind", ["poisson", "gamma", "bursty", "constant"])
def test_arrivals_have_the_requested_rate(kind: wl.ArrivalKind) -> None:
    ts = wl.arrival_times(50.0, 20_000, kind=kind, seed=3, burst_period_s=4.0, burst_len_s=1.0)
    assert len(ts) == 20_000
    assert all(b >= a for a, b in itertools.pairwise(ts))
    assert 20_000 / ts[-1] == pytest.approx(50.0, rel=0.05)


def test_arrival_variability() -> None:
    def cv(ts: list[float]) -> float:
        gaps = [b - a for a, b in zip([0.0, *ts], ts, strict=False)]
        return statistics.pstdev(gaps) / statistics.fmean(gaps)

    assert cv(wl.arrival_times(10, 20_000, kind="poisson")) == pytest.approx(1.0, abs=0.05)
    assert cv(wl.arrival_times(10, 20_000, kind="gamma", cv=3.0)) == pytest.approx(3.0, rel=0.15)
    assert cv(wl.arrival_times(10, 100, kind="constant")) == pytest.approx(0.0, abs=1e-9)


def test_bursty_arrivals_concentrate_in_bursts() -> None:
    ts = wl.arrival_times(
        10, 20_000, kind="bursty", burst_factor=5, burst_period_s=10, burst_len_s=2
    )
    inside = sum(1 for t in ts if t % 10 < 2) / len(ts)
    # Expected share inside bursts: 2*5 / (2*5 + 8*1) = 0.556.
    assert inside == pytest.approx(10 / 18, abs=0.03)


def test_generators_are_deterministic() -> None:
    a = wl.shared_prefix(
        wl.arrival_times(5, 50, seed=1),
        num_groups=4,
        prefix_tokens=50,
        suffix_tokens=10,
        output_tokens=8,
        seed=1,
    )
    b = wl.shared_prefix(
        wl.arrival_times(5, 50, seed=1),
        num_groups=4,
        prefix_tokens=50,
        suffix_tokens=10,
        output_tokens=8,
        seed=1,
    )
    c = wl.shared_prefix(
        wl.arrival_times(5, 50, seed=2),
        num_groups=4,
        prefix_tokens=50,
        suffix_tokens=10,
        output_tokens=8,
        seed=2,
    )
    assert a == b
    assert a != c


def test_shared_prefixes_are_shared_and_suffixes_unique() -> None:
    reqs = wl.shared_prefix(
        wl.arrival_times(5, 200), num_groups=4, prefix_tokens=100, suffix_tokens=20, output_tokens=8
    )
    assert {r.group for r in reqs} == {0, 1, 2, 3}
    for r in reqs:
        words = r.prompt.split()
        assert len(words) == 120 == r.prompt_tokens
        assert all(w.startswith("w") and w[1:].isdigit() for w in words)
    by_group: dict[int | None, set[str]] = {}
    for r in reqs:
        by_group.setdefault(r.group, set()).add(" ".join(r.prompt.split()[:100]))
    assert all(len(prefixes) == 1 for prefixes in by_group.values())
    assert len({next(iter(p)) for p in by_group.values()}) == 4
    suffixes = [" ".join(r.prompt.split()[100:]) for r in reqs]
    assert len(set(suffixes)) == len(suffixes)


def test_skewed_groups_follow_zipf_and_uniform_streams_stay_as_they_were() -> None:
    arrivals = wl.arrival_times(50, 4000, seed=1)
    kw = {"num_groups": 8, "prefix_tokens": 10, "suffix_tokens": 2, "output_tokens": 4}
    hot = wl.shared_prefix(arrivals, skew=1.5, **kw)
    counts = [sum(r.group == g for r in hot) for g in range(8)]
    # P(g) ∝ 1 / (g + 1)^1.5: group 0 takes ~44%, group 7 ~2%.
    weights = [1 / (g + 1) ** 1.5 for g in range(8)]
    for g in range(8):
        assert abs(counts[g] / 4000 - weights[g] / sum(weights)) < 0.03
    assert wl.shared_prefix(arrivals, skew=0.0, **kw) == wl.shared_prefix(arrivals, **kw)
    with pytest.raises(ValueError, match="skew"):
        wl.shared_prefix(arrivals, skew=-1, **kw)


def test_multi_turn_resends_growing_history() -> None:
    reqs = wl.multi_turn(
        [0.0, 0.5], turns=3, system_tokens=20, user_tokens=5, output_tokens=4, turn_gap_s=1.0
    )
    assert len(reqs) == 6
    s0 = sorted((r for r in reqs if r.session_id == "session-0-0"), key=lambda r: r.arrival_s)
    assert [r.arrival_s for r in s0] == [0.0, 1.0, 2.0]
    for prev, cur in itertools.pairwise(s0):
        assert cur.messages[: len(prev.messages)] == prev.messages
        assert len(cur.messages) == len(prev.messages) + 2
        assert ("x-session-id", "session-0-0") in cur.headers
    assert s0[-1].prompt_tokens == 20 + 3 * 5 + 2 * 4


def test_lora_mix_weights_and_sticky_sessions() -> None:
    mix = wl.parse_lora_mix("sql:3,chat:1,base:0")
    assert mix == [("sql", 3.0), ("chat", 1.0), (None, 0.0)]
    reqs = list(
        wl.with_lora_mix(
            wl.random_prompts(wl.arrival_times(10, 4000), prompt_tokens=2, output_tokens=1), mix
        )
    )
    share = sum(r.model == "sql" for r in reqs) / len(reqs)
    assert share == pytest.approx(0.75, abs=0.03)
    assert not any(r.model is None for r in reqs)
    chat = wl.multi_turn(
        [0.0, 0.1, 0.2], turns=4, system_tokens=2, user_tokens=2, output_tokens=2, turn_gap_s=1
    )
    tagged = list(wl.with_lora_mix(chat, wl.parse_lora_mix("a:1,b:1")))
    for sid in {r.session_id for r in tagged}:
        assert len({r.model for r in tagged if r.session_id == sid}) == 1
    with pytest.raises(ValueError):
        wl.parse_lora_mix("a:0")


def test_azure_trace(tmp_path: Path) -> None:
    f = tmp_path / "trace.csv"
    f.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:47.1805900,9000,3\n"
        "2023-11-16 18:15:48.6805900,10,0\n"
    )
    reqs = wl.azure_trace(f, max_prompt_tokens=4000)
    assert [round(r.arrival_s, 3) for r in reqs] == [0.0, 0.5, 2.0]
    assert [r.prompt_tokens for r in reqs] == [374, 4000, 10]
    assert [len(r.prompt.split()) for r in reqs] == [374, 4000, 10]
    assert [r.output_tokens for r in reqs] == [44, 3, 1]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        wl.arrival_times(0, 10)
    with pytest.raises(ValueError):
        wl.arrival_times(1, 10, kind="bursty", burst_len_s=5, burst_period_s=2)
    with pytest.raises(ValueError):
        wl.shared_prefix([0.0], num_groups=0, prefix_tokens=1, suffix_tokens=1, output_tokens=1)
