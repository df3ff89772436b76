"""GET /classes/{name}/quality: how the class's threshold does on reviewed parts, the threshold to suggest, and how
far its passed parts have drifted from the calibration (service/core/records/figures.py computes them).

Applying the suggestion is PATCH /classes/{name} with its threshold.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from ...core.access.roles import Role
from ...core.class_names import check_class_name
from ...core.records.figures import class_figures, scored_with
from ..auth import Requires
from ..deps import RecordsDep, RegistryDep
from ..schemas import ClassQuality
from .classes import ClassName

__all__ = ["router"]

router = APIRouter(tags=["records"], dependencies=[Depends(Requires(Role.INSPECT))])


@router.get("/classes/{name}/quality", response_model=ClassQuality, summary="A class's quality and drift figures")
async def class_quality(
    name: ClassName, registry: RegistryDep, records: RecordsDep,
    escape_target: Annotated[float | None, Query(ge=0.0, le=1.0, description="the largest share of defective parts "
                                                 "that may pass (0..1): the suggestion is then the threshold with "
                                                 "the fewest false calls within it; without it, the best F1")] = None,
) -> dict:
    """From the reviewed records scored with the class's current shots: the confusion at the threshold in force
    (defective = positive), escape and false-call rates, precision, recall, F1 and a suggested threshold; and KS D
    of the recent passed parts against the shots' scores, now and over consecutive windows."""
    check_class_name(name)
    entry = registry.get(name)
    model = registry.generation.served.fingerprint
    figures = await asyncio.to_thread(class_figures, records, name, scored_with(entry.revision, model),
                                      entry.calibration.threshold, entry.memory.calibration.shot_scores(),
                                      escape_target)
    return {"class_name": name, "threshold": entry.calibration.threshold,
            "calibrated_threshold": entry.memory.calibration.threshold,
            "threshold_overridden": entry.threshold_override is not None, **figures}
