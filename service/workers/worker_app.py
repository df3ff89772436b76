"""create_worker_app: the app an HTTP worker process serves.

/predict runs here, the same route as in a single process, with a RemoteBackend to the engine process; every
other path goes to the engine process's own HTTP server (EngineProxy), so there is one implementation of each
route and one place holding the classes. The worker counts every request it answers (MetricsMiddleware, in
prometheus_client's multiprocess files), and the engine process adds the workers' counts to its /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.routing import Mount

from ..core.settings import Settings
from ..core.staging import ImageStager
from ..core.status import ServiceStatus
from ..core.telemetry import Telemetry
from ..core.uploads import DecodeBudget, limit_malloc_arenas
from ..http.deps import Serving
from ..http.handlers import install_error_handlers
from ..http.middleware import ApiKeyMiddleware, BodyLimitMiddleware, MetricsMiddleware
from ..http.routes import predict
from .link import WorkerLink
from .proxy import EngineProxy
from .remote import RemoteBackend

__all__ = ["create_worker_app"]

log = logging.getLogger("sowa.frontend")


async def _connect(app: FastAPI, backend: RemoteBackend) -> None:
    """Connect as soon as the engine takes connections (it does once it is ready), then take traffic. A worker
    told to stop meanwhile (SIGTERM from its supervisor, or PR_SET_PDEATHSIG when the engine died) gives up."""
    stopping = getattr(app.state, "stopping", lambda: False)
    while True:
        if stopping():
            raise RuntimeError("stopped before the engine process took the connection")
        try:
            await asyncio.wait_for(backend.connect(), 10)
            break
        except (FileNotFoundError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            await asyncio.sleep(0.2)
    # decoded and resized here, on the host: the engine process owns the device
    backend.stager = ImageStager(torch.device("cpu"), backend.image_size, app.state.settings.image_decoder)
    app.state.serving = Serving(backend, app.state.settings, app.state.telemetry, forward=app.state.proxy)
    status: ServiceStatus = app.state.status
    status.model_loaded = status.classes_restored = status.warmed_up = status.accepting = True


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    backend: RemoteBackend = app.state.backend
    engine_up = Path(backend.socket_path).exists()  # the engine makes its socket once it is ready
    connecting = asyncio.create_task(_connect(app, backend))
    try:
        if engine_up:
            # a worker started again after a crash (or late): uvicorn listens once the start-up is through, so
            # connecting first means the kernel hands it no connection before it can answer, while the others
            # serve. At the first start the engine may load for minutes: the port takes connections meanwhile
            # (/healthz, /readyz answer; predictions 503 until connected)
            await connecting
        yield
    finally:
        app.state.status.accepting = False
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        await backend.close()
        await app.state.proxy.close()


def create_worker_app(settings: Settings, paths: WorkerLink) -> FastAPI:
    # the OpenAPI document and /docs come from the engine's app, which has every route
    app = FastAPI(title="SOWA inspection service (worker)", lifespan=_lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None)
    app.state.settings = settings
    app.state.status = ServiceStatus()
    app.state.telemetry = Telemetry(engine=False)
    app.state.decode_budget = DecodeBudget(int(settings.decode_memory_mb * 2**20))  # this worker's decodes
    limit_malloc_arenas()
    # without its engine a worker can answer nothing: it stops (its supervisor starts another, or is gone too)
    app.state.backend = RemoteBackend(paths.engine_socket, paths.slots, settings.max_queue,
                                      on_lost=lambda: os.kill(os.getpid(), signal.SIGTERM))
    app.state.proxy = proxy = EngineProxy(paths.engine_http, settings.request_timeout_s + 10)
    install_error_handlers(app)

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:  # not ready until connected, then the engine's word
        if not app.state.status.ready or app.state.backend.lost:
            return JSONResponse({"ready": False, "error": "this worker is not connected to the engine process"},
                                status_code=503)
        return await _forward(proxy, request)

    app.include_router(predict.router)
    app.router.routes.append(Mount("/", app=proxy))
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key.get_secret_value())
    app.add_middleware(MetricsMiddleware, telemetry=app.state.telemetry)
    return app


async def _forward(proxy: EngineProxy, request: Request) -> JSONResponse:
    r = await proxy.client.get(request.url.path)
    return JSONResponse(r.json(), status_code=r.status_code)
