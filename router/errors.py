"""OpenAI-shaped errors: one body shape for every error the router answers, whether the
gateway raises it (:class:`ApiError`) or the HTTP server refuses a request before the app."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response


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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def response(self) -> Response:
        headers = {}
        if self.retry_after_s is not None:
            headers["retry-after"] = str(self.retry_after_s)
        body = error_body(self.status, self.message, self.type, param=self.param, code=self.code)
        return JSONResponse(body, status_code=self.status, headers=headers)
