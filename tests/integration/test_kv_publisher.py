"""The KV event publisher through real ZMQ sockets on 127.0.0.1 (SUB for the stream, DEALER for
replay), as a router would use it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from shoal.kv_events import BlockRemoved, BlockStored, EventBatch, decode_frames, decode_payload
from shoal.sim.kv_publisher import REPLAY_END_SEQ, KvEventPublisher

TOPIC = "kv@127.0.0.1:18000@tiny"
DEADLINE_S = 10.0


def _batch(i: int) -> EventBatch:
    return EventBatch(
        timestamp=1795415514.0 + i,
        events=[
            BlockStored(
                block_hashes=[2**64 - 1 - i],
                parent_block_hash=None if i == 0 else 2**64 - i,
                token_ids=list(range(i, i + 4)),
                block_size=4,
                extra_keys=[None],
            ),
            BlockRemoved(block_hashes=[i + 1]),
        ],
    )


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def publisher() -> Iterator[KvEventPublisher]:
    # Port "*" lets the OS choose a free port; the test reads back the one bound.
    pub = KvEventPublisher(
        endpoint="tcp://127.0.0.1:*",
        replay_endpoint="tcp://127.0.0.1:*",
        topic=TOPIC,
        buffer_steps=5,
    )
    yield pub
    pub.close()


def _recv(sock: zmq.Socket[bytes], timeout_s: float = DEADLINE_S) -> list[bytes]:
    if not sock.poll(int(timeout_s * 1000)):
        raise AssertionError("no message within the deadline")
    return sock.recv_multipart()


def test_subscriber_receives_batches_in_order(
    ctx: zmq.Context[zmq.Socket[bytes]], publisher: KvEventPublisher
) -> None:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt_string(zmq.SUBSCRIBE, TOPIC)
    sub.connect(publisher.bound_endpoint)

    # Slow joiner: a SUB misses what is published before its subscription reaches the PUB, so
    # publish until the first message arrives (bounded), then check the stream from there on.
    deadline = time.monotonic() + DEADLINE_S
    first: list[bytes] | None = None
    i = 0
    while first is None:
        assert time.monotonic() < deadline, "subscriber never joined"
        publisher.publish(_batch(i))
        i += 1
        if sub.poll(50):
            first = sub.recv_multipart()
    topic, first_seq, _ = decode_frames(first)
    assert topic == TOPIC
    # Drain whatever else was already in flight from the warm-up loop.
    received = [first_seq]
    while sub.poll(200):
        received.append(decode_frames(sub.recv_multipart())[1])
    assert received == list(range(first_seq, i))

    for j in range(i, i + 20):
        assert publisher.publish(_batch(j)) == j
    for j in range(i, i + 20):
        frames = _recv(sub)
        assert frames[0] == TOPIC.encode()
        assert frames[1] == j.to_bytes(8, "big")
        assert decode_payload(frames[2]) == _batch(j)
    assert publisher.published == i + 20
    assert publisher.dropped == 0


def _replay(
    ctx: zmq.Context[zmq.Socket[bytes]], publisher: KvEventPublisher, start: bytes
) -> list[list[bytes]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    endpoint = publisher.bound_replay_endpoint
    assert endpoint is not None
    dealer.connect(endpoint)
    dealer.send_multipart([b"", start])
    replies: list[list[bytes]] = []
    deadline = time.monotonic() + DEADLINE_S
    # The server side is polled the way the engine loop polls it: non-blocking, repeatedly.
    while not replies or replies[-1][2] != REPLAY_END_SEQ:
        assert time.monotonic() < deadline, "replay did not finish"
        publisher.poll_replay()
        while dealer.poll(20):
            replies.append(dealer.recv_multipart())
    dealer.close()
    return replies


def test_replay_protocol(ctx: zmq.Context[zmq.Socket[bytes]], publisher: KvEventPublisher) -> None:
    for i in range(8):
        assert publisher.publish(_batch(i)) == i
    # buffer_steps=5 keeps seq 3..7.
    replies = _replay(ctx, publisher, (5).to_bytes(8, "big"))
    *batches, end = replies
    assert end == [b"", b"", b"\xff" * 8, b""]
    assert [decode_frames(r[1:])[1] for r in batches] == [5, 6, 7]
    for r in batches:
        assert r[0] == b""
        topic, seq, batch = decode_frames(r[1:])
        assert topic == TOPIC
        assert batch == _batch(seq)

    replies = _replay(ctx, publisher, (0).to_bytes(8, "big"))
    assert [decode_frames(r[1:])[1] for r in replies[:-1]] == [3, 4, 5, 6, 7]

    replies = _replay(ctx, publisher, (100).to_bytes(8, "big"))
    assert replies == [[b"", b"", REPLAY_END_SEQ, b""]]
    assert publisher.replays_served == 3


def test_malformed_replay_request_is_ignored(
    ctx: zmq.Context[zmq.Socket[bytes]], publisher: KvEventPublisher
) -> None:
    publisher.publish(_batch(0))
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    endpoint = publisher.bound_replay_endpoint
    assert endpoint is not None
    dealer.connect(endpoint)
    dealer.send_multipart([b"", b"\x00\x01"])  # sequence frame too short
    deadline = time.monotonic() + DEADLINE_S
    while publisher.bad_replay_requests == 0:
        assert time.monotonic() < deadline
        publisher.poll_replay()
        time.sleep(0.01)
    assert not dealer.poll(100)
    dealer.close()
    # A good request afterwards is still served.
    assert [decode_frames(r[1:])[1] for r in _replay(ctx, publisher, bytes(8))[:-1]] == [0]


def test_publish_never_blocks_without_readers() -> None:
    # No subscriber at all, and a subscriber that never reads: PUB drops instead of blocking.
    with KvEventPublisher(endpoint="tcp://127.0.0.1:*", topic="t", hwm=1) as pub:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 1)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(pub.bound_endpoint)
        for i in range(5000):
            assert pub.publish(_batch(i)) == i
        assert pub.next_seq == 5000
        ctx.destroy(linger=0)


def test_empty_batches_consume_no_sequence_number() -> None:
    with KvEventPublisher(endpoint="tcp://127.0.0.1:*") as pub:
        assert pub.publish(EventBatch(timestamp=1.0, events=[])) is None
        assert pub.publish(_batch(0)) == 0
    # After close, publishing is a harmless no-op (the loop may still be stepping).
    assert pub.publish(_batch(1)) is None


def test_describe_matches_vllm_kv_event_sources_shape() -> None:
    root = Path(__file__).resolve().parents[2].parent / "shared/golden/vllm-0.32.0/main"
    path = root / "007_kv_event_sources.json"
    if not path.is_file():
        pytest.skip("golden vLLM recordings not found")
    golden = json.loads(path.read_text())["response"]["body_json"]["0"]
    with KvEventPublisher(
        endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", topic=TOPIC
    ) as pub:
        described = pub.describe()
    assert list(described) == list(golden)
    assert {k: v for k, v in described.items() if "endpoint" not in k} == {
        k: v for k, v in golden.items() if "endpoint" not in k
    }
