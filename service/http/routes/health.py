"""Liveness and readiness: never behind the API key, answered by every process itself."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import RuntimeDep
from ..schemas import ReadyInfo

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.api_route("/healthz", methods=["GET", "HEAD"], summary="Liveness",
                  responses={503: {"description": "start-up failed for good"}})
async def healthz(runtime: RuntimeDep) -> JSONResponse:
    if runtime.status.error:  # start-up failed for good: let the orchestrator restart the process
        return JSONResponse({"status": "failed", "error": runtime.status.error}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz", response_model=ReadyInfo, summary="Readiness: model loaded, warmed up, classes restored",
            responses={503: {"model": ReadyInfo}})
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    body = ReadyInfo.model_validate(await runtime.ready_info())
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)
