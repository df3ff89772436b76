"""Engine: the loaded model on its device, and the only code that runs it.

Every model call runs on the engine's single worker thread, so the device sees one batch at a time and the
event loop never blocks on it. The batcher and the registry call `await engine.call(fn, ...)`.

Class memories handed to and returned by the engine hold host banks; `banks` (BankResidency) keeps the device
copies of the recently used ones within a byte budget. Images arrive resized as uint8 (a quarter of the float bytes)
and are normalised on the device. On a GPU the request threads have already put them there (`staging.py`), on side
streams, while the device ran the previous batch; host tensors are still accepted and copied here.

With `compile_mode`, the vision pass runs through torch.compile (model/compiled_vision.py), one graph per bucket
batch size, all compiled by `warmup` before traffic.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from model.bundle import BundleInfo
from model.calibration import zero_shot_pixel_threshold
from model.compiled_vision import CompiledVision
from model.device import resolve_device, resolve_dtype
from model.inference import ClassMemory, ScoreColumns, fit_class, predict_scored
from model.memory_bank import MemoryBank
from model.preprocess import normalize, resize_uint8
from model.sowa import SowaModel

from .bank_residency import BankResidency, default_budget_bytes
from .served_model import ServedModel, load_served
from .staging import Decoder

__all__ = ["Engine", "ImageResult", "PendingBatch"]

T = TypeVar("T")


@dataclass(frozen=True)
class ImageResult:
    """One image's outputs, on the host: its map, `ScoreColumns`' numbers under the same names, and the pixel
    threshold of its class."""

    anomaly_map: np.ndarray | None  # (S, S) float32, reference scale; None where it was not sent (workers)
    text_score: float
    score: float  # the raw online score (docs/scoring.md), as in the API; `ImageScores.raw` in the model
    threshold: float
    normalized_score: float
    is_anomalous: bool
    pixel_threshold: float  # map level where regions start
    map_max: float | None = None  # the map's highest value: at or below pixel_threshold, it holds no region

    @classmethod
    def from_columns(cls, columns: ScoreColumns[float], anomaly_map: np.ndarray | None,
                     pixel_threshold: float) -> ImageResult:
        return cls(anomaly_map=anomaly_map, pixel_threshold=pixel_threshold, **columns._asdict())

    def columns(self) -> ScoreColumns[float]:
        return ScoreColumns._make(getattr(self, f) for f in ScoreColumns._fields)

    @property
    def may_hold_regions(self) -> bool:
        return self.map_max is None or self.map_max > self.pixel_threshold


@dataclass(frozen=True)
class PendingBatch:
    """A launched batch: its maps on the device, its per-image numbers (`ScoreColumns`, packed) on their way to
    the host, the event that says they are there (None on the CPU)."""

    maps: torch.Tensor  # (B, S, S)
    columns: torch.Tensor  # (B, len(ScoreColumns._fields)) float32: Prediction.columns
    ready: torch.cuda.Event | None
    memories: list[ClassMemory | None]
    taps: int  # the model's stages: the zero-shot pixel threshold depends on them


class Engine:
    """The device, its one worker thread, the class banks' residency, and the models loaded on it: `active` serves;
    a model being prepared (a new version, a shadow candidate) is loaded beside it with `load`, and every model
    call takes the ServedModel it runs (default: the active one)."""

    def __init__(self, bundle: Path, device: str = "auto", dtype: str = "fp32",
                 bank_budget_bytes: int | None = None, compile_mode: str | None = None,
                 max_batch_size: int = 16, decoder: Decoder = "pil", label: str | None = None) -> None:
        """`bank_budget_bytes`: device memory for class banks; None is `default_budget_bytes` (40% of a GPU).
        `compile_mode`: a torch.compile mode for the vision pass (None: eager); `max_batch_size` bounds its
        buckets and the warm-up. `decoder`: how requests' images are staged (staging.py)."""
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.compile_mode, self.max_batch_size, self.decoder = compile_mode, max_batch_size, decoder
        self.active: ServedModel = self.load(bundle, label)
        budget = default_budget_bytes(self.device) if bank_budget_bytes is None else bank_budget_bytes
        self.banks = BankResidency(self.device, budget)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sowa-engine")
        self._collector = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sowa-collect")
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def load(self, bundle: Path, label: str | None = None) -> ServedModel:
        """Load a bundle beside the active model (any thread); BundleError when it is broken."""
        return load_served(Path(bundle), self.device, self.dtype, self.decoder, label, self.compile_mode,
                           self.max_batch_size)

    # the active model's, for callers that serve one model
    @property
    def model(self) -> SowaModel:
        return self.active.model

    @property
    def info(self) -> BundleInfo:
        return self.active.info

    @property
    def image_size(self) -> int:
        return self.active.image_size

    @property
    def compiled(self) -> CompiledVision | None:
        return self.active.compiled

    def describe(self) -> dict[str, Any]:
        return self.active.describe()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the engine thread."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, functools.partial(fn, *args))

    def call_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the engine thread from another (non-event-loop) thread, and wait for it."""
        return self._worker.submit(fn, *args).result()

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        self._collector.shutdown(wait=True)

    def host_bank(self, bank: MemoryBank, served: ServedModel | None = None) -> MemoryBank:
        """A bank as classes keep it (e.g. read from disk): serving dtype, host memory. Any thread."""
        return self.banks.to_host(bank.to(dtype=(served or self.active).model.clip.visual.proj.dtype))

    # -- work, on the engine thread -------------------------------------------------------------------------
    def fit(self, shots: Sequence[Image.Image], name: str | None = None,
            served: ServedModel | None = None) -> ClassMemory:
        """A class's memory from its shots, for `served` (default: the active model) at its own input size. The
        active model's bank stays resident, as the class is likely to be used next. `name` (the class's) picks
        the bundle's prompt class of that name, else prompt class 0."""
        served = served or self.active
        resized = [resize_uint8(img, served.image_size)[None] for img in shots]
        memory = fit_class(served.model, self._to_device(resized), prompt_name=name)
        host = self.banks.to_host(memory.bank)
        if served is self.active:
            self.banks.admit(host, memory.bank)
        return ClassMemory(host, memory.calibration, name)

    def _to_device(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(n_i, 3, S, S) uint8 parts, on the host or already staged on the device -> one normalised float32
        batch on the device."""
        if self.device.type != "cuda":
            return normalize(torch.cat(list(images)))
        on_device = [x.is_cuda for x in images]
        if all(on_device):  # staged by the request threads, on this device (the stager is built with it)
            stream = torch.cuda.current_stream(self.device)
            for x in images:  # made on a staging stream: keep the allocator from reusing it before this use
                x.record_stream(stream)
            return normalize(torch.cat(list(images)))
        if any(on_device):
            raise ValueError("a batch mixes host and device images; stage all of them or none")
        n = sum(int(x.shape[0]) for x in images)
        pinned = torch.empty((n, *images[0].shape[1:]), dtype=images[0].dtype, pin_memory=True)
        torch.cat(list(images), out=pinned)
        return normalize(pinned.to(self.device, non_blocking=True))

    @torch.inference_mode()  # the joined batch is then an inference tensor, as compiled graphs were traced with
    def launch(self, images: Sequence[torch.Tensor], memories: Sequence[ClassMemory | None],
               served: ServedModel | None = None) -> PendingBatch:
        """Start one batch (engine thread): `images` are its requests' (n_i, 3, S, S) uint8 tensors, joined here.

        On a GPU this returns once the work is queued on the device, with the per-image numbers on their way to
        pinned host memory (one packed, non-blocking copy); `finish` waits for them on another thread, so the
        engine thread can already queue the next batch. On the CPU the work is done when this returns."""
        banks = self.banks.resolve([m.bank if m else None for m in memories])
        on_device = [None if m is None else ClassMemory(bank, m.calibration, m.prompt_name)
                     for m, bank in zip(memories, banks, strict=True)]
        served = served or self.active
        pred = predict_scored(served.model, self._to_device(images), on_device)
        columns = pred.columns()
        if self.device.type != "cuda":
            return PendingBatch(pred.anomaly_maps, columns, None, list(memories), len(served.model.taps))
        host = torch.empty(columns.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(columns, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return PendingBatch(pred.anomaly_maps, host, ready, list(memories), len(served.model.taps))

    def finish(self, pending: PendingBatch, need_maps: Sequence[bool]) -> list[ImageResult]:
        """A launched batch's results (any thread but the engine's). An image's map comes to the host only when
        its answer needs it: a heatmap was asked for, or the map rises above the pixel threshold and so holds
        regions. The batch's one wait for the device is here."""
        if pending.ready is not None:
            pending.ready.synchronize()
        c = [ScoreColumns.unpack(row) for row in pending.columns.tolist()]
        zero_shot_px = zero_shot_pixel_threshold(pending.taps)
        pixel = [m.calibration.pixel_threshold if m else zero_shot_px for m in pending.memories]
        rows = [i for i, (col, px, need) in enumerate(zip(c, pixel, need_maps, strict=True))
                if need or col.map_max > px]
        maps = dict(zip(rows, self._maps_to_host(pending, rows), strict=True)) if rows else {}
        return [ImageResult.from_columns(col, maps.get(i), px)
                for i, (col, px) in enumerate(zip(c, pixel, strict=True))]

    def _maps_to_host(self, pending: PendingBatch, rows: list[int]) -> list[np.ndarray]:
        maps = pending.maps
        index = torch.tensor(rows) if len(rows) < maps.shape[0] else None
        if not maps.is_cuda:
            return list((maps if index is None else maps.index_select(0, index)).float().numpy())
        with torch.cuda.stream(self._copy_stream):  # after this batch's work, not behind the next batch's
            self._copy_stream.wait_event(pending.ready)
            if index is not None:
                maps = maps.index_select(0, index.pin_memory().to(maps.device, non_blocking=True))
            host = torch.empty(maps.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(maps, non_blocking=True)
            self._copy_stream.synchronize()
        return list(host.numpy())

    def run(self, images: Sequence[torch.Tensor], memories: Sequence[ClassMemory | None],
            need_maps: Sequence[bool] | bool = True, served: ServedModel | None = None) -> list[ImageResult]:
        """`launch` and `finish` in one call, on this thread: the engine thread's synchronous path (tests,
        probes, shadow scoring). `need_maps` True or False stands for every image."""
        pending = self.launch(images, memories, served)
        need = [need_maps] * len(pending.memories) if isinstance(need_maps, bool) else list(need_maps)
        return self.finish(pending, need)

    async def run_batch(self, images: Sequence[torch.Tensor], memories: Sequence[ClassMemory | None],
                        need_maps: Sequence[bool], served: ServedModel | None = None) -> list[ImageResult]:
        """The batcher's `run_batch`: launch on the engine thread, finish on the collector thread, so batch N's
        results come back while batch N+1 is already on the device. `served`: the model the batch's requests
        started on (default: the active one)."""
        pending = await self.call(self.launch, images, memories, served)
        return await asyncio.get_running_loop().run_in_executor(self._collector, self.finish, pending, need_maps)

    @torch.inference_mode()
    def warmup(self, served: ServedModel | None = None) -> None:
        """Compile every bucket, or run the smallest and largest batch: first-call allocations, kernel choices
        and compilation happen before traffic (`served`: a model about to be switched to)."""
        served = served or self.active
        if served.compiled is not None:
            served.compiled.warm_up()
            return
        for bs in sorted({1, self.max_batch_size}):
            x = torch.zeros(bs, 3, served.image_size, served.image_size, dtype=torch.uint8)
            predict_scored(served.model, self._to_device([x]), [None] * bs)

    def device_memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return self.active.weight_bytes
