"""`sowa info DIR`: model.bundle.read_manifest, as JSON."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("bundle", type=Path)


def run(args: argparse.Namespace) -> int:
    import json

    from model.bundle import read_manifest

    info = read_manifest(args.bundle)
    print(json.dumps({"path": str(info.path), "trained": info.trained, "fingerprint": info.fingerprint,
                      "model": info.config.to_dict(), "provenance": info.provenance}, indent=2))
    return 0
