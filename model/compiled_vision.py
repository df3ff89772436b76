"""The vision pass through `torch.compile`, one graph per bucket batch size.

A compiled graph is specialised to its input shape, and compiling one takes tens of seconds (minutes with
`max-autotune`), so a server cannot compile per batch size it happens to meet. Batches are padded up to the next
bucket (`bucket_sizes`: 1, then the largest batch halved down to 8), every bucket is compiled by `warm_up`
before traffic, and a batch larger than every bucket runs eagerly. Padding rows are zeros and are cut off before
anything reads them; the padded rows cost compute, never correctness.

Mode `reduce-overhead` also captures each bucket as a CUDA graph: the launches of a whole forward replay as one.
Its outputs live in memory the next replay overwrites, so the patch tokens that escape `predict` (banks are built
from them) are copied out.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch._dynamo.config

if TYPE_CHECKING:  # only types: the service's settings import this module's COMPILE_MODES, light
    from .sowa import SowaFeatures, SowaModel

__all__ = ["COMPILE_MODES", "CompiledVision", "bucket_sizes"]

# torch.compile's modes; "reduce-overhead" adds CUDA graphs (a no-op on the CPU)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def bucket_sizes(max_batch: int, floor: int = 8) -> list[int]:
    """1, then `max_batch` halved (rounding up) while at least `floor`: [1, 8, 16, 32, 64] for 64.

    Each bucket is a full compile of the vision tower (tens of seconds for ViT-L, minutes with max-autotune), so
    buckets go where padding costs time. Above `floor` a batch's time grows about linearly with its size, and
    buckets a factor 2 apart keep padding under half a batch; below it a ViT-L batch (577 tokens an image) does
    not fill a large GPU, so padding 2 images to 8 costs little, and 1 stays exact for lone requests. Against
    powers of two this drops the 2 and 4 buckets (7 -> 5 compiles at 64, 5 -> 3 at 16).
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if floor < 1:
        raise ValueError(f"floor must be >= 1, got {floor}")
    sizes, b = {1, max_batch}, max_batch
    while (b + 1) // 2 >= floor:
        b = (b + 1) // 2
        sizes.add(b)
    return sorted(sizes)


class CompiledVision:
    """`model.encode` compiled per bucket; call it as `encode` is called. Install it with
    `model.set_inference_encoder(CompiledVision(model, ...))` so that `predict` uses it."""

    def __init__(self, model: SowaModel, mode: str = "default", buckets: Sequence[int] = (1,)) -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode '{mode}': use one of {', '.join(COMPILE_MODES)}")
        if not buckets or min(buckets) < 1:
            raise ValueError(f"need at least one bucket size >= 1, got {list(buckets)}")
        self.model, self.mode = model, mode
        self.buckets = sorted(set(buckets))
        # every bucket is one more specialisation of the same code (`encode`, shared by every model instance in
        # the process); past dynamo's limit it would silently run eagerly, so each instance raises it by its own
        torch._dynamo.config.recompile_limit += len(self.buckets) + 1
        self._fn = torch.compile(model.encode, mode=mode, dynamic=False)
        self._primed = False

    @property
    def cuda_graphs(self) -> bool:
        return self.mode in ("reduce-overhead", "max-autotune") and self.model.clip.visual.proj.device.type == "cuda"

    def bucket(self, batch: int) -> int | None:
        """The bucket a batch of `batch` images runs in, or None when it is larger than all (eager)."""
        i = bisect.bisect_left(self.buckets, batch)
        return self.buckets[i] if i < len(self.buckets) else None

    def warm_up(self) -> None:
        """Compile (and capture) every bucket now: the first request must not pay for it."""
        p = self.model.clip.visual.proj
        s = self.model.image_size
        with torch.inference_mode():
            for b in self.buckets:
                for _ in range(3 if self.cuda_graphs else 1):  # CUDA graph trees: warm up, record, replay
                    self(torch.zeros(b, 3, s, s, device=p.device, dtype=p.dtype), adapt=self.model.trained)

    def __call__(self, images: torch.Tensor, adapt: bool = True) -> SowaFeatures:
        b = int(images.shape[0])
        bucket = self.bucket(b)
        if bucket is None:
            return self.model.encode(images, adapt=adapt)
        if not self._primed:
            # one eager pass first fills the inference caches (the position bias): traced empty, they would
            # make the first graph recompile on its second call
            self.model.encode(images[:1], adapt=adapt)
            self._primed = True
        if bucket > b:
            images = torch.cat([images, images.new_zeros(bucket - b, *images.shape[1:])])
        elif torch.is_inference_mode_enabled() and not images.is_inference():
            # dynamo guards on inference-ness: a tensor made outside inference mode (the engine's input) would
            # compile a second graph per bucket beside the warm-up's; a copy of the input costs far less
            images = images.clone()
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        f = self._fn(images, adapt=adapt)
        raw = f.raw[:b].clone() if self.cuda_graphs else f.raw[:b]
        return dataclasses.replace(f, image_embeds=f.image_embeds[:b], raw=raw,
                                   adapted=None if f.adapted is None else f.adapted[:b])
