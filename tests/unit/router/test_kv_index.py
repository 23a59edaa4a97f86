"""KvEventIndex: stored/removed/cleared events, native and foreign hash spaces, sequence gaps,
restarts, and the hard bound."""

from __future__ import annotations

import hashlib

import pytest

from shoal.hashing import block_hashes
from shoal.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, KvEvent
from shoal.router.kv_index import HashSpace, KvEventIndex

A = "http://a:8000"
B = "http://b:8000"
BS = 4


def batch(*events: KvEvent) -> EventBatch:
    return EventBatch(timestamp=0.0, events=list(events))


def stored_native(
    tokens: list[int], parent_tokens: list[int] | None = None, lora: str | None = None
) -> BlockStored:
    """What shoal sim publishes: our own hashes."""
    parent = None
    if parent_tokens:
        parent = block_hashes(parent_tokens, BS, lora)[-1]
    full = (parent_tokens or []) + tokens
    hashes = block_hashes(full, BS, lora)[len(parent_tokens or []) // BS :]
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=BS,
        lora_name=lora,
    )


def vllm_hash(parent: int | None, tokens: list[int]) -> int:
    """A stand-in for vLLM's hash: chained, but a different function from ours."""
    data = f"{parent}|{tokens}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def stored_foreign(tokens: list[int], parent: int | None) -> tuple[BlockStored, list[int]]:
    hashes = []
    p = parent
    for i in range(0, len(tokens), BS):
        p = vllm_hash(p, tokens[i : i + BS])
        hashes.append(p)
    return (
        BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=BS),
        hashes,
    )


PROMPT = list(range(1, 17))  # 4 blocks
OURS = block_hashes(PROMPT, BS)


def test_native_store_match_remove_clear() -> None:
    idx = KvEventIndex(max_blocks=100)
    assert not idx.has_events(A)
    assert idx.apply(A, 0, batch(stored_native(PROMPT[:8]))) is None
    assert idx.apply(A, 1, batch(stored_native(PROMPT[8:], parent_tokens=PROMPT[:8]))) is None
    assert idx.has_events(A)
    assert idx.hash_space(A) is HashSpace.NATIVE
    assert idx.block_size(A) == BS
    assert idx.match(OURS, [A, B]) == {A: 4, B: 0}
    # Evicting block 2 ends the prefix there, as it ends the engine's cache hit.
    idx.apply(A, 2, batch(BlockRemoved(block_hashes=[OURS[2]])))
    assert idx.match(OURS, [A]) == {A: 2}
    assert len(idx) == 3
    idx.apply(A, 3, batch(AllBlocksCleared()))
    assert idx.match(OURS, [A]) == {A: 0}
    assert len(idx) == 0


def test_two_endpoints_and_removal() -> None:
    idx = KvEventIndex(max_blocks=100)
    idx.apply(A, 0, batch(stored_native(PROMPT)))
    idx.apply(B, 0, batch(stored_native(PROMPT[:8])))
    assert idx.match(OURS, [A, B]) == {A: 4, B: 2}
    idx.remove_endpoint(A)
    assert idx.match(OURS, [A, B]) == {A: 0, B: 2}
    assert len(idx) == 2
    # A newcomer reusing A's slot starts empty.
    idx.apply("http://c:8000", 0, batch(stored_native(PROMPT[:4])))
    assert idx.match(OURS, ["http://c:8000", B]) == {"http://c:8000": 1, B: 2}


def test_lora_blocks_match_only_lora_prompts() -> None:
    idx = KvEventIndex(max_blocks=100)
    idx.apply(A, 0, batch(stored_native(PROMPT, lora="sql")))
    assert idx.match(OURS, [A]) == {A: 0}
    assert idx.match(block_hashes(PROMPT, BS, "sql"), [A]) == {A: 4}


def test_foreign_hashes_are_rehashed_into_ours() -> None:
    idx = KvEventIndex(max_blocks=100)
    first, engine1 = stored_foreign(PROMPT[:8], None)
    second, engine2 = stored_foreign(PROMPT[8:], engine1[-1])
    idx.apply(A, 0, batch(first))
    idx.apply(A, 1, batch(second))
    assert idx.hash_space(A) is HashSpace.FOREIGN
    assert idx.match(OURS, [A]) == {A: 4}
    # BlockRemoved carries the engine's hash; it must reach our entry.
    idx.apply(A, 2, batch(BlockRemoved(block_hashes=[engine2[0]])))
    assert idx.match(OURS, [A]) == {A: 2}
    # A child of a parent we never saw cannot be placed in our hash space.
    orphan, _ = stored_foreign([9, 9, 9, 9], parent=12345)
    idx.apply(A, 3, batch(orphan))
    assert idx.counters["unresolved_blocks"] == 1


