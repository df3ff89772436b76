"""A short Lightning training run of SowaLitModule, eager and torch.compile'd, at a given precision: one JSON line.

The GPU check's training step (scripts/gpu_check.sh): bf16-mixed autocast and compile on CUDA, where neither
can be tested on the development machines. Random-weight backbone, random images with square masks in memory
(no data files), no logger, checkpoint or validation: only training steps are timed. A step's time is the
interval between two step ends after `--warmup` steps (the first compiled steps include compiling); the line
gives both modes' steps/s, the first step's time and whether every loss stayed finite. Needs only lightning
(which the GPU image has), not Hydra.

    python3 scripts/gpu_train_step.py --arch ViT-B-16 --device cuda --precision bf16-mixed --compile
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.factory import build_config
from training.lit_module import SowaLitModule


class _Steps(L.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: object, *a: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # time the device's work, not the host's queueing
        self.ends.append(time.perf_counter())
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def _data(size: int, n: int, seed: int) -> TensorDataset:
    """n random images; every odd one anomalous with a square mask a quarter of the side wide."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    masks = torch.zeros(n, size, size)
    for i in range(1, n, 2):
        y, x = torch.randint(0, size * 3 // 4, (2,), generator=g).tolist()
        masks[i, y:y + size // 4, x:x + size // 4] = 1
    labels = torch.arange(n) % 2
    return TensorDataset(images, masks, labels, torch.zeros(n, dtype=torch.long))


def run(arch: str, device: str, precision: str, compile_: bool, steps: int, batch: int, warmup: int) -> dict:
    cfg = build_config(arch, "none")
    module = SowaLitModule(cfg, "none", 0, {"lr": 1e-3, "weight_decay": 0.2, "betas": [0.9, 0.999], "eps": 1e-8},
                           {"factor": 0.1, "patience": 5}, compile=compile_)
    loader = DataLoader(_data(cfg.backbone.image_size, batch * 4, 0), batch_size=batch, shuffle=True)
    timer = _Steps()
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
                        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer])
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    gaps = [b - a for a, b in itertools.pairwise(timer.ends[warmup:])]
    return {"compile": compile_, "steps": len(timer.ends), "steps_per_s": round(1 / statistics.median(gaps), 3),
            "first_step_s": round(timer.ends[0] - started, 2),
            "losses_finite": all(math.isfinite(x) for x in timer.losses),
            "first_loss": round(timer.losses[0], 4), "last_loss": round(timer.losses[-1], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B-16")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--compile", action="store_true", help="also run the torch.compile'd module")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args()
    modes = [False, True] if a.compile else [False]
    rows = [run(a.arch, a.device, a.precision, c, a.steps, a.batch, a.warmup) for c in modes]
    print(json.dumps({"probe": "train", "arch": a.arch, "device": a.device, "precision": a.precision,
                      "batch": a.batch, "lightning": L.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
