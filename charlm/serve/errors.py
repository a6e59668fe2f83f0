"""Errors as OpenAI-shaped bodies: {"error": {"message", "type", "param", "code"}}, so existing clients show
the message (the openai package raises BadRequestError, AuthenticationError, RateLimitError... from them)."""

from __future__ import annotations

from typing import Any

from charlm.errors import CharlmError, OptionError


class ApiError(CharlmError):
    """A request the server refuses, with its HTTP status and the field at fault (param)."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.type, self.param, self.code)


class FieldError(ApiError, OptionError):
    """A request field of the wrong type or out of its range: 400, naming the field."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}", 400, param=param)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def busy(retry_after: int) -> ApiError:
    """The queue is at its bound: 429 with Retry-After (the openai package waits that long and retries)."""
    return ApiError(
        f"the server is busy: every row is taken and the queue is full; retry in {retry_after} s",
        429,
        type="rate_limit_error",
        code="server_busy",
        headers={"Retry-After": str(retry_after)},
    )


def draining() -> ApiError:
    """After SIGTERM: the server finishes what it has and takes nothing new."""
    return ApiError(
        "the server is shutting down; send the request to another replica",
        503,
        type="server_error",
        code="shutting_down",
        headers={"Retry-After": "1", "Connection": "close"},
    )
