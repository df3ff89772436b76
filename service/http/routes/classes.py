"""Product classes: register shots, list, inspect, override the threshold, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Path, UploadFile

from ...core.class_names import CLASS_NAME, check_class_name
from ...core.uploads import decode_uploads
from ..deps import LocalDep, RegistryDep, ResultsDep, require_api_key
from ..schemas import ClassInfo, ClassList, Deleted, ThresholdUpdate
from .multipart import read_files

__all__ = ["router"]

router = APIRouter(prefix="/classes", tags=["classes"], dependencies=[Depends(require_api_key)])

ClassName = Annotated[str, Path(pattern=CLASS_NAME.pattern, description="1-64 of a-z, 0-9, '_', '.', '-'")]


@router.post("/{name}/shots", response_model=ClassInfo, summary="Register normal shots of a class")
async def add_shots(
    name: ClassName,
    registry: RegistryDep,
    local: LocalDep,
    images: Annotated[list[UploadFile], File(min_length=1, description="1..K normal images of the product")],
    mode: Annotated[Literal["append", "replace"], Form(description="add to the shots or replace them")] = "append",
) -> dict:
    """Builds the class's bank and calibration; answers once both are on disk."""
    check_class_name(name)
    uploads = await read_files(images, local.settings.max_shots_per_class)
    decoded = await decode_uploads(uploads, local.limits, local.decode_budget)
    entry = await registry.add_shots(name, list(decoded.images), mode)
    return entry.info()


@router.get("", response_model=ClassList, summary="List classes")
async def list_classes(registry: RegistryDep) -> dict:
    return {"classes": [registry.get(n).info() for n in registry.names()]}


@router.get("/{name}", response_model=ClassInfo, summary="One class")
async def get_class(name: ClassName, registry: RegistryDep) -> dict:
    return registry.get(name).info()


@router.patch("/{name}", response_model=ClassInfo, summary="Override the class threshold")
async def set_threshold(name: ClassName, update: ThresholdUpdate, registry: RegistryDep) -> dict:
    return (await registry.set_threshold(name, update.threshold)).info()


@router.delete("/{name}", response_model=Deleted, summary="Remove a class and its files")
async def delete_class(name: ClassName, registry: RegistryDep, results: ResultsDep) -> dict:
    await registry.delete(name)
    results.forget_class(name)  # its kept results go with it
    return {"deleted": name}
