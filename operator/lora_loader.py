"""The engine side of LoRA adapters: vLLM's runtime adapter API, as an async HTTP client.

* ``GET /v1/models``: the truth of what is loaded. vLLM lists each adapter as a model card whose
  ``parent`` is the base model (the base model's own card has ``parent: null``).
* ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}``: 200 when added; 400 with "has already
  been loaded" when it is there (treated as success: loading is idempotent here); 404 when the
  path holds no adapter; other 4xx are the engine refusing (rank too large, LoRA disabled).
* ``POST /v1/unload_lora_adapter {"lora_name"}``: 200 when removed; 404 when not loaded (success:
  the goal is that it is not there).

(Shapes and texts from the golden vLLM 0.32 recordings the simulator is tested against.)
Connection errors, timeouts and 5xx answers are retried with exponential back-off; a refusal is
not, since the same request would be refused again. Every failure is an :class:`EngineLoraError`
that says which engine, which adapter, and what the engine answered.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx

ALREADY_LOADED = "has already been loaded"


class EngineLoraError(Exception):
    """A load, unload or listing that failed; ``retryable`` is False for a refusal."""

    def __init__(self, endpoint: str, message: str, *, retryable: bool, reason: str) -> None:
        super().__init__(f"{endpoint}: {message}")
        self.endpoint = endpoint
        self.message = message
        self.retryable = retryable
        self.reason = reason


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    backoff_s: float = 0.2
    max_backoff_s: float = 2.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_backoff_s, self.backoff_s * (2**attempt)))


def _error_text(resp: httpx.Response) -> str:
    try:
        body: Any = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        if body.get("detail"):
            return str(body["detail"])[:500]
    return resp.text[:500]


class EngineLoraClient:
    """Talks to engines at ``host:port`` endpoints; the caller owns the httpx client."""

    def __init__(self, http: httpx.AsyncClient, retry: RetryPolicy | None = None) -> None:
        self.http = http
        self.retry = retry or RetryPolicy()

    async def _request(
        self, method: str, endpoint: str, path: str, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        last: str = ""
        for attempt in range(self.retry.attempts):
            if attempt:
                await asyncio.sleep(self.retry.delay(attempt - 1))
            try:
                resp = await self.http.request(method, f"http://{endpoint}{path}", json=body)
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}".rstrip(": ")
                continue
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {_error_text(resp)}"
                continue
            return resp
        raise EngineLoraError(
            endpoint,
            f"{method} {path} failed after {self.retry.attempts} attempts: {last}",
            retryable=True,
            reason="EngineUnreachable",
        )

    async def loaded(self, endpoint: str) -> set[str]:
        """Names of the adapters the engine lists in ``/v1/models``."""
        resp = await self._request("GET", endpoint, "/v1/models")
        if resp.status_code != 200:
            raise EngineLoraError(
                endpoint,
                f"GET /v1/models: HTTP {resp.status_code}: {_error_text(resp)}",
                retryable=True,
                reason="EngineUnreachable",
            )
        try:
            cards = resp.json()["data"]
            return {str(c["id"]) for c in cards if c.get("parent")}
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineLoraError(
                endpoint,
                f"GET /v1/models: unexpected answer ({exc})",
                retryable=True,
                reason="EngineUnreachable",
            ) from None

    async def load(self, endpoint: str, name: str, path: str) -> None:
        resp = await self._request(
            "POST", endpoint, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}
        )
        if resp.status_code == 200:
            return
        text = _error_text(resp)
        if resp.status_code == 400 and ALREADY_LOADED in text:
            return
        raise EngineLoraError(
            endpoint,
            f"load {name!r} from {path}: HTTP {resp.status_code}: {text}",
            retryable=False,
            reason="LoadRefused",
        )

    async def unload(self, endpoint: str, name: str) -> None:
        resp = await self._request("POST", endpoint, "/v1/unload_lora_adapter", {"lora_name": name})
        if resp.status_code in (200, 404):
            return
        raise EngineLoraError(
            endpoint,
            f"unload {name!r}: HTTP {resp.status_code}: {_error_text(resp)}",
            retryable=False,
            reason="UnloadRefused",
        )

    async def load_verified(self, endpoint: str, name: str, path: str) -> None:
        """Load, then check ``/v1/models`` lists it (an engine can answer 200 and lose it)."""
        await self.load(endpoint, name, path)
        if name not in await self.loaded(endpoint):
            raise EngineLoraError(
                endpoint,
                f"load {name!r} answered 200 but /v1/models does not list it",
                retryable=True,
                reason="LoadNotVisible",
            )


__all__ = ["EngineLoraClient", "EngineLoraError", "RetryPolicy"]
