"""Scraping engines: ``/metrics`` several times a second, ``/v1/models`` every few seconds.

The parser is deliberately partial: an engine's exposition is ~50 kB of histograms the router
never reads, so it skips every line not starting with ``vllm:`` and every family it does not need
before touching labels or values. That keeps a 200 ms scrape of tens of engines cheap on the
event loop. It is not a general Prometheus parser (no escapes beyond ``\\"``, no exemplars).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from shoal.router.engine_state import EngineStateStore
from shoal.router.scrape_cadence import ScrapeCadence
from shoal.router.types import Endpoint, EngineMetrics
from shoal.router.upstream import Upstream, UpstreamConnectError, UpstreamError

log = logging.getLogger(__name__)

_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_KV_USAGE = "vllm:kv_cache_usage_perc"
_PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
_PREFIX_HITS = "vllm:prefix_cache_hits_total"
_LORA_INFO = "vllm:lora_requests_info"
_CACHE_CONFIG = "vllm:cache_config_info"
_WANTED = frozenset(
    {_RUNNING, _WAITING, _KV_USAGE, _PREFIX_QUERIES, _PREFIX_HITS, _LORA_INFO, _CACHE_CONFIG}
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(slots=True)
class ScrapeResult:
    metrics: EngineMetrics
    block_size: int | None = None


def _labels(text: str) -> dict[str, str]:
    return dict(_LABEL.findall(text))


def _split(line: str) -> tuple[str, str, float] | None:
    """(name, label text, value) of one sample line, or None if it is not one we can read."""
    brace = line.find("{")
    if brace >= 0:
        close = line.rfind("}")
        if close < brace:
            return None
        name, labels, rest = line[:brace], line[brace + 1 : close], line[close + 1 :]
    else:
        name, _, rest = line.partition(" ")
        labels = ""
    parts = rest.split()
    if not parts:
        return None
    try:
        return name, labels, float(parts[0])
    except ValueError:
        return None


def _wanted_lines(text: str) -> Iterator[tuple[str, str]]:
    """(family, sample line) for every sample of the families the router reads.

    Jumps from one occurrence of a wanted name to the next with ``str.find`` (C speed) instead
    of splitting ~600 lines in Python: the exposition is mostly histogram buckets.
    """
    size = len(text)
    for name in _WANTED:
        needle = "\n" + name
        # Index of the first character of a candidate line, or -1 when there is none left.
        start = 0 if text.startswith(name) else text.find(needle) + 1 or -1
        while start != -1:
            after = start + len(name)
            end = text.find("\n", after)
            if end == -1:
                end = size
            if after < size and text[after] in "{ ":  # not a longer name sharing this prefix
                yield name, text[start:end]
            found = text.find(needle, end)
            start = -1 if found == -1 else found + 1


def parse_engine_metrics(text: str, model: str | None = None) -> ScrapeResult:
    """The load signals in a vLLM ``/metrics`` text.

    With ``model``, series labelled with another ``model_name`` are ignored (an engine process
    serves one model, but a multi-model exposition must not mix them). Counts are summed over
    series (data-parallel engines), KV usage takes the fullest engine.
    """
    m = EngineMetrics()
    block_size: int | None = None
    lora_stamp = -1.0
    for name, line in _wanted_lines(text):
        parsed = _split(line)
        if parsed is None:
            continue
        _, label_text, value = parsed
        if name == _CACHE_CONFIG:
            size = _labels(label_text).get("block_size", "")
            if size.isdigit() and int(size) > 0:
                block_size = int(size)
            continue
        if name == _LORA_INFO:
            # One series per adapter-set change, valued by its unix time: the newest is current.
            if value > lora_stamp:
                lora_stamp = value
                labels = _labels(label_text)
                names = {
                    a
                    for key in ("running_lora_adapters", "waiting_lora_adapters")
                    for a in labels.get(key, "").split(",")
                    if a
                }
                m.active_loras = tuple(sorted(names))
                max_lora = labels.get("max_lora", "")
                m.max_loras = int(max_lora) if max_lora.isdigit() else 0
            continue
        if (
            model is not None
            and 'model_name="' in label_text
            and _labels(label_text).get("model_name") != model
        ):
            continue
        if name == _RUNNING:
            m.num_requests_running += value
        elif name == _WAITING:
            m.num_requests_waiting += value
        elif name == _KV_USAGE:
            m.kv_cache_usage = max(m.kv_cache_usage, value)
        elif name == _PREFIX_QUERIES:
            m.prefix_cache_queries += value
        elif name == _PREFIX_HITS:
            m.prefix_cache_hits += value
    return ScrapeResult(m, block_size)


@dataclass(frozen=True, slots=True)
class ServedModels:
    """An engine's ``/v1/models``: base models and adapters (adapter name -> parent model)."""

    bases: tuple[str, ...] = ()
    adapters: Mapping[str, str] = field(default_factory=dict)
    roots: Mapping[str, str] = field(default_factory=dict)  # base -> the card's ``root``


def parse_models(payload: Any) -> ServedModels:
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise ValueError("/v1/models: no data list")
    bases: list[str] = []
    adapters: dict[str, str] = {}
    roots: dict[str, str] = {}
    for card in data:
        if not isinstance(card, dict) or not isinstance(card.get("id"), str):
            continue
        parent = card.get("parent")
        if isinstance(parent, str) and parent:
            adapters[card["id"]] = parent
        else:
            bases.append(card["id"])
            root = card.get("root")
            if isinstance(root, str) and root:
                roots[card["id"]] = root
    return ServedModels(tuple(bases), adapters, roots)


