"""Argument types and option groups several commands share."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_bench_outputs", "add_store_location", "int_list", "name_list", "store_location"]


def name_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def add_bench_outputs(b: argparse.ArgumentParser) -> None:
    b.add_argument("--json", type=Path, help="also write the results as JSON")
    b.add_argument("--markdown", type=Path, help="also write the table as markdown")
    b.add_argument("--plot", type=Path, help="also draw the results (PNG)")


def add_store_location(c: argparse.ArgumentParser) -> None:
    """--data-dir and --store: where a service keeps its state (keys, model versions), as `sowa serve` is told."""
    c.add_argument("--data-dir", default=None, help="the service's data directory (default: SOWA_DATA_DIR or "
                   "sowa-data)")
    c.add_argument("--store", default=None, help="the class store URL, when it is PostgreSQL (default: SOWA_STORE)")


def store_location(args: argparse.Namespace) -> tuple[str, Path]:
    """The store URL (--store, SOWA_STORE, else the data directory) and the data directory."""
    import os

    data_dir = args.data_dir or os.environ.get("SOWA_DATA_DIR", "sowa-data")
    return args.store or os.environ.get("SOWA_STORE") or data_dir, Path(data_dir)
