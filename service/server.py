"""Running the service: uvicorn on `create_app(settings)`, in one process or behind HTTP worker processes."""

from __future__ import annotations

import logging
from typing import Any

from .settings import Settings

__all__ = ["serve", "uvicorn_options"]


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for every process that serves HTTP (the single one, the workers, the engine's)."""
    return {"timeout_graceful_shutdown": int(settings.request_timeout_s) + 5}


def serve(settings: Settings, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; shutdown drains the queue within the request timeout."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workers = settings.resolved_workers()
    if workers > 1:
        from .frontend.supervisor import serve_with_workers

        serve_with_workers(settings, workers, log_level)
        return
    import uvicorn

    from .app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
                **uvicorn_options(settings))
