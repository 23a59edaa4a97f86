"""The paged KV cache: prefix hits, chained hashes, LRU eviction, KV events."""

from __future__ import annotations

from shoal.hashing import block_hashes
from shoal.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from shoal.sim.kv_cache import KvAllocation, KvCacheManager

BS = 4


def _fill(kv: KvCacheManager, tokens: list[int], lora: str | None = None) -> KvAllocation:
    """Admit a request the way the scheduler does: cached prefix, then new blocks, then cache."""
    alloc = KvAllocation()
    cacheable = (len(tokens) - 1) // BS * BS
    hashes = block_hashes(tokens[:cacheable], BS, lora)
    hit = kv.find_cached_prefix(hashes)
    kv.take_cached(alloc, hit, hashes)
    assert kv.allocate(alloc, len(tokens))
    kv.cache_full_blocks(alloc, tokens, len(tokens), lora)
    return alloc


def test_hashes_chain_and_include_lora() -> None:
    a = block_hashes(list(range(8)), BS)
    b = block_hashes([*range(4), 99, 5, 6, 7], BS)
    assert a[0] == b[0] and a[1] != b[1]  # same first block, different second
    assert block_hashes(list(range(8)), BS, "adapter") != a
    assert block_hashes(list(range(7)), BS) == a[:1]  # partial tail block has no hash
    assert all(0 <= h < 2**64 for h in a)


def test_prefix_hit_counts_full_blocks_and_keeps_last_token() -> None:
    kv = KvCacheManager(num_blocks=16, block_size=BS)
    first = _fill(kv, list(range(10)))  # 2 full blocks stored
    kv.free(first)
    events = kv.drain_events()
    assert len(events) == 1 and isinstance(events[0], BlockStored)
    assert len(events[0].block_hashes) == 2 and events[0].parent_block_hash is None
    # Same 10 tokens: 2 blocks hit (8 tokens). Exactly 8 tokens: only 1 block, since the last
    # token must be recomputed (vLLM caps the hit at len - 1 tokens).
    assert len(kv.find_cached_prefix(block_hashes(list(range(9))[:8], BS))) == 2
    assert len(kv.find_cached_prefix(block_hashes(list(range(8))[:4], BS))) == 1


def test_eviction_is_lru_over_unreferenced_blocks() -> None:
    kv = KvCacheManager(num_blocks=4, block_size=BS)
    a = _fill(kv, [1] * 8)  # blocks of prompt A
    kv.free(a)
    b = _fill(kv, [2] * 8)  # blocks of prompt B
    kv.free(b)
    kv.drain_events()
    # A was freed first, so it is evicted first; B stays cached.
    c = _fill(kv, [3] * 5)  # needs 2 blocks
    events = kv.drain_events()
    removed = [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert removed and set(removed) <= set(block_hashes([1] * 8, BS))
    assert len(kv.find_cached_prefix(block_hashes([2] * 8, BS))) == 2
    assert kv.find_cached_prefix(block_hashes([1] * 8, BS)) == []
    kv.free(c)


def test_tail_blocks_evicted_before_head() -> None:
    kv = KvCacheManager(num_blocks=3, block_size=BS)
    a = _fill(kv, list(range(12)))
    kv.free(a)
    kv.drain_events()
    assert kv.allocate(KvAllocation(), 1)
    # The tail block went first: the first two blocks of the prompt are still a hit.
    assert len(kv.find_cached_prefix(block_hashes(list(range(12)), BS))) == 2


def test_allocation_failure_changes_nothing_and_usage_tracks_blocks() -> None:
    kv = KvCacheManager(num_blocks=2, block_size=BS)
    alloc = KvAllocation()
    assert not kv.allocate(alloc, 9)
    assert alloc.blocks == [] and kv.num_free_blocks == 2 and kv.usage == 0.0
    assert kv.allocate(alloc, 5)
    assert kv.usage == 1.0
    kv.free(alloc)
    assert kv.usage == 0.0


def test_reset_refused_while_in_use_then_clears() -> None:
    kv = KvCacheManager(num_blocks=4, block_size=BS)
    a = _fill(kv, list(range(9)))
    assert not kv.reset_prefix_cache()
    kv.free(a)
    kv.drain_events()
    assert kv.reset_prefix_cache()
    assert kv.drain_events() == [AllBlocksCleared()]
    assert kv.find_cached_prefix(block_hashes(list(range(8)), BS)) == []


def test_lora_blocks_carry_adapter_in_events() -> None:
    kv = KvCacheManager(num_blocks=8, block_size=BS, lora_ids={"ad": 7})
    _fill(kv, list(range(9)), lora="ad")
    (event,) = kv.drain_events()
    assert isinstance(event, BlockStored)
    assert event.lora_name == "ad" and event.lora_id == 7
    assert event.extra_keys == [["ad"], ["ad"]]
