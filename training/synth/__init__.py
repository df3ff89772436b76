"""Procedural, seeded, offline images of parts and materials with defects whose masks are exactly the changed pixels.

- `part`: the one product of `sowa demo` (`make_part`, `with_defect`, `DEFECT_KINDS`, `Sample`);
- the `sowa synth` benchmark: `textures` and `objects` (normal renders with realistic jitter), `regions` and
  `defects` (what goes wrong, and where), `categories` (two disjoint families), `benchmark` (the files on disk).
  See docs/datasets.md.
"""

from .benchmark import FamilySummary, ItemSpec, SynthError, SynthOptions, plan, render_item, write_benchmark
from .categories import CATEGORIES, FAMILIES
from .defects import KINDS, TIERS
from .part import DEFECT_KINDS, Sample, make_part, with_defect

__all__ = ["CATEGORIES", "DEFECT_KINDS", "FAMILIES", "KINDS", "TIERS", "FamilySummary", "ItemSpec", "Sample",
           "SynthError", "SynthOptions", "make_part", "plan", "render_item", "with_defect", "write_benchmark"]
