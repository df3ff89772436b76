"""Golden cases computed by the research code: import its checkpoint, predict, compare (≤ 1e-4 max abs error).

Every directory under `tests/data/golden/` holding an `expected.npz` is a case (checkpoint, shots/, test/,
expected.npz, case.json), and so is every one under the directories named in `SOWA_GOLDEN_DIRS` (separated by
the path separator), so further cases (production geometry, shifted windows) are added without code. A case's
`case.json` may name `text_heads` and `value_only`: neither can be read from weights, so the import is told, as
`--text-heads` and `--qk-attention` do. A case with several `class_names` is imported with `--class-names` and
predicted as its `class_name` (`--class`): each class's own prompt context.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sowa.cli import main
from tests.helpers import GOLDEN

TOLERANCE = 1e-4


def golden_cases(env: str | None = None) -> list[Path]:
    """The case directories under tests/data/golden/ and under each of `env`'s directories."""
    roots = [GOLDEN, *(Path(p) for p in (env or "").split(os.pathsep) if p)]
    return sorted(case.parent for root in roots for case in root.glob("*/expected.npz"))


CASES = golden_cases(os.environ.get("SOWA_GOLDEN_DIRS"))


def test_golden_cases_are_present() -> None:
    assert any(c.parent == GOLDEN for c in CASES), f"no golden case under {GOLDEN}: the parity suite would test nothing"


def test_golden_dirs_from_the_environment(tmp_path: Path) -> None:
    extra = tmp_path / "more" / "parity_other"
    extra.mkdir(parents=True)
    (extra / "expected.npz").write_bytes(b"")
    found = golden_cases(os.pathsep.join([str(tmp_path / "more"), str(tmp_path / "absent")]))
    assert extra in found and (GOLDEN / "parity_tiny") in found


@pytest.fixture(scope="module", params=CASES, ids=[p.name for p in CASES])
def imported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    case: Path = request.param
    ckpt = next(case.glob("*.ckpt"))
    bundle = tmp_path_factory.mktemp(case.name) / "bundle"
    spec = json.loads((case / "case.json").read_text()) if (case / "case.json").is_file() else {}
    heads = ["--text-heads", str(spec["text_heads"])] if spec.get("text_heads") else []
    qk = ["--qk-attention"] if spec.get("value_only") is False else []  # checkpoints do not say
    names = ["--class-names", ",".join(spec["class_names"])] if len(spec.get("class_names", [])) > 1 else []
    assert main(["import-checkpoint", str(ckpt), "--out", str(bundle), *heads, *qk, *names]) == 0
    return case, bundle


def _predict(bundle: Path, case: Path, out: Path, shots: bool) -> dict[str, np.ndarray]:
    args = ["predict", "--bundle", str(bundle), "--device", "cpu", "--dtype", "fp32"]
    spec = json.loads((case / "case.json").read_text()) if (case / "case.json").is_file() else {}
    if len(spec.get("class_names", [])) > 1:  # several prompt classes: the parts are of class `class_name`
        args += ["--class", spec["class_name"]]
    if shots:  # the documented order: --shots IMG ... --out F.npz IMG ...
        args += ["--shots", *sorted(str(p) for p in (case / "shots").glob("*.png"))]
    args += ["--out", str(out), *sorted(str(p) for p in (case / "test").glob("*.png"))]
    assert main(args) == 0
    return dict(np.load(out))


def test_zero_shot_maps_and_text_probs(imported: tuple[Path, Path], tmp_path: Path) -> None:
    case, bundle = imported
    expected = np.load(case / "expected.npz")
    got = _predict(bundle, case, tmp_path / "zs.npz", shots=False)
    assert got["anomaly_maps"].shape == expected["zeroshot_maps"].shape
    assert got["anomaly_maps"].dtype == np.float32
    assert np.abs(got["anomaly_maps"] - expected["zeroshot_maps"]).max() <= TOLERANCE
    assert np.abs(got["text_scores"] - expected["text_probs"]).max() <= TOLERANCE


def test_kshot_maps(imported: tuple[Path, Path], tmp_path: Path) -> None:
    case, bundle = imported
    expected = np.load(case / "expected.npz")
    got = _predict(bundle, case, tmp_path / "ks.npz", shots=True)
    assert np.abs(got["anomaly_maps"] - expected["kshot_maps"]).max() <= TOLERANCE
    assert np.abs(got["text_scores"] - expected["text_probs"]).max() <= TOLERANCE
    assert got["scores"].shape == got["thresholds"].shape == got["is_anomalous"].shape == (len(got["scores"]),)
