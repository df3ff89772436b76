"""Kept results and the threshold tools behind the console: recent results, the scores behind a threshold, and
kept images made shots by their id."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.convertors import Convertor, register_url_convertor

from ...core.engine import ImageResult
from ...core.errors import UnprocessableError
from ...core.results import KeptResult, ResultStore, ShotNotFoundError, make_kept, thumbnail_jpeg
from ...core.settings import Settings
from ...core.uploads import ImageSource, Upload, decode_upload
from ..deps import RegistryDep, SettingsDep, require_api_key
from ..schemas import ClassInfo, Region

__all__ = ["ResultsDep", "keep_results", "new_store", "router"]

router = APIRouter(tags=["results"], dependencies=[Depends(require_api_key)])


def new_store(settings: Settings) -> ResultStore:
    return ResultStore(settings.results_per_class, settings.results_max_classes,
                       int(settings.results_max_mb * 2**20), int(settings.results_max_image_mb * 2**20))


async def _store(request: Request) -> ResultStore:
    return request.app.state.results


ResultsDep = Annotated[ResultStore, Depends(_store)]


async def keep_results(request: Request, class_name: str | None, uploads: list[Upload],
                       sources: Sequence[ImageSource], results: list[ImageResult], body: list[dict]) -> None:
    """`keep=true` on /predict: keep each result (numbers, thumbnail, the upload) and put its id in `body`."""
    if class_name is None:
        raise UnprocessableError("keep=true needs a class_name: kept results belong to a class")
    store: ResultStore = request.app.state.results
    settings: Settings = request.app.state.settings

    def build() -> list[KeptResult]:
        return [make_kept(class_name, src.name, data, src.width, src.height, r, b["regions"],
                          settings.max_image_pixels, store.max_image_bytes)
                for src, (_, data), r, b in zip(sources, uploads, results, body, strict=True)]

    for kept, b in zip(await asyncio.to_thread(build), body, strict=True):
        store.add(kept)
        b["result_id"] = kept.id


# -- models ------------------------------------------------------------------------------------------------------
class KeptResultOut(BaseModel):
    id: str
    class_name: str
    filename: str
    width: int
    height: int
    score: float = Field(description="online raw score, as computed with the class's calibration at the time")
    normalized_score: float
    text_score: float
    threshold: float = Field(description="the threshold used for this result (the per-request one if given)")
    is_anomalous: bool
    time: float = Field(description="unix time it was scored")
    regions: list[Region]
    image_kept: bool = Field(description="the upload is kept, so the result can become a shot by its id")
    thumbnail: str | None = Field(None, description="base64 JPEG, at most 128 px a side, heatmap blended over "
                                  "(with thumbnails=true)")


class KeptResultList(BaseModel):
    class_name: str
    results: list[KeptResultOut] = Field(description="newest first")


class ShotScore(BaseModel):
    score: float = Field(description="the shot's online raw score against the other shots (leave-one-out)")
    map_max: float = Field(description="maximum of its leave-one-out final map")
    text_score: float


class RecentScore(BaseModel):
    id: str
    score: float
    threshold: float
    is_anomalous: bool
    time: float


class CalibrationOut(BaseModel):
    threshold: float = Field(description="calibrated threshold")
    map_mean: float
    map_std: float
    text_mean: float
    z: float
    shots: int
    pixel_threshold: float
    shots_recorded: bool = Field(description="false for classes calibrated before per-shot scores were kept "
                                 "(register a shot again to record them)")


class Histogram(BaseModel):
    edges: list[float] = Field(description="bins + 1 increasing bin edges over the scores and both thresholds")
    shots: list[int]
    recent: list[int]


class ClassScores(BaseModel):
    class_name: str
    threshold: float = Field(description="the threshold in force (override or calibrated)")
    calibrated_threshold: float
    threshold_overridden: bool
    calibration: CalibrationOut
    shots: list[ShotScore] = Field(description="the calibration: one leave-one-out score per shot")
    recent: list[RecentScore] = Field(description="kept results, newest first")
    histogram: Histogram


class ShotRef(BaseModel):
    sha256: str = Field(description="content hash of the stored PNG: the shot's id")


class ShotList(BaseModel):
    class_name: str
    shots: list[ShotRef] = Field(description="in registration order")


class FromResults(BaseModel):
    result_ids: list[str] = Field(min_length=1, description="ids of kept results of this class",
                                  examples=[["3f2a9c0e4b1d4e6f8a7b6c5d4e3f2a1b"]])


class PreviousState(BaseModel):
    shots: int
    threshold: float
    calibrated_threshold: float


class FromResultsResponse(BaseModel):
    class_info: ClassInfo = Field(description="the class after the shots were added")
    previous: PreviousState = Field(description="the class before")
    calibration: CalibrationOut = Field(description="the new calibration")
    added: list[str] = Field(description="the result ids added (an image already a shot adds no shot)")


# -- helpers -----------------------------------------------------------------------------------------------------
def _kept_out(r: KeptResult, thumbnails: bool) -> dict:
    out = r.summary()
    out["thumbnail"] = base64.b64encode(r.thumbnail).decode("ascii") if thumbnails else None
    return out


def _calibration_out(cal: object) -> dict:
    return {"threshold": cal.threshold, "map_mean": cal.map_mean, "map_std": cal.map_std,
            "text_mean": cal.text_mean, "z": cal.z, "shots": cal.shots, "pixel_threshold": cal.pixel_threshold,
            "shots_recorded": len(cal.shot_map_max) == cal.shots}


def histogram(shots: list[float], recent: list[float], thresholds: list[float], bins: int) -> dict:
    """Counts of both score sets over shared edges spanning the scores and the thresholds (5% margin, in [0, 1])."""
    values = [*shots, *recent, *thresholds]
    lo, hi = min(values), max(values)
    pad = max(0.05 * (hi - lo), 0.005)
    lo, hi = max(0.0, lo - pad), min(1.0, hi + pad)
    edges = np.linspace(lo, hi, bins + 1)
    return {"edges": [float(e) for e in edges], "shots": np.histogram(shots, edges)[0].tolist(),
            "recent": np.histogram(recent, edges)[0].tolist()}


# -- routes ------------------------------------------------------------------------------------------------------
@router.get("/classes/{name}/results", response_model=KeptResultList, summary="Recent kept results of a class")
async def class_results(
    name: str, registry: RegistryDep, store: ResultsDep,
    limit: Annotated[int, Query(ge=1, le=10_000, description="at most this many, newest first")] = 100,
    thumbnails: Annotated[bool, Query(description="include the base64 JPEG thumbnails")] = False,
) -> dict:
    registry.get(name)
    return {"class_name": name, "results": [_kept_out(r, thumbnails) for r in store.recent(name, limit)]}


@router.get("/results/{result_id}", response_model=KeptResultOut, summary="One kept result")
async def one_result(result_id: str, store: ResultsDep) -> dict:
    return _kept_out(store.get(result_id), True)


@router.get("/results/{result_id}/thumbnail", summary="A kept result's thumbnail (JPEG, heatmap blended over)",
            response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
async def result_thumbnail(result_id: str, store: ResultsDep) -> Response:
    return Response(store.get(result_id).thumbnail, media_type="image/jpeg")


@router.get("/classes/{name}/shots", response_model=ShotList, summary="A class's shots")
async def list_shots(name: str, registry: RegistryDep) -> dict:
    """The shots by content hash; `GET /classes/{name}/shots/{sha256}` returns one (the console shows them, and
    deletes some by registering the rest with mode=replace)."""
    return {"class_name": name, "shots": [{"sha256": h} for h in registry.get(name).shots]}


class _Sha256(Convertor[str]):
    """A shot's hash in a path: 64 hex digits, so `/classes/{name}/shots/from-results` is never read as one."""

    regex = "[0-9a-f]{64}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("sha256", _Sha256())


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


