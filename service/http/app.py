"""create_app(settings): the FastAPI app and its lifespan. All mutable process state lives in `app.state`.

Start-up runs in the background (load the bundle, restore classes, warm up), so /healthz answers at once and
/readyz says when the service can take traffic. Shutdown refuses new work, drains the queue, then stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ..core.backend import LocalBackend
from ..core.batcher import DynamicBatcher
from ..core.engine import Engine
from ..core.registry import ClassRegistry
from ..core.settings import Settings
from ..core.staging import ImageStager
from ..core.status import ServiceStatus
from ..core.store import open_store
from ..core.telemetry import Telemetry
from ..core.uploads import DecodeBudget, limit_malloc_arenas
from ..workers.engine_server import EngineServer
from ..workers.link import WorkerLink
from ..workers.slots import SharedCounter
from .deps import Serving
from .handlers import install_error_handlers
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware, MetricsMiddleware, RouteHeaderMiddleware
from .openapi import install_openapi
from .routes import classes, health, predict, results
from .routes.console import mount_console

__all__ = ["create_app"]

log = logging.getLogger("sowa.service")


async def _start(app: FastAPI) -> None:
    s: Settings = app.state.settings
    status: ServiceStatus = app.state.status
    try:
        budget = None if s.bank_device_budget_mb is None else int(s.bank_device_budget_mb * 2**20)
        engine = await asyncio.to_thread(Engine, s.bundle, s.device, s.dtype, budget, s.compile_mode,
                                         s.max_batch_size)
        app.state.engine = engine
        app.state.stager = ImageStager(engine.device, engine.image_size, s.image_decoder)
        status.model_loaded = True
        store = open_store(s.store_url)
        app.state.store = store
        registry = ClassRegistry(store, engine, s.max_shots_per_class)
        app.state.registry = registry
        await asyncio.to_thread(registry.restore)
        status.classes_restored = True
        if s.warmup:
            await engine.call(engine.warmup)
        status.warmed_up = True
        telemetry: Telemetry = app.state.telemetry
        telemetry.model_info.info({k: str(v) for k, v in engine.describe().items()})
        telemetry.track(lambda: len(registry), registry.bank_bytes, engine.device_memory_bytes)
        telemetry.track_banks(engine.banks.stats)
        telemetry.track_store(store)
        link: WorkerLink | None = app.state.workers
        counter = SharedCounter() if link else None  # the queue depth, for the workers' admission
        app.state.queue_counter = counter
        batcher = DynamicBatcher(engine.run_batch, s.max_batch_size, s.max_wait_ms, s.max_queue, telemetry,
                                 on_depth=counter.set if counter else None)
        app.state.batcher = batcher
        app.state.backend = LocalBackend(engine, app.state.stager, registry, batcher)
        app.state.serving = Serving(app.state.backend, s, telemetry)
        batcher.start()
        if s.sync_interval_s > 0:
            app.state.sync = asyncio.create_task(registry.follow(s.sync_interval_s))
        if link and counter:  # workers connect once it listens: they take traffic only once this one is ready
            app.state.engine_server = EngineServer(app.state.backend, link.engine_socket, counter)
            await app.state.engine_server.start()
        status.accepting = True
        log.info("ready: %s, %d classes", engine.describe(), len(registry))
    except Exception as e:
        status.error = f"{type(e).__name__}: {e}"
        log.exception("start-up failed")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    startup = asyncio.create_task(_start(app))
    app.state.startup = startup
    yield
    app.state.status.accepting = False
    startup.cancel()
    engine_server = getattr(app.state, "engine_server", None)
    if engine_server is not None:
        await engine_server.close()
    sync = getattr(app.state, "sync", None)
    if sync is not None:
        sync.cancel()
    batcher = getattr(app.state, "batcher", None)
    if batcher is not None:
        await batcher.close()
    engine = getattr(app.state, "engine", None)
    if engine is not None:
        engine.close()
    close_store = getattr(getattr(app.state, "store", None), "close", None)
    if close_store is not None:
        close_store()
    counter = getattr(app.state, "queue_counter", None)
    if counter is not None:  # after the batcher: it writes the counter until it stops
        counter.close()


def create_app(settings: Settings, workers: WorkerLink | None = None) -> FastAPI:
    """The service's app. With `workers`, this is the engine process behind HTTP worker processes
    (service/workers/): they send predictions to its EngineServer and forward every other request here, and
    they count all requests, so this app counts none and adds theirs to /metrics."""
    app = FastAPI(
        title="SOWA inspection service",
        version="0.1.0",
        description="Few-shot visual anomaly detection: register a few normal shots per product class, then score "
                    "parts with a heatmap. Errors are `{\"error\": {\"code\", \"message\"}}`.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.status = ServiceStatus()
    app.state.workers = workers
    app.state.telemetry = Telemetry(http=workers is None,
                                    worker_metrics_dir=workers.metrics_dir if workers else None)
    app.state.decode_budget = DecodeBudget(int(settings.decode_memory_mb * 2**20))
    limit_malloc_arenas()  # before the worker threads exist, in every process serving the app (uploads.py)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(predict.router)
    app.include_router(classes.router)
    app.include_router(results.router)
    app.state.results = results.new_store(settings)  # kept results (keep=true), in memory, bounded
    mount_console(app)
    install_openapi(app, settings)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)
    if settings.api_key is not None:  # outside the body limit: a request without the key is never read
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key.get_secret_value())
    if workers is None:
        app.add_middleware(MetricsMiddleware, telemetry=app.state.telemetry)
    else:  # the workers label their counts with the route template the request matched here
        app.add_middleware(RouteHeaderMiddleware)
    return app
