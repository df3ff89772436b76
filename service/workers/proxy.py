"""EngineProxy: an ASGI app that sends a request on to the engine process's own HTTP server, on a Unix socket.

A worker answers /predict, health and the console itself and forwards the routes whose state lives in the engine
process (service/http/app.py `ENGINE_ROUTERS`) once they have matched there, behind the worker's key check and
body limit (service/http/forward.py). Both ways stream: the request body goes on as it arrives, so a worker holds
no whole upload, and the answer comes back as the engine sends it. The path goes on as the client sent it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.types import Receive, Scope, Send

from ..http.middleware import send_error

__all__ = ["EngineProxy"]

# connection-level headers are the hop's own (RFC 9110 section 7.6.1); httpx sets host anew
_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
_REQUEST_HOP = _HOP | {b"host"}


def _as_sent(path: bytes) -> bytes:
    """The path for httpx, which would resolve `.` and `..` segments (`/classes/..` -> `/`): those are sent
    percent-encoded, which the engine decodes back, so it sees the path the client sent."""
    return b"/".join(b"%2E" * len(seg) if seg in (b".", b"..") else seg for seg in path.split(b"/"))


class _ClientLeftError(Exception):
    """The client went away while its body was being sent on."""


class EngineProxy:
    def __init__(self, uds: str, timeout: float) -> None:
        self.client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=uds), base_url="http://engine",
                                        timeout=httpx.Timeout(timeout, connect=5.0))

    async def close(self) -> None:
        await self.client.aclose()

    async def get_json(self, path: str) -> tuple[int, Any]:
        """A GET of the engine's own (its readiness, say), as status and JSON."""
        r = await self.client.get(path)
        return r.status_code, r.json()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientLeftError
                yield message.get("body", b"")
                if not message.get("more_body"):
                    return

        query = b"?" + scope["query_string"] if scope["query_string"] else b""
        path = _as_sent(scope.get("raw_path") or scope["path"].encode())
        url = httpx.URL(scheme="http", host="engine", raw_path=path + query)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _REQUEST_HOP]
        request = self.client.build_request(scope["method"], url, headers=headers, content=body())
        try:
            response = await self.client.send(request, stream=True)
        except _ClientLeftError:
            return
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
