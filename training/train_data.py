"""What `sowa train` feeds the network: labelled images with masks (training/data_module.py batches them).

The reference trains on a dataset's *test* split (the one with anomalies and masks) of another domain than the
one it is evaluated on (SOWA_SPEC.md §7.3); masks are binarised > 0 for training (§7.4).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .datasets import DatasetError, Item, list_items, load_raw, transform

__all__ = ["TrainSet", "augment", "dataset_digest"]

TRAIN_MASK_THRESHOLD = 0.0  # > 0 in training, > 0.5 at test time


class TrainSet(Dataset):
    """Items of one split as (image (3, S, S), mask (S, S) float {0, 1}, label ()) tensors.

    With `mosaic_rate` > 0 an access becomes, with that probability, a 2x2 mosaic of four images of the item's
    class drawn at random (the reference's augmentation when training on MVTec, rate 0.2): each tile lands at
    half resolution. As in the reference the label stays the item's own. Draws depend on (seed, epoch, index)
    only, so resumed and multi-process runs see the same mosaics.
    """

    def __init__(self, root: str | Path, split: str, image_size: int, mosaic_rate: float = 0.0, seed: int = 0,
                 augment: bool = False) -> None:
        self.root = Path(root)
        self.items: list[Item] = list_items(self.root, split)
        if not self.items:
            raise DatasetError(f"{root}: the '{split}' split has no images to train on")
        if not 0.0 <= mosaic_rate <= 1.0:
            raise ValueError(f"mosaic rate must be in [0, 1], got {mosaic_rate}")
        self.split, self.image_size, self.mosaic_rate, self.seed = split, image_size, mosaic_rate, seed
        self.augment = augment
        self.epoch = 0
        self._by_class: dict[str, list[int]] = {}
        for i, item in enumerate(self.items):
            self._by_class.setdefault(item.cls_name, []).append(i)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        item = self.items[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        if self.mosaic_rate > 0 and rng.random() < self.mosaic_rate:
            img, mask = self._mosaic(self._by_class[item.cls_name], rng)
        else:
            img, mask = load_raw(item)
        if self.augment:
            img, mask = augment(img, mask, rng)
        image, m = transform(img, mask, self.image_size, TRAIN_MASK_THRESHOLD)
        return image, m.float(), torch.tensor(item.anomaly, dtype=torch.long)

    def _mosaic(self, pool: list[int], rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
        tiles = [load_raw(self.items[int(j)]) for j in rng.choice(pool, size=4, replace=True)]
        w, h = tiles[0][0].size  # the reference's classes have one image size; others are fitted to the first
        canvas = Image.new("RGB", (2 * w, 2 * h))
        mask = np.zeros((2 * h, 2 * w), dtype=bool)
        for k, (img, m) in enumerate(tiles):  # top-left, top-right, bottom-left, bottom-right
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BICUBIC)
                m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 0
            x, y = (k % 2) * w, (k // 2) * h
            canvas.paste(img, (x, y))
            mask[y:y + h, x:x + w] = m
        return canvas, mask

    def summary(self) -> dict[str, int]:
        return {"images": len(self.items), "anomalous": sum(i.anomaly for i in self.items),
                "anomalous_without_mask": sum(1 for i in self.items if i.anomaly and i.mask is None),
                "classes": len({i.cls_name for i in self.items})}


def augment(img: Image.Image, mask: np.ndarray, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """Not in the reference recipe (opt-in): flips, quarter turns and a hue/saturation/brightness change, so the
    zero-shot head learns defects rather than the training products' colours and orientations."""
    a = np.asarray(img)
    k = int(rng.integers(4))
    flip = bool(rng.random() < 0.5)
    a, mask = np.rot90(a, k), np.rot90(mask, k)
    if flip:
        a, mask = a[:, ::-1], mask[:, ::-1]
    hsv = np.asarray(Image.fromarray(np.ascontiguousarray(a)).convert("HSV")).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(0, 256)) % 256
    hsv[..., 1] *= rng.uniform(0.6, 1.4)
    hsv[..., 2] *= rng.uniform(0.75, 1.25)
    out = Image.fromarray(np.clip(hsv, 0, 255).astype(np.uint8), "HSV").convert("RGB")
    return out, np.ascontiguousarray(mask)


def dataset_digest(items: Sequence[Item], root: Path) -> str:
    """sha256 of the item listing (relative paths, labels, file sizes): names the data a bundle was trained on."""
    rows = []
    for i in items:
        rows.append([str(i.image.relative_to(root)), i.image.stat().st_size, i.anomaly, i.cls_name,
                     str(i.mask.relative_to(root)) if i.mask else ""])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()
