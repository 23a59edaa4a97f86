"""One active autoscaler: leader election on a ``coordination.k8s.io/v1`` Lease.

The algorithm is client-go's ``leaderelection`` reduced to what we need. A candidate reads the
Lease; it takes it when the Lease is free, its own, or expired (``renewTime`` older than
``leaseDurationSeconds``), by an update carrying the ``resourceVersion`` it read, so two candidates
racing for an expired Lease cannot both win (the loser gets 409). The holder renews every
``renew_interval_s``; if it cannot renew before ``lease_duration_s`` has passed since its last
success it stops acting *before* another candidate may take over (renewal deadline < duration),
which is what keeps two replicas from scaling at once.

Time comparisons use this process's clock against ``renewTime``; like client-go, that tolerates
skew up to the difference between the lease duration and the renewal deadline.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class LeaseConfig:
    name: str
    namespace: str
    identity: str
    lease_duration_s: float = 15.0
    renew_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.renew_interval_s < self.lease_duration_s:
            raise ValueError(
                f"renew interval ({self.renew_interval_s}s) must be positive and shorter than the "
                f"lease duration ({self.lease_duration_s}s)"
            )


class LeaderElector:
    """``is_leader`` says whether this replica may act now; :meth:`run` keeps it true."""

    def __init__(
        self,
        api: client.ApiClient,
        config: LeaseConfig,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.coord = client.CoordinationV1Api(api)
        self.config = config
        self.on_change = on_change
        self._leader_until = 0.0  # monotonic deadline of our last successful renewal
        self._was_leader = False

    @property
    def is_leader(self) -> bool:
        # Stop acting a renew interval before the lease can be taken from us.
        return time.monotonic() < self._leader_until

    def _set(self, until: float) -> None:
        self._leader_until = until
        self.refresh()

    def refresh(self) -> None:
        """Report a change of leadership (also the silent one: a renewal deadline passing)."""
        if self._was_leader != self.is_leader:
            self._was_leader = self.is_leader
            log.info(
                "%s leadership of Lease %s/%s",
                "acquired" if self.is_leader else "lost",
                self.config.namespace,
                self.config.name,
            )
            if self.on_change is not None:
                self.on_change(self.is_leader)

    def _spec(self, acquire_time: datetime.datetime | None, transitions: int) -> client.V1LeaseSpec:
        now = _now()
        return client.V1LeaseSpec(
            holder_identity=self.config.identity,
            lease_duration_seconds=int(self.config.lease_duration_s),
            acquire_time=acquire_time or now,
            renew_time=now,
            lease_transitions=transitions,
        )

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this replica holds the Lease afterwards."""
        cfg = self.config
        started = time.monotonic()
        try:
            lease = await self.coord.read_namespaced_lease(cfg.name, cfg.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=cfg.name, namespace=cfg.namespace),
                spec=self._spec(None, 0),
            )
            try:
                await self.coord.create_namespaced_lease(cfg.namespace, body)
            except ApiException as exc2:
                if exc2.status == 409:  # another candidate created it first
                    return False
                raise
            return self._won(started)
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity
        mine = holder == cfg.identity
        if holder and not mine and not self._expired(spec):
            return False
        transitions = (spec.lease_transitions or 0) + (0 if mine else 1)
        lease.spec = self._spec(spec.acquire_time if mine else None, transitions)
        try:
            await self.coord.replace_namespaced_lease(cfg.name, cfg.namespace, lease)
        except ApiException as exc:
            if exc.status == 409:  # someone else wrote it since we read it
                return False
            raise
        return self._won(started)

    def _won(self, started: float) -> bool:
        # Count from before the request: the server may have stamped renewTime at any point.
        self._set(started + self.config.lease_duration_s - self.config.renew_interval_s)
        return True

    def _expired(self, spec: client.V1LeaseSpec) -> bool:
        renew = spec.renew_time or spec.acquire_time
        if renew is None:
            return True
        duration = spec.lease_duration_seconds or self.config.lease_duration_s
        return (_now() - renew).total_seconds() > duration

    async def run(self) -> None:
        """Acquire and renew forever; never raises on API errors (logged, retried)."""
        while True:
            try:
                ok = await self.try_acquire_or_renew()
            except (TimeoutError, ApiException, OSError) as exc:
                log.warning("Lease %s/%s: %r", self.config.namespace, self.config.name, exc)
                ok = False
            self.refresh()
            # A candidate retries sooner than a holder renews, so a freed Lease is taken quickly.
            await asyncio.sleep(self.config.renew_interval_s / (1 if ok else 2))

    async def release(self) -> None:
        """Give the Lease up on shutdown so a standby takes over at once (best effort)."""
        if not self.is_leader:
            return
        cfg = self.config
        self._set(0.0)
        try:
            lease = await self.coord.read_namespaced_lease(cfg.name, cfg.namespace)
            if lease.spec is not None and lease.spec.holder_identity == cfg.identity:
                # client-go's ReleaseOnCancel: an empty holder is free for the next candidate
                lease.spec.holder_identity = ""
                lease.spec.lease_duration_seconds = 1
                await self.coord.replace_namespaced_lease(cfg.name, cfg.namespace, lease)
        except (ApiException, OSError) as exc:
            log.warning("could not release Lease %s/%s: %r", cfg.namespace, cfg.name, exc)
