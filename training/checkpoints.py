"""Training checkpoints: trainable weights, optimiser and scheduler state, and where the run was.

One file per checkpoint, written atomically; loaded with `torch.load(weights_only=True)`, which refuses
anything but tensors and plain containers, so a checkpoint cannot run code. The last `keep` are kept.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from model.files import atomic_write

__all__ = ["CheckpointMismatchError", "clear_checkpoints", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

_NAME = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointMismatchError(ValueError):
    """A checkpoint made by a run with other settings than the one resuming it."""


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = _checkpoints(Path(directory))
    return found[-1][1] if found else None


def clear_checkpoints(directory: str | Path, also: tuple[str, ...] = ()) -> None:
    """Remove a previous run's checkpoints (and the named files) so a fresh run never resumes from them; other
    files in the directory are left alone."""
    directory = Path(directory)
    for _, path in _checkpoints(directory):
        path.unlink(missing_ok=True)
    for name in also:
        (directory / name).unlink(missing_ok=True)


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:08d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    for _, old in _checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, expect: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint and check that the run settings it was made with match `expect`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: unreadable checkpoint ({e})") from None
    saved = state.get("run", {})
    diff = {k: (saved.get(k), v) for k, v in expect.items() if saved.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointMismatchError(f"{path}: cannot resume a run with other settings ({details})")
    return state