def test_non_gpu_and_other_groups_ignored() -> None:
    idx = KvEventIndex(max_blocks=100)
    ev = stored_native(PROMPT)
    cpu = BlockStored(
        block_hashes=ev.block_hashes,
        parent_block_hash=None,
        token_ids=ev.token_ids,
        block_size=BS,
        medium="CPU",
    )
    idx.apply(A, 0, batch(cpu))
    assert idx.match(OURS, [A]) == {A: 0}
    assert idx.counters["ignored_events"] == 1


def test_gap_is_reported_and_not_applied_until_accepted() -> None:
    seen: list[tuple[str, int, int]] = []
    idx = KvEventIndex(max_blocks=100, on_gap=lambda *a: seen.append(a))
    idx.apply(A, 0, batch(stored_native(PROMPT[:4])))
    later = batch(stored_native(PROMPT[8:], parent_tokens=PROMPT[:8]))
    assert idx.apply(A, 2, later) == 1
    assert seen == [(A, 1, 2)]
    assert idx.last_seq(A) == 0
    assert idx.match(OURS, [A]) == {A: 1}
    # Replay delivers 1 and 2; the re-applied live batch is then a duplicate.
    idx.apply(A, 1, batch(stored_native(PROMPT[4:8], parent_tokens=PROMPT[:4])), replay=True)
    idx.apply(A, 2, later, replay=True)
    idx.replay_finished(A)
    assert idx.apply(A, 2, later, accept_gap=True) is None
    assert idx.counters["duplicates"] == 1
    assert idx.counters["restarts"] == 0
    assert idx.is_complete(A)
    assert idx.match(OURS, [A]) == {A: 4}
    assert idx.apply(A, 3, batch(AllBlocksCleared())) is None


def test_unfillable_gap_marks_incomplete() -> None:
    idx = KvEventIndex(max_blocks=100)
    idx.apply(A, 0, batch(stored_native(PROMPT[:4])))
    assert idx.apply(A, 5, batch(stored_native(PROMPT[4:8], PROMPT[:4]))) == 1
    assert idx.apply(A, 5, batch(stored_native(PROMPT[4:8], PROMPT[:4])), accept_gap=True) is None
    assert not idx.is_complete(A)
    assert idx.last_seq(A) == 5
    # AllBlocksCleared makes the view exact again.
    idx.apply(A, 6, batch(AllBlocksCleared()))
    assert idx.is_complete(A)


def test_late_joiner_asks_for_replay_from_zero() -> None:
    idx = KvEventIndex(max_blocks=100)
    assert idx.apply(A, 7, batch(stored_native(PROMPT))) == 0


def test_backwards_seq_on_live_stream_is_a_restart() -> None:
    idx = KvEventIndex(max_blocks=100)
    idx.apply(A, 0, batch(stored_native(PROMPT)))
    idx.apply(A, 1, batch(stored_native([7, 7, 7, 7])))
    assert idx.apply(A, 0, batch(stored_native(PROMPT[:4]))) is None
    assert idx.counters["restarts"] == 1
    assert idx.match(OURS, [A]) == {A: 1}  # old blocks cleared, new one applied
    assert len(idx) == 1


def test_hard_bound_evicts_oldest_of_the_largest_endpoint() -> None:
    idx = KvEventIndex(max_blocks=10)
    idx.apply(B, 0, batch(stored_native(PROMPT[:8])))  # 2 blocks on B
    for i in range(20):
        idx.apply(A, i, batch(stored_native([100 + i] * 4)))
        assert len(idx) <= 10
    assert idx.blocks_of(B) == 2  # the quiet endpoint kept its blocks
    assert idx.counters["evicted_blocks"] >= 12
    # The newest of A's survive.
    assert idx.match(block_hashes([119] * 4, BS), [A]) == {A: 1}
    assert idx.match(block_hashes([100] * 4, BS), [A]) == {A: 0}


def test_invalid_bound() -> None:
    with pytest.raises(ValueError):
        KvEventIndex(max_blocks=0)
