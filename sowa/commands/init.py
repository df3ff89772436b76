"""`sowa init --arch A --out DIR`: model.bundle.init_bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from sowa.arguments import int_list


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--arch", required=True,
                   help="open_clip model name, one of ours (sowa-tiny) or a model-config JSON path")
    c.add_argument("--pretrained", default="none", help="none | an open_clip tag such as openai | a weight file")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--taps", type=int_list, help="tapped blocks (default: L/4-1, L/2-1, 3L/4-1, L-1)")
    c.add_argument("--window-size", type=int, help="adapter window (default: 12, or a divisor of the grid)")
    c.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    c.add_argument("--force", action="store_true")


def run(args: argparse.Namespace) -> int:
    from model.bundle import init_bundle

    info = init_bundle(args.arch, args.pretrained, args.out, args.taps, args.window_size, args.seed, args.force)
    print(f"wrote {info.path} (untrained, taps {list(info.config.taps)})")
    return 0
