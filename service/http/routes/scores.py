"""GET /classes/{name}/scores: the numbers behind a class's threshold, for the console's threshold page."""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query

from ...core.access.roles import Role
from ...core.records.store import RecordQuery
from ..auth import Requires
from ..deps import RecordsDep, RegistryDep, SettingsDep
from ..schemas import CalibrationOut, ClassScores

__all__ = ["histogram", "router"]

router = APIRouter(tags=["results"], dependencies=[Depends(Requires(Role.INSPECT))])


def histogram(shots: list[float], recent: list[float], thresholds: list[float], bins: int) -> dict:
    """Counts of both score sets over shared edges spanning the scores and the thresholds (5% margin, in [0, 1])."""
    values = [*shots, *recent, *thresholds]
    lo, hi = min(values), max(values)
    pad = max(0.05 * (hi - lo), 0.005)
    lo, hi = max(0.0, lo - pad), min(1.0, hi + pad)
    edges = np.linspace(lo, hi, bins + 1)
    return {"edges": [float(e) for e in edges], "shots": np.histogram(shots, edges)[0].tolist(),
            "recent": np.histogram(recent, edges)[0].tolist()}


@router.get("/classes/{name}/scores", response_model=ClassScores, summary="The numbers behind a threshold")
async def class_scores(
    name: str, registry: RegistryDep, records: RecordsDep, settings: SettingsDep,
    bins: Annotated[int, Query(ge=1, le=200, description="histogram bins")] = 20,
) -> dict:
    """The shots' leave-one-out scores (the calibration), the class's recent records' scores, both thresholds and a
    histogram of both score sets. Recent scores are as computed then: shots added since move the calibration."""
    entry = registry.get(name)
    cal = entry.memory.calibration
    shot_scores = cal.shot_scores()
    # as the console's kept results list them (its threshold page labels those): scores as computed then, so shots
    # added since move the calibration, not them (a record's `revision` says which shots scored it)
    recent = await asyncio.to_thread(records.query, RecordQuery(class_name=name, limit=settings.results_per_class))
    thresholds = [entry.calibration.threshold, cal.threshold]
    return {
        "class_name": name, "threshold": entry.calibration.threshold, "calibrated_threshold": cal.threshold,
        "threshold_overridden": entry.threshold_override is not None, "calibration": CalibrationOut.of(cal),
        "shots": [{"score": s, "map_max": a, "text_score": t}
                  for s, a, t in zip(shot_scores, cal.shot_map_max, cal.shot_text_scores, strict=True)],
        "recent": [{"id": r.id, "score": r.score, "threshold": r.threshold, "is_anomalous": r.is_anomalous,
                    "time": r.time} for r in recent],
        "histogram": histogram(shot_scores, [r.score for r in recent], thresholds, bins),
    }
