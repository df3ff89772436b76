"""`sowa demo`: sowa.demo.run_demo."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--out", type=Path, default=Path("sowa-demo"), help="where the demo writes (./sowa-demo)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--serve", action="store_true", help="keep the server and its console (/ui) running until Ctrl-C")


def run(args: argparse.Namespace) -> int:
    from sowa.demo import run_demo

    run_demo(args.out, args.seed, serve=args.serve)
    return 0
