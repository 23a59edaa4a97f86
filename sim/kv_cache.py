"""Paged KV cache with prefix caching, the way vLLM v1's block pool works.

- The cache is ``num_blocks`` blocks of ``block_size`` tokens. A request holds a list of blocks.
- A *full* block gets a hash chained from its parent block's hash (``shoal.hashing``), including
  the LoRA adapter name, and is registered in ``hash -> block`` so later requests with the same
  prefix reuse it (a prefix-cache hit).
- A block whose reference count drops to zero goes to the *free queue* but keeps its hash: it is
  still a cache hit until it is reused. Allocation takes from the head of the free queue (least
  recently freed first), which evicts the block's hash: LRU over unreferenced blocks. A request
  frees its blocks tail first, so the tail of a prompt is evicted before its head (its head is
  more likely shared).
- Storing and evicting emit ``BlockStored`` / ``BlockRemoved`` events (vLLM's KV events); a reset
  emits ``AllBlocksCleared`` with the next batch of events, as vLLM does.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from shoal.hashing import hash_block
from shoal.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent


@dataclass(slots=True)
class _Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None


@dataclass(slots=True)
class KvAllocation:
    """The blocks one request holds and how many of them are hashed and registered."""

    blocks: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    # Hashes of the prompt's blocks computed for the prefix lookup at admission; reused when those
    # blocks fill so each block is hashed once (sha256 is most of a simulated step's cost).
    known_hashes: list[int] = field(default_factory=list)


class KvCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        lora_ids: dict[str, int] | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0: {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Insertion order is eviction order: the head is the least recently freed block.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._events: list[KvEvent] = []
        self._lora_ids = lora_ids if lora_ids is not None else {}

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of blocks held by requests (vLLM's ``kv_cache_usage_perc``)."""
        return 1.0 - len(self._free) / self.num_blocks

    def cached_hashes(self) -> set[int]:
        return set(self._cached)

    def find_cached_prefix(self, block_hashes: list[int]) -> list[int]:
        """Block ids of the longest run of ``block_hashes`` that is cached, from the start."""
        if not self.enable_prefix_caching:
            return []
        hit: list[int] = []
        cached = self._cached
        for h in block_hashes:
            bid = cached.get(h)
            if bid is None:
                break
            hit.append(bid)
        return hit

    # ---- allocation ----------------------------------------------------------------------
    def take_cached(self, alloc: KvAllocation, block_ids: list[int], hashes: list[int]) -> None:
        """Give a new request the prefix blocks found by ``find_cached_prefix``."""
        for bid in block_ids:
            block = self._blocks[bid]
            if block.ref_cnt == 0:
                self._free.pop(bid, None)
            block.ref_cnt += 1
        alloc.blocks.extend(block_ids)
        alloc.block_hashes.extend(hashes[: len(block_ids)])
        alloc.known_hashes = hashes

    def blocks_needed(self, alloc: KvAllocation, num_tokens: int) -> int:
        """Extra blocks ``alloc`` needs to hold ``num_tokens`` tokens in total."""
        return max(0, -(-num_tokens // self.block_size) - len(alloc.blocks))

    def allocate(self, alloc: KvAllocation, num_tokens: int) -> bool:
        """Grow ``alloc`` to hold ``num_tokens`` tokens; False (and no change) if they don't fit."""
        need = self.blocks_needed(alloc, num_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            bid, _unused = self._free.popitem(last=False)
            block = self._blocks[bid]
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            alloc.blocks.append(bid)
        return True

    def _evict(self, block: _Block) -> None:
        h = block.block_hash
        assert h is not None
        if self._cached.get(h) == block.block_id:
            del self._cached[h]
            self._events.append(BlockRemoved(block_hashes=[h]))
        block.block_hash = None

    def free(self, alloc: KvAllocation) -> None:
        """Release a request's blocks, tail first, so a prompt's tail is evicted before its head."""
        for bid in reversed(alloc.blocks):
            block = self._blocks[bid]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    # Unhashed blocks hold nothing reusable: evict them before any cached block.
                    self._free[bid] = None
                    self._free.move_to_end(bid, last=False)
                else:
                    self._free[bid] = None
        alloc.blocks.clear()
        alloc.block_hashes.clear()
        alloc.known_hashes = []

    def cache_full_blocks(
        self, alloc: KvAllocation, token_ids: list[int], num_computed: int, lora_name: str | None
    ) -> None:
        """Hash and register the blocks that ``num_computed`` tokens have filled.

        Emits one ``BlockStored`` event for all blocks newly stored by this call, chained to the
        last block that was already registered, as vLLM does per request per step.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = num_computed // bs
        done = len(alloc.block_hashes)
        if full <= done:
            return
        parent = alloc.block_hashes[-1] if done else None
        event_parent = parent
        stored: list[int] = []
        stored_tokens: list[int] = []
        known = alloc.known_hashes
        for i in range(done, full):
            tokens = token_ids[i * bs : (i + 1) * bs]
            h = known[i] if i < len(known) else hash_block(parent, tokens, lora_name)
            alloc.block_hashes.append(h)
            parent = h
            block = self._blocks[alloc.blocks[i]]
            if h in self._cached:
                # Another request computed the same block concurrently: keep the first copy.
                if stored:
                    self._flush_stored(stored, stored_tokens, event_parent, lora_name)
                    stored, stored_tokens = [], []
                event_parent = h
                continue
            block.block_hash = h
            self._cached[h] = block.block_id
            stored.append(h)
            stored_tokens.extend(tokens)
        if stored:
            self._flush_stored(stored, stored_tokens, event_parent, lora_name)

    def _flush_stored(
        self, hashes: list[int], tokens: list[int], parent: int | None, lora_name: str | None
    ) -> None:
        self._events.append(
            BlockStored(
                block_hashes=hashes,
                parent_block_hash=parent,
                token_ids=tokens,
                block_size=self.block_size,
                lora_id=self._lora_ids.get(lora_name) if lora_name is not None else None,
                lora_name=lora_name,
                extra_keys=[[lora_name] if lora_name is not None else None for _ in hashes],
            )
        )

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use, like vLLM."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self._blocks:
            block.block_hash = None
        self._cached.clear()
        self._events.append(AllBlocksCleared())
        return True

    def drain_events(self) -> list[KvEvent]:
        events, self._events = self._events, []
        return events
