"""WorkerLink: where the engine process and its HTTP worker processes find each other (one run's files)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["WorkerLink"]


@dataclass(frozen=True)
class WorkerLink:
    engine_socket: str  # the engine's prediction socket (EngineServer)
    engine_http: str  # the engine's HTTP server, for every other request (EngineProxy)
    metrics_dir: str  # prometheus_client's multiprocess files, where the workers count requests
    slots: int  # images each worker can have in flight (its shared-memory slots)
