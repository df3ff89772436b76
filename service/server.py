"""Running the service: uvicorn on `create_app(settings)`, with logging set up the way operators read it."""

from __future__ import annotations

import logging

from .settings import Settings

__all__ = ["serve"]


def serve(settings: Settings, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; shutdown drains the queue within the request timeout."""
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
                timeout_graceful_shutdown=int(settings.request_timeout_s) + 5)
