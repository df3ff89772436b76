"""ForwardMiddleware: in an HTTP worker, the requests for routes whose state lives in the engine process go
there; every other request is answered here by the same routes a single process has.

A request is forwarded only once it has matched such a route here (method and path), behind this app's own
middleware: the body limit and the API key hold before anything is read or sent on, and a path no route takes
answers 404 or 405 here, as a single process does. The forwarding itself (a transport to the engine) is given.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["ForwardMiddleware"]


class ForwardMiddleware:
    def __init__(self, app: ASGIApp, forward: ASGIApp, routes: Iterable[BaseRoute]) -> None:
        self.app, self.forward, self.routes = app, forward, tuple(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and any(r.matches(scope)[0] is Match.FULL for r in self.routes):
            await self.forward(scope, receive, send)
            return
        await self.app(scope, receive, send)
