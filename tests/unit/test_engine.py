"""The engine core: scheduling, prefix caching, preemption, stop conditions, LoRA mixing."""

from __future__ import annotations

import pytest

from shoal.hashing import block_hashes
from shoal.kv_events import BlockRemoved, BlockStored, KvEvent
from shoal.sim.catalog import get_gpu, get_model
from shoal.sim.engine import EngineConfig, EngineCore
from shoal.sim.types import EngineRequest, FinishedRequestStats, FinishReason, SamplingParams


def make_core(**overrides: object) -> EngineCore:
    cfg = EngineConfig(
        model_name="tiny",
        model=get_model("tiny"),
        gpu=get_gpu("H100"),
        num_gpus=1,
        max_model_len=2048,
        block_size=32,
        num_gpu_blocks=160,
        max_num_seqs=8,
        max_num_batched_tokens=512,
        enable_lora=True,
        max_loras=2,
        max_lora_rank=8,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return EngineCore(cfg)


def req(rid: str, prompt: list[int], max_tokens: int = 4, **kw: object) -> EngineRequest:
    lora = kw.pop("lora_name", None)
    assert lora is None or isinstance(lora, str)
    return EngineRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, **kw), lora_name=lora)  # type: ignore[arg-type]


def run(
    core: EngineCore, now: float = 0.0, events: list[KvEvent] | None = None
) -> tuple[dict[str, FinishedRequestStats], float]:
    finished: dict[str, FinishedRequestStats] = {}
    t = now
    for _ in range(100_000):
        if not core.has_unfinished():
            break
        res = core.step(t)
        t += res.duration
        if events is not None:
            events.extend(res.kv_events)
        for f in res.finished:
            finished[f.request_id] = f
    return finished, t


def test_scripted_prefix_cache_hits_match_hand_computed() -> None:
    core = make_core()
    long = list(range(100, 300))  # 200 tokens: 6 full blocks of 32
    # 1) cold: 0 hits.  2) same prompt: 192 hits (6 blocks; the last token is recomputed).
    # 3) prompt sharing the first 64 tokens: 64 hits.  4) 31-token prompt: nothing cacheable.
    # 5) the 200 tokens under an adapter: 0 (the adapter is part of the hash).
    core.lora.add("ad", "/", rank=8)
    script = [
        (long, None, 0),
        (long, None, 192),
        ([*long[:64], *range(900, 960)], None, 64),
        (list(range(31)), None, 0),
        (long, "ad", 0),
    ]
    expected_hits = 0
    for i, (prompt, lora, hits) in enumerate(script):
        core.add_request(req(f"r{i}", prompt, max_tokens=1, lora_name=lora, ignore_eos=True))
        done, _ = run(core)
        assert done[f"r{i}"].num_cached_tokens == hits, i
        expected_hits += hits
    assert core.stats.prefix_cache_hits == expected_hits == 256
    assert core.stats.prefix_cache_queries == sum(len(p) for p, _, _ in script)


def test_lru_eviction_under_memory_pressure() -> None:
    core = make_core(num_gpu_blocks=20)
    a, b = list(range(1000, 1320)), list(range(2000, 2320))  # 10 blocks each
    for rid, prompt in (("a", a), ("b", b)):
        core.add_request(req(rid, prompt, max_tokens=1, ignore_eos=True))
        run(core)
    # A third prompt of 10 blocks must evict: A was used least recently.
    core.add_request(req("c", list(range(3000, 3320)), max_tokens=1, ignore_eos=True))
    events: list[KvEvent] = []
    run(core, events=events)
    removed = {h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes}
    assert removed and removed <= set(block_hashes(a, 32))
    core.add_request(req("b2", b, max_tokens=1, ignore_eos=True))
    done, _ = run(core)
    assert done["b2"].num_cached_tokens == 288  # B survived: 9 of its 10 blocks hit


def test_generation_is_deterministic_and_respects_limits() -> None:
    outs: list[list[int]] = []
    for _ in range(2):
        core = make_core()
        core.add_request(req("x", list(range(50)), max_tokens=20, ignore_eos=True))
        tokens: list[int] = []
        while core.has_unfinished():
            for o in core.step(0.0).outputs:
                tokens.extend(o.new_token_ids)
        outs.append(tokens)
    assert outs[0] == outs[1] and len(outs[0]) == 20


