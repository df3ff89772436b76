"""`sowa serve`: settings from flags and SOWA_* variables, then service.server.serve."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.core.settings import Settings

__all__ = ["add_arguments", "run", "settings_from_args"]

_FLAGS = ("bundle", "host", "port", "grpc_port", "data_dir", "store", "device", "dtype", "workers", "max_batch_size",
          "max_wait_ms", "max_queue", "bank_device_budget_mb", "compile_mode", "image_decoder", "api_key",
          "allowed_hosts", "records", "records_dir", "record_sample_passed", "record_images_max_mb",
          "record_images_max_age_days", "records_max_age_days", "records_max_count", "record_spool_max_mb",
          "unrecordable")


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--bundle", type=Path, help="bundle directory (SOWA_BUNDLE)")
    c.add_argument("--host", help="bind address (SOWA_HOST, default 127.0.0.1)")
    c.add_argument("--port", type=int, help="port (SOWA_PORT, default 8000)")
    c.add_argument("--grpc-port", type=int, help="serve the Open Inference Protocol v2 over gRPC on this port too "
                   "(SOWA_GRPC_PORT; default off). The same protocol is always on --port under /v2")
    c.add_argument("--data-dir", type=Path, help="class storage (SOWA_DATA_DIR, default ./sowa-data)")
    c.add_argument("--store", help="class store: a directory, file://DIR or postgresql://user@host/db (SOWA_STORE; "
                   "default: the data dir). Prefer SOWA_STORE for a URL with a password: arguments show in ps")
    c.add_argument("--device", help="auto | cpu | cuda | cuda:N (SOWA_DEVICE)")
    c.add_argument("--dtype", help="fp32 | fp16 | bf16 (SOWA_DTYPE)")
    c.add_argument("--workers", type=int, help="HTTP worker processes in front of the one engine process "
                   "(SOWA_WORKERS; default 1 on a CPU, on a GPU half the cores, 2 to 8)")
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
    c.add_argument("--allowed-hosts", type=lambda v: [h.strip() for h in v.split(",") if h.strip()],
                   help="host names the service answers to, comma-separated (SOWA_ALLOWED_HOSTS; default "
                   "localhost,127.0.0.1,::1; '*' for any): others are refused, against DNS rebinding")
    r = c.add_argument_group("inspection records (docs/records.md)")
    r.add_argument("--records", action=argparse.BooleanOptionalAction, default=None,
                   help="record every image scored against a class (SOWA_RECORDS, on)")
    r.add_argument("--records-dir", type=Path, help="record database, images and spool (SOWA_RECORDS_DIR; default "
                   "data_dir/records; with a PostgreSQL store the records are in its database, the spool here)")
    r.add_argument("--record-sample-passed", type=int, metavar="N", help="keep the image of 1 in N passed parts, "
                   "0 none (SOWA_RECORD_SAMPLE_PASSED, 100); flagged parts' images are always kept")
    r.add_argument("--record-images-max-mb", type=float, help="byte budget of kept images, oldest out "
                   "(SOWA_RECORD_IMAGES_MAX_MB, 2048)")
    r.add_argument("--record-images-max-age-days", type=float, help="kept images older than this go (30)")
    r.add_argument("--records-max-age-days", type=float, help="records older than this go (365)")
    r.add_argument("--records-max-count", type=int, help="records at most, oldest out (10000000)")
    r.add_argument("--record-spool-max-mb", type=float, help="what the local spool holds while the store is "
                   "unreachable (SOWA_RECORD_SPOOL_MAX_MB, 256)")
    r.add_argument("--unrecordable", choices=["answer", "503"], help="past the spool's bound: answer with "
                   "record_kept=false, or refuse with 503 (SOWA_UNRECORDABLE, answer)")
    c.add_argument("--log-level", default="info")


def settings_from_args(args: argparse.Namespace) -> Settings:
    from pydantic import ValidationError

    from model.bundle import read_manifest
    from service.core.settings import Settings

    given = {k: getattr(args, k) for k in _FLAGS if getattr(args, k, None) is not None}
    try:
        settings = Settings(**given)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
                             for err in e.errors())
        raise ValueError(f"invalid settings: {problems}") from None
    read_manifest(settings.bundle)  # fail now, in one line, rather than in the background start-up
    return settings


def run(args: argparse.Namespace) -> int:
    from service.server import serve

    serve(settings_from_args(args), args.log_level)
    return 0
