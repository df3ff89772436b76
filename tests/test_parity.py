"""Golden cases computed by the research code: import its checkpoint, predict, compare (≤ 1e-4 max abs error).

Every `../shared/reference/parity_*` directory is a case (checkpoint, shots/, test/, expected.npz), so further
golden cases (production geometry, shifted windows) are picked up as they are added.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REFERENCE
from training.cli import main

CASES = sorted(p for p in REFERENCE.glob("parity_*") if (p / "expected.npz").is_file())
TOLERANCE = 1e-4


def test_golden_cases_are_present() -> None:
    assert CASES, f"no golden cases under {REFERENCE}: the parity suite would test nothing"


@pytest.fixture(scope="module", params=CASES, ids=[p.name for p in CASES])
def imported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    case: Path = request.param
    ckpt = next(case.glob("*.ckpt"))
    bundle = tmp_path_factory.mktemp(case.name) / "bundle"
    assert main(["import-checkpoint", str(ckpt), "--out", str(bundle)]) == 0
    return case, bundle


def _predict(bundle: Path, case: Path, out: Path, shots: bool) -> dict[str, np.ndarray]:
    args = ["predict", "--bundle", str(bundle), "--device", "cpu", "--dtype", "fp32"]
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
