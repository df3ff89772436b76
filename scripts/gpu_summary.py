"""The summary table of a GPU check run (scripts/gpu_check.sh): reads its files in DIR, prints markdown.

    python scripts/gpu_summary.py DIR > DIR/summary.md
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def _json(path: Path) -> object | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _model_rows(out: Path) -> list[str]:
    lines = ["| dtype | compile | batch | images/s | TFLOP/s | of peak | register ms | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for part in sorted(out.glob("bench_model_*.json")):
        for r in (_json(part) or {}).get("rows", []):
            frac = f"{r['fraction_of_peak']:.0%}" if r.get("fraction_of_peak") is not None else ""
            comp = f"{r['compile_s']:.0f}" if r.get("compile_s") is not None else ""
            lines.append(f"| {r['dtype']} | {r['compile']} | {r['batch_size']} | {r['images_per_s']:.1f} | "
                         f"{r['tflops']:.3g} | {frac} | {r['register_ms']:.0f} | {comp} |")
    return lines if len(lines) > 2 else ["(no model bench figures)"]


def _serve_rows(out: Path) -> list[str]:
    table = out / "bench_serve.md"
    if not table.is_file():
        return ["(no serve bench figures)"]
    text = table.read_text().splitlines()
    return [line for line in text if not line.startswith("# ")]


def _util(out: Path) -> str:
    path = out / "gpu_util.csv"
    try:
        rows = list(csv.reader(path.read_text().splitlines()))
    except OSError:
        return "(no utilisation samples)"
    values = []
    for row in rows[1:]:
        try:
            values.append(float(row[1].strip().rstrip(" %")))
        except (IndexError, ValueError):
            continue
    if not values:
        return rows[0][0] if rows and rows[0] else "(no utilisation samples)"
    busy = [v for v in values if v > 0]
    return (f"GPU utilisation during the serve bench: mean {sum(values) / len(values):.0f}% over {len(values)} "
            f"samples, mean {sum(busy) / max(len(busy), 1):.0f}% while busy, max {max(values):.0f}%")


def main(out: Path) -> None:
    env = _json(out / "env.json") or {}
    print(f"# GPU check: {env.get('gpu', 'no GPU (CPU plan)')}\n")
    print(f"python {env.get('python')}, torch {env.get('torch')}, torchvision {env.get('torchvision')}, "
          f"open_clip {env.get('open_clip')}, CUDA {env.get('cuda')}; {env.get('nvidia_smi', '')}\n")
    tests = out / "cuda_tests.txt"
    last = [line for line in tests.read_text().splitlines() if line.strip()][-1:] if tests.is_file() else []
    print(f"CUDA tests: {last[0] if last else '(not run)'}\n")
    print("## Offline engine (`sowa bench model`)\n")
    print("\n".join(_model_rows(out)) + "\n")
    print("## Service (`sowa bench serve`)\n")
    print("\n".join(_serve_rows(out)) + "\n")
    print(_util(out) + "\n")
    print("## Probes\n")
    probes = out / "probes.jsonl"
    for line in probes.read_text().splitlines() if probes.is_file() else []:
        try:
            p = json.loads(line)
        except ValueError:
            continue
        if p.get("probe") == "syncs":
            print(f"- host syncs in one served batch ({p['arch']}, {p['dtype']}, batch {p['batch']}): "
                  f"{p['syncs']} {p.get('where') or p.get('note', '')}")
        elif p.get("probe") == "nvjpeg":
            g = p["grey_levels"]
            print(f"- device JPEG decode ({p['source']} -> {p['size']} px): {p['device_images_per_s']} images/s "
                  f"(PIL, one thread: {p['pil_images_per_s_one_thread']}); grey levels vs PIL: max {g['max']}, "
                  f"mean {g['mean']}, p99 {g['p99']}, p99.9 {g['p999']}, {g['share_differing']:.2%} of values "
                  "differ")
        elif p.get("probe") == "train":
            modes = "; ".join(f"{'compiled' if r['compile'] else 'eager'} {r['steps_per_s']} steps/s (first step "
                              f"{r['first_step_s']} s, losses {'finite' if r['losses_finite'] else 'NOT finite'})"
                              for r in p["rows"])
            print(f"- training ({p['arch']}, {p['precision']}, batch {p['batch']}, Lightning {p['lightning']}): "
                  f"{modes}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
