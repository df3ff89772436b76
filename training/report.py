"""Accuracy metrics of one class and setting, their aggregation over classes and seeds, and the markdown table.

Kept free of torch and of the model: `class_metrics` runs in worker processes, which then import only numpy,
scipy and scikit-learn.

Conventions (SOWA_SPEC.md §9): metrics per class, then the unweighted mean over classes; the spread over seeds is
the population standard deviation (ddof 0) of those class means. A metric that is undefined for a class (a single
label value, no defect region, all map values equal) is 0.0, the research code's convention, and is named in the
report's notes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .metrics import aupro, aupro_sowa, auroc, average_precision, f1_max

__all__ = ["KIND_METRICS", "METRICS", "METRIC_TITLES", "STD_KIND", "aggregate", "aggregate_kinds", "class_metrics",
           "markdown"]

METRICS: tuple[str, ...] = (
    "image_auroc", "image_ap", "image_f1_max", "image_auroc_online",
    "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro", "pixel_aupro_sowa",
)
METRIC_TITLES: dict[str, str] = {
    "image_auroc": "image AUROC", "image_ap": "image AP", "image_f1_max": "image F1-max",
    "image_auroc_online": "image AUROC online", "pixel_auroc": "pixel AUROC", "pixel_ap": "pixel AP",
    "pixel_f1_max": "pixel F1-max", "pixel_aupro": "AUPRO", "pixel_aupro_sowa": "AUPRO (SOWA)",
}
KIND_METRICS: tuple[str, ...] = ("image_auroc", "pixel_auroc")  # per defect kind: the kind's images + the normals
STD_KIND = "population standard deviation (ddof 0) over seeds of the class-averaged metric"


def _single_label(labels: np.ndarray) -> bool:
    return bool(labels.all() or not labels.any())


def class_metrics(
    labels: np.ndarray, scores: np.ndarray, online_scores: np.ndarray, masks: np.ndarray, maps: np.ndarray,
    kinds: Sequence[str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """All metrics of one class: image `labels` (N,), reference image `scores` (N,), `online_scores` (N,),
    ground-truth `masks` (N, H, W) bool and final `maps` (N, H, W) -> ({metric: value}, notes on undefined ones).

    With the images' defect `kinds` (N,), also `by_kind` (see `_by_kind`), to show which defects a model misses."""
    labels = np.asarray(labels).astype(bool)
    notes: list[str] = []
    if _single_label(labels):
        notes.append("image metrics undefined (one label value only): 0.0")
    pixels = masks.astype(bool)
    if _single_label(pixels):
        notes.append("pixel metrics undefined (no defect pixel, or no normal pixel): 0.0")
    out = {
        "image_auroc": auroc(labels, scores),
        "image_ap": average_precision(labels, scores),
        "image_f1_max": f1_max(labels, scores),
        "image_auroc_online": auroc(labels, online_scores),
        "pixel_auroc": auroc(pixels, maps),
        "pixel_ap": average_precision(pixels, maps),
        "pixel_f1_max": f1_max(pixels, maps),
    }
    for name, fn in (("pixel_aupro", aupro), ("pixel_aupro_sowa", aupro_sowa)):
        if _single_label(pixels):  # already noted above
            out[name] = 0.0
            continue
        try:
            value = fn(pixels, maps)
        except ValueError as e:
            value, reason = math.nan, str(e)
        else:
            reason = "no finite value (the FPR range below 0.3 collapsed to one point)"
        if not math.isfinite(value):
            notes.append(f"{name} undefined ({reason}): 0.0")
            value = 0.0
        out[name] = float(value)
    if kinds is not None:
        out["by_kind"] = _by_kind(labels, scores, pixels, maps, np.asarray(kinds))
    return out, notes


def aggregate(per_seed: Sequence[tuple[int | None, Mapping[str, Mapping[str, float]]]]) -> dict[str, Any]:
    """[(seed, {class: {metric: value}})] -> mean and std over seeds of the class means, per-class means over
    seeds, and each seed's class means. Every seed must cover the same classes."""
    if not per_seed:
        raise ValueError("nothing to aggregate: no seed results")
    classes = list(per_seed[0][1])
    for seed, by_class in per_seed:
        if list(by_class) != classes:
            raise ValueError(f"seed {seed} covers classes {list(by_class)}, expected {classes}")
    # values[s, c, m]
    values = np.array([[[by_class[c][m] for m in METRICS] for c in classes] for _, by_class in per_seed],
                      dtype=np.float64)
    class_means = values.mean(axis=1)  # (seeds, metrics)

    def named(row: np.ndarray) -> dict[str, float]:
        return {m: float(v) for m, v in zip(METRICS, row, strict=True)}

    return {
        "mean": named(class_means.mean(axis=0)),
        "std": named(class_means.std(axis=0)),
        "per_class": {c: named(values[:, i].mean(axis=0)) for i, c in enumerate(classes)},
        "per_class_std": {c: named(values[:, i].std(axis=0)) for i, c in enumerate(classes)},
        "per_seed": [{"seed": seed, "mean": named(class_means[j]),
                      "per_class": {c: named(values[j, i]) for i, c in enumerate(classes)}}
                     for j, (seed, _) in enumerate(per_seed)],
    }


