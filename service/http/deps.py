"""FastAPI dependencies: the app's components from `app.state`, and the API key check.

All `async def`, though none awaits: FastAPI runs a plain `def` dependency in its thread pool, and a thread hop
per dependency per request cost more event-loop time than the whole rest of the request handling.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Protocol

from fastapi import Depends, Request, Response
from fastapi.security import APIKeyHeader

from ..core.backend import Backend
from ..core.errors import NotReadyError, UnauthorizedError
from ..core.registry import ClassRegistry
from ..core.settings import Settings
from ..core.telemetry import Telemetry

__all__ = ["RegistryDep", "Serving", "ServingDep", "SettingsDep", "TelemetryDep", "require_api_key"]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="required when the server has one")


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _telemetry(request: Request) -> Telemetry:
    return request.app.state.telemetry


async def _ready_state(request: Request) -> None:
    if not request.app.state.status.ready:
        raise NotReadyError("the model is loading or the server is shutting down; see /readyz",
                            headers={"Retry-After": "5"})


class Forward(Protocol):
    async def predict(self, request: Request, uploads: list[tuple[str, bytes]]) -> Response: ...


@dataclass(frozen=True)
class Serving:
    """Everything /predict touches, resolved as one dependency: FastAPI's per-dependency work (solving, cache
    keys) was a quarter of the event loop's time per request with six separate ones."""

    backend: Backend  # LocalBackend in this process, or RemoteBackend to the engine process (HTTP workers)
    settings: Settings
    telemetry: Telemetry
    forward: Forward | None = None  # HTTP workers: sends a whole /predict on to the engine process


async def _serving(request: Request) -> Serving:
    await _ready_state(request)  # called, not declared: a sub-dependency would cost what this saves
    return request.app.state.serving


async def _registry(request: Request, _: Annotated[None, Depends(_ready_state)]) -> ClassRegistry:
    return request.app.state.registry


async def require_api_key(request: Request, key: Annotated[str | None, Depends(_api_key_header)]) -> None:
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    if key is None or not hmac.compare_digest(key.encode(), expected.get_secret_value().encode()):
        raise UnauthorizedError("missing or wrong X-API-Key", headers={"WWW-Authenticate": "APIKey"})


SettingsDep = Annotated[Settings, Depends(_settings)]
TelemetryDep = Annotated[Telemetry, Depends(_telemetry)]
ServingDep = Annotated[Serving, Depends(_serving)]
RegistryDep = Annotated[ClassRegistry, Depends(_registry)]
