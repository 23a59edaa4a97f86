"""Chained prefix block hashes.

A prompt is cut into blocks of ``block_size`` tokens; each full block's hash covers its parent's
hash, its own token ids and its extra keys (the LoRA adapter name), the way vLLM's prefix cache
does. Two prompts share a block hash exactly when they share the whole prefix up to that block under
the same adapter. The engine simulator, the router's approximate prefix index and the KV cache tier
all use this one function, so their hashes agree.

Like vLLM with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`` (its default), hashes are the low 64 bits
of a sha256 digest, as unsigned integers. The byte encoding differs from vLLM's (which hashes a CBOR
or pickle encoding), so the values are Shoal's own; the shape and properties are the same.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

# Root of every chain: the parent "hash" of a prompt's first block.
ROOT_HASH = 0


def hash_block(parent_hash: int | None, token_ids: Sequence[int], extra_key: str | None) -> int:
    """Hash one full block given its parent's hash (None at the root)."""
    h = hashlib.sha256()
    h.update(struct.pack(">Q", ROOT_HASH if parent_hash is None else parent_hash))
    h.update(struct.pack(f">{len(token_ids)}I", *token_ids))
    if extra_key is not None:
        h.update(b"\x00lora:")
        h.update(extra_key.encode())
    return int.from_bytes(h.digest()[:8], "little")


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    extra_key: str | None = None,
    parent_hash: int | None = None,
) -> list[int]:
    """Hashes of every *full* block of ``token_ids``; a partial tail block has none."""
    out: list[int] = []
    parent = parent_hash
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], extra_key)
        out.append(parent)
    return out
