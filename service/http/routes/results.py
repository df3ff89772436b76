"""Kept results (keep=true on /predict): a class's recent ones, one by id, its thumbnail."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from ...core.access.roles import Principal, Role
from ...core.errors import ResultNotFoundError
from ...core.results import KeptResult, ResultStore
from ..auth import PrincipalDep, Requires
from ..deps import RegistryDep, ResultsDep
from ..schemas import KeptResultList, KeptResultOut

__all__ = ["router"]

router = APIRouter(tags=["results"], dependencies=[Depends(Requires(Role.INSPECT))])


def _kept_out(r: KeptResult, thumbnails: bool) -> dict:
    out = r.summary()
    out["thumbnail"] = base64.b64encode(r.thumbnail).decode("ascii") if thumbnails else None
    return out


@router.get("/classes/{name}/results", response_model=KeptResultList, summary="Recent kept results of a class")
async def class_results(
    name: str, registry: RegistryDep, store: ResultsDep,
    limit: Annotated[int, Query(ge=1, le=10_000, description="at most this many, newest first")] = 100,
    thumbnails: Annotated[bool, Query(description="include the base64 JPEG thumbnails")] = False,
) -> dict:
    registry.get(name)
    return {"class_name": name, "results": [_kept_out(r, thumbnails) for r in store.recent(name, limit)]}


def _visible(store: ResultStore, result_id: str, principal: Principal) -> KeptResult:
    """A kept result, as a key limited to some classes may see it: one of another class is not found."""
    r = store.get(result_id)
    if not principal.may_touch(r.class_name):
        raise ResultNotFoundError(f"no kept result '{result_id[:40]}' of a class this key may touch")
    return r


@router.get("/results/{result_id}", response_model=KeptResultOut, summary="One kept result")
async def one_result(result_id: str, store: ResultsDep, principal: PrincipalDep) -> dict:
    return _kept_out(_visible(store, result_id, principal), True)


@router.get("/results/{result_id}/thumbnail", summary="A kept result's thumbnail (JPEG, heatmap blended over)",
            response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
async def result_thumbnail(result_id: str, store: ResultsDep, principal: PrincipalDep) -> Response:
    return Response(_visible(store, result_id, principal).thumbnail, media_type="image/jpeg")
