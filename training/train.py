"""`sowa train`: a composed run config (training/run_config.py) -> a Lightning run -> a bundle from the best checkpoint.

Only the adapters, prompt contexts and fusion linear learn; CLIP is frozen, so the backward pass stops at the tapped
tokens and never enters the backbone. The run directory holds config.yaml (the resolved config), the checkpoints
(best-k by `monitor.metric` and last.ckpt) and the loggers' files. At the end rank 0 loads the best checkpoint
(by the monitored metric; the last weights when no checkpoint callback runs) and writes the bundle, whose
provenance records the resolved config, the checkpoint and its score.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from model.bundle import BundleInfo, check_output_dir, save_bundle
from model.provenance import provenance_base

from .data_module import SowaDataModule
from .lit_module import METRICS, SowaLitModule
from .run_config import RunConfigError, model_config, pretrained_source, to_yaml
from .train_data import dataset_digest

__all__ = ["CONFIG_FILE", "build_module", "build_trainer", "train"]

CONFIG_FILE = "config.yaml"


def _precision(trainer_cfg: dict[str, Any]) -> str:
    """`auto`: bf16 autocast on CUDA (fp16 where bf16 is missing), fp32 on the CPU, as the reference trains."""
    p = str(trainer_cfg.get("precision", "auto"))
    if p != "auto":
        return p
    if trainer_cfg.get("accelerator") in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def build_module(cfg: DictConfig) -> SowaLitModule:
    """The LightningModule of `cfg.model` (a ModelConfig's dict form), seeded by `cfg.seed`."""
    return SowaLitModule(model_config(cfg.model), pretrained_source(cfg.model), int(cfg.seed),
                         OmegaConf.to_container(cfg.optimizer), OmegaConf.to_container(cfg.scheduler),
                         bool(cfg.compile), int(cfg.validation.map_size))


def _instantiate_all(node: DictConfig | None, what: str) -> list[Any]:
    out = []
    for name, spec in (node or {}).items():
        if spec is None:
            continue
        try:
            out.append(instantiate(spec))
        except Exception as e:  # Hydra wraps the target's own error; one line names the entry
            cause = e.__cause__ or e
            raise RunConfigError(f"{what}.{name}: {str(cause).splitlines()[0] if str(cause) else type(cause)}") \
                from None
    return out


def build_trainer(cfg: DictConfig) -> L.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer)
    kwargs["precision"] = _precision(kwargs)
    if cfg.monitor.metric not in METRICS or cfg.monitor.mode not in ("min", "max"):
        raise RunConfigError(f"monitor.metric must be one of {', '.join(METRICS)} and monitor.mode min or max, got "
                             f"{cfg.monitor.metric} and {cfg.monitor.mode}")
    if not cfg.validation.enabled:
        kwargs["limit_val_batches"] = 0
        if str(cfg.monitor.metric).startswith("val/"):
            raise RunConfigError(f"validation is off but monitor.metric is {cfg.monitor.metric}: "
                                 "add monitor.metric=train/loss_epoch monitor.mode=min")
    callbacks = _instantiate_all(cfg.callbacks, "callbacks")
    loggers = _instantiate_all(cfg.logger, "logger")
    if not loggers:  # the learning-rate monitor writes to the loggers; without one it has nothing to do
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    try:
        return L.Trainer(**kwargs, callbacks=callbacks, logger=loggers or False, default_root_dir=cfg.run_dir,
                         enable_progress_bar=any(type(c).__name__.endswith("ProgressBar") for c in callbacks),
                         enable_model_summary=any(type(c).__name__.endswith("ModelSummary") for c in callbacks))
    except (TypeError, ValueError) as e:  # Lightning's own checks of trainer.* values
        raise RunConfigError(f"trainer: {str(e).splitlines()[0]}") from None


