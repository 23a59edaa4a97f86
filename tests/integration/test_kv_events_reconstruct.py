"""KV events received over a real ZMQ socket rebuild exactly the engine's set of cached blocks.

The engine runs a workload that stores, reuses and evicts blocks; every step's events go through
`KvEventPublisher` on a TCP port; a SUB socket receives and msgpack-decodes them; replaying
BlockStored / BlockRemoved / AllBlocksCleared into a set must give the engine's own cached hashes.
"""

from __future__ import annotations

import time

import zmq

from shoal.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_frames,
)
from shoal.sim.catalog import get_gpu, get_model
from shoal.sim.engine import EngineConfig, EngineCore
from shoal.sim.kv_publisher import KvEventPublisher
from shoal.sim.types import EngineRequest, SamplingParams


def _engine() -> EngineCore:
    return EngineCore(
        EngineConfig(
            model_name="tiny",
            model=get_model("tiny"),
            gpu=get_gpu("H100"),
            num_gpus=1,
            max_model_len=2048,
            block_size=16,
            num_gpu_blocks=64,  # small: the workload below must evict
            max_num_batched_tokens=1024,
        )
    )


def test_replayed_events_rebuild_engine_cache() -> None:
    ctx = zmq.Context.instance()
    publisher = KvEventPublisher(endpoint="tcp://127.0.0.1:*", topic="kv@test@tiny")
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(publisher.bound_endpoint)
        # Slow joiner: publish a probe until the subscriber sees one, then start counting.
        probe_deadline = time.monotonic() + 5
        while time.monotonic() < probe_deadline:
            publisher.publish(EventBatch(time.time(), [AllBlocksCleared()]))
            if sub.poll(50):
                break
        while sub.poll(50):
            sub.recv_multipart()
        first_seq = publisher.next_seq

        core = _engine()
        shared = list(range(5000, 5064))  # 4 blocks shared by every third request
        published = 0
        for i in range(40):
            prompt = (
                [*shared, *range(i * 100, i * 100 + 40)]
                if i % 3 == 0
                else list(range(10_000 + i * 300, 10_000 + i * 300 + 150))
            )
            core.add_request(
                EngineRequest(f"r{i}", prompt, SamplingParams(max_tokens=20, ignore_eos=True))
            )
            t = float(i)
            while core.has_unfinished():
                step = core.step(t)
                t += step.duration
                if step.kv_events:
                    publisher.publish(EventBatch(t, step.kv_events))
                    published += 1

        received = [sub.recv_multipart() for _ in range(published) if sub.poll(5000)]
        assert len(received) == published

        blocks: set[int] = set()
        removed = 0
        for expected_seq, frames in enumerate(received, start=first_seq):
            topic, seq, batch = decode_frames(frames)
            assert topic == "kv@test@tiny" and seq == expected_seq  # no gaps, in order
            for event in batch.events:
                if isinstance(event, BlockStored):
                    blocks.update(event.block_hashes)
                elif isinstance(event, BlockRemoved):
                    removed += len(event.block_hashes)
                    blocks.difference_update(event.block_hashes)
                else:
                    blocks.clear()
        assert removed > 0, "the workload was meant to evict"
        assert blocks == core.kv.cached_hashes()
    finally:
        sub.close(linger=0)
        publisher.close()
