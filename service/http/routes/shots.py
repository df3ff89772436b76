"""A class's shots: list them, fetch one (PNG or thumbnail), and add kept results as shots by their id."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from starlette.convertors import Convertor, register_url_convertor

from ...core.access.roles import Principal, Role
from ...core.errors import ShotNotFoundError, UnprocessableError
from ...core.records.record import Record
from ...core.records.recorder import Recorder
from ...core.registry import ClassRegistry
from ...core.results import thumbnail_jpeg
from ...core.runtime import LocalRuntime
from ...core.uploads import check_count, decode_uploads
from ..auth import PrincipalDep, Requires
from ..deps import LocalDep, RecordsDep, RegistryDep
from ..schemas import CalibrationOut, FromResults, FromResultsResponse, ShotList
from .results import visible

__all__ = ["router"]

router = APIRouter(tags=["results"], dependencies=[Depends(Requires(Role.INSPECT))])


class _Sha256(Convertor[str]):
    """A shot's hash in a path: 64 hex digits, so `/classes/{name}/shots/from-results` is never read as one."""

    regex = "[0-9a-f]{64}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


# Starlette compiles a route's path when the route is declared, so its convertor must be known before then
register_url_convertor("sha256", _Sha256())


@router.get("/classes/{name}/shots", response_model=ShotList, summary="A class's shots")
async def list_shots(name: str, registry: RegistryDep) -> dict:
    """The shots by content hash; `GET /classes/{name}/shots/{sha256}` returns one (the console shows them, and
    deletes some by registering the rest with mode=replace)."""
    return {"class_name": name, "shots": [{"sha256": h} for h in registry.get(name).shots]}


@router.get("/classes/{name}/shots/{sha256:sha256}", summary="One shot: the stored PNG, or a JPEG thumbnail",
            response_class=Response, responses={200: {"content": {"image/png": {}, "image/jpeg": {}}},
                                                404: {"description": "unknown class or shot"}})
async def get_shot(
    name: str, sha256: str, registry: RegistryDep,
    thumbnail: Annotated[bool, Query(description="a JPEG at most 128 px a side instead of the PNG")] = False,
) -> Response:
    try:
        data = await asyncio.to_thread(registry.shot_png, name, sha256)
    except (KeyError, FileNotFoundError):
        raise ShotNotFoundError(f"class '{name}' has no shot '{sha256[:64]}'") from None
    if not thumbnail:
        return Response(data, media_type="image/png")
    return Response(await asyncio.to_thread(thumbnail_jpeg, data), media_type="image/jpeg")


@router.post("/classes/{name}/shots/from-results", response_model=FromResultsResponse,
             summary="Add kept results of the class as shots, by id", dependencies=[Depends(Requires(Role.OPERATE))],
             responses={404: {"description": "unknown class or result"},
                        422: {"description": "a result of another class, or kept without its image"}})
async def shots_from_results(name: str, request: FromResults, registry: RegistryDep, records: RecordsDep,
                             local: LocalDep, principal: PrincipalDep) -> dict:
    """"This one is good": the recorded uploads become shots (appended, as `POST /classes/{name}/shots` would with
    the same files) and the class is recalibrated; the answer carries the class before and after."""
    ids = list(dict.fromkeys(request.result_ids))
    check_count(len(ids), local.settings.max_shots_per_class)  # before any image is looked at
    return await shots_from_records(name, ids, registry, records, local, principal)


async def shots_from_records(name: str, ids: list[str], registry: ClassRegistry, records: Recorder,
                             local: LocalRuntime, principal: Principal) -> dict:
    """Records' uploads appended as shots of `name` (also POST /records/{id}/shot)."""
    before = registry.get(name)

    def read() -> list[tuple[Record, bytes]]:
        out = []
        for i in ids:
            r = visible(records, i, principal)
            if r.class_name != name:
                raise UnprocessableError(f"result '{r.id}' was scored against class '{r.class_name}', not '{name}'")
            image = records.image(r.id)
            if image is None:
                raise UnprocessableError(f"result '{r.id}' is recorded without its image (not sampled, over the "
                                         "size limit, or removed by retention); upload it as a shot instead")
            out.append((r, image))
        return out

    kept = await asyncio.to_thread(read)
    # as uploaded shots are: within the per-image and per-request pixel limits and the decode budget
    decoded = await decode_uploads([(r.filename, image) for r, image in kept], local.limits, local.decode_budget)
    entry = await registry.add_shots(name, list(decoded.images), "append", principal.name)
    return {"class_info": entry.info(), "calibration": CalibrationOut.of(entry.memory.calibration),
            "previous": {"shots": len(before.shots), "threshold": before.calibration.threshold,
                         "calibrated_threshold": before.memory.calibration.threshold},
            "added": [r.id for r, _ in kept]}
