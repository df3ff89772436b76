"""GET /metrics: Prometheus metrics, never behind the API key. Behind HTTP workers the engine process answers,
adding up the workers' request counts."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse

from ...core.telemetry import CONTENT_TYPE_LATEST
from ..deps import TelemetryDep

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(telemetry: TelemetryDep) -> Response:
    return Response(telemetry.render(), media_type=CONTENT_TYPE_LATEST)
