"""`sowa import-checkpoint CKPT --out DIR`: model.checkpoint_import.import_to_bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from sowa.arguments import int_list


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("checkpoint", type=Path)
    c.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    c.add_argument("--taps", type=int_list, help="tapped block indices, e.g. 5,11,17,23 (default: inferred)")
    c.add_argument("--text-heads", type=int, help="text tower heads (default: width // 64, the OpenAI rule)")
    c.add_argument("--temperature", type=float, default=0.07, help="image-level softmax temperature (0.07)")
    c.add_argument("--qk-attention", action="store_true",
                   help="the adapters were trained with value_only=false (query-key attention); checkpoints do not "
                        "say")
    c.add_argument("--class-names", type=lambda v: [n for n in v.split(",") if n],
                   help="the research config's class_names, in order, e.g. bottle,screw: each names its prompt "
                        "context, which serves the class of that name (default: class0, class1, ...)")
    c.add_argument("--force", action="store_true", help="overwrite an existing bundle")


def run(args: argparse.Namespace) -> int:
    from model.checkpoint_import import import_to_bundle

    info = import_to_bundle(args.checkpoint, args.out, args.taps, args.text_heads, args.temperature, args.force,
                            value_only=not args.qk_attention, class_names=args.class_names)
    print(f"wrote {info.path} (taps {list(info.config.taps)}, arch {info.config.backbone.arch or 'custom'})")
    return 0
