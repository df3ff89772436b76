"""`uvicorn_config`: the one place the HTTP server's options live (timeouts, header limits, the connection cap).
Whatever starts uvicorn on the service's app (a single process, the engine process behind HTTP workers, each
worker) takes them from here."""

from __future__ import annotations

import logging
import resource
from typing import Any

from ..core.settings import Settings
from .guard import guarded_protocol

__all__ = ["uvicorn_config"]


def uvicorn_config(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config` (besides the app and log level): the bind address,
    the guarded httptools protocol (service/http/guard.py) and the server's timeouts."""
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
