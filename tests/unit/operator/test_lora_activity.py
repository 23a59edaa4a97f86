"""Adapter activity from vllm:lora_requests_info (golden vLLM recording), smoothed, and the path
from activity to extra replicas in the placement."""

from __future__ import annotations

from pathlib import Path

from shoal.operator.lora_activity import AdapterActivity, EngineLoraSample, parse_lora_activity
from shoal.operator.lora_placement import AdapterDemand, PodSlots, place

GOLDEN = Path(__file__).resolve().parents[3].parent / "shared" / "golden" / "vllm-0.32.0" / "main"


def test_the_newest_series_of_a_real_vllm_exposition_is_the_current_one() -> None:
    text = (GOLDEN / "083_lora_metrics_after_requests.prom").read_text()
    # two series: "tiny-lora" running and waiting, then a later empty one (traffic over)
    assert parse_lora_activity(text) == EngineLoraSample(frozenset(), frozenset())
    busy = text.replace("1.7954155260715241e+09", "1.0e+09")  # make the busy one newest
    assert parse_lora_activity(busy) == EngineLoraSample(
        frozenset({"tiny-lora"}), frozenset({"tiny-lora"})
    )
    assert parse_lora_activity("# nothing\nvllm:num_requests_running 0\n") is None


def _busy(*names: str, waiting: tuple[str, ...] = ()) -> EngineLoraSample:
    return EngineLoraSample(frozenset(names), frozenset(waiting))


def test_activity_is_smoothed_over_the_half_life_and_forgotten_when_idle() -> None:
    act = AdapterActivity(half_life_s=10)
    act.update(0, [_busy("hot", waiting=("hot",)), _busy("hot", "cold")])
    assert act.levels() == {"hot": 3.0, "cold": 1.0}  # first sample taken as is
    act.update(10, [])  # one half-life of silence halves it
    assert act.levels()["hot"] == 1.5
    act.update(10 + 10 * 20, [])
    assert act.levels() == {}  # bounded: idle adapters are dropped


def test_activity_turns_into_extra_replicas_from_spare_room() -> None:
    act = AdapterActivity(half_life_s=30)
    # "hot" runs and queues on both of its 2 replicas: activity 4 = 2 per replica
    act.update(0, [_busy("hot", waiting=("hot",)), _busy("hot", "c0", waiting=("hot",))])
    levels = act.levels()
    demands = [AdapterDemand("hot", 2, levels.get("hot", 0.0))]
    demands += [AdapterDemand(f"c{i}", 1, levels.get(f"c{i}", 0.0)) for i in range(3)]
    pods = [PodSlots(f"p{i}", 4) for i in range(4)]
    p = place(demands, pods, rate_per_replica=1.5)
    assert len(p.pods_of("hot")) == 3  # ceil(4 / 1.5)
    assert all(len(p.pods_of(f"c{i}")) == 1 for i in range(3))
    # at 1.5 per replica a busy but unqueued adapter (1 per replica) gets nothing extra
    calm = AdapterActivity()
    calm.update(0, [_busy("hot"), _busy("hot")])
    p = place([AdapterDemand("hot", 2, calm.levels()["hot"])], pods, rate_per_replica=1.5)
    assert len(p.pods_of("hot")) == 2
