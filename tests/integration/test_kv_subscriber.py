"""KvEventSubscriber against real publishers: a ``shoal sim`` process (the index holds a
completed prompt's blocks; a router that joins late recovers earlier blocks by replay) and the
simulator's KvEventPublisher flooded past its high-water marks (mid-stream gaps recovered)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from shoal.hashing import block_hashes
from shoal.kv_events import BlockStored, EventBatch
from shoal.local import HOST, ManagedProcess, free_port, shoal_executable
from shoal.router.kv_index import HashSpace, KvEventIndex
from shoal.router.kv_subscriber import KvEventSubscriber
from shoal.sim.kv_publisher import KvEventPublisher

BLOCK = 16
URL_KEY = "engine-0"


@dataclass(frozen=True)
class Sim:
    url: str
    events: str
    replay: str


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    port, ev_port, replay_port = free_port(), free_port(), free_port()
    events = f"tcp://127.0.0.1:{ev_port}"
    replay = f"tcp://127.0.0.1:{replay_port}"
    cfg = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": events,
        "replay_endpoint": replay,
        "topic": "kv@test",
    }
    argv = [
        *shoal_executable(), "sim",
        "--model", "tiny", "--served-model-name", "tiny",
        "--block-size", str(BLOCK), "--max-model-len", "2048",
        "--host", HOST, "--port", str(port),
        "--kv-events-config", json.dumps(cfg),
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("sim") / "sim.log"
    proc = ManagedProcess("sim", argv, log, url=f"http://{HOST}:{port}")
    proc.start()
    try:
        proc.wait_healthy(timeout_s=30)
        yield Sim(proc.url, events, replay)
    finally:
        proc.stop()


async def _complete(client: httpx.AsyncClient, url: str, tokens: list[int]) -> None:
    r = await client.post(
        url + "/v1/completions",
        json={"model": "tiny", "prompt": tokens, "max_tokens": 1},
        timeout=10,
    )
    assert r.status_code == 200, r.text


async def _until(cond: Callable[[], bool], within_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _prompt(seed: int, blocks: int) -> list[int]:
    return [100 + (seed * 7919 + i * 31) % 900 for i in range(blocks * BLOCK)]


def test_completion_lands_in_index_and_late_join_recovers_by_replay(sim: Sim) -> None:
    async def run() -> None:
        index = KvEventIndex(max_blocks=100_000)
        gaps: list[tuple[str, int, int]] = []
        async with httpx.AsyncClient() as client:
            # Before any subscriber exists: these events are published to nobody.
            early = _prompt(1, 4)
            await _complete(client, sim.url, early)

            sub = KvEventSubscriber(index, on_gap=lambda *g: gaps.append(g))
            sub.add(URL_KEY, sim.events, sim.replay)
            try:
                later = _prompt(2, 5)
                early_hashes = block_hashes(early, BLOCK)
                later_hashes = block_hashes(later, BLOCK)
                # SUB connects asynchronously; keep completing fresh prompts until one arrives.
                i = 0
                while index.match(later_hashes, [URL_KEY])[URL_KEY] < len(later_hashes):
                    await _complete(client, sim.url, later if i == 0 else _prompt(100 + i, 1))
                    if i == 0:
                        await asyncio.sleep(0.2)
                    i += 1
                    assert i < 100, "no KV events reached the subscriber"
                # The completed prompt's blocks are in the index, under our hashes.
                assert index.match(later_hashes, [URL_KEY]) == {URL_KEY: 5}
                assert index.hash_space(URL_KEY) is HashSpace.NATIVE
                assert index.block_size(URL_KEY) == BLOCK
                # The first message we saw had seq > 0: a gap from 0, filled by replay.
                assert gaps and gaps[0][:2] == (URL_KEY, 0)
                assert sub.counters["replays"] >= 1
                assert sub.counters["replay_failures"] == 0
                assert index.match(early_hashes, [URL_KEY]) == {URL_KEY: 4}
                assert index.is_complete(URL_KEY)
                assert sub.counters["malformed"] == 0
            finally:
                await sub.close()
            # Removing the engine forgets its blocks.
            index.remove_endpoint(URL_KEY)
            assert index.match(later_hashes, [URL_KEY]) == {URL_KEY: 0}

    asyncio.run(run())


def test_mid_stream_loss_is_recovered_from_the_replay_buffer() -> None:
    """Tiny high-water marks on both sides and a burst the subscriber cannot keep up with: ZMQ drops
    messages, the index sees gaps, replay fills them, and the end state holds every block."""

    async def run() -> None:
        events = f"tcp://127.0.0.1:{free_port()}"
        replay = f"tcp://127.0.0.1:{free_port()}"
        pub = KvEventPublisher(events, replay, topic="kv", buffer_steps=10_000, hwm=5)
        index = KvEventIndex(max_blocks=100_000)
        sub = KvEventSubscriber(index, rcvhwm=5)
        stop = asyncio.Event()

        async def serve_replay() -> None:
            while not stop.is_set():
                pub.poll_replay()
                await asyncio.sleep(0.005)

        server = asyncio.create_task(serve_replay())
        try:
            sub.add(URL_KEY, events, replay)
            # Wait until the subscription is live (slow joiner), using throwaway batches.
            probe = 0
            while not index.has_events(URL_KEY):
                pub.publish(EventBatch(0.0, [_stored([probe] * BLOCK)]))
                probe += 1
                await asyncio.sleep(0.05)
            # The burst: published without yielding, so the subscriber reads none of it live
            # until the pipes (hwm 5 each side) have overflowed.
            burst = [[10_000 + i] * BLOCK for i in range(500)]
            for tokens in burst:
                pub.publish(EventBatch(0.0, [_stored(tokens)]))
            # A loss at the very end of the burst only shows once a later batch arrives (the
            # subscriber learns of a gap from the next sequence number), as with a live engine,
            # which keeps publishing: send a small batch every 0.2 s until the index catches up.
            deadline = asyncio.get_running_loop().time() + 30.0
            tail = 0
            while index.last_seq(URL_KEY) != pub.next_seq - 1:
                assert asyncio.get_running_loop().time() < deadline, "the index never caught up"
                await asyncio.sleep(0.2)
                if index.last_seq(URL_KEY) != pub.next_seq - 1:
                    pub.publish(EventBatch(0.0, [_stored([20_000 + tail] * BLOCK)]))
                    tail += 1
            assert sub.counters["gaps"] >= 1, "the burst did not overflow: no gap to recover"
            assert sub.counters["replays"] >= 1
            for tokens in burst:
                hashes = block_hashes(tokens, BLOCK)
                assert index.match(hashes, [URL_KEY]) == {URL_KEY: 1}
            assert index.is_complete(URL_KEY)
            assert sub.counters["received"] < pub.next_seq  # some really were lost live
        finally:
            stop.set()
            await server
            await sub.close()
            pub.close()

    asyncio.run(run())


def test_malformed_messages_are_counted_and_skipped() -> None:
    async def run() -> None:
        import zmq
        import zmq.asyncio

        events = f"tcp://127.0.0.1:{free_port()}"
        ctx = zmq.asyncio.Context()
        pub_sock = ctx.socket(zmq.PUB)
        pub_sock.bind(events)
        index = KvEventIndex(max_blocks=1000)
        sub = KvEventSubscriber(index, context=ctx)
        try:
            sub.add(URL_KEY, events)
            good = _stored([7] * BLOCK)
            seq = 0
            from shoal.kv_events import encode_frames

            while not index.has_events(URL_KEY):
                await pub_sock.send_multipart([b"garbage"])  # wrong frame count
                await pub_sock.send_multipart([b"kv", b"\x00" * 8, b"\xc1not msgpack"])
                await pub_sock.send_multipart(encode_frames("kv", seq, EventBatch(0.0, [good])))
                seq += 1
                await asyncio.sleep(0.05)
            assert sub.counters["malformed"] >= 2
            assert index.match(block_hashes([7] * BLOCK, BLOCK), [URL_KEY]) == {URL_KEY: 1}
            assert sub.endpoints == [URL_KEY]  # the task survived
        finally:
            await sub.close()
            pub_sock.close(linger=0)
            ctx.term()

    asyncio.run(run())


def _stored(tokens: list[int]) -> BlockStored:
    return BlockStored(
        block_hashes=block_hashes(tokens, BLOCK),
        parent_block_hash=None,
        token_ids=tokens,
        block_size=BLOCK,
    )
