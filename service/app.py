"""create_app(settings): the FastAPI app and its lifespan. All mutable process state lives in `app.state`.

Start-up runs in the background (load the bundle, restore classes, warm up), so /healthz answers at once and
/readyz says when the service can take traffic. Shutdown refuses new work, drains the queue, then stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from .batcher import DynamicBatcher
from .deps import Serving
from .engine import Engine
from .handlers import install_error_handlers
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware, MetricsMiddleware
from .openapi import install_openapi
from .registry import ClassRegistry
from .routes import classes, health, predict
from .settings import Settings
from .staging import ImageStager
from .store import DirectoryStore
from .telemetry import Telemetry
from .uploads import DecodeBudget, limit_malloc_arenas

__all__ = ["ServiceStatus", "create_app"]

log = logging.getLogger("sowa.service")


@dataclass
class ServiceStatus:
    model_loaded: bool = False
    classes_restored: bool = False
    warmed_up: bool = False
    accepting: bool = False
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.model_loaded and self.classes_restored and self.warmed_up and self.accepting


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
        registry = ClassRegistry(DirectoryStore(s.data_dir), engine, s.max_shots_per_class)
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
        batcher = DynamicBatcher(lambda images, memories: engine.call(engine.run, images, memories),
                                 s.max_batch_size, s.max_wait_ms, s.max_queue, telemetry)
        app.state.batcher = batcher
        app.state.serving = Serving(engine, app.state.stager, registry, batcher, s, telemetry)
        batcher.start()
        if s.sync_interval_s > 0:
            app.state.sync = asyncio.create_task(registry.follow(s.sync_interval_s))
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
    sync = getattr(app.state, "sync", None)
    if sync is not None:
        sync.cancel()
    batcher = getattr(app.state, "batcher", None)
    if batcher is not None:
        await batcher.close()
    engine = getattr(app.state, "engine", None)
    if engine is not None:
        engine.close()


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="SOWA inspection service",
        version="0.1.0",
        description="Few-shot visual anomaly detection: register a few normal shots per product class, then score "
                    "parts with a heatmap. Errors are `{\"error\": {\"code\", \"message\"}}`.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.status = ServiceStatus()
    app.state.telemetry = Telemetry()
    app.state.decode_budget = DecodeBudget(int(settings.decode_memory_mb * 2**20))
    limit_malloc_arenas()  # before the worker threads exist, in every process serving the app (uploads.py)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(predict.router)
    app.include_router(classes.router)
    install_openapi(app, settings)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)
    if settings.api_key is not None:  # outside the body limit: a request without the key is never read
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key.get_secret_value())
    app.add_middleware(MetricsMiddleware, telemetry=app.state.telemetry)
    return app
