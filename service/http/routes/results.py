"""Kept results for the console: views of the inspection records (a class's recent ones, one by id, its thumbnail).

There is one notion, the record (service/core/records/); `keep=true` on /predict only makes sure a record keeps its
upload and thumbnail. These routes answer the console's older shapes; GET /records is the full query.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from ...core.access.roles import Principal, Role
from ...core.errors import RecordNotFoundError, ResultNotFoundError
from ...core.records.record import Record
from ...core.records.recorder import Recorder
from ...core.records.store import RecordQuery
from ..auth import PrincipalDep, Requires
from ..deps import RecordsDep, RegistryDep
from ..schemas import KeptResultList, KeptResultOut

__all__ = ["kept_out", "router"]

router = APIRouter(tags=["results"], dependencies=[Depends(Requires(Role.INSPECT))])


def kept_out(r: Record, thumbnail: bytes | None) -> dict:
    """A record in the kept-result shape (the console's), with its base64 thumbnail when given."""
    return {"id": r.id, "class_name": r.class_name, "filename": r.filename, "width": r.width, "height": r.height,
            "score": r.score, "normalized_score": r.normalized_score, "text_score": r.text_score,
            "threshold": r.threshold, "is_anomalous": r.is_anomalous, "time": r.time, "regions": r.regions,
            "image_kept": r.image_sha256 is not None,
            "thumbnail": base64.b64encode(thumbnail).decode("ascii") if thumbnail is not None else None}


def recent_kept(records: Recorder, name: str, limit: int, thumbnails: bool) -> list[dict]:
    """The class's newest records, with their thumbnails (blocking: a thread)."""
    out = []
    for r in records.query(RecordQuery(class_name=name, limit=limit)):
        thumb = records.image(r.id, thumbnail=True) if thumbnails and r.thumbnail_sha256 else None
        out.append(kept_out(r, thumb))
    return out


@router.get("/classes/{name}/results", response_model=KeptResultList, summary="A class's recent records")
async def class_results(
    name: str, registry: RegistryDep, records: RecordsDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="at most this many, newest first")] = 100,
    thumbnails: Annotated[bool, Query(description="include the base64 JPEG thumbnails (where kept)")] = False,
) -> dict:
    registry.get(name)
    return {"class_name": name, "results": await asyncio.to_thread(recent_kept, records, name, limit, thumbnails)}


def visible(records: Recorder, record_id: str, principal: Principal) -> Record:
    """A record, as a key limited to some classes may see it: one of another class is not found (blocking)."""
    try:
        r = records.get(record_id)
    except RecordNotFoundError:
        raise ResultNotFoundError(f"no kept result '{record_id[:40]}'") from None
    if not principal.may_touch(r.class_name):
        raise ResultNotFoundError(f"no kept result '{record_id[:40]}' of a class this key may touch")
    return r


@router.get("/results/{result_id}", response_model=KeptResultOut, summary="One kept result (a record)")
async def one_result(result_id: str, records: RecordsDep, principal: PrincipalDep) -> dict:
    def read() -> dict:
        r = visible(records, result_id, principal)
        return kept_out(r, records.image(r.id, thumbnail=True) if r.thumbnail_sha256 else None)

    return await asyncio.to_thread(read)


@router.get("/results/{result_id}/thumbnail", summary="A kept result's thumbnail (JPEG, heatmap blended over)",
            response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
async def result_thumbnail(result_id: str, records: RecordsDep, principal: PrincipalDep) -> Response:
    def read() -> bytes:
        r = visible(records, result_id, principal)
        data = records.image(r.id, thumbnail=True)
        if data is None:
            raise ResultNotFoundError(f"result '{result_id[:40]}' is recorded without its thumbnail")
        return data

    return Response(await asyncio.to_thread(read), media_type="image/jpeg")
