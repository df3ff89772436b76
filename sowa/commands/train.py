"""`sowa train [OVERRIDE...]`: training.train.train on training/configs/train.yaml composed with Hydra overrides.

    sowa train data=visa model.adapter.depth=2 prompt=template logger=[csv,tensorboard] +experiment=best

The flags of earlier releases still work: each becomes the override its help names (docs/training.md), placed
before the command line's own overrides, which win.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sowa.arguments import int_list

DESCRIPTION = ("Hydra overrides of training/configs/train.yaml (docs/training.md), e.g. `sowa train data=visa "
               "model.adapter.depth=2 logger=[csv,tensorboard] +experiment=best`. DDP: trainer=ddp, or under "
               "torchrun (`torchrun --nproc-per-node N -m sowa train run_dir=DIR ...`).")

_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="key=value, group=option, +key=value, ~key")
    c.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    old = c.add_argument_group("flags of earlier releases (each is an override)")
    old.add_argument("--data", type=Path, help="data.root=DIR (and no validation, unless data.val_root= is given)")
    old.add_argument("--out", type=Path, help="out=BUNDLE (and run_dir=BUNDLE.checkpoints)")
    old.add_argument("--arch", help="model.backbone.arch=A with A's default taps and window")
    old.add_argument("--pretrained", help="model.backbone.weights=P: none | an open_clip tag | a weight file")
    old.add_argument("--split", choices=["train", "test"], help="data.split")
    old.add_argument("--epochs", type=int, help="trainer.max_epochs")
    old.add_argument("--max-steps", type=int, help="trainer.max_steps")
    old.add_argument("--max-minutes", type=float, help="trainer.max_time=DD:HH:MM:SS")
    old.add_argument("--batch-size", type=int, help="data.batch_size")
    old.add_argument("--lr", type=float, help="optimizer.lr")
    old.add_argument("--weight-decay", type=float, help="optimizer.weight_decay")
    old.add_argument("--seed", type=int, help="seed")
    old.add_argument("--device", help="trainer.accelerator (cpu | gpu) and trainer.devices for cuda:N")
    old.add_argument("--precision", choices=["auto", *_PRECISION], help="trainer.precision (32-true, bf16-mixed, ...)")
    old.add_argument("--workers", type=int, help="data.workers")
    old.add_argument("--taps", type=int_list, help="model.taps=[...]")
    old.add_argument("--window-size", type=int, help="model.adapter.window_size")
    old.add_argument("--attn-drop", type=float, help="model.adapter.attn_drop")
    old.add_argument("--mosaic-rate", type=float, help="data.mosaic_rate")
    old.add_argument("--augment", action="store_true", help="data.augment=true")
    old.add_argument("--checkpoint-dir", type=Path, help="run_dir (checkpoints go to its checkpoints/)")
    old.add_argument("--checkpoint-every", type=int, help="callbacks.last_checkpoint.every_n_train_steps")
    old.add_argument("--resume", action="store_true", help="ckpt_path=last (when run_dir has one)")
    old.add_argument("--force", action="store_true", help="force=true")
    old.add_argument("--no-progress", action="store_true", help="callbacks.rich_progress_bar=null")


def quote(value: object) -> object:
    """A path or name as a quoted override value, so any character in it stays a character (Hydra's grammar)."""
    if isinstance(value, (str, Path)):
        return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"
    return value


def _max_time(minutes: float) -> str:
    s = max(1, round(minutes * 60))
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def legacy_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides the flags of earlier releases stand for."""
    o: list[str] = []
    given = {x.split("=", 1)[0].lstrip("+~") for x in args.overrides}
    if args.data is not None:
        o.append(f"data.root={quote(args.data)}")
        if "data.val_root" not in given:  # earlier releases did not validate
            o += ["validation.enabled=false", "monitor.metric=train/loss_epoch", "monitor.mode=min"]
    if args.arch is not None:
        from model.backbone import resolve_backbone
        from model.config import default_window

        grid = resolve_backbone(args.arch).grid_size
        o += [f"model.backbone.arch={quote(args.arch)}", "model.backbone.model_config=null", "model.taps=[]",
              f"model.adapter.window_size={default_window(grid)}"]
    flags = {"pretrained": "model.backbone.weights", "split": "data.split", "epochs": "trainer.max_epochs",
             "max_steps": "trainer.max_steps", "batch_size": "data.batch_size", "lr": "optimizer.lr",
             "weight_decay": "optimizer.weight_decay", "seed": "seed", "workers": "data.workers",
             "window_size": "model.adapter.window_size", "attn_drop": "model.adapter.attn_drop",
             "mosaic_rate": "data.mosaic_rate", "checkpoint_every": "callbacks.last_checkpoint.every_n_train_steps"}
    o += [f"{key}={quote(getattr(args, flag))}" for flag, key in flags.items() if getattr(args, flag) is not None]
    if args.taps:
        o.append(f"model.taps=[{','.join(map(str, args.taps))}]")
    if args.max_minutes is not None:
        o.append(f"trainer.max_time={_max_time(args.max_minutes)}")
    if args.device not in (None, "auto"):
        kind, _, index = args.device.partition(":")
        o.append(f"trainer.accelerator={'gpu' if kind == 'cuda' else kind}")
        if index:
            o.append(f"trainer.devices=[{int(index)}]")
    if args.precision not in (None, "auto"):
        o.append(f"trainer.precision={_PRECISION[args.precision]}")
    run_dir = args.checkpoint_dir or (args.out.with_name(args.out.name + ".checkpoints") if args.out else None)
    if args.out is not None:
        o.append(f"out={quote(args.out)}")
    if run_dir is not None:
        o.append(f"run_dir={quote(run_dir)}")
        if args.resume and (run_dir / "checkpoints" / "last.ckpt").is_file():
            o.append("ckpt_path=last")
    if args.augment:
        o.append("data.augment=true")
    if args.force or args.resume:
        o.append("force=true")
    if args.no_progress:
        o.append("callbacks.rich_progress_bar=null")
    return o


def run(args: argparse.Namespace) -> int:
    from training.run_config import compose_config, to_yaml

    cfg = compose_config("train", [*legacy_overrides(args), *args.overrides])
    if args.cfg:
        print(to_yaml(cfg), end="")
        return 0
    from training.train import train

    info = train(cfg)
    if info is not None:  # rank 0 (the other ranks return None)
        p = info.provenance
        best = p["checkpoint"]
        score = "" if best["score"] is None else f", {best['monitor']} {best['score']:.4f}"
        print(f"wrote {info.path} from {best['path'] or 'the last weights'} ({p['steps']} steps, "
              f"{p['epochs_completed']} epochs, stopped by {p['stopped_by']}{score}, {p['elapsed_s']} s); "
              f"run: {p['run_dir']}")
    return 0
