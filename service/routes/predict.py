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
from ..codecs import check_upload_pixels, decode_upload, find_regions, png_heatmap, raw_heatmap
from ..deps import ServingDep, require_api_key
from ..engine import ImageResult
from ..errors import ClientClosedError, DeadlineExceededError, PayloadTooLargeError, UnprocessableError
from ..results import override_threshold
from ..schemas import PredictResponse
from ..settings import Settings
from ..staging import ImageStager, jpeg_size
from .results import keep_results

__all__ = ["read_batch", "read_images", "router"]

router = APIRouter(tags=["predict"], dependencies=[Depends(require_api_key)])

HeatmapKind = Literal["none", "png", "raw"]


async def _payloads(files: list[UploadFile], limit: int) -> list[tuple[str, bytes]]:
    if len(files) > limit:
        raise UnprocessableError(f"{len(files)} images in one request, more than the limit of {limit}")
    return [(f.filename or f"image-{i}", await f.read()) for i, f in enumerate(files)]


class _PixelBudget:
    """The per-request pixel limit, charged one image at a time (each image's own limit is checked before)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def charge(self, width: int, height: int) -> None:
        self.used += width * height
        if self.used > self.limit:
            raise PayloadTooLargeError(f"the images of this request hold more than {self.limit} pixels in all; "
                                       "send fewer per request")


def _decode_each(payloads: list[tuple[str, bytes]], settings: Settings) -> Iterator[tuple[str, Image.Image]]:
    """Decode one upload at a time, within the per-image and per-request pixel limits; errors name the file."""
    budget = _PixelBudget(settings.max_request_pixels)
    for name, data in payloads:
        img = decode_upload(data, name, settings.max_image_pixels)
        budget.charge(img.width, img.height)
        yield name, img


async def read_images(files: list[UploadFile], limit: int, settings: Settings) -> list[tuple[str, Image.Image]]:
    """Uploads -> decoded RGB images, decoded on a worker thread."""
    payloads = await _payloads(files, limit)
    return await asyncio.to_thread(lambda: list(_decode_each(payloads, settings)))


def _stage_batch(payloads: list[tuple[str, bytes]], settings: Settings,
                 stager: ImageStager) -> tuple[list[tuple[str, int, int]], torch.Tensor]:
    """Uploads -> (name, width, height) and the resized (n, 3, S, S) uint8 batch on the engine's device.

    PIL images are dropped once resized, so a request never holds all its full-size images at once. PIL work
    is PIL and numpy only (no torch thread pool starts outside the device thread). JPEGs go to the device decoder
    when the stager has one, their limits checked from their headers; any it refuses come back through PIL.
    """
    def through_pil(name: str, data: bytes) -> torch.Tensor:
        return resize_uint8(decode_upload(data, name, settings.max_image_pixels), stager.size)

    budget = _PixelBudget(settings.max_request_pixels)
    sizes: list[tuple[str, int, int]] = []
    resized: dict[int, torch.Tensor] = {}  # image index -> (3, S, S) uint8, on the host (PIL) or the device
    jpegs: list[int] = []  # indexes left for the device decoder
    for i, (name, data) in enumerate(payloads):
        wh = jpeg_size(data) if stager.decodes_jpeg else None
        if wh is None:
            img = decode_upload(data, name, settings.max_image_pixels)
            wh = img.size
            resized[i] = resize_uint8(img, stager.size)
        else:
            check_upload_pixels(name, *wh, settings.max_image_pixels)
            jpegs.append(i)
        budget.charge(*wh)
        sizes.append((name, *wh))
    if jpegs:
        decoded = stager.decode_jpegs([(payloads[i][1], sizes[i][1] * sizes[i][2]) for i in jpegs])
        for i, x in zip(jpegs, decoded, strict=True):
            resized[i] = x if x is not None else through_pil(*payloads[i])
    return sizes, stager.join([resized[i] for i in range(len(payloads))])


async def read_batch(files: list[UploadFile], settings: Settings,
                     stager: ImageStager) -> tuple[list[tuple[str, int, int]], torch.Tensor]:
    """Uploads -> (name, width, height) and the staged uint8 batch, in one worker-thread hop (`_stage_batch`)."""
    payloads = await _payloads(files, settings.max_images_per_request)
    return await asyncio.to_thread(_stage_batch, payloads, settings, stager)


async def _cancel_on_disconnect(request: Request, item: WorkItem) -> bool:
    """Cancel the item when the client goes away (the batcher then drops it before the device).

    The body has been read, so the server's next message on the receive channel is the disconnect: waiting for
    it costs nothing per request, where polling `request.is_disconnected()` took a sixth of the event loop's time
    under load.
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass
    item.future.cancel()
    return True


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
    svc: ServingDep,
    images: Annotated[list[UploadFile], File(description="1..N image files (any format PIL reads)")],
    class_name: Annotated[str | None, Form(description="registered class; omit for zero-shot")] = None,
    heatmap: Annotated[HeatmapKind, Form(description="none, png (8-bit, original size) or raw (float32)")] = "png",
    threshold: Annotated[float | None, Form(gt=0.0, lt=1.0, description="this request's threshold on `score`, "
                                            "instead of the class's; never stored")] = None,
    keep: Annotated[bool, Form(description="keep the results (thumbnail, upload) in memory for the console, "
                               "each with a `result_id`; needs class_name")] = False,
) -> dict:
    """Anomaly score, decision, regions and heatmap for every image."""
    settings = svc.settings
    if keep and not class_name:  # before any work
        raise UnprocessableError("keep=true needs a class_name: kept results belong to a class")
    memory = svc.registry.get(class_name).serving_memory if class_name else None
    sizes, tensor = await read_batch(images, settings, svc.stager)
    item = svc.batcher.submit(WorkItem(tensor, [memory] * len(sizes),
                                       deadline=time.monotonic() + settings.request_timeout_s))
    results = [override_threshold(r, threshold) for r in await _result(request, item, settings.request_timeout_s)]
    body = await asyncio.to_thread(lambda: [_encode(n, w, h, r, heatmap) for (n, w, h), r in zip(sizes, results,
                                                                                                  strict=True)])
    if keep:
        await keep_results(request, class_name, images, sizes, results, body)
    svc.telemetry.images.inc(len(body))
    return {"class_name": class_name, "results": body, "model": svc.engine.describe()}
