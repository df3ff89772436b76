"""Diagnostic for docs/accuracy.md: pixel AUROC of w * zero-shot map + k-shot map, for several weights w.

The reference (and `sowa eval`) uses w = 1. Sweeping w shows how much accuracy any weighting of the two parts
could reach on a dataset, i.e. whether a shortfall is the weighting's or the parts'. Every pixel of every test
image counts; shots are drawn as `sowa eval` draws them.

    python scripts/zero_shot_weight_sweep.py BUNDLE DATA [--k 4] [--seed 0] [--weights 0,0.1,0.25,0.5,1,2]
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from model.bundle import load_bundle
from model.maps import final_map
from training.datasets import list_items
from training.evaluate import _grouped, run_class, sample_shots
from training.metrics.ranking import auroc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("data")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default="0,0.1,0.25,0.5,1,2")
    args = p.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    model, _ = load_bundle(args.bundle, "cpu", torch.float32)
    tests, train = _grouped(list_items(args.data, "test")), _grouped(list_items(args.data, "train"))
    setting = (args.k, args.seed)
    table: dict[float, list[float]] = {w: [] for w in weights}
    print("| class | " + " | ".join(f"w = {w:g}" for w in weights) + " | zero-shot range | k-shot range |")
    print("|---|" + "---|" * (len(weights) + 2))
    with ThreadPoolExecutor(2) as pool:
        for cls in sorted(tests):
            maps = run_class(model, tests[cls], {setting: sample_shots(train[cls], args.k, args.seed, cls)}, 16, pool)
            distances = maps.distances[setting]
            ks = final_map(maps.zero_shot, distances, maps.grid, zero_shot_weight=0.0)  # the k-shot part alone
            labels = maps.masks.reshape(-1)
            row = []
            for w in weights:
                value = auroc(labels, final_map(maps.zero_shot, distances, maps.grid, zero_shot_weight=w).numpy()
                              .reshape(-1))
                table[w].append(value)
                row.append(f"{100 * value:.1f}")
            zs = maps.zero_shot
            print(f"| {cls} | " + " | ".join(row) + f" | {zs.min():.2f} to {zs.max():.2f} | "
                  f"{ks.min():.2f} to {ks.max():.2f} |", flush=True)
    print("| mean | " + " | ".join(f"{100 * np.mean(v):.1f}" for v in table.values()) + " | | |")


if __name__ == "__main__":
    main()
