"""`sowa bench model|serve`: sowa.bench_model.bench_model and sowa.bench_serve.bench_serve, with their tables,
JSON and plots."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from sowa.arguments import add_bench_outputs, int_list, name_list


def add_arguments(c: argparse.ArgumentParser) -> None:
    bsub = c.add_subparsers(dest="target", required=True, metavar="TARGET")
    b = bsub.add_parser("model", help="offline engine images/s by batch size and precision (random weights)")
    b.add_argument("--arch", default="ViT-B-16", help="open_clip model name, one of ours or a model-config JSON")
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", type=name_list, default=["fp32"], help="precisions, e.g. fp32,bf16")
    b.add_argument("--batch-sizes", type=int_list, default=[1, 2, 4, 8])
    b.add_argument("--shots", type=int, default=4, help="K of the bank scored against (0: zero-shot only)")
    b.add_argument("--iters", type=int, default=5)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--window-size", type=int, help="adapter window (default: 12, or a divisor of the grid)")
    b.add_argument("--no-peak", action="store_true", help="skip measuring the device's matmul peak")
    b.add_argument("--compile", type=name_list, default=["off"], dest="compile_modes",
                   help="torch.compile modes to compare, e.g. off,default or off,reduce-overhead (CUDA graphs)")
    b.add_argument("--vs-open-clip", type=int, metavar="BATCH",
                   help="also time the full path against a bare open_clip vision tower at this batch size, "
                   "alternated in this process (first precision)")
    add_bench_outputs(b)
    b = bsub.add_parser("serve", help="service images/s and latency vs concurrency, batching on and off")
    b.add_argument("--arch", default="ViT-B-16", help="architecture of a random-weight bundle made for the run")
    b.add_argument("--bundle", type=Path, help="benchmark this bundle instead")
    b.add_argument("--device", default="auto", help="the server's and the offline engine's device")
    b.add_argument("--dtype", default="fp32")
    b.add_argument("--concurrency", type=int_list, default=[1, 4, 16], help="client counts, e.g. 1,4,16")
    b.add_argument("--duration", type=float, default=20.0, help="seconds of load per point")
    b.add_argument("--max-batch-size", type=int, default=16)
    b.add_argument("--max-wait-ms", type=float, default=10.0)
    b.add_argument("--shots", type=int, default=4)
    b.add_argument("--heatmap", choices=["none", "png", "raw"], default="none")
    b.add_argument("--registrations", type=int, default=10, help="new classes registered and timed (0: none)")
    b.add_argument("--compile", default="off", dest="compile_mode",
                   help="torch.compile mode of the servers and the offline engine (off)")
    b.add_argument("--image-decoder", choices=["pil", "torchvision"], default="pil", help="the servers' decoder")
    b.add_argument("--workers", type=int_list, default=[1],
                   help="HTTP worker process counts of the batching server, e.g. 1,2,4 (1)")
    add_bench_outputs(b)


def run(args: argparse.Namespace) -> int:
    return {"model": run_model, "serve": run_serve}[args.target](args)


def run_model(args: argparse.Namespace) -> int:
    from model.device import machine_description
    from sowa.bench_model import bench_model, format_table, plot_model, vs_open_clip, write_json

    rows = bench_model(args.arch, args.device, args.dtype, tuple(args.batch_sizes), args.shots, args.iters,
                       args.warmup, args.threads, args.window_size, peak=not args.no_peak,
                       compile_modes=args.compile_modes)
    title = f"sowa bench model: {args.arch}, {machine_description(rows[0].device)}"
    table = format_table(rows)
    if args.vs_open_clip:
        ratio = vs_open_clip(args.arch, args.device, args.dtype[0], args.vs_open_clip, args.shots,
                             window_size=args.window_size)
        table += f"\n\n{ratio.line()}"
    _write(args, f"# {title}\n\n{table}\n", lambda path: write_json(rows, path),
           lambda path: plot_model(rows, path, title.replace(", ", "\n", 1)))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from model.device import machine_description
    from sowa.bench_serve import bench_serve, format_serve_table, plot_serve, write_serve_json

    bench = bench_serve(args.arch, args.concurrency, args.duration, args.max_batch_size, args.max_wait_ms,
                        args.shots, args.bundle, args.device, args.dtype, args.heatmap, args.registrations,
                        args.compile_mode, args.image_decoder, tuple(args.workers))
    title = f"sowa bench serve: {args.bundle or args.arch}, {machine_description(bench.device)}"
    _write(args, f"# {title}\n\n{format_serve_table(bench)}\n",
           lambda path: write_serve_json(bench, path, str(args.bundle or args.arch)),
           lambda path: plot_serve(bench, path, title.replace(", ", "\n", 1)))
    return 0


def _write(args: argparse.Namespace, markdown: str, json_writer: Callable[[Path], None],
           plotter: Callable[[Path], None]) -> None:
    print(markdown, end="")
    if args.markdown:
        args.markdown.write_text(markdown)
    if args.json:
        json_writer(args.json)
    if args.plot:
        plotter(args.plot)
