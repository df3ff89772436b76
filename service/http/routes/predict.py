"""POST /predict: score images, zero-shot or against a registered class.

The route parses the form, hands it to `Backend.score` (service/core/backend.py: the same path in a single process
and in an HTTP worker), and encodes the answer; it watches for the client leaving meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from ...core.access.roles import Role
from ...core.backend import ScoredImage, ScoreOptions
from ...core.class_names import CLASS_NAME
from ...core.codecs import png_heatmap, raw_heatmap
from ...core.errors import ClientClosedError, ForbiddenError
from ...core.records.record import MAX_TAGS, MAX_TEXT, RecordMeta
from ..auth import PrincipalDep, Requires
from ..deps import ServingDep
from ..schemas import PredictResponse
from .multipart import read_files

__all__ = ["router"]

router = APIRouter(tags=["predict"], dependencies=[Depends(Requires(Role.INSPECT))])

HeatmapKind = Literal["none", "png", "raw"]
T = TypeVar("T")


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away. The body has been read, so the server's next message on the receive
    channel is the disconnect: waiting for it costs nothing per request, where polling
    `request.is_disconnected()` took a sixth of the event loop's time under load."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or 499 when the client leaves first (the work is cancelled: the backend then drops the
    request before the device)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()  # the client left first
        await asyncio.gather(task, return_exceptions=True)
        raise ClientClosedError("the client closed the connection")
    finally:
        watcher.cancel()
        if not task.done():  # this request's own task is being cancelled (shutdown)
            task.cancel()


def _encode(image: ScoredImage, heatmap: HeatmapKind, keep: bool) -> dict:
    r, src = image.result, image.source
    hm = None
    if heatmap == "raw":
        hm = raw_heatmap(r.anomaly_map)
    elif heatmap == "png":
        hm = png_heatmap(r.anomaly_map, src.width, src.height, 2.0 * r.pixel_threshold)
    return {"filename": src.name, "score": r.score, "normalized_score": r.normalized_score, "text_score": r.text_score,
            "threshold": r.threshold, "is_anomalous": r.is_anomalous, "heatmap": hm, "regions": image.regions,
            "result_id": image.record_id if keep else None, "record_id": image.record_id,
            "record_kept": image.record_kept}


@router.post("/predict", response_model=PredictResponse, summary="Score images")  # errors: service/http/openapi.py
async def predict(
    request: Request,
    runtime: ServingDep,
    principal: PrincipalDep,
    images: Annotated[list[UploadFile], File(min_length=1, description="1..N image files (any format PIL reads)")],
    class_name: Annotated[str | None, Form(pattern=CLASS_NAME.pattern,
                                           description="registered class; omit for zero-shot")] = None,
    heatmap: Annotated[HeatmapKind, Form(description="none, png (8-bit, original size) or raw (float32)")] = "png",
    threshold: Annotated[float | None, Form(gt=0.0, lt=1.0, description="this request's threshold on `score`, "
                                            "instead of the class's; never stored")] = None,
    keep: Annotated[bool, Form(description="record the results with their thumbnail and upload whatever the "
                               "sampling, for the console, each with a `result_id`; needs class_name")] = False,
    record: Annotated[bool | None, Form(description="record this request's images (default: as the service is "
                                        "set, on unless started with --no-records); only with a class")] = None,
    part_id: Annotated[str | None, Form(max_length=MAX_TEXT, description="the part's id, kept in its records "
                                        "(printable text)")] = None,
    station: Annotated[str | None, Form(max_length=MAX_TEXT, description="the station that took the image")] = None,
    tags: Annotated[list[str] | None, Form(max_length=MAX_TAGS, description=f"up to {MAX_TAGS} tags (repeat the "
                                           "field, or comma-separate): letters, digits, _.:/@+=-")] = None,
) -> dict:
    """Anomaly score, decision, regions and heatmap for every image."""
    s = runtime.settings
    if class_name is not None and not principal.may_touch(class_name):
        raise ForbiddenError(f"key '{principal.name}' may touch classes matching '{principal.classes}' only, not "
                             f"'{class_name}'")
    meta = RecordMeta.of(part_id, station, tags)  # 422 on bad metadata, before any image is read
    options = ScoreOptions(class_name, threshold, need_maps=heatmap != "none", keep=keep, record=record, meta=meta)
    scored = await _unless_client_leaves(request, runtime.backend.score(
        lambda: read_files(images, s.max_images_per_request), options, s.request_timeout_s, runtime.limits,
        runtime.decode_budget, int(s.results_max_image_mb * 2**20)))
    body = await asyncio.to_thread(lambda: [_encode(image, heatmap, keep) for image in scored.images])
    runtime.telemetry.images.inc(len(body))
    return {"class_name": class_name, "results": body, "model": scored.model}
