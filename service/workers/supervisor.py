"""`sowa serve --workers N` (N > 1): this process becomes the engine process and starts N HTTP workers.

The engine process serves the full app on a Unix socket (for what the workers forward) and predictions on
another (EngineServer); the workers listen on the service's port. A worker that dies is started again. SIGTERM
or SIGINT stops the workers first (each finishes the requests it has, which need the engine), then the engine
(its queue drains), then removes the run's files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path

import uvicorn

from ..core.settings import Settings
from ..http.app import create_app
from ..http.server_config import uvicorn_config
from .link import WorkerLink
from .runtime import EngineRuntime
from .worker import port_socket, run_worker

__all__ = ["serve_with_workers", "worker_slots"]

log = logging.getLogger("sowa.frontend")
_RESTART_PAUSE_S = 5.0  # the least time between two starts of one worker


def worker_slots(settings: Settings, workers: int) -> int:
    """Images one worker can have in flight: its share of the queue, plus room for one full request."""
    return math.ceil(settings.max_queue / workers) + settings.max_images_per_request


class _EngineHttp(uvicorn.Server):
    """uvicorn without its signal handlers: the supervisor decides the order of shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve_with_workers(settings: Settings, workers: int, log_level: str = "info") -> None:
    run = Path(tempfile.mkdtemp(prefix="sowa-serve-"))
    try:
        (run / "metrics").mkdir()
        link = WorkerLink(str(run / "engine.sock"), str(run / "engine-http.sock"), str(run / "metrics"),
                          worker_slots(settings, workers))
        asyncio.run(_supervise(settings, workers, link, log_level))
    finally:
        shutil.rmtree(run, ignore_errors=True)


async def _supervise(settings: Settings, workers: int, link: WorkerLink, log_level: str) -> None:
    port_socket(settings.host, settings.port).close()  # a taken port fails here, in one line, not N times
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    options = {k: v for k, v in uvicorn_config(settings).items() if k not in ("host", "port")}
    app = create_app(settings, EngineRuntime(settings, link))
    config = uvicorn.Config(app, uds=link.engine_http, log_level=log_level, **options)
    engine = _EngineHttp(config)
    engine_task = asyncio.create_task(engine.serve())
    grpc = None
    if settings.grpc_port is not None:  # gRPC is served here, where the model is, beside the workers' HTTP
        from ..rpc.server import GrpcServer

        grpc = GrpcServer(app.state.runtime)
        await grpc.start()
    ctx = multiprocessing.get_context("spawn")  # no fork: the engine process holds threads and a device

    started: dict[int, float] = {}

    def start(i: int) -> BaseProcess:
        p = ctx.Process(target=run_worker, args=(settings, link, log_level, i, os.getpid()), name=f"sowa-worker-{i}")
        p.start()
        started[i] = time.monotonic()
        return p

    procs = [start(i) for i in range(workers)]
    log.info("serving on %s:%d with %d HTTP workers; run files in %s", settings.host, settings.port, workers,
             Path(link.engine_socket).parent)
    while not stop.is_set() and not engine_task.done():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
        for i, p in enumerate(procs):
            # one that dies young is started again after a pause, not in a loop that re-imports torch twice a second
            if not stop.is_set() and not p.is_alive() and time.monotonic() - started[i] >= _RESTART_PAUSE_S:
                log.error("HTTP worker %d exited (code %s); starting it again", i, p.exitcode)
                procs[i] = start(i)
    for p in procs:  # workers first: they finish their requests, which need the engine
        if p.is_alive():
            p.terminate()  # SIGTERM: uvicorn's graceful shutdown
    grace = settings.request_timeout_s + 10
    await asyncio.gather(*(asyncio.to_thread(p.join, grace) for p in procs))
    for p in procs:
        if p.is_alive():
            p.kill()
    if grpc is not None:  # its calls need the engine: they finish before it stops
        await grpc.stop(grace=settings.request_timeout_s)
    engine.should_exit = True
    await engine_task
