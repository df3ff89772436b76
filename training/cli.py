"""The `sowa` command line. Each subcommand is a thin shell over a function in `training/` or `model/`.

Expected failures (bad bundle, bad checkpoint, unreadable image, impossible option) print one line on stderr
and exit with status 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main"]


def _name_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


def _bench_outputs(b: argparse.ArgumentParser) -> None:
    b.add_argument("--json", type=Path, help="also write the results as JSON")
    b.add_argument("--markdown", type=Path, help="also write the table as markdown")
    b.add_argument("--plot", type=Path, help="also draw the results (PNG)")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sowa", description="Few-shot visual anomaly detection with SOWA.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("import-checkpoint", help="official SOWA Lightning checkpoint -> bundle")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    c.add_argument("--taps", type=_int_list, help="tapped block indices, e.g. 5,11,17,23 (default: inferred)")
    c.add_argument("--text-heads", type=int, help="text tower heads (default: width // 64, the OpenAI rule)")
    c.add_argument("--temperature", type=float, default=0.07, help="image-level softmax temperature (0.07)")
    c.add_argument("--force", action="store_true", help="overwrite an existing bundle")

    c = sub.add_parser("init", help="untrained bundle for few-shot-only serving on a pretrained backbone")
    c.add_argument("--arch", required=True, help="open_clip model name or model-config JSON path")
    c.add_argument("--pretrained", default="none", help="none | an open_clip tag such as openai | a weight file")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--taps", type=_int_list, help="tapped blocks (default: L/4-1, L/2-1, 3L/4-1, L-1)")
    c.add_argument("--window-size", type=int, help="adapter window (default: 12, or a divisor of the grid)")
    c.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    c.add_argument("--force", action="store_true")

    c = sub.add_parser("predict", help="offline inference on image files -> npz",
                       description="Put --shots before another option (or end them with --): "
                                   "sowa predict --bundle B --shots s1.png s2.png --out r.npz t1.png t2.png")
    c.add_argument("--bundle", type=Path, required=True)
    c.add_argument("--shots", type=Path, nargs="+", default=[], help="normal reference images of the class")
    c.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    c.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--out", type=Path, required=True, help="npz file to write")
    c.add_argument("images", type=Path, nargs="+")

    c = sub.add_parser("serve", help="run the inference service (flags override SOWA_* environment variables)")
    c.add_argument("--bundle", type=Path, help="bundle directory (SOWA_BUNDLE)")
    c.add_argument("--host", help="bind address (SOWA_HOST, default 127.0.0.1)")
    c.add_argument("--port", type=int, help="port (SOWA_PORT, default 8000)")
    c.add_argument("--data-dir", type=Path, help="class storage (SOWA_DATA_DIR, default ./sowa-data)")
    c.add_argument("--device", help="auto | cpu | cuda | cuda:N (SOWA_DEVICE)")
    c.add_argument("--dtype", help="fp32 | fp16 | bf16 (SOWA_DTYPE)")
    c.add_argument("--max-batch-size", type=int, help="images per device batch (SOWA_MAX_BATCH_SIZE, 16)")
    c.add_argument("--max-wait-ms", type=float, help="batch fill wait (SOWA_MAX_WAIT_MS, 5)")
    c.add_argument("--max-queue", type=int, help="queued images before 429 (SOWA_MAX_QUEUE, 256)")
    c.add_argument("--bank-device-budget-mb", type=float, help="device memory for class banks, least recently "
                   "used offloaded to host (SOWA_BANK_DEVICE_BUDGET_MB; default 40%% of a GPU, no limit on CPU)")
    c.add_argument("--compile", dest="compile_mode", metavar="MODE",
                   help="torch.compile the vision pass: default, reduce-overhead (CUDA graphs), max-autotune, "
                   "max-autotune-no-cudagraphs or off (SOWA_COMPILE_MODE, off); every batch-size bucket compiles "
                   "at start-up")
    c.add_argument("--image-decoder", choices=["pil", "torchvision"],
                   help="pil: reference preprocessing, bit for bit; torchvision: JPEGs decoded and resized on the "
                   "device (SOWA_IMAGE_DECODER, pil)")
    c.add_argument("--api-key", help="require X-API-Key (prefer SOWA_API_KEY: arguments are visible in ps)")
    c.add_argument("--log-level", default="info")

    c = sub.add_parser("demo", help="the whole story offline: bundle, server, shots, predictions, overlays")
    c.add_argument("--out", type=Path, default=Path("sowa-demo"), help="where the demo writes (./sowa-demo)")
    c.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("train", help="train adapters and prompts on a labelled dataset -> bundle (torchrun for DDP)",
                       description="The reference recipe by default (SOWA_SPEC.md section 7). Under torchrun "
                                   "--nproc-per-node N it trains with DDP, global batch N x --batch-size.")
    c.add_argument("--data", type=Path, required=True, help="dataset root (meta.json, MVTec or VisA layout)")
    c.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    c.add_argument("--arch", default="ViT-L-14-336", help="open_clip model name or model-config JSON path")
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
    c.add_argument("--taps", type=_int_list, help="tapped blocks (default: L/4-1, L/2-1, 3L/4-1, L-1)")
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

    c = sub.add_parser("eval", help="accuracy on a labelled test split over K shots and seeds -> JSON + table")
    c.add_argument("--bundle", type=Path, required=True)
    c.add_argument("--data", type=Path, required=True, help="dataset root (meta.json, VisA split_csv or MVTec)")
    c.add_argument("--k", type=_int_list, default=[0, 1, 2, 4], help="shot counts, e.g. 0,1,2,4 (0: zero-shot)")
    c.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="shot-draw seeds for K > 0 (0,1,2)")
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

    c = sub.add_parser("plot", help="a metric against K from eval reports -> PNG")
    c.add_argument("reports", type=Path, nargs="+")
    c.add_argument("--label", action="append", help="legend label, once per report (default: file name)")
    c.add_argument("--metric", default="pixel_auroc", help="report metric name (pixel_auroc)")
    c.add_argument("--title")
    c.add_argument("--out", type=Path, required=True, help="PNG to write")

    c = sub.add_parser("synth", help="procedural anomaly benchmark: two disjoint families, MVTec layout + meta.json",
                       description="Writes OUT/a and OUT/b (six categories each, see docs/datasets.md); same seed "
                                   "and options give byte-identical files.")
    c.add_argument("--out", type=Path, required=True, help="directory to write (empty, new, or an earlier synth)")
    c.add_argument("--image-size", type=int, default=256, help="image side in pixels (256)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--train-per-class", type=int, default=32, help="normal train images per class (32)")
    c.add_argument("--test-good-per-class", type=int, default=16, help="normal test images per class (16)")
    c.add_argument("--test-defect-per-class", type=int, default=32, help="defective test images per class (32)")
    c.add_argument("--workers", type=int, help="processes (default: CPUs, at most 8); the output does not depend on it")
    c.add_argument("--force", action="store_true", help="overwrite an earlier synth output at --out")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser("info", help="print a bundle's manifest summary")
    c.add_argument("bundle", type=Path)

    c = sub.add_parser("bench", help="benchmarks")
    bsub = c.add_subparsers(dest="target", required=True, metavar="TARGET")
    b = bsub.add_parser("model", help="offline engine images/s by batch size and precision (random weights)")
    b.add_argument("--arch", default="ViT-B-16", help="open_clip model name or model-config JSON path")
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", type=_name_list, default=["fp32"], help="precisions, e.g. fp32,bf16")
    b.add_argument("--batch-sizes", type=_int_list, default=[1, 2, 4, 8])
    b.add_argument("--shots", type=int, default=4, help="K of the bank scored against (0: zero-shot only)")
    b.add_argument("--iters", type=int, default=5)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--window-size", type=int, help="adapter window (default: 12, or a divisor of the grid)")
    b.add_argument("--no-peak", action="store_true", help="skip measuring the device's matmul peak")
    b.add_argument("--compile", type=_name_list, default=["off"], dest="compile_modes",
                   help="torch.compile modes to compare, e.g. off,default or off,reduce-overhead (CUDA graphs)")
    _bench_outputs(b)
    b = bsub.add_parser("serve", help="service images/s and latency vs concurrency, batching on and off")
    b.add_argument("--arch", default="ViT-B-16", help="architecture of a random-weight bundle made for the run")
    b.add_argument("--bundle", type=Path, help="benchmark this bundle instead")
    b.add_argument("--device", default="auto", help="the server's and the offline engine's device")
    b.add_argument("--dtype", default="fp32")
    b.add_argument("--concurrency", type=_int_list, default=[1, 4, 16], help="client counts, e.g. 1,4,16")
    b.add_argument("--duration", type=float, default=20.0, help="seconds of load per point")
    b.add_argument("--max-batch-size", type=int, default=16)
    b.add_argument("--max-wait-ms", type=float, default=10.0)
    b.add_argument("--shots", type=int, default=4)
    b.add_argument("--heatmap", choices=["none", "png", "raw"], default="none")
    b.add_argument("--registrations", type=int, default=10, help="new classes registered and timed (0: none)")
    b.add_argument("--compile", default="off", dest="compile_mode",
                   help="torch.compile mode of the servers and the offline engine (off)")
    b.add_argument("--image-decoder", choices=["pil", "torchvision"], default="pil", help="the servers' decoder")
    _bench_outputs(b)
    return p


def _run(args: argparse.Namespace) -> int:
    # heavy imports only once the arguments are known to be good: `sowa --help` stays instant
    if args.command == "import-checkpoint":
        from .offline import run_import

        info = run_import(args.checkpoint, args.out, args.taps, args.text_heads, args.temperature, args.force)
        print(f"wrote {info.path} (taps {list(info.config.taps)}, arch {info.config.backbone.arch or 'custom'})")
    elif args.command == "init":
        from .offline import init_bundle

        info = init_bundle(args.arch, args.pretrained, args.out, args.taps, args.window_size, args.seed, args.force)
        print(f"wrote {info.path} (untrained, taps {list(info.config.taps)})")
    elif args.command == "predict":
        import numpy as np

        from .offline import predict_files

        arrays = predict_files(args.bundle, args.images, args.shots, args.device, args.dtype, args.batch_size)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.out, **arrays)
        for path, s, t, a in zip(args.images, arrays["scores"], arrays["thresholds"], arrays["is_anomalous"],
                                 strict=True):
            print(f"{path}\tscore {s:.4f}\tthreshold {t:.4f}\t{'ANOMALOUS' if a else 'normal'}")
        print(f"wrote {args.out}")
    elif args.command == "serve":
        from .serve import serve

        serve(args)
    elif args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, args.seed)
    elif args.command == "train":
        from .train import TrainOptions, train

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
    elif args.command == "eval":
        from .evaluate import evaluate, write_report
        from .report import markdown

        report = evaluate(args.bundle, args.data, args.k, args.seeds, args.device, args.dtype, args.batch_size,
                          args.visuals, args.visuals_per_class, not args.no_progress, args.metric_workers)
        write_report(report, args.out)
        table = markdown(report)
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(table)
        print(table, end="")
        print(f"wrote {args.out} ({report['elapsed_s']:.1f} s)")
    elif args.command == "plot":
        from .plots import load_report, plot_vs_k

        labels = args.label or [p.stem for p in args.reports]
        if len(labels) != len(args.reports):
            raise ValueError(f"{len(labels)} --label for {len(args.reports)} reports: give one per report")
        plot_vs_k([(lb, load_report(p)) for lb, p in zip(labels, args.reports, strict=True)], args.metric, args.out,
                  args.title)
        print(f"wrote {args.out}")
    elif args.command == "synth":
        import os

        from .synth import SynthOptions, write_benchmark

        options = SynthOptions(args.image_size, args.seed, args.train_per_class, args.test_good_per_class,
                               args.test_defect_per_class)
        workers = args.workers or min(os.cpu_count() or 1, 8)
        for family in write_benchmark(args.out, options, args.force, workers, not args.no_progress):
            print(family.line())
    elif args.command == "info":
        import json

        from model.bundle import read_manifest

        info = read_manifest(args.bundle)
        print(json.dumps({"path": str(info.path), "trained": info.trained, "fingerprint": info.fingerprint,
                          "model": info.config.to_dict(), "provenance": info.provenance}, indent=2))
    elif args.command == "bench" and args.target == "serve":
        from .bench_model import machine_description
        from .bench_serve import bench_serve, format_serve_table, plot_serve, write_serve_json

        bench = bench_serve(args.arch, args.concurrency, args.duration, args.max_batch_size, args.max_wait_ms,
                            args.shots, args.bundle, args.device, args.dtype, args.heatmap, args.registrations,
                            args.compile_mode, args.image_decoder)
        title = f"sowa bench serve: {args.bundle or args.arch}, {machine_description(bench.device)}"
        _bench_write(args, f"# {title}\n\n{format_serve_table(bench)}\n",
                     lambda path: write_serve_json(bench, path, str(args.bundle or args.arch)),
                     lambda path: plot_serve(bench, path, title.replace(", ", "\n", 1)))
    elif args.command == "bench":
        from .bench_model import bench_model, format_table, machine_description, plot_model, write_json

        rows = bench_model(args.arch, args.device, args.dtype, tuple(args.batch_sizes), args.shots, args.iters,
                           args.warmup, args.threads, args.window_size, peak=not args.no_peak,
                           compile_modes=args.compile_modes)
        title = f"sowa bench model: {args.arch}, {machine_description(rows[0].device)}"
        _bench_write(args, f"# {title}\n\n{format_table(rows)}\n", lambda path: write_json(rows, path),
                     lambda path: plot_model(rows, path, title.replace(", ", "\n", 1)))
    return 0


def _bench_write(args: argparse.Namespace, markdown: str, json_writer: Callable[[Path], None],
                 plotter: Callable[[Path], None]) -> None:
    print(markdown, end="")
    if args.markdown:
        args.markdown.write_text(markdown)
    if args.json:
        json_writer(args.json)
    if args.plot:
        plotter(args.plot)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from model.backbone import BackboneError
    from model.bundle import BundleError
    from model.checkpoint_import import CheckpointError
    from model.config import ConfigError
    from model.preprocess import ImageDecodeError

    try:
        return _run(args)
    except (BundleError, CheckpointError, ConfigError, BackboneError, ImageDecodeError, ValueError, OSError) as e:
        print(f"sowa {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
