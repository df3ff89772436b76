"""SowaDataModule: the `data:` config as Lightning loaders of (image, mask, label, class id) batches.

Training reads `data.root`'s `data.split` (the labelled split, as the reference trains across domains); validation
reads `data.val_root`'s `data.val_split` without mosaic or augmentation. The class id of an item is its class's
prompt context (`PromptConfig.class_index`: its position in `class_names`, else 0, as the research code does).
Under DDP Lightning shards both loaders with a DistributedSampler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from model.config import PromptConfig

from .train_data import TrainSet

__all__ = ["ClassIdSet", "SowaDataModule"]


class ClassIdSet(Dataset):
    """A TrainSet whose items also carry their prompt class id: (image, mask, label, class id)."""

    def __init__(self, data: TrainSet, prompt: PromptConfig) -> None:
        self.data = data
        self.class_ids = [prompt.class_index(item.cls_name) for item in data.items]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        image, mask, label = self.data[index]
        return image, mask, label, torch.tensor(self.class_ids[index], dtype=torch.long)


class SowaDataModule(L.LightningDataModule):
    def __init__(self, data: dict[str, Any], image_size: int, prompt: PromptConfig, seed: int,
                 validate: bool = True) -> None:
        super().__init__()
        self.cfg, self.image_size, self.prompt, self.seed, self.validate = data, image_size, prompt, seed, validate
        self.train_set = TrainSet(Path(data["root"]), data["split"], image_size, float(data["mosaic_rate"]), seed,
                                  bool(data["augment"]))
        self.val_set: TrainSet | None = None
        if validate:
            self.val_set = TrainSet(Path(data["val_root"]), data["val_split"], image_size, 0.0, seed, False)

    def set_epoch(self, epoch: int) -> None:
        """Mosaic draws depend on (seed, epoch, index); called before each epoch's loader starts its workers."""
        self.train_set.set_epoch(epoch)

    def _loader(self, data: TrainSet, batch_size: int, shuffle: bool) -> DataLoader:
        workers = int(self.cfg["workers"])
        return DataLoader(ClassIdSet(data, self.prompt), batch_size=batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
                          num_workers=workers, persistent_workers=False,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, int(self.cfg["batch_size"]), shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, int(self.cfg["val_batch_size"]), shuffle=False)
