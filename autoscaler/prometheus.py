"""A small async client for Prometheus's HTTP API: instant queries only, which is all the loop
needs (``GET /api/v1/query``).

What "no answer" means is the point of this module. Prometheus answers an instant query with an
empty vector when no series has a sample within its look-back (a target that stopped being
scraped is marked stale and drops out), and with ``NaN`` when the arithmetic has nothing to work
on (``histogram_quantile`` over zero observations, ``0/0``). Both come back as ``None`` here,
never as ``0``: a caller that read them as zero would scale a busy pool down because the
monitoring broke. Transport failures, HTTP errors and malformed answers raise
:class:`PrometheusError` with the query and the cause, so that the caller can hold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

DEFAULT_TIMEOUT_S = 5.0


class PrometheusError(Exception):
    """Prometheus could not answer a query: unreachable, timed out, refused, or malformed."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One series of an instant-vector answer. ``value`` is ``None`` for NaN or ±Inf."""

    labels: Mapping[str, str]
    value: float | None
    timestamp: float


def _parse_value(raw: Any) -> float | None:
    """Prometheus encodes sample values as strings ("1.5", "NaN", "+Inf")."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass
class PrometheusClient:
    """Instant queries against ``base_url`` (e.g. ``http://prometheus:9090``).

    ``client`` may be shared; when not given one is made and closed by :meth:`aclose`.
    """

    base_url: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    client: httpx.AsyncClient | None = None
    _owned: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=self.timeout_s)
            self._owned = True

    async def aclose(self) -> None:
        if self._owned and self.client is not None:
            await self.client.aclose()

    async def query(self, promql: str) -> list[Sample]:
        """Evaluate ``promql`` now; the series of the instant vector (or the one scalar)."""
        assert self.client is not None
        url = f"{self.base_url}/api/v1/query"
        try:
            resp = await self.client.get(url, params={"query": promql}, timeout=self.timeout_s)
        except httpx.TimeoutException as exc:
            raise PrometheusError(
                f"query timed out after {self.timeout_s:g}s at {url}: {promql}"
            ) from exc
        except httpx.HTTPError as exc:
            raise PrometheusError(f"cannot reach Prometheus at {url}: {exc!r}") from exc
        try:
            body = resp.json()
        except ValueError:
            raise PrometheusError(
                f"Prometheus answered HTTP {resp.status_code} with a body that is not JSON "
                f"for {promql}: {resp.text[:200]!r}"
            ) from None
        if not isinstance(body, dict):
            raise PrometheusError(f"unexpected answer for {promql}: {str(body)[:200]}")
        if resp.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(
                f"Prometheus refused {promql}: HTTP {resp.status_code} "
                f"{body.get('errorType', '')}: {body.get('error', '')}".rstrip()
            )
        return _parse_data(body.get("data"), promql)

    async def query_value(self, promql: str) -> float | None:
        """A query expected to yield at most one number: its value, or ``None`` when the
        answer is empty, NaN or infinite. More than one series is a bug in the query."""
        samples = await self.query(promql)
        if not samples:
            return None
        if len(samples) > 1:
            raise PrometheusError(
                f"expected one series, got {len(samples)} for {promql}: "
                f"{[dict(s.labels) for s in samples[:3]]}"
            )
        return samples[0].value


def _parse_data(data: Any, promql: str) -> list[Sample]:
    if not isinstance(data, dict):
        raise PrometheusError(f"answer without data for {promql}")
    kind, result = data.get("resultType"), data.get("result")
    if not isinstance(result, list):
        raise PrometheusError(f"malformed {kind} answer for {promql}: result is not a list")
    try:
        if kind == "vector":
            return [
                Sample(
                    labels=dict(item.get("metric") or {}),
                    value=_parse_value(item["value"][1]),
                    timestamp=float(item["value"][0]),
                )
                for item in result
            ]
        if kind == "scalar":
            return [Sample(labels={}, value=_parse_value(result[1]), timestamp=float(result[0]))]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise PrometheusError(f"malformed {kind} answer for {promql}: {exc!r}") from None
    raise PrometheusError(f"unsupported result type {kind!r} for {promql} (want an instant vector)")
