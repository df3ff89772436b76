"""What `sowa train` feeds the network: labelled images with masks, in a seeded order that resumes exactly.

The reference trains on a dataset's *test* split (the one with anomalies and masks) of another domain than the
one it is evaluated on (SOWA_SPEC.md §7.3); masks are binarised > 0 for training (§7.4).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .datasets import DatasetError, Item, list_items, load_sample

__all__ = ["TrainSet", "dataset_digest", "epoch_order"]

TRAIN_MASK_THRESHOLD = 0.0  # > 0 in training, > 0.5 at test time


class TrainSet(Dataset):
    """Items of one split as (image (3, S, S), mask (S, S) float {0, 1}, label ()) tensors."""

    def __init__(self, root: str | Path, split: str, image_size: int) -> None:
        self.root = Path(root)
        self.items: list[Item] = list_items(self.root, split)
        if not self.items:
            raise DatasetError(f"{root}: the '{split}' split has no images to train on")
        self.split, self.image_size = split, image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = load_sample(self.items[index], self.image_size, TRAIN_MASK_THRESHOLD)
        return s.image, s.mask.float(), torch.tensor(s.item.anomaly, dtype=torch.long)

    def summary(self) -> dict[str, int]:
        return {"images": len(self.items), "anomalous": sum(i.anomaly for i in self.items),
                "classes": len({i.cls_name for i in self.items})}


def dataset_digest(items: Sequence[Item], root: Path) -> str:
    """sha256 of the item listing (relative paths, labels, file sizes): names the data a bundle was trained on."""
    rows = []
    for i in items:
        rows.append([str(i.image.relative_to(root)), i.image.stat().st_size, i.anomaly, i.cls_name,
                     str(i.mask.relative_to(root)) if i.mask else ""])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
    """This rank's share of epoch `epoch`'s shuffled order of n items.

    The permutation depends only on (seed, epoch), so a resumed run sees the same batches; like
    DistributedSampler the order is padded by wrapping around so every rank gets the same number of steps.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    per_rank = -(-n // world)
    order += order[: per_rank * world - n]
    return order[rank::world]
