"""Product classes: register shots, list, inspect, override the threshold, delete."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Path, Query, UploadFile

from ...core.access.roles import Role
from ...core.class_names import CLASS_NAME, check_class_name
from ...core.registry import ClassRegistry
from ...core.uploads import decode_uploads
from ..auth import PrincipalDep, Requires
from ..deps import LocalDep, RecordsDep, RegistryDep
from ..query_params import only_params
from ..schemas import ClassInfo, ClassList, Deleted, ThresholdUpdate
from .multipart import read_files
from .results import recent_kept

__all__ = ["router"]

router = APIRouter(prefix="/classes", tags=["classes"], dependencies=[Depends(Requires(Role.INSPECT))])

ClassName = Annotated[str, Path(pattern=CLASS_NAME.pattern, description="1-64 of a-z, 0-9, '_', '.', '-'")]


@router.post("/{name}/shots", response_model=ClassInfo, summary="Register normal shots of a class",
             dependencies=[Depends(Requires(Role.OPERATE))])
async def add_shots(
    name: ClassName,
    registry: RegistryDep,
    local: LocalDep,
    principal: PrincipalDep,
    images: Annotated[list[UploadFile], File(min_length=1, description="1..K normal images of the product")],
    mode: Annotated[Literal["append", "replace"], Form(description="add to the shots or replace them")] = "append",
) -> dict:
    """Builds the class's bank and calibration; answers once both are on disk."""
    check_class_name(name)
    uploads = await read_files(images, local.settings.max_shots_per_class)
    decoded = await decode_uploads(uploads, local.limits, local.decode_budget)
    entry = await registry.add_shots(name, list(decoded.images), mode, principal.name)
    return entry.info()


PAGE_DEFAULT, PAGE_MAX = 100, 1000  # 1000 plain items are about 250 KiB of JSON


@router.get("", response_model=ClassList, summary="List classes, a page at a time",
            dependencies=[only_params("limit", "after", "recent", "thumbnails")])
async def list_classes(
    registry: RegistryDep,
    records: RecordsDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX, description="classes per page")] = PAGE_DEFAULT,
    after: Annotated[str | None, Query(max_length=64, description="the previous page's `next`: this page starts "
                                       "after that name")] = None,
    recent: Annotated[int, Query(ge=0, le=8, description="with each class, its last N records")] = 0,
    thumbnails: Annotated[bool, Query(description="with each class, its first shot as a JPEG thumbnail (and the "
                                      "recent results' thumbnails)")] = False,
) -> dict:
    """Classes in name order (an unknown or repeated query parameter is a 422: which of two cursors a page starts
    after is no guess to make) (for a key limited to some classes, those it may touch); a class registered or deleted
    between two pages does not move the others. What the console's class table shows comes in the one request
    (`recent`, `thumbnails`)."""
    entries, next_name, total = registry.page(after, limit, None if principal.classes is None else principal.may_touch)
    items: list[dict[str, Any]] = []
    for entry in entries:
        item = {**entry.info(), "first_shot": entry.shots[0] if entry.shots else None}
        if recent:
            item["recent_results"] = await asyncio.to_thread(recent_kept, records, entry.name, recent, thumbnails)
        items.append(item)
    if thumbnails:
        thumbs = await asyncio.to_thread(_first_thumbnails, registry, items)
        for item, thumb in zip(items, thumbs, strict=True):
            item["first_shot_thumbnail"] = thumb
    return {"classes": items, "total": total, "next": next_name}


def _first_thumbnails(registry: ClassRegistry, items: list[dict[str, Any]]) -> list[str | None]:
    out: list[str | None] = []
    for item in items:
        try:
            jpeg = registry.shot_thumbnail(item["name"], item["first_shot"]) if item["first_shot"] else None
        except Exception:  # deleted meanwhile, or a damaged shot: the row shows no picture, the list still answers
            jpeg = None
        out.append(None if jpeg is None else base64.b64encode(jpeg).decode("ascii"))
    return out


@router.get("/{name}", response_model=ClassInfo, summary="One class")
async def get_class(name: ClassName, registry: RegistryDep) -> dict:
    return registry.get(name).info()


@router.patch("/{name}", response_model=ClassInfo, summary="Override the class threshold",
              dependencies=[Depends(Requires(Role.OPERATE))])
async def set_threshold(name: ClassName, update: ThresholdUpdate, registry: RegistryDep,
                        principal: PrincipalDep) -> dict:
    return (await registry.set_threshold(name, update.threshold, principal.name)).info()


@router.delete("/{name}", response_model=Deleted, summary="Remove a class and its files",
               dependencies=[Depends(Requires(Role.ADMIN))])
async def delete_class(name: ClassName, registry: RegistryDep, principal: PrincipalDep) -> dict:
    await registry.delete(name, principal.name)  # its records stay: they are the line's history
    return {"deleted": name}
