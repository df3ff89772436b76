"""`sowa plot REPORT... --out PNG`: training.plots.plot_vs_k."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("reports", type=Path, nargs="+")
    c.add_argument("--label", action="append", help="legend label, once per report (default: file name)")
    c.add_argument("--metric", default="pixel_auroc", help="report metric name (pixel_auroc)")
    c.add_argument("--title")
    c.add_argument("--out", type=Path, required=True, help="PNG to write")


def run(args: argparse.Namespace) -> int:
    from training.plots import load_report, plot_vs_k

    labels = args.label or [p.stem for p in args.reports]
    if len(labels) != len(args.reports):
        raise ValueError(f"{len(labels)} --label for {len(args.reports)} reports: give one per report")
    plot_vs_k([(lb, load_report(p)) for lb, p in zip(labels, args.reports, strict=True)], args.metric, args.out,
              args.title)
    print(f"wrote {args.out}")
    return 0
