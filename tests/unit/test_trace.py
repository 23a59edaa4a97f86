"""Workload sources: the Azure trace reader, the synthetic generator, deterministic prompts."""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

import pytest

from shoal.sim.trace import (
    PromptFactory,
    TraceRequest,
    load_azure_trace,
    scale_workload,
    synthetic_workload,
)

AZURE_CONV = Path("/work/shared/data/azure-llm-2023/AzureLLMInferenceTrace_conv.csv")

CSV = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:52.1000000,0,12
2023-11-16 18:16:46.6805900,10,1
"""


def test_reads_trace_relative_to_first_row(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(CSV)
    reqs = load_azure_trace(path)
    assert [r.prompt_tokens for r in reqs] == [374, 396, 1, 10]  # empty prompt clamped to 1
    assert reqs[0].arrival_s == 0.0
    assert reqs[1].arrival_s == pytest.approx(4.314579, abs=1e-7)
    assert reqs[3].arrival_s == pytest.approx(60.0, abs=1e-9)
    assert all(r.prefix_group is None for r in reqs)


def test_window_and_rate_scale(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(CSV)
    # Twice the rate: arrivals at 0, ~2.16, ~2.71, 30; the window [2, 30) keeps two, shifted.
    reqs = load_azure_trace(path, rate_scale=2.0, start_s=2.0, duration_s=28.0)
    assert [r.output_tokens for r in reqs] == [109, 12]
    assert reqs[0].arrival_s == pytest.approx(4.314579 / 2 - 2.0, abs=1e-7)
    assert len(load_azure_trace(path, max_requests=2)) == 2
    with pytest.raises(ValueError):
        load_azure_trace(path, rate_scale=0)


def test_rejects_other_csv(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        load_azure_trace(path)


@pytest.mark.skipif(not AZURE_CONV.exists(), reason="Azure trace not available")
def test_azure_conversation_trace_shape() -> None:
    reqs = load_azure_trace(AZURE_CONV)
    assert len(reqs) == 19366
    assert 3400 < reqs[-1].arrival_s < 3600
    assert statistics.mean(r.prompt_tokens for r in reqs) == pytest.approx(1155, rel=0.01)
    assert statistics.mean(r.output_tokens for r in reqs) == pytest.approx(211, rel=0.01)


def test_synthetic_matches_conversation_means_and_is_deterministic() -> None:
    a = list(synthetic_workload(20.0, 600.0, seed=3))
    b = list(synthetic_workload(20.0, 600.0, seed=3))
    assert a == b
    assert a != list(synthetic_workload(20.0, 600.0, seed=4))
    assert len(a) == pytest.approx(12000, rel=0.05)  # Poisson at 20 req/s
    assert statistics.mean(r.prompt_tokens for r in a) == pytest.approx(1155, rel=0.08)
    assert statistics.mean(r.output_tokens for r in a) == pytest.approx(211, rel=0.08)
    assert all(x.arrival_s <= y.arrival_s for x, y in itertools.pairwise(a))
    assert a[-1].arrival_s < 600.0


def test_synthetic_prefix_groups() -> None:
    reqs = list(
        synthetic_workload(
            50.0, 20.0, seed=1, num_prefix_groups=3, prefix_share=0.5, prefix_tokens=64
        )
    )
    grouped = [r for r in reqs if r.prefix_group is not None]
    assert 0.4 < len(grouped) / len(reqs) < 0.6
    assert {r.prefix_group for r in grouped} == {0, 1, 2}
    assert all(0 < r.prefix_tokens <= min(64, r.prompt_tokens - 1) for r in grouped)
    # The lengths do not depend on the prefix settings.
    plain = list(synthetic_workload(50.0, 20.0, seed=1))
    assert [r.prompt_tokens for r in plain] == [r.prompt_tokens for r in reqs]


def test_prompt_ids_are_deterministic_and_share_group_prefixes() -> None:
    f = PromptFactory(seed=7, vocab_size=128256)
    a = TraceRequest(0.0, 100, 5, prefix_group=2, prefix_tokens=40)
    b = TraceRequest(1.0, 30, 5, prefix_group=2, prefix_tokens=40)  # shorter than the prefix
    c = TraceRequest(2.0, 100, 5)
    ia, ib, ic = f.prompt_ids(0, a), f.prompt_ids(1, b), f.prompt_ids(2, c)
    assert (len(ia), len(ib), len(ic)) == (100, 30, 100)
    assert ia[:29] == ib[:29]  # b keeps one token of its own
    assert ia[40:] != f.prompt_ids(3, a)[40:]
    assert ia[:40] == f.prompt_ids(3, a)[:40]
    assert ic[:40] != ia[:40]
    assert PromptFactory(seed=7, vocab_size=128256).prompt_ids(2, c) == ic
    assert all(4 <= t < 65536 for t in ia + ic)
    small = PromptFactory(seed=7, vocab_size=100).prompt_ids(0, c)
    assert all(4 <= t < 100 for t in small)


def test_scale_workload() -> None:
    reqs = [TraceRequest(10.0, 5, 6, 1, 3)]
    assert list(scale_workload(reqs, 2.0)) == [TraceRequest(5.0, 5, 6, 1, 3)]
