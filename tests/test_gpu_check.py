"""The one-shot GPU check's plumbing, on the CPU plan: every step runs, at most 8 files come back, the summary
holds the figures a GPU run would report."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

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
    train = probes["train"]["rows"]
    assert [r["compile"] for r in train] == [False] and train[0]["losses_finite"] and train[0]["steps"] == 4
    summary = (out / "summary.md").read_text()
    for needle in ("CUDA tests:", "| fp32 | default | 1 |", "| batching | 2 | 2 |", "device JPEG decode",
                   "- training (sowa-tiny, 32-true, batch 4"):
        assert needle in summary
    assert "0 step(s) failed" in done.stdout


def _gpu_deps() -> object:
    spec = importlib.util.spec_from_file_location("gpu_deps", REPO / "scripts" / "gpu_deps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_wheels_for_the_gpu_machine_are_what_its_image_lacks() -> None:
    deps = _gpu_deps()
    image = deps.image_packages()
    assert {"torch", "torchvision", "numpy", "pillow", "uvloop", "timm"} <= image
    needed = deps.missing(deps.project_requirements(), image)
    assert {"torch", "torchvision", "numpy", "uvloop", "prometheus-client"}.isdisjoint(needed)  # the image's
    # the service's own dependencies and theirs: opentelemetry-api comes in through FastAPI, psycopg-binary
    # through the psycopg[binary] extra, pydantic-core through pydantic
    assert {"fastapi", "open-clip-torch", "uvicorn", "httptools", "opentelemetry-api", "psycopg-binary",
            "pydantic-core", "starlette"} <= set(needed)
    assert needed["fastapi"] == version("fastapi")  # the version this suite ran with
    # markers are read for the target, CPython 3.12 on Linux: uvicorn's typing-extensions is for < 3.11 only
    assert set(deps.missing([Requirement("uvicorn")], set())) == {"uvicorn", "click", "h11"}
    assert "psycopg-binary" not in deps.missing([Requirement("psycopg")], image)  # only with the extra
    both = [Requirement("psycopg[binary]"), Requirement("psycopg")]  # in either order, the extra's wheel comes
    assert "psycopg-binary" in deps.missing(both, image) and "psycopg-binary" in deps.missing(both[::-1], image)
    printed = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_deps.py")], capture_output=True,
                             text=True, check=True).stdout.split()
    assert printed == [f"{n}=={v}" for n, v in needed.items()]
