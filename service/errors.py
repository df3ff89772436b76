"""The service's errors: one tree, one JSON shape `{"error": {"code", "message"}}`, one place that maps them."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = [
    "ClassNotFoundError",
    "ClientClosedError",
    "DeadlineExceededError",
    "InvalidImageError",
    "NotReadyError",
    "PayloadTooLargeError",
    "QueueFullError",
    "SowaError",
    "UnauthorizedError",
    "UnprocessableError",
    "error_body",
    "install_error_handlers",
]

log = logging.getLogger("sowa.service")


class SowaError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.headers = message, headers


class InvalidImageError(SowaError):
    status, code = 400, "invalid_image"


class UnauthorizedError(SowaError):
    status, code = 401, "unauthorized"


class ClassNotFoundError(SowaError):
    status, code = 404, "class_not_found"


class PayloadTooLargeError(SowaError):
    status, code = 413, "payload_too_large"


class UnprocessableError(SowaError):
    status, code = 422, "invalid_request"


class ClientClosedError(SowaError):
    status, code = 499, "client_closed_request"  # nginx's convention; nobody reads it, the metrics count it


class QueueFullError(SowaError):
    status, code = 429, "queue_full"


class NotReadyError(SowaError):
    status, code = 503, "not_ready"


class DeadlineExceededError(SowaError):
    status, code = 504, "deadline_exceeded"


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "invalid"))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SowaError)
    async def _sowa(_: Request, exc: SowaError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid_request", _validation_message(exc)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        code = codes.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)
