"""Pure ASGI middlewares (no BaseHTTPMiddleware: it breaks disconnect detection and streams)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..core.errors import error_body
from ..core.telemetry import Telemetry

__all__ = ["ROUTE_HEADER", "BodyLimitMiddleware", "MetricsMiddleware", "RouteHeaderMiddleware"]

ROUTE_HEADER = b"x-sowa-route"  # engine -> worker: the route template a forwarded request matched


async def send_error(send: Send, status: int, code: str, message: str,
                     headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """The service's JSON error body, sent from middleware that answers before any route runs."""
    body = json.dumps(error_body(code, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """413 for a request body over `limit` bytes: by Content-Length at once, else counted as it streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._reject(send)
            return
        seen = 0
        started = rejected = False

        async def counting_receive() -> Message:
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # a streamed (chunked) body: answer 413 now, the app sees the client leave
                    rejected = True
                    if not started:
                        await self._reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return  # the 413 is already sent; the app's own answer to the "disconnect" goes nowhere
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, tracking_send)

    async def _reject(self, send: Send) -> None:
        await send_error(send, 413, "payload_too_large", f"request body larger than {self.limit} bytes",
                         [(b"connection", b"close")])


class MetricsMiddleware:
    """Count and time requests by route template (never the raw path: class names would explode labels)."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry) -> None:
        self.app, self.telemetry = app, telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: dict[str, Any] = {"code": 500}
        start = time.perf_counter()

        forwarded: list[str] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = message.get("headers") or []
                if any(k == ROUTE_HEADER for k, _ in headers):  # answered by the engine process, for a worker
                    forwarded.extend(v.decode("latin-1") for k, v in headers if k == ROUTE_HEADER)
                    message = {**message, "headers": [(k, v) for k, v in headers if k != ROUTE_HEADER]}
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            endpoint = (forwarded[0] if forwarded else None) or getattr(route, "path", None) or "unmatched"
            self.telemetry.requests.labels(endpoint, str(status["code"])).inc()
            self.telemetry.request_duration.labels(endpoint).observe(time.perf_counter() - start)


class RouteHeaderMiddleware:
    """The engine process behind workers: tell them, in a response header, which route template a request
    matched, so their request counts are labelled as a single process labels them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tag(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                message = {**message, "headers": [*(message.get("headers") or []), (ROUTE_HEADER, route.encode())]}
            await send(message)

        await self.app(scope, receive, tag)
