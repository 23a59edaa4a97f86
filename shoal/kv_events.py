"""KV cache events in vLLM's wire format.

An engine publishes what its prefix cache stores and evicts so that a router can route by where a
prefix really lives. The format is vLLM's (``vllm/distributed/kv_events.py``, recorded byte for byte
in ``shared/golden/vllm-0.32.0``): a ZMQ PUB socket sends multipart messages
``[topic, 8-byte big-endian sequence number, payload]``; the payload is msgpack
``[timestamp, [event, ...], data_parallel_rank]``; each event is a msgpack *map* whose first key is
``type``. Block hashes are unsigned 64-bit integers.

The dataclasses are what the simulator emits and what the router's subscriber decodes into.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    lora_name: str | None = None
    medium: str = "GPU"
    group_idx: int = 0
    kv_cache_spec_kind: str = "full_attention"
    # One entry per block: None for the base model, [lora_name] under an adapter.
    extra_keys: list[list[str] | None] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str = "GPU"
    group_idx: int = 0


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One published message: the events of one engine step."""

    timestamp: float
    events: list[KvEvent]
    data_parallel_rank: int = 0


# --------------------------------------------------------------------------------------------------
# Wire format
# --------------------------------------------------------------------------------------------------
#
# Encoding mirrors what vLLM 0.32's msgspec encoder emits (checked byte for byte against the golden
# recordings in tests/unit/test_kv_events.py):
#   - the batch is an array ``[ts, events, dp_rank]``; ``ts`` is always a float64 (0xcb), because
#     msgspec never narrows floats;
#   - events are maps whose keys come in the struct's field order with ``type`` first; the fields
#     that vLLM omits at their defaults (kv_cache_spec_sliding_window, locality, ownership,
#     session_id) are never written, and every field we write is one vLLM always writes;
#   - integers use the smallest msgpack encoding, so uint64 hashes >= 2**32 come out as 0xcf.
#
# Decoding is lenient in what it accepts and strict in how it fails: unknown keys and unknown event
# types are skipped (a newer vLLM must not break an older router), but anything structurally wrong
# raises ValueError and nothing else, so a subscriber needs exactly one ``except``.

_SEQ = struct.Struct(">Q")
_U64_MAX = (1 << 64) - 1
_I64_MIN = -(1 << 63)

# Field order of each event type, as vLLM declares its msgspec structs. Used both to write maps in
# the right key order and to read the positional (array_like) encoding of older vLLM versions,
# where an event is ``[type_tag, field0, field1, ...]`` with trailing defaults cut off.
BLOCK_STORED_FIELDS: tuple[str, ...] = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
)
BLOCK_REMOVED_FIELDS: tuple[str, ...] = ("block_hashes", "medium", "group_idx")


def _check_hash(value: int) -> int:
    # Hashes are uint64 on the wire; signed int64 is accepted too because vLLM versions that used
    # Python's hash() (before sha256 became the default) published negative hashes.
    if isinstance(value, bool) or not isinstance(value, int) or not _I64_MIN <= value <= _U64_MAX:
        raise ValueError(f"block hash must be a 64-bit integer, got {value!r}")
    return value


def _event_to_wire(event: KvEvent) -> dict[str, Any]:
    if isinstance(event, BlockStored):
        return {
            "type": "BlockStored",
            "block_hashes": [_check_hash(h) for h in event.block_hashes],
            "parent_block_hash": (
                None if event.parent_block_hash is None else _check_hash(event.parent_block_hash)
            ),
            "token_ids": event.token_ids,
            "block_size": event.block_size,
            "lora_id": event.lora_id,
            "medium": event.medium,
            "lora_name": event.lora_name,
            "extra_keys": event.extra_keys,
            "group_idx": event.group_idx,
            "kv_cache_spec_kind": event.kv_cache_spec_kind,
        }
    if isinstance(event, BlockRemoved):
        return {
            "type": "BlockRemoved",
            "block_hashes": [_check_hash(h) for h in event.block_hashes],
            "medium": event.medium,
            "group_idx": event.group_idx,
        }
    if isinstance(event, AllBlocksCleared):
        return {"type": "AllBlocksCleared"}
    raise ValueError(f"not a KV event: {event!r}")


