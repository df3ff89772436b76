from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from model.bundle import load_bundle
from model.checkpoint_import import CheckpointError, import_checkpoint, import_to_bundle, read_checkpoint
from model.inference import fit_class, predict_scored
from model.sowa import SowaModel
from sowa.cli import main
from tests.helpers import GOLDEN, perturb_trainables, tiny_config, write_reference_checkpoint


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what a malicious checkpoint does: make unpickling call a function
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize(("depth", "label"), [(1, "production geometry"), (2, "shifted windows")])
def test_import_reproduces_the_source_model(tmp_path: Path, depth: int, label: str) -> None:
    # 336 px, 24x24 grid, 24 blocks, taps [5, 11, 17, 23], window 12: the released model's geometry, narrow
    torch.manual_seed(3)
    cfg = tiny_config(taps=(5, 11, 17, 23), window=12, depth=depth, image_size=336, layers=24, patch_size=14)
    src = SowaModel(cfg)
    perturb_trainables(src, seed=depth)
    src.refresh_text()
    ckpt = write_reference_checkpoint(src, tmp_path / "sowa.ckpt")

    imported = import_checkpoint(ckpt)
    got = imported.model
    assert got.taps == (5, 11, 17, 23)  # inferred from which CLIP block each adapter aliases
    assert got.cfg.adapter.depth == depth and got.cfg.adapter.window_size == 12
    assert imported.provenance["global_step"] == 7

    shots, images = torch.randn(2, 3, 336, 336), torch.randn(2, 3, 336, 336)
    ref_mem, got_mem = fit_class(src, shots), fit_class(got, shots)
    ref, out = predict_scored(src, images, [ref_mem] * 2), predict_scored(got, images, [got_mem] * 2)
    assert torch.allclose(out.anomaly_maps, ref.anomaly_maps, atol=1e-5), label
    assert torch.allclose(out.text_scores, ref.text_scores, atol=1e-6)


def test_unknown_globals_are_stubbed_never_called(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model = SowaModel(tiny_config())
    ckpt = write_reference_checkpoint(model, tmp_path / "evil.ckpt", exploit=_Exploit(marker))
    read = read_checkpoint(ckpt)
    assert not marker.exists()
    assert type(read["hyper_parameters"]["loss"]).__module__.startswith("sowa_stub.")
    assert isinstance(read["state_dict"]["net.visual_encoder.proj"], torch.Tensor)


def test_plain_torch_load_would_have_run_it(tmp_path: Path) -> None:
    # the contrast that justifies the allow-list: an ordinary load executes the payload
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"x": _Exploit(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", pickle.dumps({"state_dict": 3})])
def test_garbage_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        read_checkpoint(path)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    ckpt = write_reference_checkpoint(SowaModel(tiny_config()), tmp_path / "full.ckpt")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(cut)


def test_missing_and_misshapen_tensors(tmp_path: Path) -> None:
    model = SowaModel(tiny_config())
    ckpt = torch.load(write_reference_checkpoint(model, tmp_path / "a.ckpt"), weights_only=False)  # our own file
    sd = ckpt["state_dict"]
    del sd["net.cross_fusion.linear.bias"]
    torch.save(ckpt, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="fusion.linear.bias"):
        import_checkpoint(tmp_path / "missing.ckpt")
    sd["net.cross_fusion.linear.bias"] = torch.zeros(5)
    torch.save(ckpt, tmp_path / "shape.ckpt")
    with pytest.raises(CheckpointError, match=r"fusion.linear.bias.*\(5,\)"):
        import_checkpoint(tmp_path / "shape.ckpt")
    torch.save({"state_dict": {"net.other.weight": torch.zeros(1)}}, tmp_path / "noclip.ckpt")
    with pytest.raises(CheckpointError, match="no CLIP vision tower"):
        import_checkpoint(tmp_path / "noclip.ckpt")


def test_taps_override_and_bundle_round_trip(tmp_path: Path) -> None:
    model = SowaModel(tiny_config())
    ckpt = write_reference_checkpoint(model, tmp_path / "m.ckpt")
    info = import_to_bundle(ckpt, tmp_path / "bundle", taps=[3, 2, 1, 0], text_heads=None, temperature=0.05)
    assert info.config.taps == (3, 2, 1, 0) and info.config.temperature == 0.05
    assert info.provenance["source"] == "import-checkpoint" and len(info.provenance["checkpoint_sha256"]) == 64
    loaded, _ = load_bundle(tmp_path / "bundle")
    assert loaded.taps == (3, 2, 1, 0)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"\x00" * 10)
    assert main(["import-checkpoint", str(bad), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x.ckpt" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["import-checkpoint", str(bad), "--out", str(tmp_path / "b"), "--taps", "a,b"])


def test_golden_variants_import_as_their_research_configuration() -> None:
    """The research code's own checkpoints of issue 21's variants: per-stage adapters, a shared module with a
    hidden MLP, query-key attention, two prompt classes (tests/data/golden/*/case.json)."""
    stages = import_checkpoint(GOLDEN / "parity_stages" / "reference.ckpt").model.cfg
    assert [(a.window_size, a.depth, a.num_heads) for a in stages.stage_adapters] == \
        [(2, 2, 8), (4, 1, 4), (4, 3, 8), (8, 1, 2)]
    assert stages.taps == (0, 1, 2, 3) and not stages.share_weight
    shared = import_checkpoint(GOLDEN / "parity_shared_hidden" / "reference.ckpt")
    assert shared.model.cfg.share_weight and shared.model.cfg.adapters == ()
    assert shared.model.cfg.adapter.hidden_features == (48, 32) and len(shared.model.adapters) == 1
    qk = import_checkpoint(GOLDEN / "parity_qk" / "reference.ckpt", value_only=False).model
    assert not qk.cfg.adapter.value_only and not qk.adapters[0].blocks[1].attn.value_only
    ckpt = GOLDEN / "parity_classes" / "reference.ckpt"
    named = import_checkpoint(ckpt, class_names=["widget", "gadget"])
    assert named.model.cfg.prompt.class_names == ("widget", "gadget") and named.provenance["prompts"] == "default"
    assert import_checkpoint(ckpt).model.cfg.prompt.class_names == ("class0", "class1")
    with pytest.raises(CheckpointError, match="do not give the checkpoint's prompt token ids"):
        import_checkpoint(ckpt, class_names=["gadget", "widget"])
    with pytest.raises(CheckpointError, match="3 class names given for the checkpoint's 2 prompt classes"):
        import_checkpoint(ckpt, class_names=["a", "b", "c"])
