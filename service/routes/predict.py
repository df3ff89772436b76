"""POST /predict: score images, zero-shot or against a registered class."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Annotated, Literal

import torch
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from PIL import Image

from model.preprocess import resize_uint8

from ..batcher import WorkItem
from ..codecs import decode_upload, find_regions, png_heatmap, raw_heatmap
from ..deps import BatcherDep, EngineDep, RegistryDep, SettingsDep, TelemetryDep, require_api_key
from ..engine import ImageResult
from ..errors import ClientClosedError, DeadlineExceededError, PayloadTooLargeError, UnprocessableError
from ..schemas import PredictResponse
from ..settings import Settings

__all__ = ["read_batch", "read_images", "router"]

router = APIRouter(tags=["predict"], dependencies=[Depends(require_api_key)])

HeatmapKind = Literal["none", "png", "raw"]


async def _payloads(files: list[UploadFile], limit: int) -> list[tuple[str, bytes]]:
    if len(files) > limit:
        raise UnprocessableError(f"{len(files)} images in one request, more than the limit of {limit}")
    return [(f.filename or f"image-{i}", await f.read()) for i, f in enumerate(files)]


def _decode_each(payloads: list[tuple[str, bytes]], settings: Settings) -> Iterator[tuple[str, Image.Image]]:
    """Decode one upload at a time, within the per-image and per-request pixel limits; errors name the file."""
    used = 0
    for name, data in payloads:
        img = decode_upload(data, name, settings.max_image_pixels)
        used += img.width * img.height
        if used > settings.max_request_pixels:
            raise PayloadTooLargeError(f"the images of this request hold more than {settings.max_request_pixels} "
                                       "pixels in all; send fewer per request")
        yield name, img


async def read_images(files: list[UploadFile], limit: int, settings: Settings) -> list[tuple[str, Image.Image]]:
    """Uploads -> decoded RGB images, decoded on a worker thread."""
    payloads = await _payloads(files, limit)
    return await asyncio.to_thread(lambda: list(_decode_each(payloads, settings)))


async def read_batch(files: list[UploadFile], settings: Settings,
                     size: int) -> tuple[list[tuple[str, int, int]], torch.Tensor]:
    """Uploads -> (name, width, height) and the resized (n, 3, size, size) uint8 batch, in one worker-thread hop.

    Each image is dropped once resized, so a request never holds all its full-size images at once. Resizing is
    PIL and numpy only (no torch thread pool starts outside the device thread); the engine normalises on the
    device.
    """
    payloads = await _payloads(files, settings.max_images_per_request)

    def work() -> tuple[list[tuple[str, int, int]], torch.Tensor]:
        sizes, arrays = [], []
        for name, img in _decode_each(payloads, settings):
            sizes.append((name, img.width, img.height))
            arrays.append(resize_uint8(img, size))
        return sizes, torch.stack(arrays)

    return await asyncio.to_thread(work)


async def _cancel_on_disconnect(request: Request, item: WorkItem) -> bool:
    """Cancel the item when the client goes away (the batcher then drops it before the device)."""
    while not item.future.done():
        if await request.is_disconnected():
            item.future.cancel()
            return True
        await asyncio.sleep(0.05)
    return False


async def _result(request: Request, item: WorkItem, timeout: float) -> list[ImageResult]:
    watcher = asyncio.create_task(_cancel_on_disconnect(request, item))
    try:
        return await asyncio.wait_for(asyncio.shield(item.future), timeout)
    except asyncio.TimeoutError:  # not the builtin before Python 3.11
        item.future.cancel()
        raise DeadlineExceededError(f"no result within {timeout:g} s") from None
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled() and watcher.result():
            raise ClientClosedError("the client closed the connection") from None
        raise  # this request's own task is being cancelled (shutdown)
    finally:
        watcher.cancel()


def _encode(name: str, width: int, height: int, r: ImageResult, heatmap: HeatmapKind) -> dict:
    hm = None
    if heatmap == "raw":
        hm = raw_heatmap(r.anomaly_map)
    elif heatmap == "png":
        hm = png_heatmap(r.anomaly_map, width, height, 2.0 * r.pixel_threshold)
    return {"filename": name, "score": r.score, "normalized_score": r.normalized_score, "text_score": r.text_score,
            "threshold": r.threshold, "is_anomalous": r.is_anomalous, "heatmap": hm,
            "regions": find_regions(r.anomaly_map, r.pixel_threshold, width, height)}


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
    sizes, tensor = await read_batch(images, settings, engine.image_size)
    item = batcher.submit(WorkItem(tensor, [memory] * len(sizes),
                                   deadline=time.monotonic() + settings.request_timeout_s))
    results = await _result(request, item, settings.request_timeout_s)
    body = await asyncio.to_thread(lambda: [_encode(n, w, h, r, heatmap) for (n, w, h), r in zip(sizes, results,
                                                                                                  strict=True)])
    telemetry.images.inc(len(body))
    return {"class_name": class_name, "results": body, "model": engine.describe()}
