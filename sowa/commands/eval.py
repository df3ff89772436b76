"""`sowa eval [OVERRIDE...]`: training.evaluate.evaluate on training/configs/eval.yaml composed with overrides.

    sowa eval bundle=B data=visa k=[0,1] seeds=[0] out=report.json

The flags of earlier releases still work (`--bundle B --data DIR --out F ...`): each becomes an override, placed
before the command line's own overrides, which win.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sowa.arguments import int_list
from sowa.commands.train import quote

DESCRIPTION = ("Hydra overrides of training/configs/eval.yaml (docs/evaluation.md), e.g. `sowa eval bundle=B "
               "data=visa k=[0,1,4] out=report.json`; the data preset's test_root is evaluated.")


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="key=value, group=option, +key=value")
    c.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    old = c.add_argument_group("flags of earlier releases (each is an override)")
    old.add_argument("--bundle", type=Path, help="bundle=B")
    old.add_argument("--data", type=Path, help="data.test_root=DIR (meta.json, VisA split_csv or MVTec)")
    old.add_argument("--k", type=int_list, help="k=[...] shot counts, e.g. 0,1,2,4 (0: zero-shot)")
    old.add_argument("--seeds", type=int_list, help="seeds=[...] shot-draw seeds for K > 0")
    old.add_argument("--device", help="device: auto | cpu | cuda | cuda:N")
    old.add_argument("--dtype", help="dtype: fp32 | fp16 | bf16")
    old.add_argument("--batch-size", type=int, help="batch_size")
    old.add_argument("--out", type=Path, help="out=F: report JSON to write")
    old.add_argument("--markdown", type=Path, help="markdown=F: also write the markdown tables here")
    old.add_argument("--visuals", type=Path, help="visuals=DIR: image | mask | heatmap strips")
    old.add_argument("--visuals-per-class", type=int, help="visuals_per_class")
    old.add_argument("--metric-workers", type=int, help="metric_workers (null: CPUs - 1, at most 8; 0: none)")
    old.add_argument("--no-progress", action="store_true", help="progress=false")


def legacy_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides the flags of earlier releases stand for."""
    flags = {"bundle": "bundle", "data": "data.test_root", "device": "device", "dtype": "dtype",
             "batch_size": "batch_size", "out": "out", "markdown": "markdown", "visuals": "visuals",
             "visuals_per_class": "visuals_per_class", "metric_workers": "metric_workers"}
    o = [f"{key}={quote(getattr(args, flag))}" for flag, key in flags.items() if getattr(args, flag) is not None]
    o += [f"{key}=[{','.join(map(str, getattr(args, key)))}]" for key in ("k", "seeds") if getattr(args, key)]
    if args.no_progress:
        o.append("progress=false")
    return o


def run(args: argparse.Namespace) -> int:
    from training.run_config import compose_config, to_yaml

    cfg = compose_config("eval", [*legacy_overrides(args), *args.overrides])
    if args.cfg:
        print(to_yaml(cfg), end="")
        return 0
    from training.evaluate import evaluate, write_report
    from training.report import markdown

    def path(value: str | None) -> Path | None:
        return None if value is None else Path(value)

    report = evaluate(Path(cfg.bundle), Path(cfg.data.test_root), list(cfg.k), list(cfg.seeds), cfg.device,
                      cfg.dtype, int(cfg.batch_size), path(cfg.visuals), int(cfg.visuals_per_class),
                      bool(cfg.progress), cfg.metric_workers)
    out = Path(cfg.out)
    write_report(report, out)
    table = markdown(report)
    if cfg.markdown:
        Path(cfg.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.markdown).write_text(table)
    print(table, end="")
    print(f"wrote {out} ({report['elapsed_s']:.1f} s)")
    return 0