def encode_payload(batch: EventBatch) -> bytes:
    """Serialise one batch exactly as vLLM's publisher does (msgpack, events as maps)."""
    wire = [
        float(batch.timestamp),
        [_event_to_wire(e) for e in batch.events],
        batch.data_parallel_rank,
    ]
    try:
        # use_single_float=False keeps the timestamp float64 (0xcb) like msgspec.
        packed: bytes = msgpack.packb(wire, use_bin_type=True, use_single_float=False)
    except (TypeError, OverflowError) as exc:
        raise ValueError(f"cannot encode KV event batch: {exc}") from exc
    return packed


# --- decoding helpers: each validates one field and raises ValueError with the field's name ------


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    return value


def _as_int_list(value: Any, name: str) -> list[int]:
    # One C-level pass over the (long) token list in the common all-int case; the per-item
    # check only runs to name the offending entry.
    items = _as_list(value, name)
    if set(map(type, items)) <= {int}:
        return items
    return [_as_int(t, name) for t in items]


def _as_opt_int(value: Any, name: str) -> int | None:
    return None if value is None else _as_int(value, name)


def _as_hash(value: Any, name: str) -> int:
    # Hashes may be bytes when a vLLM runs with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0; the int form
    # vLLM publishes by default is the low 64 bits of that digest, so convert the same way to keep
    # one hash space for the router.
    if isinstance(value, bytes):
        if len(value) < 8:
            raise ValueError(f"{name}: byte hash shorter than 8 bytes")
        return int.from_bytes(value[-8:], "big")
    number = _as_int(value, name)
    if not _I64_MIN <= number <= _U64_MAX:
        raise ValueError(f"{name} out of 64-bit range")
    return number


def _as_opt_hash(value: Any, name: str) -> int | None:
    return None if value is None else _as_hash(value, name)


def _as_list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{name} must be an array, got {type(value).__name__}")
    return value


def _as_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    return value


def _as_opt_str(value: Any, name: str) -> str | None:
    return None if value is None else _as_str(value, name)


def _as_extra_keys(value: Any, name: str) -> list[list[str] | None]:
    # Entries are nil (base model) or an array of per-block keys (LoRA name, multimodal hashes,
    # cache salt). The entries' contents are kept as sent so re-encoding is lossless.
    out: list[list[str] | None] = []
    for i, entry in enumerate(_as_list(value, name)):
        if entry is not None and not isinstance(entry, list):
            raise ValueError(f"{name}[{i}] must be nil or an array")
        out.append(entry)
    return out


def _fields_from_array(items: list[Any], order: tuple[str, ...], tag: str) -> dict[str, Any]:
    if len(items) - 1 > len(order):
        # Extra trailing positions are fields of a newer vLLM: tolerated, ignored.
        items = items[: len(order) + 1]
    return dict(zip(order, items[1:], strict=False))


def _decode_block_stored(f: Mapping[str, Any]) -> BlockStored:
    for required in ("block_hashes", "token_ids", "block_size"):
        if required not in f:
            raise ValueError(f"BlockStored without {required}")
    medium = f.get("medium")
    return BlockStored(
        block_hashes=[
            _as_hash(h, "block_hashes") for h in _as_list(f["block_hashes"], "block_hashes")
        ],
        parent_block_hash=_as_opt_hash(f.get("parent_block_hash"), "parent_block_hash"),
        token_ids=_as_int_list(f["token_ids"], "token_ids"),
        block_size=_as_int(f["block_size"], "block_size"),
        lora_id=_as_opt_int(f.get("lora_id"), "lora_id"),
        lora_name=_as_opt_str(f.get("lora_name"), "lora_name"),
        # Older vLLM left medium nil for the GPU tier.
        medium="GPU" if medium is None else _as_str(medium, "medium"),
        group_idx=_as_int(f.get("group_idx", 0), "group_idx"),
        kv_cache_spec_kind=_as_str(
            f.get("kv_cache_spec_kind", "full_attention"), "kv_cache_spec_kind"
        ),
        extra_keys=_as_extra_keys(f.get("extra_keys", []), "extra_keys"),
    )


