"""Liveness, readiness and metrics: never behind the API key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from ...core.telemetry import CONTENT_TYPE_LATEST
from ..deps import TelemetryDep
from ..schemas import ReadyInfo

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.api_route("/healthz", methods=["GET", "HEAD"], summary="Liveness",
                  responses={503: {"description": "start-up failed for good"}})
async def healthz(request: Request) -> JSONResponse:
    status = request.app.state.status
    if status.error:  # start-up failed for good: let the orchestrator restart the process
        return JSONResponse({"status": "failed", "error": status.error}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz", response_model=ReadyInfo, summary="Readiness: model loaded, warmed up, classes restored",
            responses={503: {"model": ReadyInfo}})
async def readyz(request: Request) -> JSONResponse:
    status = request.app.state.status
    registry = getattr(request.app.state, "registry", None)
    store = getattr(request.app.state, "store", None)
    body = ReadyInfo(ready=status.ready, model_loaded=status.model_loaded, warmed_up=status.warmed_up,
                     classes_restored=status.classes_restored, classes=len(registry) if registry is not None else 0,
                     refused_classes=registry.refused if registry is not None else {}, error=status.error,
                     store=getattr(store, "kind", "directory") if store is not None else None,
                     store_error=getattr(store, "error", None))
    return JSONResponse(body.model_dump(), status_code=200 if status.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(telemetry: TelemetryDep) -> Response:
    return Response(telemetry.render(), media_type=CONTENT_TYPE_LATEST)