def train(cfg: DictConfig) -> BundleInfo | None:
    """Run `cfg` (compose_config("train", ...)); returns the bundle on rank 0, None on the other ranks."""
    started = time.monotonic()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = build_module(cfg)
    data = SowaDataModule(OmegaConf.to_container(cfg.data), module.model.image_size, module.model.cfg.prompt,
                          int(cfg.seed), bool(cfg.validation.enabled))
    trainer = build_trainer(cfg)
    run_dir, out = Path(cfg.run_dir), Path(cfg.out)
    resume = None if cfg.ckpt_path is None else str(_checkpoint_file(cfg.ckpt_path, run_dir))
    if trainer.is_global_zero:
        check_output_dir(out, bool(cfg.force) or resume is not None)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))
        unmasked = data.train_set.summary()["anomalous_without_mask"]
        if unmasked:  # the reference does the same, silently: say it
            print(f"sowa train: warning: {unmasked} anomalous image(s) in {cfg.data.root} have no mask; their pixel "
                  "maps are trained as all-normal (the reference's behaviour)", file=sys.stderr)
    resumed_step = _checkpoint_step(resume)
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    agree = _ranks_agree(trainer, module)
    if not trainer.is_global_zero:
        return None
    best = _best_checkpoint(trainer)
    if best is not None:
        _load_weights(module, best)
    model = module.model
    model.eval()
    model.refresh_text()
    summary = data.train_set.summary()
    ckpt_cb = _monitoring_checkpoint(trainer)
    score = ckpt_cb.best_model_score if ckpt_cb is not None and best is not None else None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    prov = {**provenance_base("train"), "arch": cfg.model.backbone.arch, "pretrained": pretrained_source(cfg.model),
            "data": {"path": str(Path(cfg.data.root).resolve()), "split": cfg.data.split,
                     "sha256": dataset_digest(data.train_set.items, data.train_set.root), **summary},
            "steps": trainer.global_step, "epochs_completed": trainer.current_epoch, "stopped_by": _stopped_by(trainer),
            "resumed_from_step": resumed_step, "seed": int(cfg.seed), "batch_size": int(cfg.data.batch_size),
            "world_size": trainer.world_size, "global_batch_size": int(cfg.data.batch_size) * trainer.world_size,
            "lr": cfg.optimizer.lr, "weight_decay": cfg.optimizer.weight_decay, "precision": str(trainer.precision),
            "device": str(module.device), "ranks_agree": agree,
            "checkpoint": {"path": str(best) if best else None, "monitor": cfg.monitor.metric,
                           "score": None if score is None else float(score)},
            "final_metrics": metrics, "run_dir": str(run_dir.resolve()),
            "elapsed_s": round(time.monotonic() - started, 1), "config": OmegaConf.to_container(cfg)}
    return save_bundle(model, out, prov)


def _checkpoint_file(ckpt_path: str, run_dir: Path) -> Path:
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise OSError(f"ckpt_path: no checkpoint at {path}")
    return path


def _checkpoint_step(ckpt_path: str | None) -> int | None:
    if ckpt_path is None:
        return None
    return int(_read_checkpoint(Path(ckpt_path)).get("global_step", 0))


def _read_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only: a checkpoint is tensors and plain containers; loading one runs no code
    return torch.load(path, map_location="cpu", weights_only=True)


def _monitoring_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The checkpoint callback that keeps the best by the monitored metric (the first one with a monitor)."""
    found = [cb for cb in trainer.checkpoint_callbacks if cb.monitor]
    return found[0] if found else None


def _best_checkpoint(trainer: L.Trainer) -> Path | None:
    cb = _monitoring_checkpoint(trainer)
    return Path(cb.best_model_path) if cb is not None and cb.best_model_path else None


def _load_weights(module: SowaLitModule, path: Path) -> None:
    state = _read_checkpoint(path)["state_dict"]
    module.load_state_dict(state, strict=False)


def _stopped_by(trainer: L.Trainer) -> str:
    for cb in trainer.callbacks:
        if isinstance(cb, EarlyStopping) and cb.stopped_epoch > 0:
            return "early stopping"
    if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
        return "steps"
    if trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs:
        return "epochs"
    return "time limit" if trainer.should_stop else "steps"


def _ranks_agree(trainer: L.Trainer, module: SowaLitModule) -> bool:
    """Whether every rank ends with the same trainable weights (DDP keeps them equal; a mismatch is a bug)."""
    if trainer.world_size == 1:
        return True
    sums = torch.stack([p.detach().double().sum() for p in module.model.trainable_parameters()])
    gathered = trainer.strategy.all_gather(sums.to(module.device))  # (world, P)
    return bool(torch.equal(gathered.min(0).values, gathered.max(0).values) and not math.isnan(float(sums.sum())))
