"""`sowa plot`: a metric against K from one or more `sowa eval` reports, with the spread over seeds as error bars.

Uses matplotlib's object API on an Agg canvas: no pyplot state, no display needed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import METRIC_TITLES, METRICS

__all__ = ["load_report", "plot_vs_k"]


def load_report(path: Path) -> dict[str, Any]:
    """Read a `sowa eval` report; a file that is not one is a one-line ValueError."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable report ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), dict) or not report["results"]:
        raise ValueError(f"{path}: not a sowa eval report (no results)")
    return report


def plot_vs_k(reports: Sequence[tuple[str, dict]], metric: str, out: Path, title: str | None = None) -> None:
    """Draw `metric` (in %) against K, mean ± std over seeds, one line per (label, report); write a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if metric not in METRICS:
        raise ValueError(f"unknown metric '{metric}': use one of {', '.join(METRICS)}")
    if not reports:
        raise ValueError("no report to plot")
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    all_ks: set[int] = set()
    for label, report in reports:
        try:
            points = sorted((int(k), r["mean"][metric], r["std"][metric]) for k, r in report["results"].items())
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"report '{label}' has no '{metric}' results") from None
        ks = [p[0] for p in points]
        all_ks.update(ks)
        ax.errorbar(ks, [100 * p[1] for p in points], yerr=[100 * p[2] for p in points], marker="o", capsize=4,
                    label=label)
    ax.set_xticks(sorted(all_ks))
    ax.set_xlabel("K (normal shots per class)")
    ax.set_ylabel(f"{METRIC_TITLES[metric]} (%)")
    ax.set_title(title or f"{METRIC_TITLES[metric]} against K (mean ± std over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
