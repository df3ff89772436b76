"""`sowa train`: the reference recipe (SOWA_SPEC.md §7) as a resumable, seeded loop that also runs under torchrun.

Only the adapters, prompt contexts and fusion linear learn; CLIP is frozen, so the backward pass stops at the
tapped tokens and never enters the backbone. Under torchrun each process takes every world-size-th item of the
epoch's shuffled order and DDP averages the gradients, so the global batch is `batch_size * world_size`.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from model.bundle import BundleInfo, check_output_dir, save_bundle
from model.factory import build_config, build_model
from model.provenance import provenance_base
from model.sowa import SowaModel

from .checkpoints import clear_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import World, all_reduce_mean, barrier, setup_world, teardown_world
from .losses import sowa_loss
from .train_data import TrainSet, dataset_digest, epoch_order, rank_share

__all__ = ["TrainOptions", "train"]

_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainOptions:
    """Everything that defines a run; the defaults are the reference recipe (one epoch, batch 8, AdamW)."""

    data: Path
    out: Path
    arch: str = "ViT-L-14-336"
    pretrained: str = "openai"
    split: str = "test"  # the reference trains on the labelled test split of another domain (§7.3)
    epochs: int = 1
    max_steps: int | None = None
    max_minutes: float | None = None
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.2
    seed: int = 2025
    device: str = "auto"
    precision: str = "auto"
    workers: int = 0
    taps: tuple[int, ...] | None = None
    window_size: int | None = None
    attn_drop: float | None = None  # adapter attention dropout; None keeps the reference's 0.1
    mosaic_rate: float = 0.0  # the reference uses 0.2 when training on MVTec (for VisA), 0 otherwise
    augment: bool = False  # flips, quarter turns, colour changes: not in the reference recipe
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 200
    log_every: int = 10
    resume: bool = False
    force: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"--max-steps must be >= 0, got {self.max_steps}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"--max-minutes must be > 0, got {self.max_minutes}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"need --lr > 0 and --weight-decay >= 0, got {self.lr} and {self.weight_decay}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(_PRECISIONS)}, got {self.precision!r}")
        if self.workers < 0 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("--workers must be >= 0, --checkpoint-every and --log-every >= 1")

    @property
    def checkpoints(self) -> Path:
        return self.checkpoint_dir or self.out.with_name(self.out.name + ".checkpoints")

    def run_identity(self, world: World) -> dict[str, Any]:
        """The settings a resumed run must share with the checkpoint it continues."""
        return {"data": str(self.data.resolve()), "split": self.split, "arch": self.arch, "pretrained":
                self.pretrained, "batch_size": self.batch_size, "lr": self.lr, "weight_decay": self.weight_decay,
                "seed": self.seed, "world_size": world.size, "taps": list(self.taps) if self.taps else None,
                "window_size": self.window_size, "attn_drop": self.attn_drop, "mosaic_rate": self.mosaic_rate,
                "augment": self.augment}


def _autocast(device: torch.device, precision: str) -> tuple[contextlib.AbstractContextManager, str]:
    """Mixed precision on CUDA (bf16 where supported); CPU trains in fp32, as the reference does everywhere."""
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), precision
    if device.type != "cuda":
        raise ValueError(f"--precision {precision} needs a CUDA device; train in fp32 on {device}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype), precision


def _step_seed(seed: int, step: int, rank: int) -> int:
    # dropout noise from (seed, step, rank) rather than a running RNG: a resumed run draws the same masks
    return (seed * 1_000_003 + step * 7_919 + rank) % (2**63)


class _Throughput:
    """Smoothed images/s and loss for the progress bar."""

    def __init__(self) -> None:
        self.loss: float | None = None
        self.rate: float | None = None

    def update(self, loss: float, images: int, seconds: float) -> None:
        a = 0.1
        self.loss = loss if self.loss is None else (1 - a) * self.loss + a * loss
        r = images / max(seconds, 1e-9)
        self.rate = r if self.rate is None else (1 - a) * self.rate + a * r


def train(opts: TrainOptions) -> BundleInfo | None:
    """Run training; returns the written bundle on the main process (None on the other ranks)."""
    opts.validate()
    world = setup_world(opts.device)
    try:
        return _train(opts, world)
    finally:
        teardown_world(world)


def _train(opts: TrainOptions, world: World) -> BundleInfo | None:
    started = time.monotonic()
    if world.is_main:
        check_output_dir(opts.out, opts.force or opts.resume)
    parts = _build(opts, world)
    loop = _Loop(opts, world, parts, started)
    loop.run()
    barrier(world)
    if not world.is_main:
        return None
    model = parts.model
    model.eval()
    model.refresh_text()
    data = parts.data
    prov = {**provenance_base("train"), "arch": opts.arch, "pretrained": opts.pretrained, "data": {
        "path": str(opts.data.resolve()), "split": opts.split, "sha256": dataset_digest(data.items, data.root),
        **parts.summary}, "steps": loop.step, "epochs_completed": loop.epoch, "stopped_by": loop.stopped,
        "resumed_from_step": loop.resumed_from, "seed": opts.seed, "batch_size": opts.batch_size,
        "world_size": world.size, "global_batch_size": opts.batch_size * world.size, "lr": opts.lr,
        "weight_decay": opts.weight_decay, "precision": parts.precision, "device": str(world.device),
        "final_loss": loop.terms or None, "epoch_losses": loop.epoch_losses,
        "elapsed_s": round(time.monotonic() - started, 1),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}}
    return save_bundle(model, opts.out, prov)


@dataclass
class _Parts:
    """What a run trains with: the data, the model (and its DDP wrapper), the optimiser and precision."""

    data: TrainSet
    summary: dict[str, Any]
    model: SowaModel
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    autocast: contextlib.AbstractContextManager
    precision: str


def _build(opts: TrainOptions, world: World) -> _Parts:
    cfg = build_config(opts.arch, opts.pretrained, list(opts.taps) if opts.taps else None, opts.window_size)
    if opts.attn_drop is not None:
        cfg = replace(cfg, adapter=replace(cfg.adapter, attn_drop=opts.attn_drop))
    data = TrainSet(opts.data, opts.split, cfg.backbone.image_size, opts.mosaic_rate, opts.seed, opts.augment)
    summary = data.summary()
    unmasked = summary["anomalous_without_mask"]
    if unmasked and world.is_main:  # the reference does the same, silently: say it
        print(f"sowa train: warning: {unmasked} anomalous image(s) in {opts.data} have no mask; their pixel maps are "
              "trained as all-normal (the reference's behaviour)", file=sys.stderr)
    model = build_model(cfg, opts.pretrained, opts.seed, trained=True)
    model.clip.requires_grad_(False)  # frozen backbone, also the aliased attention weights inside the adapters
    model.to(world.device).train()
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    # stepped per epoch on the epoch's mean loss; a no-op at the reference's single epoch (§7.2)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=5)
    autocast, precision = _autocast(world.device, opts.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    net: torch.nn.Module = model
    if world.distributed:
        net = DistributedDataParallel(model, device_ids=[world.device] if world.device.type == "cuda" else None)
    return _Parts(data, summary, model, net, optimizer, scheduler, scaler, autocast, precision)


class _Loop:
    """The training loop's state, and what a step, a log line, a checkpoint and an epoch end do with it.

    Per-step loss terms stay on the device until a log line, checkpoint or epoch end needs them: reading them
    every step would make the host wait for the device each step and stop it from queueing the next one.
    """

    def __init__(self, opts: TrainOptions, world: World, parts: _Parts, started: float) -> None:
        self.opts, self.world, self.parts, self.started = opts, world, parts, started
        self.steps_per_epoch = math.ceil(rank_share(len(parts.data), world.size) / opts.batch_size)
        self.total = opts.epochs * self.steps_per_epoch
        if opts.max_steps is not None:
            self.total = min(self.total, opts.max_steps)
        self.identity = opts.run_identity(world)
        self.step, self.epoch, self.resumed_from = 0, 0, None
        self.epoch_losses: list[float] = []
        self.acc = {"sum": 0.0, "count": 0}  # this epoch's running loss, kept in checkpoints for the scheduler
        self.pending: list[tuple[torch.Tensor, int]] = []  # (reduced loss terms, images) per step since a sync
        self.terms: dict[str, float] = {}  # the last synced step's terms
        self.synced_at = time.monotonic()
        self.meter, self.stopped = _Throughput(), "steps"
        self.log = opts.checkpoints / "train_log.jsonl"
        self.deadline = started + opts.max_minutes * 60 if opts.max_minutes else None
        self._resume_or_start()
        self.bar = tqdm(total=self.total, initial=min(self.step, self.total),
                        disable=not (world.is_main and opts.progress), unit="step", desc="train", dynamic_ncols=True)

    def _resume_or_start(self) -> None:
        opts, world, p = self.opts, self.world, self.parts
        ckpt = latest_checkpoint(opts.checkpoints) if opts.resume else None
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.identity)
            p.model.load_state_dict(state["model"], strict=False)
            p.optimizer.load_state_dict(state["optimizer"])
            p.scheduler.load_state_dict(state["scheduler"])
            if "scaler" in state:
                p.scaler.load_state_dict(state["scaler"])
            self.step, self.epoch, self.epoch_losses = state["step"], state["epoch"], list(state["epoch_losses"])
            self.acc = {"sum": float(state["epoch_loss_sum"]), "count": int(state["epoch_loss_count"])}
            self.resumed_from = self.step
        elif opts.resume and world.is_main:
            print(f"sowa train: no checkpoint in {opts.checkpoints}; starting from scratch")
        if world.is_main:
            opts.checkpoints.mkdir(parents=True, exist_ok=True)
            if ckpt is None:  # a fresh run: an earlier run's checkpoints must not be resumed into this one's log
                clear_checkpoints(opts.checkpoints, also=(self.log.name,))
        barrier(world)  # no rank may checkpoint before the clearing is done

    def sync_losses(self) -> None:
        if not self.pending:
            return
        rows = torch.stack([t for t, _ in self.pending]).tolist()  # the one wait for the device
        now = time.monotonic()
        for row in rows:  # added in step order: the same epoch sums as reading them one by one
            self.acc["sum"] += row[0]
            self.acc["count"] += 1
        self.terms = dict(zip(("total", "ce", "focal", "dice"), rows[-1], strict=True))
        self.meter.update(rows[-1][0], sum(n for _, n in self.pending), now - self.synced_at)
        self.synced_at = now
        self.pending.clear()
        self.bar.set_postfix(loss=f"{self.meter.loss:.4f}", img_s=f"{self.meter.rate:.1f}", epoch=self.epoch)

    def checkpoint(self) -> None:
        self.sync_losses()
        if self.world.is_main:
            p = self.parts
            save_checkpoint(self.opts.checkpoints, self.step, {
                "run": self.identity, "step": self.step, "epoch": self.epoch, "epoch_losses": self.epoch_losses,
                "epoch_loss_sum": self.acc["sum"], "epoch_loss_count": self.acc["count"],
                "model": p.model.sowa_state_dict(), "optimizer": p.optimizer.state_dict(),
                "scheduler": p.scheduler.state_dict(), "scaler": p.scaler.state_dict()})

    def run(self) -> None:
        while self.step < self.total and self.epoch < self.opts.epochs:
            self._run_epoch()
            if self.stopped == "time limit":
                break
            self.sync_losses()
            if self.step - self.epoch * self.steps_per_epoch >= self.steps_per_epoch:  # a whole epoch is behind us
                epoch_mean = self.acc["sum"] / max(self.acc["count"], 1)  # already a mean over ranks, step by step
                self.epoch_losses.append(epoch_mean)
                self.parts.scheduler.step(epoch_mean)
                self.epoch += 1
                self.acc = {"sum": 0.0, "count": 0}
        self.bar.close()
        self.checkpoint()

    def _run_epoch(self) -> None:
        opts, world, data = self.opts, self.world, self.parts.data
        order = epoch_order(len(data), opts.seed, self.epoch, world.rank, world.size)
        data.set_epoch(self.epoch)  # before the loader forks its workers, which copy the dataset
        done_in_epoch = self.step - self.epoch * self.steps_per_epoch
        loader = DataLoader(Subset(data, order[done_in_epoch * opts.batch_size:]), batch_size=opts.batch_size,
                            num_workers=opts.workers, pin_memory=world.device.type == "cuda")
        for images, masks, labels in loader:
            self._step(images, masks, labels)
            if self.step % opts.log_every == 0:
                self._log_line()
            if self.step % opts.checkpoint_every == 0:
                self.checkpoint()
            if self.step >= self.total or self.stopped == "time limit":
                break

    def _step(self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> None:
        world, p = self.world, self.parts
        torch.manual_seed(_step_seed(self.opts.seed, self.step, world.rank))
        images = images.to(world.device, non_blocking=True)
        masks = masks.to(world.device, non_blocking=True)
        labels = labels.to(world.device, non_blocking=True)
        with p.autocast:
            out = p.net(images)
        terms = sowa_loss(out, masks, labels)
        p.optimizer.zero_grad(set_to_none=True)
        p.scaler.scale(terms.total).backward()
        p.scaler.step(p.optimizer)
        p.scaler.update()
        self.step += 1
        terms_now = torch.stack([terms.total, terms.ce, terms.focal, terms.dice]).detach()
        self.pending.append((all_reduce_mean(world, terms_now), images.shape[0] * world.size))
        self.bar.update(1)

    def _log_line(self) -> None:
        self.sync_losses()
        if self.world.is_main:
            with self.log.open("a") as f:
                f.write(json.dumps({"step": self.step, "epoch": self.epoch, **self.terms, "lr": self.parts.optimizer
                                    .param_groups[0]["lr"], "images_per_s": self.meter.rate,
                                    "elapsed_s": time.monotonic() - self.started}) + "\n")
        # the time limit is checked where the host waits anyway (on every rank at the same steps)
        late = self.deadline is not None and time.monotonic() > self.deadline
        if self.deadline is not None and self.step < self.total and _agree(self.world, late):
            self.stopped = "time limit"


def _agree(world: World, flag: bool) -> bool:
    """Whether any rank says yes: every rank must leave the loop at the same step, or DDP would hang."""
    if not world.distributed:
        return flag
    t = torch.tensor(float(flag), device=world.device)
    return bool(all_reduce_mean(world, t).item() > 0)

