"""SowaLitModule: the LightningModule around `model.sowa.SowaModel` (which stays pure torch).

A training step is the reference recipe (SOWA_SPEC.md §7): the SOWA loss (training/losses.py) on the model's
differentiable outputs, AdamW over the adapters, prompt contexts and fusion linear, and ReduceLROnPlateau on each
epoch's mean loss. Validation scores the same forward pass: the image score is the text anomaly probability, the
pixel map the filtered zero-shot map (model/maps.py); image accuracy (score > 0.5), image AUROC and pixel AUROC
are computed over the whole validation set (gathered from every rank) with training/metrics.

Checkpoints leave the frozen CLIP out (it is rebuilt from the config and its weight source, as the bundle does),
so a ViT-L checkpoint is megabytes, not gigabytes.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.factory import build_model
from model.maps import zero_shot_map
from model.sowa import TrainOutput

from .losses import sowa_loss
from .metrics import auroc

__all__ = ["METRICS", "SowaLitModule"]

# what a run logs, so what monitor.metric may name (val/* only when validating)
METRICS = ("train/loss", "train/loss_epoch", "train/ce", "train/focal", "train/dice", "val/loss",
           "val/image_accuracy", "val/image_auroc", "val/pixel_auroc")

_BACKBONE = "model.clip."


class SowaLitModule(L.LightningModule):
    def __init__(self, model_cfg: ModelConfig, pretrained: str, seed: int, optimizer: dict[str, Any],
                 scheduler: dict[str, Any], compile: bool = False, map_size: int = 64) -> None:
        super().__init__()
        self.model = build_model(model_cfg, pretrained, seed, trained=True)
        self.model.clip.requires_grad_(False)  # frozen backbone, also the aliased attention weights of the adapters
        self.model.train()  # SowaModel starts in eval mode; Lightning keeps the modes it finds (adapter dropout on)
        self.optim_cfg, self.sched_cfg, self.map_size = dict(optimizer), dict(scheduler), int(map_size)
        self.strict_loading = False  # checkpoints hold no backbone: on_load_checkpoint checks the rest
        # the compiled callable is not a submodule: parameters and state_dict keys stay the model's own
        object.__setattr__(self, "_forward", torch.compile(self.model) if compile else self.model)
        self._val: list[tuple[torch.Tensor, ...]] = []

    # -- passes ------------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, class_ids: torch.Tensor | None = None) -> TrainOutput:
        """Each image against its own class's prompt context (class_ids (B,); None: prompt class 0)."""
        return self._forward(images, class_ids)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        images, masks, labels, class_ids = batch
        terms = sowa_loss(self(images, class_ids), masks, labels)
        b = images.shape[0]
        # a step's terms only where the loggers write them (every log_every_n_steps) or a bar shows them: each
        # self.log costs host time, a few % of a small model's step
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0 or self.trainer.progress_bar_callback:
            self.log_dict({"train/loss": terms.total, "train/ce": terms.ce, "train/focal": terms.focal,
                           "train/dice": terms.dice}, on_step=True, on_epoch=False, batch_size=b)
        self.log("train/loss_epoch", terms.total, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True,
                 batch_size=b)
        return terms.total

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        images, masks, labels, class_ids = batch
        out = self(images, class_ids)
        terms = sowa_loss(out, masks, labels)
        self.log("val/loss", terms.total, on_step=False, on_epoch=True, sync_dist=True, batch_size=images.shape[0])
        maps = zero_shot_map(out.patch_logits.float(), self.model.image_size, self.model.cfg.sigma)
        small = (self.map_size, self.map_size)
        maps = F.interpolate(maps[:, None], size=small, mode="bilinear", align_corners=False)[:, 0]
        masks = F.interpolate(masks[:, None].float(), size=small, mode="nearest")[:, 0]
        self._val.append((out.text_probs[:, 1].float(), labels, maps, masks))

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        scores, labels, maps, masks = (torch.cat(t) for t in zip(*self._val, strict=True))
        self._val = []
        if self.trainer.world_size > 1:  # every rank's share (DistributedSampler pads it to the same size)
            scores, labels, maps, masks = (self.all_gather(t).flatten(0, 1) for t in (scores, labels, maps, masks))
        s, y = scores.cpu().numpy(), labels.cpu().numpy()
        metrics = {"val/image_accuracy": float(np.mean((s > 0.5) == (y > 0))), "val/image_auroc": auroc(y, s),
                   "val/pixel_auroc": auroc(masks.cpu().numpy() > 0.5, maps.cpu().numpy())}
        self.log_dict(metrics, prog_bar=True)  # the same numbers on every rank

    # -- optimisation --------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim_cfg
        optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=o["lr"], weight_decay=o["weight_decay"],
                                      betas=tuple(o["betas"]), eps=o["eps"])
        # stepped per epoch on the epoch's mean loss; a no-op at the reference's single epoch (§7.2)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=self.sched_cfg["factor"],
                                                               patience=self.sched_cfg["patience"])
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "train/loss_epoch", "interval": "epoch"}}

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(_BACKBONE)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        own = {k: v for k, v in self.state_dict().items() if not k.startswith(_BACKBONE)}
        theirs = checkpoint["state_dict"]
        missing = sorted(set(own) - set(theirs))
        differ = sorted(k for k in set(own) & set(theirs) if own[k].shape != theirs[k].shape)
        if missing or differ:
            k = (missing or differ)[0]
            what = "lacks" if missing else f"has {tuple(theirs[k].shape)}, not {tuple(own[k].shape)}, for"
            raise ValueError(f"checkpoint {what} this model's tensor {k}: it was made with another model config")

    def sowa_weights(self) -> dict[str, torch.Tensor]:
        """The weights a bundle's sowa.safetensors holds (every tensor but the backbone)."""
        return self.model.sowa_state_dict()
