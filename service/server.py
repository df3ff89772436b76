"""Running the service: uvicorn on `create_app(settings)`, in one process or behind HTTP worker processes.

`uvicorn_config` is the one place the HTTP server's options live (timeouts, header limits, the connection cap):
whatever starts uvicorn on this app (here, the HTTP workers, the engine process behind them) takes them from it.
"""

from __future__ import annotations

import logging
import resource
from typing import Any

from .settings import Settings

__all__ = ["serve", "uvicorn_config"]


def uvicorn_config(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config` (besides the app and log level): the bind address,
    the guarded httptools protocol (service/http_guard.py) and the server's timeouts."""
    from .http_guard import guarded_protocol

    cap = settings.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and cap > soft - 64:  # files, sockets and the model need descriptors too
        cap = max(1, soft - 64)
        logging.getLogger("sowa.service").warning("max_connections %d is near the file-descriptor limit %d: "
                                                  "using %d", settings.max_connections, soft, cap)
    return {
        "host": settings.host, "port": settings.port,
        "http": guarded_protocol(settings.header_timeout_s, settings.body_timeout_s, settings.max_header_bytes,
                                 cap),
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "timeout_graceful_shutdown": int(settings.request_timeout_s) + 5,
    }


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

    uvicorn.run(create_app(settings), log_level=log_level, **uvicorn_config(settings))
