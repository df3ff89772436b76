"""The service app in the test's own process: `create_app(settings)` behind httpx's ASGI transport, its lifespan
run by asgi-lifespan. No port, no subprocess: failures show their traceback in the test, and the app's parts
(`app.state`: engine, batcher, registry) are at hand for tests that need to hold them still."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from service.client import AsyncSowaClient
from service.core.settings import Settings
from service.http.app import create_app
from tests.helpers import wait_for_async

__all__ = ["InProcess", "serve_in_process"]


@dataclass
class InProcess:
    app: FastAPI
    client: AsyncSowaClient

    @property
    def http(self) -> httpx.AsyncClient:
        return self.client.http

    def connect(self, api_key: str | None = None) -> AsyncSowaClient:
        """Another client of the same app (e.g. one that sends the API key)."""
        return AsyncSowaClient(http=_http(self.app), api_key=api_key)


def _http(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sowa.test", timeout=120)


@asynccontextmanager
async def serve_in_process(bundle: Path, data_dir: Path, ready_timeout: float = 60.0,
                           **settings: Any) -> AsyncIterator[InProcess]:
    """A started, ready app (settings as `Settings` fields, CPU unless given) and a client of it, which calls
    the app by the name sowa.test (an allowed host)."""
    settings = {"device": "cpu", "allowed_hosts": ["sowa.test"], **settings}
    app = create_app(Settings(bundle=bundle, data_dir=data_dir, **settings))
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=60) as manager:
        http = _http(manager.app)
        async with AsyncSowaClient(http=http) as client:
            async def ready() -> bool:
                if app.state.runtime.status.error:
                    raise AssertionError(f"start-up failed: {app.state.runtime.status.error}")
                return (await http.get("/readyz")).status_code == 200

            await wait_for_async(ready, ready_timeout, "the app is ready")
            yield InProcess(app, client)
