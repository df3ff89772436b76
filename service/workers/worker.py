"""The HTTP worker process: `run_worker` is what the supervisor starts, N times.

This module imports nothing at load time: prometheus_client must see PROMETHEUS_MULTIPROC_DIR before its first
import in the process, so that the worker's request counts go to files the engine process adds up.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.settings import Settings
    from .link import WorkerLink

__all__ = ["port_socket", "run_worker"]


def port_socket(host: str, port: int) -> socket.socket:
    """The service's port, bound by every worker (SO_REUSEPORT): the kernel spreads connections among the workers
    listening on it. Bound, not listening: uvicorn listens once the worker's app has started (connected to the
    engine), so a worker that is starting again after a crash is handed no connection it would sit on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _stop_with_parent(engine_pid: int) -> None:
    """Linux: SIGTERM this process when the engine process (its parent) dies, even by kill -9, so no orphaned
    worker keeps the port (SO_REUSEPORT would hand it connections it cannot answer)."""
    import contextlib
    import ctypes
    import signal

    # elsewhere the lost engine connection stops the worker (RemoteBackend.on_lost)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != engine_pid:  # it died before the line above: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


def run_worker(settings: Settings, link: WorkerLink, log_level: str, index: int, engine_pid: int) -> None:
    _stop_with_parent(engine_pid)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = link.metrics_dir
    import logging

    import uvicorn

    from ..http.app import create_app
    from ..http.server_config import uvicorn_config
    from .proxy import EngineProxy
    from .runtime import WorkerRuntime

    logging.basicConfig(level=log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per forwarded request otherwise
    # the port is bound here (SO_REUSEPORT), so uvicorn takes the socket rather than host and port; it listens on
    # it (with its `backlog`) after the app's start-up, which waits for the engine
    proxy = EngineProxy(link.engine_http, settings.request_timeout_s + 10)
    runtime = WorkerRuntime(settings, link, proxy)
    app = create_app(settings, runtime, forward=proxy)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, **uvicorn_config(settings)))
    runtime.stop_requested = lambda: server.should_exit  # set by uvicorn's signal handler, also during start-up
    server.run(sockets=[port_socket(settings.host, settings.port)])
