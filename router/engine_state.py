"""What the router knows about each engine, in one place.

:class:`EngineStateStore` owns one :class:`EndpointState` per discovered endpoint and every rule
that changes it: scraped metrics and staleness, served models and adapters, the router's own
in-flight accounting, and failure tracking with ejection. The proxy, the scrapers, discovery and
shared state call its methods; the routing pipeline only reads the states. Nothing here awaits,
so every update is atomic with respect to the event loop.

Ejection and probe-back: ``eject_after_failures`` consecutive failed requests eject an endpoint
for ``eject_seconds`` (doubling on each re-ejection, at most 8×). When the cool-down ends the
endpoint is on probation: the next request that goes there is the probe; if it fails the endpoint
is ejected again at once, if it succeeds the endpoint is fully back.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from shoal.router.filters import NotSaturatedFilter
from shoal.router.types import Endpoint, EndpointState, EngineMetrics

_MAX_BACKOFF_DOUBLINGS = 3


@dataclass(frozen=True, slots=True)
class ModelCard:
    """One entry of the router's ``/v1/models``: a base model, or an adapter and its parent."""

    id: str
    parent: str | None = None


@dataclass(slots=True)
class _Tracking:
    declared: Endpoint  # as discovery gave it
    block_size: int | None = None
    adapters: Mapping[str, str] = field(default_factory=dict)
    bases: tuple[str, ...] = ()
    local_requests: int = 0
    local_tokens: int = 0
    remote_requests: int = 0  # other router replicas' in-flight, from shared state
    consecutive_failures: int = 0
    ejections_in_a_row: int = 0
    on_probation: bool = False
    scrape_failures: int = 0
    scrape_interval_s: float = 0.2  # the scraper's current cadence; staleness is counted in it