def _decode_block_removed(f: Mapping[str, Any]) -> BlockRemoved:
    if "block_hashes" not in f:
        raise ValueError("BlockRemoved without block_hashes")
    medium = f.get("medium")
    return BlockRemoved(
        block_hashes=[
            _as_hash(h, "block_hashes") for h in _as_list(f["block_hashes"], "block_hashes")
        ],
        medium="GPU" if medium is None else _as_str(medium, "medium"),
        group_idx=_as_int(f.get("group_idx", 0), "group_idx"),
    )


def _decode_all_cleared(f: Mapping[str, Any]) -> AllBlocksCleared:
    return AllBlocksCleared()


_DECODERS: dict[str, tuple[tuple[str, ...], Callable[[Mapping[str, Any]], KvEvent]]] = {
    "BlockStored": (BLOCK_STORED_FIELDS, _decode_block_stored),
    "BlockRemoved": (BLOCK_REMOVED_FIELDS, _decode_block_removed),
    "AllBlocksCleared": ((), _decode_all_cleared),
}


def _decode_event(raw: Any, index: int) -> KvEvent | None:
    """One event from its map form (vLLM >= 0.11) or its tagged-array form (older vLLM).

    Returns None for an event type this code does not know, so that a newer engine's extra event
    kinds do not make the whole batch (and the stored blocks in it) unreadable.
    """
    if isinstance(raw, dict):
        tag = raw.get("type")
        if not isinstance(tag, str):
            raise ValueError(f"event {index}: map without a string 'type'")
        known = _DECODERS.get(tag)
        return None if known is None else known[1](raw)
    if isinstance(raw, list):
        if not raw or not isinstance(raw[0], str):
            raise ValueError(f"event {index}: array without a leading type tag")
        known = _DECODERS.get(raw[0])
        if known is None:
            return None
        return known[1](_fields_from_array(raw, known[0], raw[0]))
    raise ValueError(f"event {index}: expected a map or an array, got {type(raw).__name__}")


def decode_payload(data: bytes) -> EventBatch:
    """Parse one payload frame. Any malformed input raises ValueError (and only ValueError).

    Accepted: ``[ts, events, dp_rank]`` and the older two-element ``[ts, events]`` (rank 0); a nil
    rank reads as 0. Events may be maps keyed by name with ``type`` first (current vLLM) or arrays
    ``[type, field, ...]`` in declaration order (vLLM before events became maps); unknown keys,
    unknown trailing array positions and unknown event types are ignored.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"payload must be bytes, got {type(data).__name__}")
    try:
        raw = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types; normalise them
        raise ValueError(f"payload is not valid msgpack: {exc}") from exc
    if not isinstance(raw, list) or len(raw) not in (2, 3):
        raise ValueError("payload must be an array [timestamp, events, dp_rank]")
    ts = raw[0]
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise ValueError(f"timestamp must be a number, got {type(ts).__name__}")
    rank = raw[2] if len(raw) == 3 else None
    events: list[KvEvent] = []
    for i, item in enumerate(_as_list(raw[1], "events")):
        event = _decode_event(item, i)
        if event is not None:
            events.append(event)
    return EventBatch(
        timestamp=float(ts),
        events=events,
        data_parallel_rank=0 if rank is None else _as_int(rank, "data_parallel_rank"),
    )


def encode_frames(topic: str, seq: int, batch: EventBatch) -> list[bytes]:
    """The three frames of one PUB message: ``[topic, seq (8-byte big-endian), payload]``."""
    if not 0 <= seq <= _U64_MAX:
        raise ValueError(f"sequence number out of range: {seq}")
    return [topic.encode("utf-8"), _SEQ.pack(seq), encode_payload(batch)]


def decode_frames(frames: Sequence[bytes]) -> tuple[str, int, EventBatch]:
    """Inverse of :func:`encode_frames`. Replay replies carry a leading empty delimiter frame from
    the ROUTER socket; strip it before calling this."""
    if len(frames) != 3:
        raise ValueError(f"expected 3 frames [topic, seq, payload], got {len(frames)}")
    topic_b, seq_b, payload = (bytes(f) for f in frames)
    if len(seq_b) != 8:
        raise ValueError(f"sequence frame must be 8 bytes, got {len(seq_b)}")
    try:
        topic = topic_b.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"topic is not UTF-8: {exc}") from exc
    (seq,) = _SEQ.unpack(seq_b)
    return topic, seq, decode_payload(payload)
