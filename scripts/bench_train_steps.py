"""Training steps/s before and after the move to Lightning, in one run: docs/benchmarks.md's training figures.

BEFORE is the hand-written loop of `training/train.py` at `--before-rev` (git show; its package is extracted
from git into a temporary folder and imported as `training_before`, on today's `model/`), AFTER is `sowa train`'s
Lightning run (training/train.py). Both train the same model on the same toy data (MVTec layout, written here),
batch 8, on the CPU, without progress bars; AFTER keeps its default checkpoint callbacks and the csv logger,
without validation (the loop had none). A step's time is the interval between two step ends, over steps
`--warmup`+1..`--steps` (data loading, logging and checkpointing included); a run's figure is 1 / its shortest
step (other work on a shared machine only adds time); runs alternate BEFORE, AFTER, `--repeats` times, and the
best run of each is compared (the ratio of the medians is in the JSON too).

    python3 scripts/bench_train_steps.py --configs tiny vit_b16 --steps 12 --repeats 3
"""

from __future__ import annotations

import argparse
import importlib
import io
import itertools
import json
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEP_ENDS: list[float] = []  # filled by StepTimer / the wrapped legacy step

# our name -> (model preset, the legacy loop's --arch)
CONFIGS = {"tiny": ("tiny", "sowa-tiny"), "vit_b16": ("vit_b16", "ViT-B-16")}


class StepTimer(L.Callback):
    """Records when each training step ends (instantiated by Hydra from `+callbacks.step_timer`)."""

    def on_train_batch_end(self, *args: object, **kwargs: object) -> None:
        STEP_ENDS.append(time.perf_counter())


def write_toy(root: Path, n: int = 48) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        kind = "good" if i % 3 == 0 else "square"
        img = (rng.normal(0.5, 0.05, (64, 64, 3)) * 255).clip(0, 255).astype(np.uint8)
        (root / "c" / "test" / kind).mkdir(parents=True, exist_ok=True)
        if kind != "good":
            x, y = rng.integers(4, 44, 2)
            img[y:y + 14, x:x + 14] = [240, 30, 30]
            mask = np.zeros((64, 64), np.uint8)
            mask[y:y + 14, x:x + 14] = 255
            (root / "c" / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "c" / "ground_truth" / kind / f"{i:03d}_mask.png")
        Image.fromarray(img).save(root / "c" / "test" / kind / f"{i:03d}.png")
    return root


def load_before(rev: str, into: Path):
    """`training/` at `rev` as the package `training_before` (relative imports stay inside it)."""
    archive = subprocess.run(["git", "archive", rev, "training"], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "training").rename(into / "training_before")
    sys.path.insert(0, str(into))
    return importlib.import_module("training_before.train")


def steps_per_s(ends: list[float], warmup: int) -> float:
    """1 / the shortest step time, as timeit takes the minimum: other work on a shared machine only ever adds
    time to a step, so the fastest step of a run is the closest to its own cost."""
    t = ends[warmup:]
    return 1.0 / min(b - a for a, b in itertools.pairwise(t))


def run_before(legacy, data: Path, work: Path, name: str, steps: int, warmup: int) -> float:
    _, arch = CONFIGS[name]
    loop = legacy._Loop
    original = loop._step

    def timed(self, *a, **kw):
        original(self, *a, **kw)
        STEP_ENDS.append(time.perf_counter())

    STEP_ENDS.clear()
    loop._step = timed
    try:
        legacy.train(legacy.TrainOptions(data=data, out=work / "before", arch=arch, pretrained="none", epochs=1000,
                                         max_steps=steps, batch_size=8, device="cpu", progress=False, force=True))
    finally:
        loop._step = original
    return steps_per_s(STEP_ENDS, warmup)


def run_after(data: Path, work: Path, name: str, steps: int, warmup: int) -> float:
    from training.run_config import compose_config
    from training.train import train

    preset, _ = CONFIGS[name]
    cfg = compose_config("train", [
        f"model={preset}", "model.backbone.weights=none", f"data.root={data}", "data.batch_size=8",
        "validation.enabled=false", "monitor.metric=train/loss_epoch", "monitor.mode=min", f"trainer.max_steps={steps}",
        "trainer.max_epochs=-1", "trainer.accelerator=cpu", "callbacks.rich_progress_bar=null",
        "callbacks.model_summary=null", "+callbacks.step_timer._target_=__main__.StepTimer", "logger=csv",
        f"run_dir={work / 'after'}", "force=true"])
    STEP_ENDS.clear()
    train(cfg)
    return steps_per_s(STEP_ENDS, warmup)


def lightning_overhead(steps: int = 300) -> dict[str, float]:
    """Lightning's own host time per step: a 4->1 linear model stepped by a plain loop, by a Trainer, and by a
    Trainer whose step logs five metrics; shortest step in ms."""
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(L.LightningModule):
        def __init__(self, logs: bool) -> None:
            super().__init__()
            self.lin, self.logs = torch.nn.Linear(4, 1), logs

        def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
            loss = self.lin(batch[0]).mean()
            if self.logs:
                self.log_dict({"a": loss, "b": loss, "c": loss, "d": loss})
                self.log("e", loss, on_step=False, on_epoch=True, sync_dist=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters())

    data = TensorDataset(torch.randn(steps * 8, 4))
    out = {}
    for name, logs in (("trainer_ms", False), ("trainer_5_logs_ms", True)):
        STEP_ENDS.clear()
        L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[StepTimer()]).fit(
            Tiny(logs), DataLoader(data, batch_size=8))
        out[name] = 1e3 / steps_per_s(STEP_ENDS, 10)
    lin = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(lin.parameters())
    STEP_ENDS.clear()
    for (x,) in DataLoader(data, batch_size=8):
        opt.zero_grad()
        lin(x).mean().backward()
        opt.step()
        STEP_ENDS.append(time.perf_counter())
    out["plain_loop_ms"] = 1e3 / steps_per_s(STEP_ENDS, 10)
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--before-rev", default="f38cb00", help="the commit whose training/train.py is BEFORE")
    p.add_argument("--json", type=Path)
    p.add_argument("--overhead", action="store_true", help="also Lightning's own host time per step (ms)")
    args = p.parse_args()
    overhead = lightning_overhead() if args.overhead else None
    if overhead:
        print(f"per-step host time, shortest step: {overhead}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        legacy = load_before(args.before_rev, work / "src")
        data = write_toy(work / "data")
        results = {}
        for name in args.configs:
            before, after = [], []
            for _ in range(args.repeats):
                before.append(run_before(legacy, data, work, name, args.steps, args.warmup))
                after.append(run_after(data, work, name, args.steps, args.warmup))
            b, a = max(before), max(after)
            mb, ma = statistics.median(before), statistics.median(after)
            results[name] = {"before_steps_s": b, "after_steps_s": a, "ratio": a / b, "median_ratio": ma / mb,
                             "before_runs": before, "after_runs": after}
            print(f"{name:8s} before {b:7.3f} steps/s  after {a:7.3f} steps/s  after/before {a / b:.3f}  "
                  f"(runs: {[round(x, 3) for x in before]} / {[round(x, 3) for x in after]})", flush=True)
    info = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
            "torch": torch.__version__, "lightning": L.__version__, "steps": args.steps, "warmup": args.warmup,
            "repeats": args.repeats, "batch_size": 8, "lightning_overhead": overhead, "results": results}
    if args.json:
        args.json.write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
