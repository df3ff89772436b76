"""`sowa train --data DIR --out BUNDLE`: training.train.train (under torchrun: `torchrun -m sowa train ...`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sowa.arguments import int_list

DESCRIPTION = ("The reference recipe by default (SOWA_SPEC.md section 7). Under torchrun --nproc-per-node N "
               "(`torchrun --nproc-per-node N -m sowa train ...`) it trains with DDP, global batch N x --batch-size.")


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--data", type=Path, required=True, help="dataset root (meta.json, MVTec or VisA layout)")
    c.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    c.add_argument("--arch", default="ViT-L-14-336",
                   help="open_clip model name, one of ours (sowa-tiny) or a model-config JSON path")
    c.add_argument("--pretrained", default="openai", help="none | an open_clip tag such as openai | a weight file")
    c.add_argument("--split", default="test", choices=["train", "test"],
                   help="split to train on (test: the labelled one, as the reference does across domains)")
    c.add_argument("--epochs", type=int, default=1)
    c.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    c.add_argument("--max-minutes", type=float, help="stop (and write the bundle) after this much wall time")
    c.add_argument("--batch-size", type=int, default=8, help="images per process and step (8)")
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--weight-decay", type=float, default=0.2)
    c.add_argument("--seed", type=int, default=2025)
    c.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    c.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16")
    c.add_argument("--workers", type=int, default=0, help="data-loading processes (0: in the training process)")
    c.add_argument("--taps", type=int_list, help="tapped blocks (default: L/4-1, L/2-1, 3L/4-1, L-1)")
    c.add_argument("--window-size", type=int, help="adapter window (default: 12, or a divisor of the grid)")
    c.add_argument("--attn-drop", type=float, help="adapter attention dropout while training (0.1)")
    c.add_argument("--mosaic-rate", type=float, default=0.0,
                   help="probability of a 2x2 same-class mosaic per image (the reference: 0.2 on MVTec, else 0)")
    c.add_argument("--augment", action="store_true",
                   help="flips, quarter turns and colour changes (not in the reference recipe)")
    c.add_argument("--checkpoint-dir", type=Path, help="where checkpoints go (default: OUT.checkpoints)")
    c.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (200)")
    c.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the same run")
    c.add_argument("--force", action="store_true", help="overwrite an existing bundle at --out")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from training.train import TrainOptions, train

    info = train(TrainOptions(
        data=args.data, out=args.out, arch=args.arch, pretrained=args.pretrained, split=args.split,
        epochs=args.epochs, max_steps=args.max_steps, max_minutes=args.max_minutes, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, device=args.device,
        precision=args.precision, workers=args.workers, taps=tuple(args.taps) if args.taps else None,
        window_size=args.window_size, attn_drop=args.attn_drop,
        mosaic_rate=args.mosaic_rate, augment=args.augment, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, resume=args.resume, force=args.force,
        progress=not args.no_progress))
    if info is not None:  # the main process (torchrun's other ranks return None)
        p = info.provenance
        loss = (p.get("final_loss") or {}).get("total", float("nan"))
        print(f"wrote {info.path} ({p['steps']} steps, {p['epochs_completed']} epochs, stopped by "
              f"{p['stopped_by']}, last loss {loss:.4f}, {p['elapsed_s']} s)")
    return 0
