"""`sowa demo`, the README's second command: the real server, a synthetic product, overlays on disk."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from sowa.cli import main
from tests.helpers import REPO


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "[4/4]" in out and "parts judged right" in out
    console = re.search(r"^console: (http://127\.0\.0\.1:\d+/ui/#/inspect/demo-part)$", out, re.M)
    assert console, out  # the last lines: the console's URL, and that the server stops without --serve
    assert out.rstrip().splitlines()[-1].startswith("(the server stops now")
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["total"] == 9 and summary["correct"] >= 8  # 9/9 measured; random weights leave some slack
    assert summary["class"]["shots"] == 8
    overlays = sorted((tmp_path / "demo" / "overlays").glob("*.png"))
    assert len(overlays) == 9
    assert Image.open(overlays[0]).size == (448, 224)  # image | heatmap side by side
    assert (tmp_path / "demo" / "data" / "classes" / "demo-part" / "class.json").is_file()


@pytest.mark.slow
def test_demo_serve_keeps_the_console_up_until_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-u", "-m", "sowa", "demo", "--out", str(tmp_path / "demo"), "--serve"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:  # the demo prints as it goes; the console line comes last
            lines.append(line)
            if line.startswith("serving until Ctrl-C"):
                break
        url = next(x.split(" ", 1)[1].strip() for x in lines if x.startswith("console: "))
        base = url.split("/ui/")[0]
        assert httpx.get(f"{base}/ui/", timeout=10).status_code == 200
        kept = httpx.get(f"{base}/classes/demo-part/results", timeout=10).json()["results"]
        assert len(kept) == 9  # the demo keeps its results, so the console has something to show
        time.sleep(1.0)
        assert proc.poll() is None, "the server should still be serving"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{base}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
