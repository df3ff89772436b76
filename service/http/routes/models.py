"""Model versions: list them, activate one (rollback is activating the previous), shadow a candidate, read how the
shadow compares. The service core does the work (service/core/models/activation.py); these routes only change the
repository's serving state, which every replica follows, and report it."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ...core.access.roles import Role
from ...core.class_names import CLASS_NAME
from ..auth import PrincipalDep, Requires
from ..deps import ModelsDep

__all__ = ["router"]

router = APIRouter(prefix="/models", tags=["models"], dependencies=[Depends(Requires(Role.INSPECT))])

Version = Annotated[str, Path(pattern=CLASS_NAME.pattern, description="a version label, a fingerprint, or a unique "
                              "prefix of at least 8 of its hex digits")]
Wait = Annotated[bool, Query(description="answer once this replica serves it (else at once, 202 while it is "
                             "being prepared: follow /models or /readyz)")]


class ShadowRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    share: float | None = Field(None, ge=0.0, le=1.0, description="share of the answered requests it scores "
                                "(default: the service's shadow_share)")


def _answer(overview: dict) -> JSONResponse:
    prep = overview.get("preparation")
    preparing = prep is not None and prep["phase"] not in ("done", "failed", "cancelled")
    return JSONResponse(overview, status_code=202 if preparing else 200)


@router.get("", summary="Model versions, which one serves, which one shadows")
async def list_models(models: ModelsDep) -> dict:
    return await asyncio.to_thread(models.overview)  # the repository may be a database: off the event loop


@router.post("/rollback", summary="Activate the previous version", dependencies=[Depends(Requires(Role.ADMIN))],
             responses={202: {"description": "being prepared"}})
async def rollback(models: ModelsDep, principal: PrincipalDep, wait: Wait = False) -> JSONResponse:
    return _answer(await models.rollback(principal.name, wait))


@router.delete("/shadow", summary="Stop shadowing", dependencies=[Depends(Requires(Role.ADMIN))])
async def stop_shadow(models: ModelsDep, principal: PrincipalDep) -> dict:
    return await models.set_shadow(None, None, principal.name)


@router.post("/{version}/activate", summary="Serve this version (every replica follows)",
             dependencies=[Depends(Requires(Role.ADMIN))], responses={202: {"description": "being prepared"}})
async def activate(version: Version, models: ModelsDep, principal: PrincipalDep, wait: Wait = False) -> JSONResponse:
    """Loads it beside the serving model, rebuilds every class's bank for it from the stored shots, warms it up,
    then switches between two batches; the serving model answers meanwhile."""
    return _answer(await models.activate(version, principal.name, wait))


@router.post("/{version}/shadow", summary="Score a share of the traffic with this version too",
             dependencies=[Depends(Requires(Role.ADMIN))])
async def shadow(version: Version, models: ModelsDep, principal: PrincipalDep, body: ShadowRequest | None = None,
                 wait: Wait = False) -> dict:
    return await models.set_shadow(version, body.share if body else None, principal.name, wait)


@router.get("/{version}/shadow-report", summary="How the shadow compares with the serving model, per class")
async def shadow_report(version: Version, models: ModelsDep) -> dict:
    return await models.shadow_report(version)
