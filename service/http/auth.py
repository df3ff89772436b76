"""Who is calling and may they: the API key to a principal, the principal's role against the route's.

Every route declares the least role it needs with `Depends(Requires(Role.X))` (on its router, or itself to ask
more). `AuthMiddleware` runs before any body is read: it refuses duplicate keys (400), throttles an address
after a burst of wrong keys (429), resolves the key to a principal (401 when missing, unknown or revoked, while
keys are required), and answers 403 when the matched route needs a higher role or names a class outside the
key's pattern (a route's `name` path parameter is always a class name). The dependency checks again (a route
reached another way) and documents the key in OpenAPI. Open without a key: /healthz, /readyz, the v2 protocol's
/v2/health/live and /ready, the console's files, and /metrics unless `metrics_need_key`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from ..core.access.roles import ANONYMOUS, Principal, Role
from ..core.errors import ForbiddenError, SowaError, UnauthorizedError
from .middleware import send_error

__all__ = ["AuthMiddleware", "PrincipalDep", "Requires", "required_role"]

PRINCIPAL = "sowa.principal"  # where the middleware leaves the caller in the request's scope
OPEN = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                       description="an API key (`sowa keys add`), or the configured SOWA_API_KEY; see docs/security.md")


def _console(path: str) -> bool:
    """The console's static files and /ui/config.json hold no data; the API they call needs a key."""
    return path == "/ui" or path.startswith("/ui/")


class Requires:
    """A route's least role, as a dependency: checked again here, and read by the middleware and OpenAPI."""

    def __init__(self, role: Role) -> None:
        self.role = role

    async def __call__(self, request: Request, _: Annotated[str | None, Depends(_header)]) -> None:
        _check(await _principal(request), self.role, request.path_params.get("name"))


def _check(principal: Principal, role: Role, class_name: str | None) -> None:
    if not principal.may(role):
        raise ForbiddenError(f"this needs the {role.value} role; key '{principal.name}' has {principal.role.value}")
    if class_name is not None and not principal.may_touch(class_name):
        raise ForbiddenError(f"key '{principal.name}' may touch classes matching '{principal.classes}' only, "
                             f"not '{class_name[:64]}'")
    if class_name is None and principal.classes is not None and role is not Role.INSPECT:
        # beyond reading, what names no class (keys, the audit trail) concerns every class: a limited key could
        # otherwise make itself an unlimited one
        raise ForbiddenError(f"this needs a {role.value} key for all classes; key '{principal.name}' is limited to "
                             f"'{principal.classes}'")


def _requirements(dependant: object) -> Iterable[Role]:
    for dep in getattr(dependant, "dependencies", ()):
        if isinstance(dep.call, Requires):
            yield dep.call.role
        yield from _requirements(dep)


def required_role(route: BaseRoute) -> Role | None:
    """The least role `route` needs (the highest its Requires say), or None for a route open to anyone."""
    roles = list(_requirements(route.dependant)) if isinstance(route, APIRoute) else []
    return max(roles, key=lambda r: r.rank) if roles else None


async def _principal(request: Request) -> Principal:
    principal = request.scope.get(PRINCIPAL)
    if principal is None:
        raise UnauthorizedError("missing or wrong X-API-Key", headers={"WWW-Authenticate": "APIKey"})
    return principal


PrincipalDep = Annotated[Principal, Depends(_principal)]


class AuthMiddleware:
    def __init__(self, app: ASGIApp, runtime: object, routes: list[BaseRoute], failures_per_minute: int,
                 metrics_open: bool, throttle: bool = True) -> None:
        """`throttle` False: the engine process behind HTTP workers, whose requests all come over one socket
        from workers that have throttled their clients already (one bucket here would throttle everyone)."""
        self.app, self.runtime = app, runtime
        self.routes = [(route, required_role(route)) for route in routes]
        self.open = OPEN | ({"/metrics"} if metrics_open else set())
        self.failures = RateLimitItemPerMinute(failures_per_minute)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self.throttle = throttle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open or _console(scope["path"]):
            await self.app(scope, receive, send)
            return
        presented = [v for k, v in scope["headers"] if k == b"x-api-key"]
        if len(presented) > 1:  # a proxy and the app could each read a different one
            await send_error(send, 400, "bad_request", "more than one X-API-Key header")
            return
        keys = self.runtime.keys  # type: ignore[attr-defined]
        if not keys.loaded:
            await send_error(send, 503, "not_ready", "the keys are loading; see /readyz", [(b"retry-after", b"5")])
            return
        principal = ANONYMOUS
        try:
            required = keys.required
        except SowaError as e:  # the key store unreadable: refuse, never open up
            await send_error(send, e.status, e.code, e.message, [(b"retry-after", b"5")])
            return
        if required:
            address = (scope.get("client") or ("unknown",))[0]
            if self.throttle and not self.limiter.test(self.failures, address):
                await send_error(send, 429, "too_many_failed_keys", "too many wrong API keys from this address; "
                                 "wait a minute", [(b"retry-after", b"60")])
                return
            found = keys.authenticate(presented[0].decode("latin-1")) if presented else None
            if found is None:
                self.limiter.hit(self.failures, address)
                await send_error(send, 401, "unauthorized", "missing or wrong X-API-Key",
                                 [(b"www-authenticate", b"APIKey")])
                return
            principal = found
        for route, role in self.routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                if role is not None:
                    try:
                        _check(principal, role, child.get("path_params", {}).get("name"))
                    except ForbiddenError as e:
                        await send_error(send, e.status, e.code, e.message)
                        return
                break
        scope[PRINCIPAL] = principal
        await self.app(scope, receive, send)
