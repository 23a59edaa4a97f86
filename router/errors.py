"""OpenAI-shaped errors: one body shape for every error the router answers, whether the
gateway raises it (:class:`ApiError`) or the HTTP server refuses a request before the app."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from shoal.router.exchange import HttpExchange


def error_body(
    status: int, message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """``{"error": {...}}`` as OpenAI's API answers it; ``code`` defaults to the status."""
    return {
        "error": {
            "message": message,
            "type": type_,
            "param": param,
            "code": code if code is not None else status,
        }
    }


def bad_request(message: str, param: str | None = None) -> ApiError:
    """A 400 for a request the router cannot read (OpenAI's ``invalid_request_error``)."""
    return ApiError(400, message, "invalid_request_error", param=param)


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s
        self.extra_headers = dict(extra_headers or {})

    async def send_to(self, exchange: HttpExchange) -> None:
        body = orjson.dumps(
            error_body(self.status, self.message, self.type, param=self.param, code=self.code)
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if self.retry_after_s is not None:
            headers.append((b"retry-after", str(self.retry_after_s).encode()))
        for name, value in self.extra_headers.items():
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
        await exchange.start_response(self.status, headers)
        await exchange.write_body(body, more=False)
