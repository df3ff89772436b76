"""`sowa eval --bundle B --data DIR --out report.json`: training.evaluate.evaluate."""

from __future__ import annotations

import argparse
from pathlib import Path

from sowa.arguments import int_list


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--bundle", type=Path, required=True)
    c.add_argument("--data", type=Path, required=True, help="dataset root (meta.json, VisA split_csv or MVTec)")
    c.add_argument("--k", type=int_list, default=[0, 1, 2, 4], help="shot counts, e.g. 0,1,2,4 (0: zero-shot)")
    c.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="shot-draw seeds for K > 0 (0,1,2)")
    c.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    c.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--out", type=Path, required=True, help="report JSON to write")
    c.add_argument("--markdown", type=Path, help="also write the markdown tables here")
    c.add_argument("--visuals", type=Path, help="write image | mask | heatmap strips here")
    c.add_argument("--visuals-per-class", type=int, default=4)
    c.add_argument("--metric-workers", type=int, default=None,
                   help="processes computing metrics beside the network (default: CPUs - 1, at most 8; 0: none)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate, write_report
    from training.report import markdown

    report = evaluate(args.bundle, args.data, args.k, args.seeds, args.device, args.dtype, args.batch_size,
                      args.visuals, args.visuals_per_class, not args.no_progress, args.metric_workers)
    write_report(report, args.out)
    table = markdown(report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    print(table, end="")
    print(f"wrote {args.out} ({report['elapsed_s']:.1f} s)")
    return 0