def kv_source_from(payload: Any, engine_url: str) -> tuple[str, str | None] | None:
    """(events endpoint, replay endpoint) from ``GET /kv_event_sources``, or None.

    Engines often bind ``tcp://*:5557``; the router connects to the engine's own host instead.
    """
    if not isinstance(payload, dict):
        return None
    host = urlsplit(engine_url).hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    for source in payload.values():
        if not isinstance(source, dict) or not source.get("enable_kv_cache_events", True):
            continue
        if source.get("publisher", "zmq") != "zmq":
            continue
        events = source.get("endpoint")
        if not isinstance(events, str) or not events.startswith("tcp://"):
            continue
        replay = source.get("replay_endpoint")
        return _rehost(events, host), _rehost(replay, host) if isinstance(replay, str) else None
    return None


def _rehost(address: str, host: str) -> str:
    prefix, _, rest = address.partition("://")
    bound, _, port = rest.rpartition(":")
    if bound in ("*", "0.0.0.0", "[::]", "::", ""):
        bound = host
    return f"{prefix}://{bound}:{port}"


# Called with (engine url, events endpoint, replay endpoint) when an engine's KV events are found.
KvSourceHook = Callable[[str, str, str | None], None]


class ScraperPool:
    """One scraping task per endpoint, feeding an :class:`EngineStateStore`."""

    def __init__(
        self,
        upstream: Upstream,
        store: EngineStateStore,
        *,
        cadence: ScrapeCadence | None = None,
        models_refresh_s: float = 5.0,
        discover_kv_sources: bool = True,
        on_kv_source: KvSourceHook | None = None,
        on_update: Callable[[str], None] | None = None,
        idle_wait_share: float = 0.0,
    ) -> None:
        self._upstream = upstream
        # A due scrape waits up to this share of the interval for a moment when no request is in
        # flight at the engine: rendering /metrics blocks the engine's API-server loop for
        # milliseconds, and every request in flight there waits with it.
        self._idle_wait_share = idle_wait_share
        self._store = store
        self._cadence = cadence or ScrapeCadence(0.2, 0.2)
        self._models_refresh = models_refresh_s
        self._discover_kv = discover_kv_sources
        self._on_kv_source = on_kv_source
        self._on_update = on_update
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Long enough for a busy engine, short enough that a hung one turns stale quickly.
        self._timeout_s = max(1.0, 4 * self._cadence.fastest_s)

    def add(self, endpoint: Endpoint) -> None:
        if endpoint.url in self._tasks:
            return
        self._tasks[endpoint.url] = asyncio.get_running_loop().create_task(
            self._run(endpoint), name=f"scrape {endpoint.url}"
        )

    def remove(self, url: str) -> None:
        task = self._tasks.pop(url, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _get_ok(self, endpoint: Endpoint, path: str) -> bytes:
        status, body = await self._upstream.get(endpoint.url, path, self._timeout_s)
        if status != 200:
            raise UpstreamError(f"GET {path} answered HTTP {status}")
        return body

    async def scrape_once(self, endpoint: Endpoint, model: str | None) -> EngineMetrics:
        body = await self._get_ok(endpoint, "/metrics")
        result = parse_engine_metrics(body.decode("utf-8", "replace"), model)
        self._store.update_metrics(endpoint.url, result.metrics, result.block_size)
        return result.metrics

    async def refresh_models(self, endpoint: Endpoint) -> ServedModels:
        served = parse_models(json.loads(await self._get_ok(endpoint, "/v1/models")))
        self._store.update_models(endpoint.url, served.bases, served.adapters, served.roots)
        return served

    async def find_kv_source(self, endpoint: Endpoint) -> bool:
        status, body = await self._upstream.get(endpoint.url, "/kv_event_sources", self._timeout_s)
        if status != 200:
            return False
        try:
            source = kv_source_from(json.loads(body), endpoint.url)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        if source is None:
            return False
        if self._on_kv_source is not None:
            self._on_kv_source(endpoint.url, source[0], source[1])
        return True

    async def _run(self, endpoint: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        url = endpoint.url
        next_models = 0.0
        kv_found = endpoint.kv_events_endpoint is not None or not self._discover_kv
        model: str | None = endpoint.models[0] if len(endpoint.models) == 1 else None
        failures = 0
        cadence = self._cadence
        interval = cadence.fastest_s
        previous: EngineMetrics | None = None
        while True:
            started = loop.time()
            try:
                if started >= next_models:
                    served = await self.refresh_models(endpoint)
                    if model is None and len(served.bases) == 1:
                        model = served.bases[0]
                    if not kv_found:
                        kv_found = await self.find_kv_source(endpoint)
                    next_models = started + self._models_refresh
                if self._idle_wait_share > 0:
                    await self._store.wait_idle(url, interval * self._idle_wait_share)
                current = await self.scrape_once(endpoint, model)
                failures = 0
                state = self._store.get(url)
                in_flight = state.in_flight_requests if state is not None else 0
                interval = cadence.after_scrape(interval, previous, current, in_flight)
                previous = current
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                interval = cadence.after_failure()
                previous = None
                self._store.scrape_failed(url, connect_error=isinstance(exc, UpstreamConnectError))
                if failures == 1 or failures % 50 == 0:
                    log.warning("scraping %s failed (%d in a row): %r", url, failures, exc)
                next_models = 0.0  # re-read models once it answers again
            self._store.set_scrape_interval(url, interval)
            self._store.refresh_staleness(url)
            if self._on_update is not None:
                self._on_update(url)
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))
