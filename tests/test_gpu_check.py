"""The one-shot GPU check's plumbing, on the CPU plan: every step runs, at most 8 files come back, the summary
holds the figures a GPU run would report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

EXPECTED = {"env.json", "cuda_tests.txt", "bench_model.json", "bench_serve.json", "probes.jsonl", "gpu_util.csv",
            "summary.md", "log.txt"}


@pytest.mark.slow
def test_gpu_check_cpu_plan(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    files = {p.name for p in out.iterdir()}
    assert files == EXPECTED  # the device tool brings back 8 files at most
    modes = {(r["compile"], r["batch_size"]) for part in json.loads((out / "bench_model.json").read_text())
             for r in part["rows"]}
    assert modes == {("off", 1), ("off", 4), ("default", 1)}
    serve = json.loads((out / "bench_serve.json").read_text())
    assert {(r["mode"], r["workers"]) for r in serve["rows"]} >= {("batching", 1), ("batching", 2), ("no batching", 1)}
    probes = {p["probe"]: p for p in map(json.loads, (out / "probes.jsonl").read_text().splitlines())}
    assert probes["syncs"]["syncs"] is None  # nothing to wait for on a CPU; a GPU run counts them
    assert probes["nvjpeg"]["grey_levels"]["max"] <= 2 and probes["nvjpeg"]["device_images_per_s"] > 0
    summary = (out / "summary.md").read_text()
    for needle in ("CUDA tests:", "| fp32 | default | 1 |", "| batching | 2 | 2 |", "device JPEG decode"):
        assert needle in summary
    assert "0 step(s) failed" in done.stdout
