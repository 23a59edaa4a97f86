"""Pickers: max-score with random tie-breaks, random, round-robin per model, power of two."""

from __future__ import annotations

import random
from collections import Counter

from shoal.router.pickers import MaxScorePicker, PowerOfTwoPicker, RandomPicker, RoundRobinPicker
from shoal.router.types import Endpoint, EndpointState, EngineMetrics, RoutingRequest


def state(url: str, running: float = 0, stale: bool = False) -> EndpointState:
    return EndpointState(
        endpoint=Endpoint(url=url),
        metrics=EngineMetrics(num_requests_running=running),
        stale=stale,
    )


def request(model: str = "llama") -> RoutingRequest:
    return RoutingRequest(
        model=model, base_model=model, lora=None, prompt_token_ids=[], block_hashes=[]
    )


CANDS = [state("http://a"), state("http://b"), state("http://c")]


def test_max_score_picks_the_best() -> None:
    p = MaxScorePicker(random.Random(0))
    assert p.pick(request(), CANDS, [0.1, 0.9, 0.5]).url == "http://b"


def test_max_score_breaks_ties_randomly_not_by_order() -> None:
    p = MaxScorePicker(random.Random(1))
    picks = Counter(p.pick(request(), CANDS, [0.7, 0.7, 0.2]).url for _ in range(400))
    assert set(picks) == {"http://a", "http://b"}
    assert min(picks.values()) > 120  # roughly even


def test_max_score_is_reproducible_with_a_seeded_rng() -> None:
    def run(seed: int) -> list[str]:
        p = MaxScorePicker(random.Random(seed))
        return [p.pick(request(), CANDS, [1, 1, 1]).url for _ in range(30)]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_random_picker_covers_all() -> None:
    p = RandomPicker(random.Random(2))
    assert {p.pick(request(), CANDS, [0, 0, 0]).url for _ in range(100)} == {
        "http://a",
        "http://b",
        "http://c",
    }


def test_round_robin_cycles_per_model_in_url_order() -> None:
    p = RoundRobinPicker()
    shuffled = [CANDS[2], CANDS[0], CANDS[1]]
    seq = [p.pick(request(), shuffled, [0, 0, 0]).url for _ in range(4)]
    assert seq == ["http://a", "http://b", "http://c", "http://a"]
    # Another model has its own cycle.
    assert p.pick(request("qwen"), CANDS, [0, 0, 0]).url == "http://a"
    # An endpoint filtered out is skipped without disturbing the order.
    assert p.pick(request(), [CANDS[0], CANDS[2]], [0, 0]).url == "http://c"


def test_round_robin_bounded_models() -> None:
    p = RoundRobinPicker(max_models=2)
    for m in ("a", "b", "c", "d"):
        p.pick(request(m), CANDS, [0, 0, 0])
    assert len(p._last) == 2


def test_power_of_two_prefers_the_less_loaded_of_two() -> None:
    p = PowerOfTwoPicker(random.Random(3))
    cands = [state("http://idle"), state("http://busy", running=10)]
    assert all(p.pick(request(), cands, [0, 0]).url == "http://idle" for _ in range(20))
    # With three, the busiest can only win if it is sampled twice, which sample() never does.
    three = [state("http://x", 1), state("http://y", 2), state("http://z", 9)]
    assert "http://z" not in {p.pick(request(), three, [0, 0, 0]).url for _ in range(200)}
    # Stale counts as infinitely loaded.
    stale = [state("http://s", 0, stale=True), state("http://f", 50)]
    assert all(p.pick(request(), stale, [0, 0]).url == "http://f" for _ in range(20))
    assert p.pick(request(), cands[:1], [0]).url == "http://idle"