class EngineStateStore:
    def __init__(
        self,
        *,
        scrape_interval_s: float = 0.2,
        stale_after_intervals: int = 5,
        eject_after_failures: int = 3,
        eject_seconds: float = 10.0,
        unhealthy_after_scrape_failures: int = 3,
        default_block_size: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scrape_interval_s = scrape_interval_s
        self.stale_after_intervals = stale_after_intervals
        self.eject_after_failures = eject_after_failures
        self.eject_seconds = eject_seconds
        self.unhealthy_after = unhealthy_after_scrape_failures
        self.default_block_size = default_block_size
        self._clock = clock
        self._states: dict[str, EndpointState] = {}
        self._tracking: dict[str, _Tracking] = {}
        self._list: list[EndpointState] = []
        self._models: dict[str, tuple[str, str | None]] = {}
        self._roots: dict[str, str] = {}  # base model -> the engine's model root
        # ejections, probes_failed, ... for the metrics layer.
        self.counters: Counter[str] = Counter()
        # Called when the set of served names changes (held requests re-check theirs).
        self.on_models_changed: Callable[[], None] | None = None
        # Scrapers waiting for an endpoint to have no request in flight (see wait_idle).
        self._idle_waiters: dict[str, asyncio.Future[None]] = {}

    # ---------------------------------------------------------------------------- membership

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> tuple[list[Endpoint], list[str]]:
        """Replace the fleet; returns (added endpoints, removed urls). Known endpoints keep
        their state (metrics, in-flight counts) when discovery re-announces them."""
        wanted = {e.url: e for e in endpoints}
        removed = [url for url in self._states if url not in wanted]
        for url in removed:
            del self._states[url]
            del self._tracking[url]
            self._wake_idle_waiter(url)
        added: list[Endpoint] = []
        for url, endpoint in wanted.items():
            track = self._tracking.get(url)
            if track is None:
                self._states[url] = EndpointState(endpoint=endpoint)
                self._tracking[url] = _Tracking(
                    declared=endpoint, scrape_interval_s=self.scrape_interval_s
                )
                added.append(endpoint)
            elif track.declared != endpoint:
                track.declared = endpoint
                self._states[url].endpoint = self._effective(endpoint, track.bases)
        self._list = list(self._states.values())
        self._rebuild_models()
        return added, removed

    def states(self) -> Sequence[EndpointState]:
        """Every endpoint's state (the pipeline's candidates; it filters by model itself)."""
        return self._list

    def get(self, url: str) -> EndpointState | None:
        return self._states.get(url)

    def __len__(self) -> int:
        return len(self._states)

    # ----------------------------------------------------------------------------- scraping

    def update_metrics(self, url: str, metrics: EngineMetrics, block_size: int | None) -> None:
        state = self._states.get(url)
        if state is None:
            return
        track = self._tracking[url]
        metrics.scraped_at = self._clock()
        state.metrics = metrics
        state.stale = False
        state.healthy = True
        track.scrape_failures = 0
        if block_size is not None:
            track.block_size = block_size

    def scrape_failed(self, url: str, *, connect_error: bool) -> None:
        track = self._tracking.get(url)
        state = self._states.get(url)
        if track is None or state is None:
            return
        track.scrape_failures += 1
        # An engine that refuses connections is down, not merely slow: keep every strategy
        # (even round-robin, which ignores load) away from it until it answers again.
        if connect_error and track.scrape_failures >= self.unhealthy_after:
            state.healthy = False
        if track.scrape_failures >= self.unhealthy_after:
            state.stale = True

    def set_scrape_interval(self, url: str, interval_s: float) -> None:
        """The scraper's cadence for ``url`` from now on: metrics count as stale once they are
        ``stale_after_intervals`` of it old, so a slower cadence does not read as staleness."""
        track = self._tracking.get(url)
        if track is not None:
            track.scrape_interval_s = interval_s

    def scrape_interval(self, url: str) -> float | None:
        track = self._tracking.get(url)
        return None if track is None else track.scrape_interval_s

    def _too_old(self, state: EndpointState, now: float) -> bool:
        at = state.metrics.scraped_at
        if at == 0.0:
            return True
        interval = self._tracking[state.url].scrape_interval_s  # every state has its tracking
        return now - at > self.stale_after_intervals * interval

    def refresh_staleness(self, url: str) -> None:
        state = self._states.get(url)
        if state is None:
            return
        state.stale = self._too_old(state, self._clock()) or state.stale

    def refresh_all_staleness(self) -> None:
        now = self._clock()
        for state in self._list:
            if self._too_old(state, now):
                state.stale = True

    # ------------------------------------------------------------------------ models/adapters

    @staticmethod
    def _effective(declared: Endpoint, bases: tuple[str, ...]) -> Endpoint:
        # Discovery that cannot name models (a static URL list) learns them from the engine.
        if declared.models or not bases:
            return declared
        return replace(declared, models=bases)

    def model_root(self, name: str) -> str:
        """The engine's ``root`` of a served model (what its tokenizer is named by)."""
        resolved = self._models.get(name)
        base = name if resolved is None else resolved[0]
        return self._roots.get(base, base)

    def serves_root(self, root: str) -> bool:
        """Some engine serves a model by this root (or base name)."""
        return root in self._roots or root in self._roots.values()

    def update_models(
        self,
        url: str,
        bases: Sequence[str],
        adapters: Mapping[str, str],
        roots: Mapping[str, str] | None = None,
    ) -> None:
        state = self._states.get(url)
        if state is None:
            return
        track = self._tracking[url]
        bases_t = tuple(bases)
        for base, root in (roots or {}).items():
            if base not in self._roots and len(self._roots) < 4096:
                self._roots[base] = root
        if bases_t == track.bases and dict(adapters) == dict(track.adapters):
            return
        track.bases = bases_t
        track.adapters = dict(adapters)
        state.endpoint = self._effective(track.declared, bases_t)
        state.loaded_adapters = frozenset(adapters)
        self._rebuild_models()

    def _rebuild_models(self) -> None:
        models: dict[str, tuple[str, str | None]] = {}
        for url, track in self._tracking.items():
            for base in self._states[url].endpoint.models or track.bases:
                models[base] = (base, None)
            for adapter, parent in track.adapters.items():
                models.setdefault(adapter, (parent, adapter))
        changed = models != self._models
        self._models = models
        if changed and self.on_models_changed is not None:
            self.on_models_changed()

    def resolve_model(self, name: str) -> tuple[str, str | None] | None:
        """(base model, adapter or None) for a requested model name, None if nobody serves it."""
        return self._models.get(name)

    def base_models(self) -> list[str]:
        """Every base model some endpoint serves, sorted."""
        return sorted(name for name, (_, lora) in self._models.items() if lora is None)

    def resolve_servable(self, name: str) -> tuple[str, str | None] | None:
        """Like ``resolve_model``, but only once an endpoint that serves the name is healthy,
        has fresh metrics and is not ejected: what a held request waits for."""
        resolved = self._models.get(name)
        if resolved is None:
            return None
        base, lora = resolved
        now = self._clock()
        for s in self.candidates_for(base):
            if not s.healthy or s.stale or s.ejected_until > now:
                continue
            if lora is None or lora in s.loaded_adapters:
                return resolved
        return None

    def model_cards(self) -> list[ModelCard]:
        return [
            ModelCard(name, None if lora is None else base)
            for name, (base, lora) in sorted(self._models.items())
        ]

    def block_size_for(self, base_model: str) -> int:
        """The block size the model's engines hash prompts with (the first one known)."""
        for url, state in self._states.items():
            size = self._tracking[url].block_size
            if size is not None and (
                not state.endpoint.models or base_model in state.endpoint.models
            ):
                return size
        return self.default_block_size

    # ------------------------------------------------------------------------------ in flight

    def begin(self, url: str, tokens: int) -> None:
        state = self._states.get(url)
        if state is None:
            return
        track = self._tracking[url]
        track.local_requests += 1
        track.local_tokens += tokens
        self._recount(url, state, track)

    def end(self, url: str, tokens: int) -> None:
        state = self._states.get(url)
        if state is None:
            return  # the endpoint left the fleet while the request ran
        track = self._tracking[url]
        track.local_requests = max(0, track.local_requests - 1)
        track.local_tokens = max(0, track.local_tokens - tokens)
        self._recount(url, state, track)

    def _recount(self, url: str, state: EndpointState, track: _Tracking) -> None:
        """The endpoint's in-flight counts from this router's and the other replicas'; a
        scraper waiting for the endpoint to be idle is woken when they reach zero."""
        state.in_flight_requests = track.local_requests + track.remote_requests
        state.in_flight_tokens = track.local_tokens
        if state.in_flight_requests == 0:
            self._wake_idle_waiter(url)

    async def wait_idle(self, url: str, timeout_s: float) -> bool:
        """Wait until no request (this router's or, through shared state, another replica's) is
        in flight at ``url``, for at most ``timeout_s``; True if it is idle now."""
        state = self._states.get(url)
        if state is None or state.in_flight_requests == 0:
            return True
        if timeout_s <= 0:
            return False
        waiter = self._idle_waiters.get(url)
        if waiter is None or waiter.done():
            waiter = self._idle_waiters[url] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            return False
        return True

    def _wake_idle_waiter(self, url: str) -> None:
        waiter = self._idle_waiters.pop(url, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def local_in_flight(self) -> dict[str, int]:
        return {url: t.local_requests for url, t in self._tracking.items()}

    def set_remote_in_flight(self, counts: Mapping[str, int]) -> None:
        """Other replicas' in-flight requests per endpoint (shared state); absent means 0."""
        for url, track in self._tracking.items():
            track.remote_requests = max(0, int(counts.get(url, 0)))
            self._recount(url, self._states[url], track)

    # ------------------------------------------------------------------------ failures/ejection

    def record_success(self, url: str) -> None:
        track = self._tracking.get(url)
        if track is None:
            return
        track.consecutive_failures = 0
        if track.on_probation:
            track.on_probation = False
            track.ejections_in_a_row = 0
            self.counters["probes_succeeded"] += 1

    def record_failure(self, url: str) -> bool:
        """Count a failed request; True when this failure ejected the endpoint."""
        track = self._tracking.get(url)
        state = self._states.get(url)
        if track is None or state is None:
            return False
        now = self._clock()
        if state.ejected_until > now:
            return False  # already out; late failures of requests sent before the ejection
        track.consecutive_failures += 1
        if track.on_probation:
            self.counters["probes_failed"] += 1
        elif track.consecutive_failures < self.eject_after_failures:
            return False
        backoff = 2 ** min(track.ejections_in_a_row, _MAX_BACKOFF_DOUBLINGS)
        state.ejected_until = now + self.eject_seconds * backoff
        track.ejections_in_a_row += 1
        track.consecutive_failures = 0
        track.on_probation = True
        self.counters["ejections"] += 1
        return True

    def candidates_for(self, base_model: str) -> list[EndpointState]:
        """Endpoints that serve ``base_model`` (or declare no models at all)."""
        return [s for s in self._list if not s.endpoint.models or base_model in s.endpoint.models]

    def now(self) -> float:
        return self._clock()

    def is_ejected(self, url: str) -> bool:
        state = self._states.get(url)
        return state is not None and state.ejected_until > self._clock()


class SaturationPolicy:
    """When an endpoint cannot take more work now (admission then queues requests).

    Saturated: the pipeline's own notion (:meth:`NotSaturatedFilter.is_saturated`: stale
    metrics, engine queue over ``max_waiting``, KV cache over ``max_kv_cache_usage``), or this
    router has ``max_in_flight`` requests there, or the engine's queue *plus* what the router sent
    since the last scrape would pass ``max_waiting`` (a scrape is up to one interval old; without
    this, one scrape reporting room would release the whole queue onto one engine).
    """

    def __init__(
        self, max_waiting: float = 32.0, max_kv_cache_usage: float = 1.0, max_in_flight: int = 0
    ) -> None:
        self._filter = NotSaturatedFilter(max_waiting, max_kv_cache_usage)
        self.max_waiting = max_waiting
        self.max_in_flight = max_in_flight

    def over_in_flight(self, s: EndpointState) -> bool:
        return 0 < self.max_in_flight <= s.in_flight_requests

    def is_saturated(self, s: EndpointState) -> bool:
        if self._filter.is_saturated(s) or self.over_in_flight(s):
            return True
        m = s.metrics
        unseen = s.in_flight_requests - (m.num_requests_running + m.num_requests_waiting)
        return m.num_requests_waiting + max(0.0, unseen) > self.max_waiting

    def has_capacity(self, candidates: Sequence[EndpointState], now: float) -> bool:
        """Some candidate can take a request. If every candidate is stale (no load signal at
        all, e.g. engines whose /metrics is broken), only the in-flight bound applies: a fleet
        must not stop serving because it stopped reporting."""
        usable = [s for s in candidates if s.healthy and s.ejected_until <= now]
        if not usable:
            # Nothing to send to: let the request through to get its 503 now, not after a wait.
            return True
        if all(s.stale for s in usable):
            return any(not self.over_in_flight(s) for s in usable)
        return any(not self.is_saturated(s) for s in usable)
