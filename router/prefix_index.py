"""Approximate prefix index: which endpoints the router itself sent which prompt blocks.

The router cannot see an engine's prefix cache without KV events, but it knows where it sent every
prompt. A block hash (``shoal.hashing``: chained, so one hash stands for the whole prefix up to and
including that block) that went to an endpoint recently is probably still cached there. This is the
"approximate" prefix affinity of sglang-router's ``cache_aware`` policy and the Gateway API
Inference Extension's prefix plugin, kept as a flat hash table instead of a radix tree: the chained
hashes already encode the tree, so a lookup is one dict probe per block.

Memory is the design constraint (the router must survive 1,000,000 distinct prompts within a stated
bound), so one entry is as small as CPython allows:

- ``dict[int, int]``: block hash -> ``(endpoint bitmask << STAMP_BITS) | last_write_ms``. No tuple,
  no per-entry object besides the key int and a value int. Endpoints are small ints handed out by
  the index, so a fleet of up to ~20 endpoints keeps the value a 2-digit int, and one ``record``
  call writes the *same* value object into every block it creates, so values are mostly shared.
  Measured: about 90 bytes per entry by tracemalloc, about 115 bytes of RSS with allocator
  slack (``tests/unit/router/test_prefix_index.py``: 1,000,000 prompts at the default 500,000-entry
  bound grow RSS by ~57 MB).
- Eviction is generational (segmented LRU, no OrderedDict and no per-entry links): writes go to a
  *current* dict; when it holds ``max_entries // 2`` entries it becomes the *previous* dict and the
  old previous one is dropped whole. Lookups read current, then previous; a write of a block found
  only in previous carries its endpoints over. So an entry survives at least ``max_entries // 2``
  writes after its last write, the two dicts together never hold more than ``max_entries``, and
  nothing is ever deleted from a dict, which matters: deletes leave holes that make CPython grow a
  churning dict to about three times its live size. Dropping a generation frees its memory at once.
- TTL: every value carries its write time; an expired entry reads as absent, and a previous
  generation whose newest write has expired is dropped whole.

Endpoint removal is lazy: the endpoint's bit leaves ``_live_mask`` (every write masks it out of the
entries it touches) and its id is only handed out again once every entry written before the removal
has expired, so a new endpoint can never inherit a dead one's history.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

STAMP_BITS = 40  # milliseconds since the index was created: ~34 years before it wraps
_STAMP_MASK = (1 << STAMP_BITS) - 1

DEFAULT_MAX_ENTRIES = 500_000
DEFAULT_TTL_S = 600.0


class ApproxPrefixIndex:
    """Block hash -> endpoints that were sent it; hard entry bound, LRU-like eviction, TTL.

    Not thread-safe; the router calls it from its event loop only (every call is short and never
    awaits, so it is safe to share between coroutines).
    """

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 2:
            raise ValueError("max_entries must be at least 2")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._generation_size = max_entries // 2
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._clock = clock
        self._t0 = clock()
        self._current: dict[int, int] = {}
        self._previous: dict[int, int] = {}
        self._previous_newest_ms = 0  # newest write in _previous: all of it expires after this
        self._ids: dict[str, int] = {}
        self._urls: list[str | None] = []
        # (time in ms from which the id may be reused, id), in removal order.
        self._retired: list[tuple[int, int]] = []
        self._live_mask = 0
        self.rotations = 0
        self.evicted_entries = 0

    # ------------------------------------------------------------------------------- inspection

    def __len__(self) -> int:
        """Stored entries (a block written in both generations counts twice, as it costs twice)."""
        return len(self._current) + len(self._previous)

    @property
    def endpoints(self) -> list[str]:
        return list(self._ids)

    def _now_ms(self) -> int:
        return int((self._clock() - self._t0) * 1000)

    # ---------------------------------------------------------------------------------- writes

    def _id_for(self, url: str, now: int) -> int:
        eid = self._ids.get(url)
        if eid is not None:
            return eid
        if self._retired and self._retired[0][0] <= now:
            eid = self._retired.pop(0)[1]
            self._urls[eid] = url
        else:
            eid = len(self._urls)
            self._urls.append(url)
        self._ids[url] = eid
        self._live_mask |= 1 << eid
        return eid

    def _rotate(self, now: int) -> None:
        self.evicted_entries += len(self._previous)
        self._previous = self._current
        self._previous_newest_ms = now
        self._current = {}
        self.rotations += 1

    def record(self, block_hashes: Sequence[int], endpoint_url: str) -> None:
        """Remember that ``endpoint_url`` was sent the prompt whose chained hashes are given.

        O(len(block_hashes)). A prompt longer than half the index keeps only its leading blocks:
        they are the ones other prompts share.
        """
        if not block_hashes:
            return
        now = self._now_ms()
        cutoff = now - self._ttl_ms
        if self._previous and self._previous_newest_ms < cutoff:
            self.evicted_entries += len(self._previous)
            self._previous = {}
        bit = 1 << self._id_for(endpoint_url, now)
        live = self._live_mask
        fresh = (bit << STAMP_BITS) | now
        prev_mask = -1
        prev_value = fresh
        current = self._current
        limit = self._generation_size
        for h in block_hashes[:limit]:
            old = current.get(h)
            if old is None:
                if len(current) >= limit:
                    self._rotate(now)
                    current = self._current
                old = self._previous.get(h)
            if old is None or (old & _STAMP_MASK) < cutoff:
                current[h] = fresh
                continue
            mask = ((old >> STAMP_BITS) & live) | bit
            if mask != prev_mask:
                # Neighbouring blocks of one prefix usually share a mask: share the value object.
                prev_mask = mask
                prev_value = (mask << STAMP_BITS) | now
            current[h] = prev_value

    def remove_endpoint(self, url: str) -> None:
        """Forget an endpoint that left the fleet; its entries are ignored and age out."""
        eid = self._ids.pop(url, None)
        if eid is None:
            return
        now = self._now_ms()
        self._urls[eid] = None
        self._live_mask &= ~(1 << eid)
        self._retired.append((now + self._ttl_ms + 1, eid))

    def clear(self) -> None:
        self._current = {}
        self._previous = {}

    # ----------------------------------------------------------------------------------- reads

    def match(self, block_hashes: Sequence[int], urls: Iterable[str]) -> dict[str, int]:
        """Longest recorded prefix (in blocks) of ``block_hashes`` per endpoint in ``urls``.

        O(len(block_hashes)) dict probes whatever the number of endpoints: one bitmask walks the
        chain and endpoints drop out of it where their history ends.
        """
        result = dict.fromkeys(urls, 0)
        ids = self._ids
        alive = 0
        for url in result:
            eid = ids.get(url)
            if eid is not None:
                alive |= 1 << eid
        if not alive or not block_hashes:
            return result
        cutoff = self._now_ms() - self._ttl_ms
        current = self._current
        previous = self._previous
        urls_by_id = self._urls
        depth = 0
        for h in block_hashes:
            value = current.get(h)
            if value is None:
                value = previous.get(h)
            if value is None or (value & _STAMP_MASK) < cutoff:
                break
            still = alive & (value >> STAMP_BITS)
            dropped = alive & ~still
            while dropped:
                low = dropped & -dropped
                gone = urls_by_id[low.bit_length() - 1]
                if gone is not None:
                    result[gone] = depth
                dropped ^= low
            alive = still
            if not alive:
                return result
            depth += 1
        while alive:
            low = alive & -alive
            kept = urls_by_id[low.bit_length() - 1]
            if kept is not None:
                result[kept] = depth
            alive ^= low
        return result