def test_stop_string_cuts_text_and_holds_back() -> None:
    core = make_core()
    core.add_request(req("probe", list(range(10)), max_tokens=6, ignore_eos=True))
    text = ""
    while core.has_unfinished():
        text += "".join(o.new_text for o in core.step(0.0).outputs)
    words = text.split()
    stop = words[3]
    core = make_core()
    core.add_request(req("s", list(range(10)), max_tokens=6, ignore_eos=True, stop=(stop,)))
    got, reason, stop_reason = "", None, None
    while core.has_unfinished():
        for o in core.step(0.0).outputs:
            got += o.new_text
            if o.finished:
                reason, stop_reason = o.finish_reason, o.stop_reason
    assert reason is FinishReason.STOP and stop_reason == stop
    assert got == text[: text.index(stop)]


def test_eos_ends_requests_without_ignore_eos_and_min_tokens_holds() -> None:
    core = make_core(mean_output_tokens=4)
    for i in range(20):
        core.add_request(req(f"e{i}", [i, i + 1, i + 2], max_tokens=200))
    done, _ = run(core)
    assert any(f.finish_reason is FinishReason.STOP for f in done.values())
    core = make_core(mean_output_tokens=4)
    core.add_request(req("m", [1, 2, 3], max_tokens=50, min_tokens=50))
    done, _ = run(core)
    assert done["m"].num_generation_tokens == 50


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    core = make_core(num_gpu_blocks=12, max_num_batched_tokens=2048)
    for i in range(4):
        core.add_request(
            req(f"p{i}", list(range(i * 1000, i * 1000 + 90)), max_tokens=60, ignore_eos=True)
        )
    done, _ = run(core)
    assert len(done) == 4 and all(f.num_generation_tokens == 60 for f in done.values())
    assert core.stats.num_preemptions > 0
    assert sum(f.num_preemptions for f in done.values()) == core.stats.num_preemptions
    assert core.kv.usage == 0.0


def test_chunked_prefill_respects_token_budget() -> None:
    core = make_core(max_num_batched_tokens=64)
    core.add_request(req("long", list(range(300)), max_tokens=1, ignore_eos=True))
    steps = 0
    while core.has_unfinished():
        res = core.step(0.0)
        assert res.num_scheduled_tokens <= 64
        steps += 1
    assert steps == 5  # ceil(300 / 64)


def test_batch_mixes_at_most_max_loras_adapters() -> None:
    core = make_core(max_loras=1)
    core.lora.add("a", "/", rank=8)
    core.lora.add("b", "/", rank=8)
    core.add_request(req("ra", list(range(40)), max_tokens=3, lora_name="a", ignore_eos=True))
    core.add_request(req("rb", list(range(40)), max_tokens=3, lora_name="b", ignore_eos=True))
    res = core.step(0.0)
    assert {o.request_id for o in res.outputs} == {"ra"}
    done, _ = run(core)
    assert set(done) == {"ra", "rb"}


def test_decode_stores_filled_blocks_and_events_chain() -> None:
    core = make_core()
    core.add_request(req("d", list(range(20)), max_tokens=50, ignore_eos=True))
    events = []
    while core.has_unfinished():
        events.extend(core.step(0.0).kv_events)
    stored = [e for e in events if isinstance(e, BlockStored)]
    # 20 + 50 = 70 tokens, of which 69 have KV computed: 2 full blocks, each its own event.
    assert [len(e.block_hashes) for e in stored] == [1, 1]
    assert stored[1].parent_block_hash == stored[0].block_hashes[0]


def test_abort_frees_blocks_and_reports() -> None:
    core = make_core()
    core.add_request(req("x", list(range(100)), max_tokens=100, ignore_eos=True))
    core.step(0.0)
    core.abort_request("x")
    res = core.step(1.0)
    assert [o.finish_reason for o in res.outputs] == [FinishReason.ABORT]
    assert core.kv.usage == 0.0 and not core.has_unfinished()


def test_rejects_prompt_over_max_model_len() -> None:
    core = make_core()
    with pytest.raises(ValueError, match="max_model_len"):
        core.add_request(req("big", list(range(2048))))
