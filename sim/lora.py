"""LoRA adapters in the simulated engine: registration, GPU and host residency.

vLLM keeps up to ``max_loras`` adapters in GPU slots (a batch may mix at most that many) and up to
``max_cpu_loras`` in host memory; bringing an adapter into a GPU slot costs a copy from host memory,
or a load from disk when it is not in host memory either. Both caches are LRU. Errors carry the
status, OpenAI error type and message text vLLM 0.32 answers with (golden recordings 075-085).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


class LoraError(Exception):
    status = 400
    err_type = "BadRequestError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LoraAlreadyLoaded(LoraError):
    status = 400
    err_type = "InvalidUserInput"


class LoraNotFound(LoraError):
    status = 404
    err_type = "NotFoundError"


class LoraBadPath(LoraError):
    status = 404
    err_type = "NotFoundError"


class LoraCapacityError(LoraError):
    status = 400
    err_type = "BadRequestError"


@dataclass(slots=True)
class LoraAdapter:
    name: str
    path: str
    lora_id: int
    rank: int


def _rank_from_config(path: str) -> int | None:
    """The rank a PEFT adapter declares (``r`` in ``adapter_config.json``), as vLLM reads it;
    None when the path has no readable config (the simulator then assumes a small rank)."""
    try:
        with open(os.path.join(path, "adapter_config.json")) as f:
            value = json.load(f).get("r")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def default_path_check(path: str) -> bool:
    """An adapter path is loadable when it exists (a directory or file), as for vLLM."""
    return os.path.exists(path)


class LoraManager:
    def __init__(
        self,
        max_loras: int,
        max_cpu_loras: int | None = None,
        max_lora_rank: int = 16,
        path_check: Callable[[str], bool] = default_path_check,
    ) -> None:
        self.max_loras = max_loras
        self.max_cpu_loras = max(max_cpu_loras or max_loras, max_loras)
        self.max_lora_rank = max_lora_rank
        self._path_check = path_check
        self._adapters: dict[str, LoraAdapter] = {}
        self._next_id = 1
        # LRU residency: most recently used at the end.
        self._gpu: OrderedDict[str, None] = OrderedDict()
        self._cpu: OrderedDict[str, None] = OrderedDict()
        self.ids: dict[str, int] = {}

    def add(self, name: str, path: str, rank: int | None = None) -> LoraAdapter:
        if name in self._adapters:
            raise LoraAlreadyLoaded(
                f"The lora adapter '{name}' has already been loaded. If you want to load the "
                "adapter in place, set 'load_inplace' to True."
            )
        if not path or not self._path_check(path):
            raise LoraBadPath(f"Loading lora {name} failed: No adapter found for {path}")
        if rank is None:
            rank = _rank_from_config(path)
        rank = rank if rank is not None else min(8, self.max_lora_rank)
        if rank > self.max_lora_rank:
            raise LoraCapacityError(
                f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}."
            )
        adapter = LoraAdapter(name=name, path=path, lora_id=self._next_id, rank=rank)
        self._next_id += 1
        self._adapters[name] = adapter
        self.ids[name] = adapter.lora_id
        # vLLM loads a new adapter into host memory at registration.
        self._touch_cpu(name)
        return adapter

    def remove(self, name: str) -> None:
        if name not in self._adapters:
            raise LoraNotFound(f"The lora adapter '{name}' cannot be found.")
        del self._adapters[name]
        self.ids.pop(name, None)
        self._gpu.pop(name, None)
        self._cpu.pop(name, None)

    def get(self, name: str) -> LoraAdapter | None:
        return self._adapters.get(name)

    def adapters(self) -> list[LoraAdapter]:
        return list(self._adapters.values())

    def is_on_gpu(self, name: str) -> bool:
        return name in self._gpu

    def activate(self, name: str) -> str | None:
        """Put ``name`` in a GPU slot; return its source ("cpu", "disk"), or None if resident."""
        if name in self._gpu:
            self._gpu.move_to_end(name)
            return None
        source = "cpu" if name in self._cpu else "disk"
        self._gpu[name] = None
        while len(self._gpu) > self.max_loras:
            self._gpu.popitem(last=False)
        self._touch_cpu(name)
        return source

    def _touch_cpu(self, name: str) -> None:
        self._cpu[name] = None
        self._cpu.move_to_end(name)
        while len(self._cpu) > self.max_cpu_loras:
            self._cpu.popitem(last=False)
