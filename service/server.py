"""Running the service: uvicorn on `create_app(settings)`, in one process or behind HTTP worker processes
(`service.workers`). The composition root: the one module that knows every layer."""

from __future__ import annotations

import logging

from .core.settings import Settings
from .http.server_config import uvicorn_config

__all__ = ["serve"]


def serve(settings: Settings, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; shutdown drains the queue within the request timeout."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workers = settings.resolved_workers()
    if workers > 1:
        from .workers.supervisor import serve_with_workers

        serve_with_workers(settings, workers, log_level)
        return
    import uvicorn

    from .http.app import create_app

    if settings.grpc_port is None:
        uvicorn.run(create_app(settings), log_level=log_level, **uvicorn_config(settings))
        return
    import asyncio

    config = uvicorn.Config(create_app(settings), log_level=log_level, **uvicorn_config(settings))
    asyncio.run(_serve_with_grpc(uvicorn.Server(config)))


async def _serve_with_grpc(http: object) -> None:
    """HTTP and the Open Inference Protocol over gRPC (service/rpc/) in one event loop, on the one runtime: gRPC
    stops (its calls in flight finish within the grace) once HTTP has shut down, queue drained."""
    from .rpc.server import GrpcServer

    app = http.config.app  # type: ignore[attr-defined]
    grpc = GrpcServer(app.state.runtime)
    await grpc.start()
    try:
        await http.serve()  # type: ignore[attr-defined]
    finally:
        await grpc.stop(grace=5.0)