@router.get("/classes/{name}/scores", response_model=ClassScores, summary="The numbers behind a threshold")
async def class_scores(
    name: str, registry: RegistryDep, store: ResultsDep,
    bins: Annotated[int, Query(ge=1, le=200, description="histogram bins")] = 20,
) -> dict:
    """The shots' leave-one-out scores (the calibration), the kept results' scores, both thresholds and a
    histogram of both score sets. Recent scores are as computed then: shots added since move the calibration."""
    entry = registry.get(name)
    cal = entry.memory.calibration
    shot_scores = cal.shot_scores()
    recent = store.recent(name)
    thresholds = [entry.calibration.threshold, cal.threshold]
    return {
        "class_name": name, "threshold": entry.calibration.threshold, "calibrated_threshold": cal.threshold,
        "threshold_overridden": entry.threshold_override is not None, "calibration": _calibration_out(cal),
        "shots": [{"score": s, "map_max": a, "text_score": t}
                  for s, a, t in zip(shot_scores, cal.shot_map_max, cal.shot_text_scores, strict=True)],
        "recent": [{"id": r.id, "score": r.score, "threshold": r.threshold, "is_anomalous": r.is_anomalous,
                    "time": r.time} for r in recent],
        "histogram": histogram(shot_scores, [r.score for r in recent], thresholds, bins),
    }


@router.post("/classes/{name}/shots/from-results", response_model=FromResultsResponse,
             summary="Add kept results of the class as shots, by id",
             responses={404: {"description": "unknown class or result"},
                        422: {"description": "a result of another class, or kept without its image"}})
async def shots_from_results(name: str, request: FromResults, registry: RegistryDep, store: ResultsDep,
                             settings: SettingsDep) -> dict:
    """"This one is good": the kept uploads become shots (appended, as `POST /classes/{name}/shots` would with the
    same files) and the class is recalibrated; the answer carries the class before and after."""
    before = registry.get(name)
    kept = [store.get(i) for i in dict.fromkeys(request.result_ids)]
    for r in kept:
        if r.class_name != name:
            raise UnprocessableError(f"result '{r.id}' was scored against class '{r.class_name}', not '{name}'")
        if r.image is None:
            raise UnprocessableError(f"result '{r.id}' was kept without its image (over "
                                     f"{store.max_image_bytes} bytes); upload it as a shot instead")
    images = await asyncio.to_thread(lambda: [decode_upload(r.image, r.filename, settings.max_image_pixels)
                                              for r in kept])
    entry = await registry.add_shots(name, images, "append")
    return {"class_info": entry.info(), "calibration": _calibration_out(entry.memory.calibration),
            "previous": {"shots": len(before.shots), "threshold": before.calibration.threshold,
                         "calibrated_threshold": before.memory.calibration.threshold},
            "added": [r.id for r in kept]}
