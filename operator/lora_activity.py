"""How busy each LoRA adapter is, from the engines' own ``vllm:lora_requests_info``.

The operator already talks to every engine pod each reconcile, so it reads their ``/metrics``
too, needing no Prometheus. vLLM publishes one ``vllm:lora_requests_info`` series per
(running, waiting) adapter combination, valued with the time it was last current; the newest
series says which adapters have requests running and which have requests queued on that engine
(the golden vLLM 0.32 recordings show this; it names adapters, not request counts).

Activity of an adapter in one sample = engines where it runs + engines where it waits: 2 on
one replica means that replica is busy and still queues requests for it. Samples are smoothed
with an exponential moving average (half-life ``half_life_s``) so a burst does not add and drop
replicas every round. The placement gives an adapter extra replicas when its activity exceeds
``--lora-hot-activity-per-replica`` × its replicas (see ``lora_placement``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

LORA_INFO = "vllm:lora_requests_info"
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
DEFAULT_HALF_LIFE_S = 60.0
# Adapters whose smoothed activity fell below this are forgotten: the map stays bounded by the
# adapters that were recently busy.
_FORGET_BELOW = 0.01


@dataclass(frozen=True)
class EngineLoraSample:
    running: frozenset[str]
    waiting: frozenset[str]


def parse_lora_activity(text: str) -> EngineLoraSample | None:
    """The newest ``vllm:lora_requests_info`` series of a ``/metrics`` text (None: no series)."""
    best: tuple[float, EngineLoraSample] | None = None
    for line in text.splitlines():
        if not line.startswith(LORA_INFO + "{"):
            continue
        close = line.rfind("}")
        try:
            stamp = float(line[close + 1 :].split()[0])
        except (IndexError, ValueError):
            continue
        labels = dict(_LABEL.findall(line[len(LORA_INFO) + 1 : close]))
        sample = EngineLoraSample(
            frozenset(a for a in labels.get("running_lora_adapters", "").split(",") if a),
            frozenset(a for a in labels.get("waiting_lora_adapters", "").split(",") if a),
        )
        if best is None or stamp > best[0]:
            best = (stamp, sample)
    return best[1] if best else None


@dataclass
class AdapterActivity:
    """Smoothed activity per adapter of one base Model (time passed in: a pure state)."""

    half_life_s: float = DEFAULT_HALF_LIFE_S
    _level: dict[str, float] = field(default_factory=dict)
    _last: float | None = None

    def update(self, now: float, samples: Iterable[EngineLoraSample]) -> None:
        current: dict[str, float] = {}
        for s in samples:
            for name in s.running:
                current[name] = current.get(name, 0.0) + 1.0
            for name in s.waiting:
                current[name] = current.get(name, 0.0) + 1.0
        if self._last is None:
            keep = 0.0
        else:
            keep = math.exp(-math.log(2) * max(0.0, now - self._last) / self.half_life_s)
        self._last = now
        names = set(self._level) | set(current)
        self._level = {
            n: level
            for n in names
            if (level := keep * self._level.get(n, 0.0) + (1 - keep) * current.get(n, 0.0))
            >= _FORGET_BELOW
            or n in current
        }

    def levels(self) -> Mapping[str, float]:
        return dict(self._level)


__all__ = ["LORA_INFO", "AdapterActivity", "EngineLoraSample", "parse_lora_activity"]
