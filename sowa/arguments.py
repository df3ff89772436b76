"""Argument types and option groups several commands share."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_bench_outputs", "int_list", "name_list"]


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
