"""KV event wire format against the real vLLM 0.32.0 recordings (shared/golden/vllm-0.32.0)."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_frames,
    decode_payload,
    encode_frames,
    encode_payload,
)

_REPO = Path(__file__).resolve().parents[2]


def _golden_root() -> Path:
    # The recordings live next to the checkout (../shared) or inside it (shared/); an env var
    # overrides both for unusual layouts.
    candidates = [Path(p) for p in [os.environ.get("SHOAL_GOLDEN_DIR", "")] if p] + [
        _REPO / "shared/golden/vllm-0.32.0",
        _REPO.parent / "shared/golden/vllm-0.32.0",
    ]
    for c in candidates:
        if (c / "README.md").is_file():
            return c
    pytest.skip("golden vLLM recordings not found (set SHOAL_GOLDEN_DIR)")


def _read_frames(path: Path) -> list[list[bytes]]:
    # Record format from the golden README: u32be n_frames, then n x (u32be len + bytes).
    data, i, out = path.read_bytes(), 0, []
    while i < len(data):
        (n,) = struct.unpack_from(">I", data, i)
        i += 4
        frames = []
        for _ in range(n):
            (length,) = struct.unpack_from(">I", data, i)
            i += 4
            frames.append(data[i : i + length])
            i += length
        out.append(frames)
    return out


def _golden_messages() -> list[dict[str, Any]]:
    root = _golden_root()
    msgs: list[dict[str, Any]] = []
    for run in ("main", "details"):
        msgs += json.loads((root / run / "kv_events_decoded.json").read_text())
    return msgs


def test_golden_payloads_round_trip_byte_for_byte() -> None:
    msgs = _golden_messages()
    assert len(msgs) >= 20
    kinds: set[str] = set()
    for m in msgs:
        payload = bytes.fromhex(m["payload_hex"])
        batch = decode_payload(payload)
        kinds.update(type(e).__name__ for e in batch.events)
        assert encode_payload(batch) == payload, f"seq {m['seq']} differs after re-encoding"
    # The recordings exercise all three event kinds; make sure the test really covered them.
    assert kinds == {"BlockStored", "BlockRemoved", "AllBlocksCleared"}


def test_golden_decoded_fields_match_recorded_json() -> None:
    for m in _golden_messages():
        batch = decode_payload(bytes.fromhex(m["payload_hex"]))
        ts, events, rank = m["decoded"]
        assert batch.timestamp == ts
        assert batch.data_parallel_rank == rank
        assert len(batch.events) == len(events)
        for ours, theirs in zip(batch.events, events, strict=True):
            assert type(ours).__name__ == theirs["type"]
            if isinstance(ours, BlockStored):
                assert ours.block_hashes == theirs["block_hashes"]
                assert ours.parent_block_hash == theirs["parent_block_hash"]
                assert ours.token_ids == theirs["token_ids"]
                assert ours.block_size == theirs["block_size"] == 32
                assert ours.lora_name == theirs["lora_name"]
                assert ours.lora_id == theirs["lora_id"]
                assert ours.extra_keys == theirs["extra_keys"]
                assert len(ours.token_ids) == 32 * len(ours.block_hashes)
            elif isinstance(ours, BlockRemoved):
                assert ours.block_hashes == theirs["block_hashes"]
                assert ours.medium == "GPU"


@pytest.mark.parametrize("run", ["main", "details"])
def test_golden_frames_bin_decode(run: str) -> None:
    root = _golden_root()
    records = _read_frames(root / run / "kv_events_frames.bin")
    decoded = json.loads((root / run / "kv_events_decoded.json").read_text())
    assert len(records) == len(decoded)
    for expected_seq, (frames, m) in enumerate(zip(records, decoded, strict=True)):
        topic, seq, batch = decode_frames(frames)
        assert topic == m["topic"] == "kv@127.0.0.1:18000@tiny"
        # Sequence numbers start at 0 and have no gaps.
        assert seq == m["seq"] == expected_seq
        assert encode_frames(topic, seq, batch) == frames


def test_golden_replay_frames_decode() -> None:
    root = _golden_root()
    records = _read_frames(root / "main" / "kv_replay_frames.bin")
    replay = json.loads((root / "main" / "kv_replay_decoded.json").read_text())
    live = {m["seq"]: bytes.fromhex(m["payload_hex"]) for m in _golden_messages()[:23]}
    # Every record but the end marker is [b"", topic, seq, payload] from the ROUTER.
    *batches, end = records
    assert end == [b"", b"", b"\xff" * 8, b""]
    assert [len(f) for f in end] == replay["replies"][-1]["frames_hex_lens"]
    for frames in batches:
        assert frames[0] == b""
        _topic, seq, batch = decode_frames(frames[1:])
        assert encode_payload(batch) == frames[3] == live[seq]


def _batch(*events: Any, ts: float = 1795415514.25) -> EventBatch:
    return EventBatch(timestamp=ts, events=list(events), data_parallel_rank=0)


def test_encode_layout_matches_vllm_conventions() -> None:
    stored = BlockStored(
        block_hashes=[2**64 - 1, 5],
        parent_block_hash=2**63,
        token_ids=list(range(64)),
        block_size=32,
        lora_name="a",
        extra_keys=[["a"], ["a"]],
    )
    payload = encode_payload(_batch(stored, BlockRemoved(block_hashes=[7]), AllBlocksCleared()))
    assert payload[:2] == b"\x93\xcb"  # fixarray(3), float64 timestamp
    assert b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff" in payload  # uint64 hash
    raw = msgpack.unpackb(payload)
    assert list(raw[1][0]) == [
        "type",
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
    ]
    assert list(raw[1][1]) == ["type", "block_hashes", "medium", "group_idx"]
    assert raw[1][2] == {"type": "AllBlocksCleared"}
    # An integral timestamp still goes out as float64, as msgspec encodes a float field.
    assert encode_payload(_batch(AllBlocksCleared(), ts=5))[:2] == b"\x93\xcb"


def test_decode_tolerates_newer_fields() -> None:
    raw = [
        1.5,
        [
            {
                "type": "BlockStored",
                "block_hashes": [1],
                "parent_block_hash": None,
                "token_ids": [1, 2],
                "block_size": 2,
                "lora_id": None,
                "medium": "GPU",
                "lora_name": None,
                "extra_keys": [None],
                "group_idx": 0,
                "kv_cache_spec_kind": "sliding_window",
                "kv_cache_spec_sliding_window": 128,
                "locality": {"node": "x"},
                "ownership": "shared",
                "session_id": "s1",
            },
            {"type": "BlockRemoved", "block_hashes": [1], "medium": "CPU", "locality": "x"},
            {"type": "SomethingNewer", "x": 1},
        ],
        0,
    ]
    batch = decode_payload(msgpack.packb(raw))
    assert len(batch.events) == 2  # the unknown event kind is skipped, not fatal
    stored, removed = batch.events
    assert isinstance(stored, BlockStored) and stored.kv_cache_spec_kind == "sliding_window"
    assert isinstance(removed, BlockRemoved) and removed.medium == "CPU"


def test_decode_older_array_encoding() -> None:
    # vLLM before events became maps: msgspec array_like + tag, i.e. [tag, fields...] in field
    # order with trailing defaults omitted, and a batch without the data-parallel rank.
    raw = [
        2.0,
        [
            ["BlockStored", [11, 12], None, list(range(4)), 2, None, "GPU"],
            ["BlockRemoved", [11]],
            ["AllBlocksCleared"],
        ],
    ]
    batch = decode_payload(msgpack.packb(raw))
    assert batch.data_parallel_rank == 0
    stored, removed, cleared = batch.events
    assert stored == BlockStored(
        block_hashes=[11, 12], parent_block_hash=None, token_ids=[0, 1, 2, 3], block_size=2
    )
    assert removed == BlockRemoved(block_hashes=[11])
    assert cleared == AllBlocksCleared()


def test_decode_bytes_hashes_take_low_64_bits() -> None:
    digest = bytes(range(32))
    raw = [1.0, [{"type": "BlockRemoved", "block_hashes": [digest]}], 0]
    (event,) = decode_payload(msgpack.packb(raw, use_bin_type=True)).events
    assert isinstance(event, BlockRemoved)
    assert event.block_hashes == [int.from_bytes(digest[-8:], "big")]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # reserved msgpack byte
        b"\x93\xcb\x00",  # truncated
        msgpack.packb({"ts": 1}),
        msgpack.packb([1.0]),
        msgpack.packb([1.0, [], 0, 4]),
        msgpack.packb(["x", [], 0]),
        msgpack.packb([True, [], 0]),
        msgpack.packb([1.0, {}, 0]),
        msgpack.packb([1.0, [], "0"]),
        msgpack.packb([1.0, [5], 0]),
        msgpack.packb([1.0, [{"block_hashes": [1]}], 0]),
        msgpack.packb([1.0, [{"type": 3}], 0]),
        msgpack.packb([1.0, [[]], 0]),
        msgpack.packb([1.0, [{"type": "BlockRemoved"}], 0]),
        msgpack.packb([1.0, [{"type": "BlockRemoved", "block_hashes": ["x"]}], 0]),
        msgpack.packb([1.0, [{"type": "BlockRemoved", "block_hashes": [2**64 - 1 + 0]}], 0])[:-3],
        msgpack.packb([1.0, [{"type": "BlockRemoved", "block_hashes": [b"short"]}], 0]),
        msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": []}], 0]),
        msgpack.packb(
            [
                1.0,
                [{"type": "BlockStored", "block_hashes": [1], "token_ids": [1.5], "block_size": 1}],
                0,
            ]
        ),
        msgpack.packb(
            [
                1.0,
                [
                    {
                        "type": "BlockStored",
                        "block_hashes": [1],
                        "token_ids": [],
                        "block_size": 1,
                        "extra_keys": ["x"],
                    }
                ],
                0,
            ]
        ),
        msgpack.packb([1.0, [], 0]) + b"\x00",  # trailing garbage
        msgpack.packb({1: 2}),  # non-string map key
        b"\xd4\x01\x00",  # ext type
    ],
)
def test_malformed_payloads_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_payload(data)


def test_malformed_frames_raise_value_error() -> None:
    good = encode_frames("t", 1, _batch(AllBlocksCleared()))
    for frames in (good[:2], [*good, b""], [good[0], b"\x00" * 7, good[2]], [b"\xff", *good[1:]]):
        with pytest.raises(ValueError):
            decode_frames(frames)


def test_encode_rejects_out_of_range_values() -> None:
    with pytest.raises(ValueError):
        encode_payload(_batch(BlockRemoved(block_hashes=[2**64])))
    with pytest.raises(ValueError):
        encode_frames("t", -1, _batch(AllBlocksCleared()))


def test_frames_round_trip() -> None:
    batch = _batch(BlockRemoved(block_hashes=[3, 2**64 - 2]))
    frames = encode_frames("kv@x", 2**40, batch)
    assert frames[1] == (2**40).to_bytes(8, "big")
    assert decode_frames(frames) == ("kv@x", 2**40, batch)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_only_raise_value_error(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        decode_payload(data)


_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared"]),
)
_tree = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.sampled_from(["type", "block_hashes", "token_ids", "block_size", "medium", "x"]),
            inner,
            max_size=5,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=500, deadline=None)
@given(st.tuples(_leaf, st.lists(_tree, max_size=4), _leaf))
def test_structured_garbage_only_raises_value_error(raw: tuple[Any, Any, Any]) -> None:
    # Well-formed msgpack with the wrong shapes reaches the field validators, which random bytes
    # rarely do.
    with contextlib.suppress(ValueError):
        decode_payload(msgpack.packb(list(raw), use_bin_type=True))
