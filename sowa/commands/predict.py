"""`sowa predict --bundle B [--shots ...] --out F.npz IMG ...`: model.inference.predict_files."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = ("Put --shots before another option (or end them with --): "
               "sowa predict --bundle B --shots s1.png s2.png --out r.npz t1.png t2.png")


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--bundle", type=Path, required=True)
    c.add_argument("--shots", type=Path, nargs="+", default=[], help="normal reference images of the class")
    c.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    c.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--class", dest="class_name",
                   help="the parts' class name: picks the bundle's prompt class of that name (else the first)")
    c.add_argument("--out", type=Path, required=True, help="npz file to write")
    c.add_argument("images", type=Path, nargs="+")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from model.inference import predict_files

    arrays = predict_files(args.bundle, args.images, args.shots, args.device, args.dtype, args.batch_size,
                           args.class_name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    for path, s, t, a in zip(args.images, arrays["scores"], arrays["thresholds"], arrays["is_anomalous"],
                             strict=True):
        print(f"{path}\tscore {s:.4f}\tthreshold {t:.4f}\t{'ANOMALOUS' if a else 'normal'}")
    print(f"wrote {args.out}")
    return 0
