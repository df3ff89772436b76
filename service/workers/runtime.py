"""The runtimes of `sowa serve --workers N`: the engine process's, and each HTTP worker's.

`EngineRuntime` is a LocalRuntime (it holds the model) that also serves its backend to the workers over a socket
(EngineServer) and publishes its queue depth in shared memory for their admission. `WorkerRuntime` holds no
state a restart would lose: its backend is a RemoteBackend to the engine, its images are decoded here on the CPU.
Both plug into the one app factory, service/http/app.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core.runtime import LocalRuntime, Runtime
from ..core.settings import Settings
from ..core.staging import ImageStager
from ..core.telemetry import Telemetry
from .engine_server import EngineServer
from .link import WorkerLink
from .proxy import EngineProxy
from .remote import RemoteBackend
from .slots import SharedCounter

__all__ = ["EngineRuntime", "WorkerRuntime"]

log = logging.getLogger("sowa.workers")


class EngineRuntime(LocalRuntime):
    """The engine process: the workers count requests, so this one counts none and adds theirs to /metrics."""

    counts_requests = False

    def __init__(self, settings: Settings, link: WorkerLink) -> None:
        super().__init__(settings, Telemetry(http=False, worker_metrics_dir=link.metrics_dir))
        self.link = link
        self.counter: SharedCounter | None = None
        self.server: EngineServer | None = None

    async def started(self) -> None:
        """Workers connect once the socket exists: they take traffic only once this process is ready."""
        if self.batcher is None or self.local is None:
            raise RuntimeError("the engine runtime started without its batcher")
        self.counter = SharedCounter()  # the queue depth, for the workers' admission
        self.batcher.on_depth = self.counter.set
        self.server = EngineServer(self.local, self.link.engine_socket, self.counter)
        await self.server.start()
        if self.models is not None:  # a switch to another input size is told to the workers at once
            self.models.on_switch.append(self.server.announce)

    async def stopping(self) -> None:
        if self.server is not None:
            await self.server.close()

    async def close(self) -> None:
        await super().close()
        if self.counter is not None:  # after the batcher: it writes the counter until it stops
            self.counter.close()


class WorkerRuntime(Runtime):
    def __init__(self, settings: Settings, link: WorkerLink, proxy: EngineProxy) -> None:
        super().__init__(settings, Telemetry(engine=False))
        self.proxy = proxy
        # without its engine a worker can answer nothing: it stops (its supervisor starts another, or is gone too)
        self.remote = RemoteBackend(link.engine_socket, link.slots, settings,
                                    on_lost=lambda: os.kill(os.getpid(), signal.SIGTERM))
        self.stop_requested: Callable[[], bool] = lambda: False  # set by the process (uvicorn's exit flag)

    async def start(self) -> None:
        """Connect as soon as the engine takes connections (it does once it is ready), then take traffic. A
        worker told to stop meanwhile (SIGTERM from its supervisor, or PR_SET_PDEATHSIG when the engine died)
        gives up."""
        backend = self.remote
        await self.open_access()  # keys are checked here too, before anything is forwarded
        while True:
            if self.stop_requested():
                raise RuntimeError("stopped before the engine process took the connection")
            try:
                await asyncio.wait_for(backend.connect(), 10)
                break
            except (FileNotFoundError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                await asyncio.sleep(0.2)
        # decoded and resized here, on the host: the engine process owns the device
        backend.stager = ImageStager(torch.device("cpu"), backend.image_size, self.settings.image_decoder)
        self._backend = backend
        status = self.status
        status.model_loaded = status.classes_restored = status.warmed_up = status.accepting = True

    async def before_listening(self, startup: asyncio.Task) -> None:
        if Path(self.remote.socket_path).exists():
            # a worker started again after a crash (or late): uvicorn listens once the start-up is through, so
            # connecting first means the kernel hands it no connection before it can answer, while the others
            # serve. At the first start the engine may load for minutes: the port takes connections meanwhile
            # (/healthz, /readyz answer; predictions 503 until connected)
            await startup

    async def ready_info(self) -> dict[str, Any]:
        """Not ready until connected, then the engine's word."""
        if not self.status.ready or self.remote.lost:
            return {**await super().ready_info(), "ready": False,
                    "error": "this worker is not connected to the engine process"}
        _, body = await self.proxy.get_json("/readyz")
        return body

    async def close(self) -> None:
        await super().close()
        await self.remote.close()
        await self.proxy.close()
