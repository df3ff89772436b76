"""Provenance recorded in every bundle: what made it, when, with which code."""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["provenance_base"]


def provenance_base(source: str) -> dict[str, Any]:
    """Common provenance fields of a bundle made by `source` (a command name)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {"source": source, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_revision": rev,
            "torch": torch.__version__, "python": platform.python_version()}
