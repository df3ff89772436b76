"""The `sowa` command line: a table of commands, each a module of `sowa.commands` with `add_arguments` and `run`.

A command module wires its arguments to one function of `model/`, `training/` or `service/` and imports it only
when it runs, so `sowa --help` stays instant. Expected failures (bad bundle, bad checkpoint, unreadable image,
impossible option) print one line on stderr and exit with status 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "main"]

# name -> (module under sowa.commands, one-line help); the order is the order `sowa --help` lists them in
COMMANDS: dict[str, tuple[str, str]] = {
    "import-checkpoint": ("import_checkpoint", "official SOWA Lightning checkpoint -> bundle"),
    "init": ("init", "untrained bundle for few-shot-only serving on a pretrained backbone"),
    "predict": ("predict", "offline inference on image files -> npz"),
    "serve": ("serve", "run the inference service (flags override SOWA_* environment variables)"),
    "demo": ("demo", "the whole story offline: bundle, server, shots, predictions, overlays"),
    "train": ("train", "train adapters and prompts -> bundle; Hydra overrides (data=visa model.adapter.depth=2 ...)"),
    "eval": ("eval", "accuracy on a labelled test split over K shots and seeds -> JSON + table; Hydra overrides"),
    "plot": ("plot", "a metric against K from eval reports -> PNG"),
    "synth": ("synth", "procedural anomaly benchmark: two disjoint families, MVTec layout + meta.json"),
    "info": ("info", "print a bundle's manifest summary"),
    "store": ("store", "class store tools: migrate a directory store into PostgreSQL"),
    "keys": ("keys", "API keys with roles: add (printed once), list, revoke"),
    "models": ("models", "model versions: add, list, activate, rollback, shadow, remove (running services follow)"),
    "bench": ("bench", "benchmarks: the offline engine (model) and the service (serve)"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sowa", description="Few-shot visual anomaly detection with SOWA.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command = importlib.import_module(f"sowa.commands.{module}")
        c = sub.add_parser(name, help=help_text, description=getattr(command, "DESCRIPTION", None))
        command.add_arguments(c)
        c.set_defaults(run=command.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from model.backbone import BackboneError
    from model.bundle import BundleError
    from model.checkpoint_import import CheckpointError
    from model.config import ConfigError
    from model.preprocess import ImageDecodeError

    try:
        return args.run(args)
    except (BundleError, CheckpointError, ConfigError, BackboneError, ImageDecodeError, ValueError, OSError) as e:
        print(f"sowa {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
