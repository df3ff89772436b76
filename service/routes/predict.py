"""POST /predict: score images, zero-shot or against a registered class."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Literal

import torch
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from PIL import Image

from model.preprocess import preprocess_batch

from ..batcher import WorkItem
from ..codecs import decode_upload, find_regions, png_heatmap, raw_heatmap
from ..deps import BatcherDep, EngineDep, RegistryDep, SettingsDep, TelemetryDep, require_api_key
from ..engine import ImageResult
from ..errors import ClientClosedError, DeadlineExceededError, UnprocessableError
from ..schemas import PredictResponse

__all__ = ["read_images", "router"]

router = APIRouter(tags=["predict"], dependencies=[Depends(require_api_key)])

HeatmapKind = Literal["none", "png", "raw"]


async def read_images(files: list[UploadFile], limit: int, max_pixels: int,
                      size: int | None = None) -> tuple[list[tuple[str, Image.Image]], torch.Tensor | None]:
    """Read uploads, then decode (and, given the model `size`, preprocess) them in one worker-thread hop.

    Errors name the file. Preprocessing is numpy-only, so no torch thread pool starts outside the device thread.
    """
    if len(files) > limit:
        raise UnprocessableError(f"{len(files)} images in one request, more than the limit of {limit}")
    payloads = [(f.filename or f"image-{i}", await f.read()) for i, f in enumerate(files)]

    def work() -> tuple[list[tuple[str, Image.Image]], torch.Tensor | None]:
        decoded = [(name, decode_upload(data, name, max_pixels)) for name, data in payloads]
        return decoded, (preprocess_batch([img for _, img in decoded], size) if size else None)

    return await asyncio.to_thread(work)


async def _cancel_on_disconnect(request: Request, item: WorkItem) -> None:
    while not item.future.done():
        if await request.is_disconnected():
            item.future.cancel()  # the batcher drops it before the device
            return
        await asyncio.sleep(0.05)


async def _result(request: Request, item: WorkItem, timeout: float) -> list[ImageResult]:
    watcher = asyncio.create_task(_cancel_on_disconnect(request, item))
    try:
        return await asyncio.wait_for(asyncio.shield(item.future), timeout)
    except TimeoutError:
        item.future.cancel()
        raise DeadlineExceededError(f"no result within {timeout:g} s") from None
    except asyncio.CancelledError:
        if item.future.cancelled() and not asyncio.current_task().cancelling():
            raise ClientClosedError("the client closed the connection") from None
        raise
    finally:
        watcher.cancel()


def _encode(name: str, img: Image.Image, r: ImageResult, heatmap: HeatmapKind) -> dict:
    hm = None
    if heatmap == "raw":
        hm = raw_heatmap(r.anomaly_map)
    elif heatmap == "png":
        hm = png_heatmap(r.anomaly_map, img.width, img.height, 2.0 * r.pixel_threshold)
    return {"filename": name, "score": r.score, "normalized_score": r.normalized_score, "text_score": r.text_score,
            "threshold": r.threshold, "is_anomalous": r.is_anomalous, "heatmap": hm,
            "regions": find_regions(r.anomaly_map, r.pixel_threshold, img.width, img.height)}


@router.post("/predict", response_model=PredictResponse, summary="Score images",
             responses={404: {"description": "unknown class"}, 413: {"description": "too large"},
                        422: {"description": "invalid fields"}, 429: {"description": "queue full"}})
async def predict(
    request: Request,
    engine: EngineDep,
    registry: RegistryDep,
    batcher: BatcherDep,
    settings: SettingsDep,
    telemetry: TelemetryDep,
    images: Annotated[list[UploadFile], File(description="1..N image files (any format PIL reads)")],
    class_name: Annotated[str | None, Form(description="registered class; omit for zero-shot")] = None,
    heatmap: Annotated[HeatmapKind, Form(description="none, png (8-bit, original size) or raw (float32)")] = "png",
) -> dict:
    """Anomaly score, decision, regions and heatmap for every image."""
    memory = registry.get(class_name).serving_memory if class_name else None
    decoded, tensor = await read_images(images, settings.max_images_per_request, settings.max_image_pixels,
                                        engine.image_size)
    item = batcher.submit(WorkItem(tensor, [memory] * len(decoded),
                                   deadline=time.monotonic() + settings.request_timeout_s))
    results = await _result(request, item, settings.request_timeout_s)
    body = await asyncio.to_thread(lambda: [_encode(n, d, r, heatmap) for (n, d), r in zip(decoded, results,
                                                                                           strict=True)])
    telemetry.images.inc(len(body))
    return {"class_name": class_name, "results": body, "model": engine.describe()}
