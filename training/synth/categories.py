"""The benchmark's categories and their split into two disjoint families, `a` and `b`.

Each family has three textures and three objects, so a model trained on one family can be evaluated on the
other (the MVTec <-> VisA protocol, in miniature). The lists are part of the benchmark's definition: changing
them changes every number measured on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .objects import OBJECTS, Render
from .textures import TEXTURES

__all__ = ["CATEGORIES", "FAMILIES", "Category", "foreign_texture"]

FAMILIES: dict[str, tuple[str, ...]] = {
    "a": ("woven", "wood", "carpet", "hexnut", "pill", "pcb"),
    "b": ("metal", "tiles", "leather", "bottlecap", "screw", "transistor"),
}


@dataclass(frozen=True)
class Category:
    name: str
    family: str
    kind: str  # "texture" or "object"

    def design(self, rng: np.random.Generator) -> dict:
        """The class-level look (colours, scale, layout): fixed for a class and seed, shared by its images."""
        return (TEXTURES[self.name] if self.kind == "texture" else OBJECTS[self.name]).design(rng)

    def render(self, rng: np.random.Generator, size: int, design: dict) -> Render:
        """One normal image of the class with its per-image jitter."""
        if self.kind == "object":
            return OBJECTS[self.name].render(rng, size, design)
        image = TEXTURES[self.name].render(rng, size, design)
        return Render(image, np.ones((size, size), dtype=bool), None)


CATEGORIES: dict[str, Category] = {
    name: Category(name, family, "texture" if name in TEXTURES else "object")
    for family, names in FAMILIES.items() for name in names
}


def foreign_texture(rng: np.random.Generator, size: int, exclude: str = "") -> np.ndarray:
    """Another material for pasted-in defects: a random texture (not `exclude`), random design, colour channels
    rotated so that it never passes for the surface it lands on."""
    names = sorted(n for n in TEXTURES if n != exclude)
    texture = TEXTURES[names[rng.integers(len(names))]]
    image = texture.render(rng, size, texture.design(rng))
    return image[..., np.roll(np.arange(3), rng.integers(1, 3))]
