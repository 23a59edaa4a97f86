"""Precise prefix index: which blocks each engine really holds, from its KV events.

Fed by :class:`shoal.router.kv_subscriber.KvEventSubscriber`; read by the ``kv-aware`` strategy's
:class:`~shoal.router.scorers.PreciseKvScorer`. Unlike the approximate index this one is told about
evictions, so a match means the engine had the blocks a moment ago.

Two hash spaces. The router hashes a prompt with :func:`shoal.hashing.block_hashes`.
``shoal sim`` publishes those very hashes ("native" endpoints), but a real vLLM hashes a different
byte encoding (and may salt it), so its hashes never equal ours. The index therefore decides per
endpoint, from the first ``BlockStored`` that carries token ids, whether the engine's hash of the
first block equals the hash we compute from the event's ``token_ids``, parent and ``lora_name``:

- native: engine hashes are used as they are; no extra state;
- foreign: every stored block is re-hashed with our function (chained from the parent block's *our*
  hash) and a per-endpoint map engine-hash -> our-hash resolves later parents and ``BlockRemoved``.
  That map holds exactly one entry per indexed block of that endpoint, so it shares the index's
  bound. A block whose parent we never saw (missed events, or evicted here) cannot be re-hashed and
  is skipped (counted as ``unresolved_blocks``): a prefix match needs the whole chain anyway. Only
  the LoRA name is taken as an extra key; blocks salted with other extra keys (multimodal hashes,
  cache salts) cannot match a plain prompt anyway.

Only GPU-tier blocks of KV cache group 0 are indexed: that is what makes a prompt's prefill cheap on
that engine (CPU-offloaded copies are a later refinement).

Sequence numbers: a publisher numbers its batches 0, 1, 2, ... without gaps. ``apply`` tells the
caller when a batch jumps ahead (messages were lost: ZMQ PUB drops at its high-water mark, and a
subscriber that joins late misses everything before it) so it can replay the missing range from the
engine's replay socket. A sequence number that goes *backwards* on the live stream means the engine
restarted (its cache is empty again): the endpoint's blocks are cleared and numbering starts over.

Memory: ``dict[int, int]`` block -> endpoint bitmask for lookups (one probe per prompt block
whatever the number of endpoints), plus one insertion-ordered ``dict`` per endpoint for eviction
and removal.
``max_blocks`` bounds the total; beyond it the endpoint holding the most blocks loses its oldest.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from shoal.hashing import hash_block
from shoal.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch

log = logging.getLogger(__name__)

DEFAULT_MAX_BLOCKS = 1_000_000

# Called as on_gap(endpoint_url, first_missing_seq, seq_received).
GapCallback = Callable[[str, int, int], None]


class HashSpace(enum.Enum):
    UNKNOWN = "unknown"
    NATIVE = "native"  # the engine hashes with shoal.hashing (shoal sim)
    FOREIGN = "foreign"  # anything else (vLLM, SGLang): re-hash from token ids


@dataclass(slots=True)
class _EndpointBlocks:
    eid: int
    # our hash -> the engine's hash, oldest first (eviction order).
    blocks: dict[int, int] = field(default_factory=dict)
    # engine hash -> our hash; foreign endpoints only.
    engine_to_ours: dict[int, int] = field(default_factory=dict)
    hash_space: HashSpace = HashSpace.UNKNOWN
    block_size: int | None = None
    last_seq: int | None = None
    # Highest seq applied from a replay; live duplicates up to it are skipped, not taken as restart.
    replayed_through: int | None = None
    complete: bool = True
    has_events: bool = False


class KvEventIndex:
    """Per-endpoint sets of held blocks, queried by prompt prefix. Event-loop only, never awaits."""

    def __init__(
        self, max_blocks: int = DEFAULT_MAX_BLOCKS, *, on_gap: GapCallback | None = None
    ) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be at least 1")
        self.max_blocks = max_blocks
        self._on_gap = on_gap
        self._owners: dict[int, int] = {}  # our hash -> bitmask of endpoint ids holding it
        self._endpoints: dict[str, _EndpointBlocks] = {}
        self._urls_by_id: dict[int, str] = {}
        self._free_ids: list[int] = []
        self._total = 0
        # gaps, duplicates, restarts, unresolved_blocks, ignored_events, evicted_blocks, ...
        self.counters: Counter[str] = Counter()

    # ------------------------------------------------------------------------------- inspection

    def __len__(self) -> int:
        return self._total

    def has_events(self, url: str) -> bool:
        """True once the endpoint has published at least one batch we applied."""
        ep = self._endpoints.get(url)
        return ep is not None and ep.has_events

    def is_complete(self, url: str) -> bool:
        """False after a gap that replay could not fill: the endpoint's view may be stale."""
        ep = self._endpoints.get(url)
        return ep is None or ep.complete

    def blocks_of(self, url: str) -> int:
        ep = self._endpoints.get(url)
        return 0 if ep is None else len(ep.blocks)

    def hash_space(self, url: str) -> HashSpace:
        ep = self._endpoints.get(url)
        return HashSpace.UNKNOWN if ep is None else ep.hash_space

    def block_size(self, url: str) -> int | None:
        """The engine's block size, once known: prompts must be hashed with the same size."""
        ep = self._endpoints.get(url)
        return None if ep is None else ep.block_size

    def last_seq(self, url: str) -> int | None:
        ep = self._endpoints.get(url)
        return None if ep is None else ep.last_seq

    # -------------------------------------------------------------------------------- endpoints

    def _endpoint(self, url: str) -> _EndpointBlocks:
        ep = self._endpoints.get(url)
        if ep is None:
            eid = self._free_ids.pop() if self._free_ids else len(self._urls_by_id)
            ep = _EndpointBlocks(eid=eid)
            self._endpoints[url] = ep
            self._urls_by_id[eid] = url
        return ep

    def remove_endpoint(self, url: str) -> None:
        ep = self._endpoints.pop(url, None)
        if ep is None:
            return
        self._clear(ep)
        del self._urls_by_id[ep.eid]
        self._free_ids.append(ep.eid)  # safe to reuse: _clear removed every bit it owned

    def _clear(self, ep: _EndpointBlocks) -> None:
        keep = ~(1 << ep.eid)
        owners = self._owners
        for ours in ep.blocks:
            mask = owners[ours] & keep
            if mask:
                owners[ours] = mask
            else:
                del owners[ours]
        self._total -= len(ep.blocks)
        ep.blocks = {}
        ep.engine_to_ours = {}

    # ---------------------------------------------------------------------------------- applying

    def apply(
        self,
        url: str,
        seq: int,
        batch: EventBatch,
        *,
        replay: bool = False,
        accept_gap: bool = False,
    ) -> int | None:
        """Apply one published batch; returns None, or the first missing seq on a gap.

        On a gap (``seq`` jumps ahead of the next expected number) the batch is *not* applied
        unless ``accept_gap``: the caller should replay from the returned seq, then call again with
        ``accept_gap=True`` (a duplicate by then is skipped; a gap replay could not fill is accepted
        and marks the endpoint incomplete). ``replay=True`` marks batches from the replay socket:
        older ones are duplicates, and a jump means the engine's buffer no longer reaches back.
        """
        ep = self._endpoint(url)
        last = ep.last_seq
        if last is not None and seq <= last:
            if replay or (ep.replayed_through is not None and seq <= ep.replayed_through):
                self.counters["duplicates"] += 1
                return None
            # The live stream never goes backwards: the engine restarted with an empty cache.
            self.counters["restarts"] += 1
            log.info("KV events from %s restarted at seq %d (after %d): clearing", url, seq, last)
            self._clear(ep)
            ep.last_seq = last = None
            ep.replayed_through = None
            ep.complete = True
            if seq > 0 and not accept_gap:
                return self._gap(url, 0, seq)
        expected = 0 if last is None else last + 1
        if seq > expected:
            if replay or accept_gap:
                # Lost for good (the engine's replay buffer is shorter than the gap).
                ep.complete = False
                self.counters["unrecovered_gaps"] += 1
            else:
                return self._gap(url, expected, seq)
        elif not replay and ep.replayed_through is not None:
            ep.replayed_through = None  # live stream caught up with the replay
        ep.last_seq = seq
        self._apply_events(ep, batch)
        return None

    def _gap(self, url: str, expected: int, seq: int) -> int:
        self.counters["gaps"] += 1
        if self._on_gap is not None:
            self._on_gap(url, expected, seq)
        return expected

    def replay_finished(self, url: str) -> None:
        """Live batches up to what the replay delivered are duplicates from now on."""
        ep = self._endpoints.get(url)
        if ep is not None:
            ep.replayed_through = ep.last_seq

    def _apply_events(self, ep: _EndpointBlocks, batch: EventBatch) -> None:
        if batch.events:
            ep.has_events = True
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._stored(ep, event)
            elif isinstance(event, BlockRemoved):
                self._removed(ep, event)
            elif isinstance(event, AllBlocksCleared):
                self._clear(ep)
                ep.complete = True  # an empty cache is exactly known

    def _our_hashes(self, ep: _EndpointBlocks, event: BlockStored) -> list[int] | None:
        """Our hashes for the event's blocks, or None when they cannot be computed."""
        hashes = event.block_hashes
        if ep.hash_space is HashSpace.NATIVE:
            return hashes
        bs = event.block_size
        tokens = event.token_ids
        if bs <= 0 or len(tokens) != bs * len(hashes):
            # vLLM sends the blocks' tokens concatenated; anything else cannot be re-hashed.
            self.counters["unresolved_blocks"] += len(hashes)
            return None
        parent = event.parent_block_hash
        if ep.hash_space is HashSpace.UNKNOWN:
            # A native parent is its own our-hash, so this single hash decides the space.
            first = hash_block(parent, tokens[:bs], event.lora_name)
            ep.hash_space = HashSpace.NATIVE if first == hashes[0] else HashSpace.FOREIGN
            if ep.hash_space is HashSpace.NATIVE:
                return hashes
        parent_ours: int | None = None
        if parent is not None:
            parent_ours = ep.engine_to_ours.get(parent)
            if parent_ours is None:
                self.counters["unresolved_blocks"] += len(hashes)
                return None
        ours: list[int] = []
        for i in range(len(hashes)):
            parent_ours = hash_block(parent_ours, tokens[i * bs : (i + 1) * bs], event.lora_name)
            ours.append(parent_ours)
        return ours

    def _stored(self, ep: _EndpointBlocks, event: BlockStored) -> None:
        if event.medium != "GPU" or event.group_idx != 0 or not event.block_hashes:
            self.counters["ignored_events"] += 1
            return
        ep.block_size = event.block_size
        ours = self._our_hashes(ep, event)
        if ours is None:
            return
        bit = 1 << ep.eid
        owners = self._owners
        blocks = ep.blocks
        foreign = ep.hash_space is HashSpace.FOREIGN
        added = 0
        for our_hash, engine_hash in zip(ours, event.block_hashes, strict=True):
            previous_engine = blocks.pop(our_hash, None)
            blocks[our_hash] = engine_hash  # (re)inserted last: the newest block
            if foreign:
                if previous_engine is not None and previous_engine != engine_hash:
                    ep.engine_to_ours.pop(previous_engine, None)
                ep.engine_to_ours[engine_hash] = our_hash
            if previous_engine is None:
                owners[our_hash] = owners.get(our_hash, 0) | bit
                added += 1
        self._total += added
        if self._total > self.max_blocks:
            self._evict(self._total - self.max_blocks)

    def _removed(self, ep: _EndpointBlocks, event: BlockRemoved) -> None:
        if event.medium != "GPU" or event.group_idx != 0:
            self.counters["ignored_events"] += 1
            return
        foreign = ep.hash_space is HashSpace.FOREIGN
        for engine_hash in event.block_hashes:
            our_hash = ep.engine_to_ours.pop(engine_hash, None) if foreign else engine_hash
            if our_hash is not None:
                self._drop(ep, our_hash)

    def _drop(self, ep: _EndpointBlocks, our_hash: int) -> None:
        if ep.blocks.pop(our_hash, None) is None:
            return
        mask = self._owners[our_hash] & ~(1 << ep.eid)
        if mask:
            self._owners[our_hash] = mask
        else:
            del self._owners[our_hash]
        self._total -= 1

    def _evict(self, count: int) -> None:
        # Take from the endpoint holding the most blocks, oldest first, so a chatty endpoint
        # cannot push a quiet one out of the index. A tenth of the overshoot's owner at a time
        # keeps this O(endpoints) per batch rather than per block.
        while count > 0:
            ep = max(self._endpoints.values(), key=lambda e: len(e.blocks))
            take = min(count, max(1, len(ep.blocks) // 10))
            victims = []
            for our_hash in ep.blocks:
                victims.append(our_hash)
                if len(victims) >= take:
                    break
            for our_hash in victims:
                engine_hash = ep.blocks[our_hash]
                if ep.hash_space is HashSpace.FOREIGN:
                    ep.engine_to_ours.pop(engine_hash, None)
                self._drop(ep, our_hash)
            self.counters["evicted_blocks"] += len(victims)
            count -= len(victims)

    # ----------------------------------------------------------------------------------- reads

    def match(self, block_hashes: Sequence[int], urls: Iterable[str]) -> dict[str, int]:
        """Longest prefix (in blocks) of ``block_hashes`` each endpoint in ``urls`` holds.

        One dict probe per block whatever the number of endpoints. A prefix match needs every block
        from the first one: a hole (an evicted block) ends the endpoint's match there, as it ends
        the engine's prefix-cache hit.
        """
        result = dict.fromkeys(urls, 0)
        alive = 0
        for url in result:
            ep = self._endpoints.get(url)
            if ep is not None:
                alive |= 1 << ep.eid
        if not alive:
            return result
        owners = self._owners
        urls_by_id = self._urls_by_id
        depth = 0
        for h in block_hashes:
            still = alive & owners.get(h, 0)
            dropped = alive & ~still
            while dropped:
                low = dropped & -dropped
                result[urls_by_id[low.bit_length() - 1]] = depth
                dropped ^= low
            alive = still
            if not alive:
                return result
            depth += 1
        while alive:
            low = alive & -alive
            result[urls_by_id[low.bit_length() - 1]] = depth
            alive ^= low
        return result
