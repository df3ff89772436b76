"""`sowa synth --out DIR`: training.synth.write_benchmark."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = ("Writes OUT/a and OUT/b (six categories each, see docs/datasets.md); same seed and options give "
               "byte-identical files.")


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--out", type=Path, required=True, help="directory to write (empty, new, or an earlier synth)")
    c.add_argument("--image-size", type=int, default=256, help="image side in pixels (256)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--train-per-class", type=int, default=32, help="normal train images per class (32)")
    c.add_argument("--test-good-per-class", type=int, default=16, help="normal test images per class (16)")
    c.add_argument("--test-defect-per-class", type=int, default=32, help="defective test images per class (32)")
    c.add_argument("--workers", type=int, help="processes (default: CPUs, at most 8); the output does not depend on it")
    c.add_argument("--force", action="store_true", help="overwrite an earlier synth output at --out")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import os

    from training.synth import SynthOptions, write_benchmark

    options = SynthOptions(args.image_size, args.seed, args.train_per_class, args.test_good_per_class,
                           args.test_defect_per_class)
    workers = args.workers or min(os.cpu_count() or 1, 8)
    for family in write_benchmark(args.out, options, args.force, workers, not args.no_progress):
        print(family.line())
    return 0