def _by_kind(labels: np.ndarray, scores: np.ndarray, pixels: np.ndarray, maps: np.ndarray, kinds: np.ndarray
             ) -> dict[str, dict[str, float]]:
    """Per defect kind: image AUROC of the kind's images against the normal images, and pixel AUROC of the kind's
    defect pixels against every normal pixel of the class. The normal pixels are sorted once and each kind's
    positives ranked among them (Mann-Whitney), so the breakdown costs little beside the class metrics."""
    negatives = np.sort(maps[~pixels].ravel())
    out: dict[str, dict[str, float]] = {}
    for kind in sorted(set(kinds[labels].tolist())):
        keep = ~labels | (kinds == kind)
        positives = maps[(kinds == kind)[:, None, None] & pixels]
        if positives.size == 0 or negatives.size == 0:
            pixel = 0.0  # undefined: the research code's convention
        else:
            below = np.searchsorted(negatives, positives, side="left")
            ties = np.searchsorted(negatives, positives, side="right") - below
            pixel = float((below + 0.5 * ties).sum() / (positives.size * negatives.size))
        out[kind] = {"image_auroc": auroc(labels[keep], scores[keep]), "pixel_auroc": pixel}
    return out


def aggregate_kinds(per_seed: Sequence[tuple[int | None, Mapping[str, Mapping[str, Any]]]]
                    ) -> dict[str, dict[str, float]]:
    """{kind: {metric: mean over seeds and over the classes that have the kind}} from class metrics that carry
    `by_kind`; empty when none do."""
    sums: dict[str, dict[str, list[float]]] = {}
    for _, by_class in per_seed:
        for values in by_class.values():
            for kind, metrics in values.get("by_kind", {}).items():
                for m in KIND_METRICS:
                    sums.setdefault(kind, {}).setdefault(m, []).append(metrics[m])
    return {kind: {m: float(np.mean(v)) for m, v in metrics.items()} for kind, metrics in sorted(sums.items())}


def _pm(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def markdown(report: Mapping[str, Any]) -> str:
    """The paper's table: one row per K, one column per metric, ×100 as "mean ± std" with one decimal; then the
    per-class table (mean ± std over seeds) at the largest K."""
    bundle = report["bundle"]
    ks = [int(k) for k in report["results"]]
    n_test = sum(c["test"] for c in report["classes"].values())
    head = "| " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |"
    rule = "|---" * (len(METRICS) + 1) + "|"
    lines = [
        f"# sowa eval: {bundle['path']} on {report['data']}",
        "",
        f"{len(report['classes'])} classes, {n_test} test images; K {', '.join(map(str, ks))}; seeds "
        f"{', '.join(map(str, report['seeds']))}; {report['device']} {report['dtype']} ({report['machine']}); "
        f"bundle {bundle['fingerprint'][:12]}, {'trained' if bundle['trained'] else 'untrained'}. Values in %, "
        "mean ± population std over seeds of the class means (K = 0 has no seed).",
        "",
        "| K " + head,
        rule,
    ]
    for k in ks:
        r = report["results"][str(k)]
        lines.append(f"| {k} | " + " | ".join(_pm(r["mean"][m], r["std"][m]) for m in METRICS) + " |")
    top = max(ks)
    r = report["results"][str(top)]
    lines += ["", f"## Per class, K = {top}", "", "| class " + head, rule]
    for cls, values in r["per_class"].items():
        std = r["per_class_std"][cls]
        lines.append(f"| {cls} | " + " | ".join(_pm(values[m], std[m]) for m in METRICS) + " |")
    if r.get("per_kind"):
        lines += ["", f"## Per defect kind, K = {top}", "",
                  "Image AUROC: the kind's images against the normal images of their class; pixel AUROC: the "
                  "kind's defect pixels against every normal pixel of their class. Mean over classes and seeds.", "",
                  "| kind | image AUROC | pixel AUROC |", "|---|---|---|"]
        for kind, values in r["per_kind"].items():
            lines.append(f"| {kind} | {100 * values['image_auroc']:.1f} | {100 * values['pixel_auroc']:.1f} |")
    if report.get("notes"):
        lines += ["", "Notes:", *(f"- {n}" for n in report["notes"])]
    return "\n".join(lines) + "\n"
