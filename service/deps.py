"""FastAPI dependencies: the app's components from `app.state`, and the API key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from .batcher import DynamicBatcher
from .engine import Engine
from .errors import NotReadyError, UnauthorizedError
from .registry import ClassRegistry
from .settings import Settings
from .staging import ImageStager
from .telemetry import Telemetry

__all__ = ["BatcherDep", "EngineDep", "RegistryDep", "SettingsDep", "StagerDep", "TelemetryDep", "require_api_key"]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="required when the server has one")


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _telemetry(request: Request) -> Telemetry:
    return request.app.state.telemetry


def _ready_state(request: Request) -> None:
    if not request.app.state.status.ready:
        raise NotReadyError("the model is loading or the server is shutting down; see /readyz",
                            headers={"Retry-After": "5"})


def _engine(request: Request, _: Annotated[None, Depends(_ready_state)]) -> Engine:
    return request.app.state.engine


def _stager(request: Request, _: Annotated[None, Depends(_ready_state)]) -> ImageStager:
    return request.app.state.stager


def _registry(request: Request, _: Annotated[None, Depends(_ready_state)]) -> ClassRegistry:
    return request.app.state.registry


def _batcher(request: Request, _: Annotated[None, Depends(_ready_state)]) -> DynamicBatcher:
    return request.app.state.batcher


def require_api_key(request: Request, key: Annotated[str | None, Depends(_api_key_header)]) -> None:
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    if key is None or not hmac.compare_digest(key.encode(), expected.get_secret_value().encode()):
        raise UnauthorizedError("missing or wrong X-API-Key", headers={"WWW-Authenticate": "APIKey"})


SettingsDep = Annotated[Settings, Depends(_settings)]
TelemetryDep = Annotated[Telemetry, Depends(_telemetry)]
EngineDep = Annotated[Engine, Depends(_engine)]
StagerDep = Annotated[ImageStager, Depends(_stager)]
RegistryDep = Annotated[ClassRegistry, Depends(_registry)]
BatcherDep = Annotated[DynamicBatcher, Depends(_batcher)]
