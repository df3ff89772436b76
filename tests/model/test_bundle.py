from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.bundle import BACKBONE_FILE, MANIFEST, SOWA_FILE, BundleError, load_bundle, read_manifest, save_bundle
from model.sowa import SowaModel


@pytest.fixture()
def bundle(tiny_model: SowaModel, tmp_path: Path) -> Path:
    save_bundle(tiny_model, tmp_path / "b", {"source": "test"})
    return tmp_path / "b"


def test_round_trip_gives_identical_predictions(tiny_model: SowaModel, bundle: Path) -> None:
    loaded, info = load_bundle(bundle)
    x = torch.randn(2, 3, 64, 64)
    a, b = tiny_model.predict(x), loaded.predict(x)
    assert torch.equal(a.anomaly_maps, b.anomaly_maps) and torch.equal(a.text_scores, b.text_scores)
    assert info.provenance == {"source": "test"} and info.trained
    assert len(info.fingerprint) == 64


def test_manifest_lists_hashes_and_no_pickles(bundle: Path) -> None:
    m = json.loads((bundle / MANIFEST).read_text())
    assert m["format"] == "sowa-bundle" and m["format_version"] == 1
    assert set(m["files"]) == {SOWA_FILE, BACKBONE_FILE}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert sorted(p.name for p in bundle.iterdir()) == sorted([MANIFEST, SOWA_FILE, BACKBONE_FILE])
    assert m["model"]["taps"] == [0, 1, 2, 3] and m["model"]["adapter"]["window_size"] == 4


def test_tampered_weights_are_refused(bundle: Path) -> None:
    data = bytearray((bundle / SOWA_FILE).read_bytes())
    data[-5] ^= 0xFF
    (bundle / SOWA_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 does not match"):
        load_bundle(bundle)


def test_truncated_and_missing_files(bundle: Path) -> None:
    (bundle / BACKBONE_FILE).write_bytes((bundle / BACKBONE_FILE).read_bytes()[:100])
    with pytest.raises(BundleError, match="truncated or replaced"):
        load_bundle(bundle)
    (bundle / BACKBONE_FILE).unlink()
    with pytest.raises(BundleError, match="missing weight file"):
        load_bundle(bundle)


def _edit_manifest(bundle: Path, edit) -> None:
    m = json.loads((bundle / MANIFEST).read_text())
    edit(m)
    (bundle / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
    (lambda m: m.update(format="other"), "not a sowa-bundle manifest"),
    (lambda m: m["model"].update(taps=[0, 9]), r"taps \[9\] out of range"),
    (lambda m: m["model"]["adapter"].update(num_heads=3), "not divisible by adapter num_heads"),
    (lambda m: m["files"].update({"../evil.bin": {"sha256": "0" * 64}}), "unexpected file entry"),
    (lambda m: m["files"].pop(BACKBONE_FILE), "no backbone.safetensors is listed"),
])
def test_invalid_manifests(bundle: Path, edit, message: str) -> None:
    _edit_manifest(bundle, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_shape_mismatch_names_the_tensor(bundle: Path) -> None:
    # a config that builds fine but does not fit the stored weights (cpb width 64 -> 32)
    _edit_manifest(bundle, lambda m: m["model"]["adapter"].update(cpb_dim=32))
    with pytest.raises(BundleError, match=r"cpb_mlp.0.weight' has shape \(64, 2\), the config needs \(32, 2\)"):
        load_bundle(bundle)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a bundle directory"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="no sowa.json"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        read_manifest(tmp_path)


def test_text_tower_is_dropped_but_vectors_kept(bundle: Path) -> None:
    model, _ = load_bundle(bundle)
    assert not any(k.startswith("clip.transformer.") for k in model.state_dict())
    assert model.text_features.dtype == torch.float32 and model.text_features.norm(dim=-1).allclose(
        torch.ones(1, 2))
    with pytest.raises(RuntimeError, match="text tower was dropped"):
        model.refresh_text()
