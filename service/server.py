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

    uvicorn.run(create_app(settings), log_level=log_level, **uvicorn_config(settings))
