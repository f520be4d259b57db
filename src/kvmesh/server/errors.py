"""OpenAI-style error bodies and the exceptions that map to them."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        err_type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type or _default_type(status)
        self.param = param
        self.headers = headers or {}
        self.reason = reason  # why a request was refused, for metrics (never sent)


def _default_type(status: int) -> str:
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        429: "rate_limit_exceeded",
        503: "service_unavailable",
    }.get(status, "server_error")


def error_body(
    status: int, message: str, err_type: str | None = None, param: str | None = None
) -> dict:
    return {
        "error": {
            "message": message,
            "type": err_type or _default_type(status),
            "param": param,
            "code": status,
        }
    }


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.status, exc.message, exc.err_type, exc.param),
        status_code=exc.status,
        headers=exc.headers,
    )


async def api_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def validation_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", []) if p != "body"]
    where = ".".join(loc) or "body"
    message = f"invalid request: {where}: {first.get('msg', 'malformed')}"
    return error_response(APIError(HTTPStatus.BAD_REQUEST, message, param=where or None))
