"""POST /predict: score images, zero-shot or against a registered class."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile

from ...core.class_names import CLASS_NAME
from ...core.codecs import find_regions, png_heatmap, raw_heatmap
from ...core.engine import ImageResult
from ...core.errors import ClientClosedError, DeadlineExceededError, UnprocessableError
from ...core.results import override_threshold
from ...core.uploads import ImageSource, PixelLimits, stage_uploads
from ..deps import ServingDep, require_api_key
from ..schemas import PredictResponse
from .multipart import read_files
from .results import keep_results

__all__ = ["router"]

router = APIRouter(tags=["predict"], dependencies=[Depends(require_api_key)])

HeatmapKind = Literal["none", "png", "raw"]


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away. The body has been read, so the server's next message on the receive
    channel is the disconnect: waiting for it costs nothing per request, where polling
    `request.is_disconnected()` took a sixth of the event loop's time under load."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _result(request: Request, work: Awaitable[list[ImageResult]], timeout: float) -> list[ImageResult]:
    """The backend's results, or the error that says why not: the deadline passed (504), the client left (499;
    the backend then drops the request before the device)."""
    task = asyncio.ensure_future(asyncio.wait_for(work, timeout))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()  # the client left first
        await asyncio.gather(task, return_exceptions=True)
        raise ClientClosedError("the client closed the connection")
    except asyncio.TimeoutError:  # not the builtin before Python 3.11
        raise DeadlineExceededError(f"no result within {timeout:g} s") from None
    finally:
        watcher.cancel()
        if not task.done():  # this request's own task is being cancelled (shutdown)
            task.cancel()


def _encode(src: ImageSource, r: ImageResult, heatmap: HeatmapKind) -> dict:
    hm = None
    if heatmap == "raw":
        hm = raw_heatmap(r.anomaly_map)
    elif heatmap == "png":
        hm = png_heatmap(r.anomaly_map, src.width, src.height, 2.0 * r.pixel_threshold)
    return {"filename": src.name, "score": r.score, "normalized_score": r.normalized_score, "text_score": r.text_score,
            "threshold": r.threshold, "is_anomalous": r.is_anomalous, "heatmap": hm,
            "regions": find_regions(r.anomaly_map, r.pixel_threshold, src.width, src.height)
            if r.anomaly_map is not None and r.may_hold_regions else []}


@router.post("/predict", response_model=PredictResponse, summary="Score images")  # errors: service/http/openapi.py
async def predict(
    request: Request,
    svc: ServingDep,
    images: Annotated[list[UploadFile], File(min_length=1, description="1..N image files (any format PIL reads)")],
    class_name: Annotated[str | None, Form(pattern=CLASS_NAME.pattern,
                                           description="registered class; omit for zero-shot")] = None,
    heatmap: Annotated[HeatmapKind, Form(description="none, png (8-bit, original size) or raw (float32)")] = "png",
    threshold: Annotated[float | None, Form(gt=0.0, lt=1.0, description="this request's threshold on `score`, "
                                            "instead of the class's; never stored")] = None,
    keep: Annotated[bool, Form(description="keep the results (thumbnail, upload) in memory for the console, "
                               "each with a `result_id`; needs class_name")] = False,
) -> dict | Response:
    """Anomaly score, decision, regions and heatmap for every image."""
    settings = svc.settings
    if keep and not class_name:  # before any work
        raise UnprocessableError("keep=true needs a class_name: kept results belong to a class")
    if class_name:
        svc.backend.check_class(class_name)  # 404 before any work
    uploads = await read_files(images, settings.max_images_per_request)
    if keep and svc.forward is not None:  # an HTTP worker: kept results live in the engine process
        return await svc.forward.predict(request, uploads)
    svc.backend.admit(len(uploads))  # 429 before decoding: overload costs no decoding
    batch = await stage_uploads(uploads, PixelLimits.of(settings), svc.backend.stager,
                                request.app.state.decode_budget)
    work = svc.backend.predict(batch.images, class_name, time.monotonic() + settings.request_timeout_s,
                               need_maps=heatmap != "none" or keep)
    results = [override_threshold(r, threshold) for r in await _result(request, work, settings.request_timeout_s)]
    body = await asyncio.to_thread(lambda: [_encode(src, r, heatmap) for src, r in zip(batch.sources, results,
                                                                                       strict=True)])
    if keep:
        await keep_results(request, class_name, uploads, batch.sources, results, body)
    svc.telemetry.images.inc(len(body))
    return {"class_name": class_name, "results": body, "model": svc.backend.describe()}
