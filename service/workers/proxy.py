"""EngineProxy: an ASGI app that forwards a request to the engine process's own HTTP server, on a Unix socket.

A worker serves /predict itself and forwards everything else (class registration, the console, readiness,
metrics, the OpenAPI document) unchanged: one implementation of every route, in the process that holds the
state. The body is bounded before it gets here (BodyLimitMiddleware); the answer streams back as it comes.
"""

from __future__ import annotations

import httpx
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..http.middleware import send_error

__all__ = ["EngineProxy"]

# connection-level headers are the hop's own (RFC 9110 section 7.6.1); httpx sets host and length anew
_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
_REQUEST_HOP = _HOP | {b"host", b"content-length"}


class EngineProxy:
    def __init__(self, uds: str, timeout: float) -> None:
        self.client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=uds), base_url="http://engine",
                                        timeout=httpx.Timeout(timeout, connect=5.0))

    async def close(self) -> None:
        await self.client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope.get("raw_path") or scope["path"].encode()
        url = path.decode("latin-1") + (f"?{scope['query_string'].decode('latin-1')}" if scope["query_string"] else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _REQUEST_HOP]
        request = self.client.build_request(scope["method"], url, headers=headers, content=bytes(body))
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TransportError as e:
            await send_error(send, 503, "not_ready", f"the engine process is not answering ({type(e).__name__})",
                             [(b"retry-after", b"5")])
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    async def predict(self, request: Request, uploads: list[tuple[str, bytes]]) -> Response:
        """A /predict the worker cannot answer itself (keep=true: kept results live in the engine process), sent
        on as the same form: its fields and the files' bytes already read."""
        form = await request.form()  # parsed once already; starlette keeps it on the request
        fields: dict[str, list[str]] = {}
        for k, v in form.multi_items():
            if not isinstance(v, UploadFile):
                fields.setdefault(k, []).append(v)
        files = [("images", (name, data, "application/octet-stream")) for name, data in uploads]
        headers = {k: v for k, v in request.headers.items() if k.lower() == "x-api-key"}
        try:
            r = await self.client.post("/predict", data=fields, files=files, headers=headers)
        except httpx.TransportError as e:
            return Response(f'{{"error": {{"code": "not_ready", "message": "the engine process is not answering '
                            f'({type(e).__name__})"}}}}', 503, {"retry-after": "5"}, "application/json")
        return Response(r.content, r.status_code, {k: v for k, v in r.headers.items()
                                                   if k.lower().encode() not in _REQUEST_HOP})
