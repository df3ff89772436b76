"""FastAPI dependencies: the app's one typed runtime (service/core/runtime.py) and what routes take from it.

Routes never read `app.state`: they declare one of these. All `async def`, though none awaits: FastAPI runs a
plain `def` dependency in its thread pool, and a thread hop per dependency per request cost more event-loop time
than the whole rest of the request handling.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..core.errors import SowaError
from ..core.models.activation import ModelManager
from ..core.records.recorder import Recorder
from ..core.registry import ClassRegistry
from ..core.runtime import LocalRuntime, Runtime
from ..core.settings import Settings
from ..core.telemetry import Telemetry

__all__ = ["LocalDep", "ModelsDep", "RecordsDep", "RegistryDep", "RuntimeDep", "ServingDep", "SettingsDep",
           "TelemetryDep", "runtime_of"]



def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


async def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def _serving(request: Request) -> Runtime:
    """The runtime of a route that predicts: 503 until it is ready (asked of `backend`, once per request)."""
    runtime: Runtime = request.app.state.runtime
    runtime.backend  # noqa: B018 - raises NotReadyError until the backend is up
    return runtime


async def _local(request: Request) -> LocalRuntime:
    runtime = request.app.state.runtime
    if not isinstance(runtime, LocalRuntime):  # an HTTP worker forwards these routes (http/forward.py)
        raise SowaError("this route is served by the engine process")
    return runtime


async def _settings(request: Request) -> Settings:
    return request.app.state.runtime.settings


async def _telemetry(request: Request) -> Telemetry:
    return request.app.state.runtime.telemetry


async def _registry(local: Annotated[LocalRuntime, Depends(_local)]) -> ClassRegistry:
    return local.registry  # 503 until the classes are restored


async def _models(local: Annotated[LocalRuntime, Depends(_local)]) -> ModelManager:
    local.registry  # noqa: B018 - raises NotReadyError until the service is up
    if local.models is None:
        raise SowaError("the model manager is not running")
    return local.models


async def _records(local: Annotated[LocalRuntime, Depends(_local)]) -> Recorder:
    return local.records  # the records: the store and what is still in the spool


RuntimeDep = Annotated[Runtime, Depends(_runtime)]
ServingDep = Annotated[Runtime, Depends(_serving)]
LocalDep = Annotated[LocalRuntime, Depends(_local)]
SettingsDep = Annotated[Settings, Depends(_settings)]
TelemetryDep = Annotated[Telemetry, Depends(_telemetry)]
RegistryDep = Annotated[ClassRegistry, Depends(_registry)]
RecordsDep = Annotated[Recorder, Depends(_records)]
ModelsDep = Annotated[ModelManager, Depends(_models)]
