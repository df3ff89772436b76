"""`sowa demo`, the README's second command: the real server, a synthetic product, overlays on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sowa.cli import main


def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "[4/4]" in out and "parts judged right" in out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["total"] == 9 and summary["correct"] >= 8  # 9/9 measured; random weights leave some slack
    assert summary["class"]["shots"] == 8
    overlays = sorted((tmp_path / "demo" / "overlays").glob("*.png"))
    assert len(overlays) == 9
    assert Image.open(overlays[0]).size == (448, 224)  # image | heatmap side by side
    assert (tmp_path / "demo" / "data" / "classes" / "demo-part" / "class.json").is_file()
