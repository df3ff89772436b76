"""create_app: the service's one app factory, for a single process, the engine process behind HTTP workers, and
each worker alike. What differs between them is the runtime it is given (service/core/runtime.py, or
service/workers/runtime.py) and, in a worker, where the routes holding the classes are answered (`forward`).

Start-up runs in the background (load the bundle, restore classes, warm up), so /healthz answers at once and
/readyz says when the service can take traffic. Shutdown refuses new work, drains the queue, then stops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp

from ..core.runtime import LocalRuntime, Runtime
from ..core.settings import Settings
from .auth import AuthMiddleware
from .forward import ForwardMiddleware
from .handlers import install_error_handlers
from .middleware import BodyLimitMiddleware, MetricsMiddleware, RouteHeaderMiddleware
from .openapi import install_openapi
from .protections import ProtectionsMiddleware
from .routes import (
    audit,
    classes,
    console,
    health,
    keys,
    metrics,
    models,
    predict,
    quality,
    records,
    results,
    scores,
    shots,
    v2,
)

__all__ = ["create_app"]

# the routes whose state (classes, records, the engine's metrics) lives where the model is
ENGINE_ROUTERS = (classes.router, shots.router, scores.router, results.router, records.router, quality.router,
                  keys.router, metrics.router, audit.router, v2.repository_router, models.router)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime: Runtime = app.state.runtime
    startup = asyncio.create_task(runtime.start())
    try:
        await runtime.before_listening(startup)
        yield
    finally:
        runtime.status.accepting = False
        startup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await startup
        await runtime.close()


def create_app(settings: Settings, runtime: Runtime | None = None, forward: ASGIApp | None = None) -> FastAPI:
    """The service's app on `runtime` (default: this process holds the model). `forward`: an HTTP worker's way
    to the engine process, which answers the routes of ENGINE_ROUTERS."""
    runtime = runtime or LocalRuntime(settings)
    app = FastAPI(
        title="SOWA inspection service",
        version="0.1.0",
        description="Few-shot visual anomaly detection: register a few normal shots per product class, then score "
                    "parts with a heatmap. Errors are `{\"error\": {\"code\", \"message\"}}`.",
        lifespan=_lifespan,
        docs_url=None, redoc_url=None,  # /docs is the console's, from packaged files (routes/console.py)
    )
    app.state.runtime = runtime
    install_error_handlers(app)
    routers = (health.router, predict.router, keys.me_router, console.router, v2.health_router, v2.router,
               *ENGINE_ROUTERS)
    for router in routers:
        app.include_router(router)
    routes = [r for router in routers for r in router.routes]  # as declared (the app holds them wrapped)
    console.mount_console(app)
    install_openapi(app, settings, runtime, routes)
    if forward is not None:  # innermost: the key and the body limit below hold first
        app.add_middleware(ForwardMiddleware, forward=forward,
                           routes=[r for router in ENGINE_ROUTERS for r in router.routes])
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)
    # outside the body limit: a request without a key, or for a route its role does not reach, is never read
    app.add_middleware(AuthMiddleware, runtime=runtime, routes=routes,
                       failures_per_minute=settings.auth_failures_per_minute,
                       metrics_open=not settings.metrics_need_key, throttle=runtime.counts_requests)
    # outside the key check (a refused site or Host counts as no wrong key) and around every answer's headers
    app.add_middleware(ProtectionsMiddleware, allowed_hosts=settings.allowed_hosts,
                       check_requests=runtime.counts_requests)  # the engine behind workers: they have checked
    app.add_middleware(v2.ProtocolErrors)  # under /v2 every error answers the protocol's shape
    if runtime.counts_requests:
        app.add_middleware(MetricsMiddleware, telemetry=runtime.telemetry)
    else:  # behind HTTP workers, which count: label their counts with the route template matched here
        app.add_middleware(RouteHeaderMiddleware)
    return app
