"""`sowa eval`: a bundle's accuracy on a labelled test split, measured the way the literature does (SOWA_SPEC.md
§5, §6, §9), over several shot counts K and seeds.

Per class, the network runs once over the test images (zero-shot maps, text scores, raw patch tokens) and once over
the union of all the shots the (K, seed) settings draw. Each setting's k-shot map is then one matmul against its
bank plus an upsample: the numbers of `SowaModel.predict(images, banks)` without a network pass per setting.
Metrics, which cost more CPU than the network costs GPU at 336 px, run in worker processes while the network moves
on to the next class.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.bundle import load_bundle
from model.calibration import image_scores
from model.device import machine_description, resolve_device, resolve_dtype
from model.files import atomic_write
from model.inference import ClassMemory, memory_from_outputs
from model.maps import final_map
from model.memory_bank import min_distances
from model.sowa import SowaModel

from .datasets import DatasetError, Item, Sample, list_items, load_sample
from .report import METRICS, STD_KIND, aggregate, aggregate_kinds, class_metrics
from .visuals import save_strip

__all__ = ["REPORT_FORMAT", "ClassMaps", "Setting", "evaluate", "run_class", "sample_shots",
           "write_report"]

REPORT_FORMAT = "sowa-eval-report"
MASK_THRESHOLD = 0.5  # test-time mask binarisation (spec §7.4)
Setting = tuple[int, int | None]  # (K, seed); K = 0 has no seed


def sample_shots(items: Sequence[Item], k: int, seed: int, cls: str) -> list[Item]:
    """K shots of class `cls` for `seed`: the first K of a permutation seeded by "seed:class" alone, so a draw is
    reproducible, independent of the other classes and their order, and nested (the K=1 shot is in the K=2 draw).
    All items when there are fewer than K."""
    order = random.Random(f"{seed}:{cls}").sample(range(len(items)), len(items))
    return [items[i] for i in order[:k]]


@dataclass
class ClassMaps:
    """One class's test results, on the CPU: everything the metrics of every setting need."""

    items: list[Item]
    masks: np.ndarray  # (N, H, W) bool at model resolution
    zero_shot: torch.Tensor  # (N, H, W) float32
    text_scores: torch.Tensor  # (N,) float32
    grid: int
    distances: dict[Setting, torch.Tensor] = field(default_factory=dict)  # (N, S, L) float32 per K > 0 setting
    memories: dict[Setting, ClassMemory] = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray:
        return np.array([it.anomaly for it in self.items], dtype=bool)

    def final_maps(self, setting: Setting) -> torch.Tensor:
        """(N, H, W) float32: filtered zero-shot map + unfiltered k-shot map (spec §6), or zero-shot for K = 0."""
        return final_map(self.zero_shot, self.distances[setting] if setting[0] else None, self.grid)

    def scores(self, setting: Setting, maps: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(reference image scores, online scores) of the class's test images under `setting`.

        Reference (spec §5/§6): text score at K = 0; otherwise 0.5 * (text score + the map maximum min-max
        normalised over the class's test images): transductive. Online: the service's calibrated score
        (docs/scoring.md), per image; it is the text score at K = 0.
        """
        text = self.text_scores
        if setting[0] == 0:
            return text.numpy().copy(), text.numpy().copy()
        peak = maps.flatten(1).amax(dim=1).double()
        span = (peak.max() - peak.min()).item()
        # every image with the same maximum: the reference divides 0 by 0; no image ranks above another
        norm = (peak - peak.min()) / span if span > 0 else torch.zeros_like(peak)
        reference = 0.5 * (text.double() + norm)
        online = image_scores(text, peak, [self.memories[setting].calibration] * len(self.items)).raw
        return reference.numpy(), online.double().numpy()


def _batches(items: Sequence[Item], size: int, batch_size: int, pool: Executor) -> Iterator[list[Sample]]:
    """Loaded samples in batches; the next batch decodes in `pool` while the caller runs the current one."""
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]

    def submit(chunk: Sequence[Item]) -> list[Future]:
        return [pool.submit(load_sample, it, size, MASK_THRESHOLD) for it in chunk]

    pending = submit(chunks[0]) if chunks else []
    for j in range(len(chunks)):
        current = [f.result() for f in pending]
        pending = submit(chunks[j + 1]) if j + 1 < len(chunks) else []
        yield current


def _stack(batch: Sequence[Sample]) -> torch.Tensor:
    return torch.stack([s.image for s in batch])


@torch.inference_mode()
def run_class(
    model: SowaModel, tests: Sequence[Item], draws: Mapping[Setting, Sequence[Item]], batch_size: int,
    pool: Executor, bar: tqdm | None = None, class_name: str | None = None,
) -> ClassMaps:
    """Network passes of one class: once over the union of the shots of all `draws` (fitting one bank and
    calibration per setting), once over the `tests`, scoring every batch against every bank. The class is scored
    with the bundle's prompt class of the same name, else prompt class 0, as the service does."""
    size = model.image_size
    prompt = model.cfg.prompt.class_index(class_name) if class_name else 0
    memories: dict[Setting, ClassMemory] = {}
    union = list(dict.fromkeys(it for shots in draws.values() for it in shots))
    if union:
        outs = []
        for batch in _batches(union, size, batch_size, pool):
            outs.append(model.predict(_stack(batch), class_ids=[prompt] * len(batch)))
            if bar is not None:
                bar.update(len(batch))
        raw = torch.cat([o.raw_patches for o in outs])
        zero_shot = torch.cat([o.zero_shot_maps for o in outs])
        text = torch.cat([o.text_scores for o in outs])
        del outs
        position = {it: i for i, it in enumerate(union)}
        for setting, shots in draws.items():
            idx = torch.tensor([position[it] for it in shots], device=raw.device)
            memories[setting] = memory_from_outputs(raw[idx], zero_shot[idx], text[idx], model.grid)
        del raw, zero_shot, text
    zs, texts, masks = [], [], []
    distances: dict[Setting, list[torch.Tensor]] = {s: [] for s in memories}
    for batch in _batches(tests, size, batch_size, pool):
        out = model.predict(_stack(batch), class_ids=[prompt] * len(batch))
        zs.append(out.zero_shot_maps.float().cpu())
        texts.append(out.text_scores.float().cpu())
        masks.append(np.stack([s.mask.numpy() for s in batch]))
        for setting, memory in memories.items():
            distances[setting].append(min_distances(out.raw_patches, [memory.bank] * len(batch)).cpu())
        if bar is not None:
            bar.update(len(batch))
    return ClassMaps(list(tests), np.concatenate(masks), torch.cat(zs), torch.cat(texts), model.grid,
                     {s: torch.cat(d) for s, d in distances.items()}, memories)


class _MetricRunner:
    """Runs `class_metrics` in worker processes (spawned: the parent may hold CUDA), at most `2 * workers` tasks
    queued so maps of later classes do not pile up in memory; `workers == 0` computes in this process."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                     if workers > 0 else None)
        self.done: dict[tuple[Setting, str], tuple[dict[str, float], list[str]]] = {}
        self.pending: dict[Future, tuple[Setting, str]] = {}

    def submit(self, setting: Setting, cls: str, *args: np.ndarray) -> None:
        if self.pool is None:
            self.done[setting, cls] = class_metrics(*args)
            return
        while len(self.pending) >= 2 * self.workers:
            finished, _ = wait(self.pending, return_when=FIRST_COMPLETED)
            self._collect(finished)
        self.pending[self.pool.submit(class_metrics, *args)] = (setting, cls)

    def _collect(self, futures: Any) -> None:
        for f in futures:
            self.done[self.pending.pop(f)] = f.result()

    def finish(self) -> dict[tuple[Setting, str], tuple[dict[str, float], list[str]]]:
        self._collect(list(self.pending))
        return self.done

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _check_args(ks: Sequence[int], seeds: Sequence[int], batch_size: int, visuals_per_class: int
                ) -> tuple[list[int], list[int]]:
    ks_sorted = sorted(set(int(k) for k in ks))
    if not ks_sorted:
        raise ValueError("no K given: pass at least one shot count, e.g. 0,1,2,4")
    if ks_sorted[0] < 0:
        raise ValueError(f"K must be >= 0, got {ks_sorted[0]}")
    unique_seeds = list(dict.fromkeys(int(s) for s in seeds))
    if ks_sorted[-1] > 0 and not unique_seeds:
        raise ValueError("no seed given: K > 0 draws its shots with at least one seed")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if visuals_per_class < 0:
        raise ValueError(f"visuals per class must be >= 0, got {visuals_per_class}")
    return ks_sorted, unique_seeds


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _grouped(items: Sequence[Item]) -> dict[str, list[Item]]:
    out: dict[str, list[Item]] = {}
    for it in items:
        out.setdefault(it.cls_name, []).append(it)
    return out


def _write_visuals(out: Path, cls: str, maps: ClassMaps, setting: Setting, final: torch.Tensor,
                   scores: tuple[np.ndarray, np.ndarray], count: int, vmax: float) -> list[dict[str, Any]]:
    labels = maps.labels
    chosen = ([i for i in range(len(labels)) if labels[i]] + [i for i in range(len(labels)) if not labels[i]])[:count]
    folder = out / re.sub(r"[^A-Za-z0-9_.-]", "_", cls)
    entries = []
    for j, i in enumerate(chosen):
        item = maps.items[i]
        path = folder / f"{j:02d}_{item.defect}_{item.image.stem}.png"
        meta = {"sowa:class": cls, "sowa:k": str(setting[0]), "sowa:seed": str(setting[1]),
                "sowa:score": f"{scores[0][i]:.6f}", "sowa:online_score": f"{scores[1][i]:.6f}"}
        save_strip(path, item.image, maps.masks[i], final[i].numpy(), vmax, meta)
        entries.append({"class": cls, "file": str(path.relative_to(out)), "image": str(item.image),
                        "anomaly": item.anomaly, "defect": item.defect, "score": float(scores[0][i]),
                        "online_score": float(scores[1][i])})
    return entries


def evaluate(
    bundle: Path, data: Path, ks: Sequence[int], seeds: Sequence[int], device: str = "auto", dtype: str = "fp32",
    batch_size: int = 16, visuals: Path | None = None, visuals_per_class: int = 4, progress: bool = True,
    metric_workers: int | None = 0,
) -> dict[str, Any]:
    """Evaluate `bundle` on the test split of `data` for every K in `ks` (K = 0: zero-shot, computed once) and, for
    K > 0, every seed; returns the report (docs/evaluation.md).

    `metric_workers`: processes computing metrics while the network runs on (0: in this process; None: one fewer
    than the CPUs, at most 8). Workers are spawned, so a script calling this with workers needs the usual
    `if __name__ == "__main__":` guard; `sowa eval` uses them by default."""
    started = time.perf_counter()
    bundle, data = Path(bundle), Path(data)
    ks, seeds = _check_args(ks, seeds, batch_size, visuals_per_class)
    workers = _default_workers() if metric_workers is None else metric_workers
    if workers < 0:
        raise ValueError(f"metric workers must be >= 0, got {workers}")
    tests_by_class, normal_train = _split_items(data, ks[-1])
    dev = resolve_device(device)
    model, info = load_bundle(bundle, dev, resolve_dtype(dtype))
    settings: list[Setting] = [(k, None) for k in ks if k == 0] + [(k, s) for k in ks if k > 0 for s in seeds]
    shown = settings[-1] if settings[-1][0] == 0 else (ks[-1], seeds[0])  # the visuals' setting
    vmax = float(len(model.taps))  # fixed colour scale: 0 .. S map units (training/visuals.py)
    draws_by_class = {cls: {s: sample_shots(normal_train[cls], s[0], s[1], cls) for s in settings if s[0] > 0}
                      for cls in tests_by_class}
    shots = _ShotRecord(data, ks, draws_by_class)
    done, visual_entries = _run_classes(model, tests_by_class, draws_by_class, settings, batch_size, workers,
                                        progress, visuals if visuals_per_class else None, shown,
                                        visuals_per_class, vmax)
    results = _results(ks, settings, list(tests_by_class), done, shots)
    if visuals is not None:
        _write_visual_index(visuals, shown, vmax, visual_entries)
    cfg = info.config
    return {
        "format": REPORT_FORMAT,
        "format_version": 1,
        "bundle": {"path": str(bundle), "fingerprint": info.fingerprint, "trained": info.trained,
                   "arch": cfg.backbone.arch, "weights": cfg.backbone.weights, "image_size": model.image_size,
                   "taps": list(cfg.taps), "provenance": info.provenance},
        "data": str(data),
        "ks": ks,
        "seeds": seeds,
        "classes": {cls: {"test": len(items), "anomalous": sum(it.anomaly for it in items),
                          "normal_train": len(normal_train.get(cls, []))}
                    for cls, items in tests_by_class.items()},
        "metrics": list(METRICS),
        "std": STD_KIND,
        "image_score": "K=0: text score; K>0: 0.5 * (text score + per-class min-max normalised map maximum)",
        "device": str(dev),
        "dtype": str(resolve_dtype(dtype)).removeprefix("torch."),
        "batch_size": batch_size,
        "machine": machine_description(str(dev)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": round(time.perf_counter() - started, 3),
        "results": results,
        "shots": shots.files,
        "notes": shots.notes,
    }


def _write_visual_index(visuals: Path, shown: Setting, vmax: float, entries: list[dict[str, Any]]) -> None:
    visuals.mkdir(parents=True, exist_ok=True)
    index = {"k": shown[0], "seed": shown[1], "scale": [0.0, vmax], "scale_units": "final-map units "
             "(reference scale), black at 0, white at the number of stages", "files": entries}
    (visuals / "index.json").write_text(json.dumps(index, indent=2) + "\n")


def _split_items(data: Path, max_k: int) -> tuple[dict[str, list[Item]], dict[str, list[Item]]]:
    """Test items and (when K > 0 is asked for) normal train items, by class; every class must have shots."""
    tests_by_class = _grouped(list_items(data, "test"))
    if not tests_by_class:
        raise DatasetError(f"{data}: the test split has no images")
    normal_train: dict[str, list[Item]] = {}
    if max_k > 0:
        normal_train = _grouped([it for it in list_items(data, "train") if it.anomaly == 0])
        missing = [c for c in tests_by_class if not normal_train.get(c)]
        if missing:
            raise DatasetError(f"{data}: class(es) {', '.join(missing)} have no normal train images to draw "
                               f"K={max_k} shots from")
    return tests_by_class, normal_train


class _ShotRecord:
    """The report's record of the shots drawn: files per (K, seed, class), counts per K, and notes on classes
    with fewer normal images than K."""

    def __init__(self, data: Path, ks: Sequence[int], draws_by_class: Mapping[str, Mapping[Setting, Sequence[Item]]]
                 ) -> None:
        self.data = data
        self.files: dict[str, dict[str, dict[str, list[str]]]] = {}
        self.used: dict[int, dict[str, int]] = {k: {} for k in ks if k > 0}
        self.notes: list[str] = []
        for cls, draws in draws_by_class.items():
            self.add(cls, draws)

    def add(self, cls: str, draws: Mapping[Setting, Sequence[Item]]) -> None:
        for (k, seed), shots in draws.items():
            self.files.setdefault(str(k), {}).setdefault(str(seed), {})[cls] = [
                _relative(it.image, self.data) for it in shots]
            self.used[k][cls] = len(shots)
        for k in self.used:
            if self.used[k][cls] < k:
                self.notes.append(f"class '{cls}': K={k} asks for more shots than its "
                                  f"{self.used[k][cls]} normal train images; all of them were used")


_Done = dict[tuple[Setting, str], tuple[dict[str, float], list[str]]]


def _run_classes(
    model: SowaModel, tests_by_class: Mapping[str, Sequence[Item]],
    draws_by_class: Mapping[str, Mapping[Setting, Sequence[Item]]], settings: Sequence[Setting], batch_size: int,
    workers: int, progress: bool, visuals: Path | None, shown: Setting, visuals_per_class: int, vmax: float,
) -> tuple[_Done, list[dict[str, Any]]]:
    """Network passes class by class, metrics of every setting submitted to the workers as each class is done;
    returns the metrics per (setting, class) and the visuals written."""
    classes = list(tests_by_class)
    total = sum(len(tests_by_class[c]) + len({it for d in draws_by_class[c].values() for it in d}) for c in classes)
    visual_entries: list[dict[str, Any]] = []
    runner = _MetricRunner(workers)
    try:
        with ThreadPoolExecutor(min(8, os.cpu_count() or 2)) as loader, \
                tqdm(total=len(classes), desc="classes", unit="class", disable=not progress) as class_bar, \
                tqdm(total=total, desc="images", unit="img", disable=not progress, leave=False) as bar:
            for cls in classes:
                class_bar.set_postfix_str(cls)
                maps = run_class(model, tests_by_class[cls], draws_by_class[cls], batch_size, loader, bar, cls)
                for setting in settings:
                    final = maps.final_maps(setting)
                    scores = maps.scores(setting, final)
                    runner.submit(setting, cls, maps.labels, scores[0], scores[1], maps.masks, final.numpy(),
                                  np.array([it.defect for it in maps.items]))
                    if visuals is not None and setting == shown:
                        visual_entries += _write_visuals(visuals, cls, maps, setting, final, scores,
                                                         visuals_per_class, vmax)
                del maps
                class_bar.update(1)
            return runner.finish(), visual_entries
    finally:
        runner.close()


def _results(ks: Sequence[int], settings: Sequence[Setting], classes: Sequence[str], done: _Done,
             shots: _ShotRecord) -> dict[str, Any]:
    """Per-K aggregates over seeds (overall and per defect kind); the metrics' notes go to `shots.notes`."""
    results: dict[str, Any] = {}
    for k in ks:
        per_seed = []
        for setting in (s for s in settings if s[0] == k):
            per_seed.append((setting[1], {cls: done[setting, cls][0] for cls in classes}))
            for cls in classes:
                shots.notes += [f"class '{cls}', K={k}, seed {setting[1]}: {n}" for n in done[setting, cls][1]]
        results[str(k)] = aggregate(per_seed)
        results[str(k)]["per_kind"] = aggregate_kinds(per_seed)
        if k > 0:
            results[str(k)]["shots_used"] = shots.used[k]
    return results


def write_report(report: Mapping[str, Any], path: Path) -> None:
    """Write the report as JSON, atomically (readers see the old file or the new one, never half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))

