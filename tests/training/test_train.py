"""`sowa train`: the reference losses term by term, a real training run on a toy dataset, exact resume, and DDP
with two gloo processes that reproduces the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from model.bundle import load_bundle, read_manifest
from model.sowa import SowaModel, TrainOutput
from sowa.cli import main
from tests.helpers import REPO, TINY_CLIP
from training.checkpoints import CheckpointMismatchError, latest_checkpoint
from training.evaluate import evaluate
from training.losses import dice_loss, focal_loss, sowa_loss
from training.train import TrainOptions, train
from training.train_data import epoch_order


# -- losses ----------------------------------------------------------------------------------------------------
def reference_focal(probs2: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """The research code's FocalLoss on a (B, 2, H, W) softmax map, written the long way (one-hot, clamp)."""
    logit = probs2.permute(0, 2, 3, 1).reshape(-1, 2)
    one_hot = torch.nn.functional.one_hot(target.reshape(-1).long(), 2).float()
    one_hot = one_hot.clamp(smooth / (2 - 1), 1.0 - smooth)
    pt = (one_hot * logit).sum(1) + smooth
    return (-((1 - pt) ** 2) * pt.log()).mean()


def test_focal_matches_the_reference_formula() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 5, 7, generator=g)
    y = (torch.rand(3, 5, 7, generator=g) > 0.7).float()
    ours = focal_loss(p, y)
    ref = reference_focal(torch.stack([1 - p, p], dim=1), y)
    assert torch.allclose(ours, ref, atol=1e-7)


def test_focal_and_dice_on_hand_computed_cases() -> None:
    # one pixel, anomaly probability 0.5, true class anomaly: p_t = 0.5 + 1e-5, loss = -(1-p_t)^2 ln p_t
    pt = 0.5 + 1e-5
    assert focal_loss(torch.tensor([[[0.5]]]), torch.tensor([[[1.0]]])).item() == pytest.approx(
        -((1 - pt) ** 2) * np.log(pt), rel=1e-5)
    # dice on p = [1, 0], y = [1, 1]: (2*1 + 1) / (1 + 2 + 1) = 0.75
    assert dice_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])).item() == pytest.approx(0.25)
    # a perfect map: dice 0 on both channels, focal tiny
    y = torch.zeros(2, 4, 4)
    y[:, :2] = 1
    assert dice_loss(y, y).item() == pytest.approx(0.0, abs=1e-7)
    assert focal_loss(y, y).item() < 1e-9


def test_sowa_loss_sums_the_reference_terms() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 3, 3, generator=g)
    text = torch.softmax(torch.randn(2, 2, generator=g), dim=-1)
    masks = torch.zeros(2, 12, 12)
    masks[0, 2:6, 3:9] = 1
    labels = torch.tensor([1, 0])
    terms = sowa_loss(TrainOutput(text, logits), masks, labels)
    up = torch.nn.functional.interpolate(logits, size=(12, 12), mode="bilinear", align_corners=True)
    probs = torch.softmax(torch.stack([-up / 2, up / 2], dim=2), dim=2)  # (B, S, 2, H, W): softmax of 2 channels
    focal = sum(reference_focal(probs[:, s], masks) for s in range(4))
    dice = sum(dice_loss(probs[:, s, 1], masks) + dice_loss(probs[:, s, 0], 1 - masks) for s in range(4))
    ce = torch.nn.functional.cross_entropy(text, labels)  # on probabilities: the reference's double softmax
    assert torch.allclose(terms.focal, focal, atol=1e-6)
    assert torch.allclose(terms.dice, dice, atol=1e-6)
    assert torch.allclose(terms.total, ce + focal + dice, atol=1e-6)


def test_gradients_reach_only_the_trainable_parameters(tiny_model: SowaModel) -> None:
    model = tiny_model
    model.clip.requires_grad_(False)
    model.train()
    images = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64)
    masks[0, 10:30, 10:30] = 1
    sowa_loss(model(images), masks, torch.tensor([1, 0])).total.backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert sum(p.numel() for p in model.trainable_parameters()) > 0


# -- data order ------------------------------------------------------------------------------------------------
def test_epoch_order_is_seeded_and_shards_like_distributed_sampler() -> None:
    a = epoch_order(10, seed=3, epoch=0)
    assert sorted(a) == list(range(10))
    assert a == epoch_order(10, seed=3, epoch=0)
    assert a != epoch_order(10, seed=3, epoch=1)
    r0, r1, r2 = (epoch_order(10, 3, 0, rank, 3) for rank in range(3))
    assert len(r0) == len(r1) == len(r2) == 4  # padded by wrapping around
    assert sorted(set(r0 + r1 + r2)) == list(range(10))
    assert r0 == (a + a[:2])[0::3] and r2 == (a + a[:2])[2::3]


# -- a real run --------------------------------------------------------------------------------------------------
def write_toy_dataset(root: Path, seed: int = 0) -> Path:
    """Two classes of 64x64 noise textures; anomalies are red squares, masks exactly the square (MVTec layout)."""
    rng = np.random.default_rng(seed)
    for cls in ("c1", "c2"):
        for split, kinds in (("train", ["good"] * 4), ("test", ["good"] * 4 + ["square"] * 8)):
            for i, kind in enumerate(kinds):
                img = (rng.normal(0.5, 0.05, (64, 64, 3)) * 255).clip(0, 255).astype(np.uint8)
                folder = root / cls / split / kind
                folder.mkdir(parents=True, exist_ok=True)
                if kind != "good":
                    x, y = rng.integers(4, 44, 2)
                    img[y:y + 14, x:x + 14] = [240, 30, 30]
                    mask = np.zeros((64, 64), np.uint8)
                    mask[y:y + 14, x:x + 14] = 255
                    gt = root / cls / "ground_truth" / kind
                    gt.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask).save(gt / f"{i:03d}_mask.png")
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("toy")
    arch = root / "tiny.json"
    arch.write_text(json.dumps(TINY_CLIP))
    return write_toy_dataset(root / "data"), arch


def _opts(toy: tuple[Path, Path], out: Path, **kw) -> TrainOptions:
    data, arch = toy
    base = dict(data=data, out=out, arch=str(arch), pretrained="none", progress=False, checkpoint_every=2,
                log_every=1)
    return TrainOptions(**{**base, **kw})


def test_training_lowers_the_loss_and_writes_a_trained_bundle(toy: tuple[Path, Path], tmp_path: Path) -> None:
    info = train(_opts(toy, tmp_path / "b", epochs=4, max_steps=None))
    assert info is not None and info.trained
    prov = info.provenance
    assert prov["source"] == "train" and prov["steps"] == 12 and prov["epochs_completed"] == 4  # 24 images / 8
    assert prov["data"]["images"] == 24 and prov["data"]["anomalous"] == 16 and len(prov["data"]["sha256"]) == 64
    assert prov["data"]["anomalous_without_mask"] == 0
    assert prov["seed"] == 2025 and prov["batch_size"] == 8 and prov["world_size"] == 1
    losses = prov["epoch_losses"]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, losses
    log = [json.loads(line) for line in (tmp_path / "b.checkpoints" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13)) and all(r["images_per_s"] > 0 for r in log)

    # only adapters, prompts and fusion moved; the bundle loads and reproduces the trained text vectors
    model, _ = load_bundle(tmp_path / "b", "cpu")
    torch.manual_seed(2025)
    init = SowaModel(model.cfg, trained=False)
    moved = {k for k, v in init.sowa_state_dict().items() if k in model.sowa_state_dict()
             and v.dtype.is_floating_point and not torch.equal(v, model.sowa_state_dict()[k])}
    assert any(k.startswith("adapters.") for k in moved) and any(k.startswith("prompt_learner.") for k in moved)
    assert any(k.startswith("fusion.") for k in moved)
    out = model.predict(torch.randn(2, 3, 64, 64))
    assert out.zero_shot_maps.abs().sum() > 0  # a trained bundle scores zero-shot

    # and it learned something: zero-shot pixel AUROC on its own data, well above the untrained 0.5
    report = evaluate(tmp_path / "b", toy[0], ks=[0], seeds=[0], device="cpu", progress=False)
    assert report["results"]["0"]["mean"]["pixel_auroc"] > 0.7


def test_resume_continues_exactly(toy: tuple[Path, Path], tmp_path: Path) -> None:
    straight = train(_opts(toy, tmp_path / "straight", epochs=2))
    assert straight is not None
    half = train(_opts(toy, tmp_path / "resumed", epochs=2, max_steps=4))
    assert half is not None and half.provenance["steps"] == 4
    assert latest_checkpoint(tmp_path / "resumed.checkpoints").name == "step-00000004.pt"
    resumed = train(_opts(toy, tmp_path / "resumed", epochs=2, resume=True))
    assert resumed is not None and resumed.provenance["resumed_from_step"] == 4
    assert resumed.provenance["steps"] == 6 and resumed.provenance["epochs_completed"] == 2
    a = load_file(straight.path / "sowa.safetensors")
    b = load_file(resumed.path / "sowa.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert resumed.provenance["epoch_losses"] == pytest.approx(straight.provenance["epoch_losses"], abs=1e-5)


def test_losses_read_back_in_windows_give_the_same_run(toy: tuple[Path, Path], tmp_path: Path) -> None:
    # loss terms stay on the device between log lines: the run, its epoch means and its checkpoints do not change
    every = train(_opts(toy, tmp_path / "every", epochs=2, log_every=1))
    windows = train(_opts(toy, tmp_path / "windows", epochs=2, log_every=4, checkpoint_every=5))
    assert every is not None and windows is not None
    assert windows.provenance["epoch_losses"] == every.provenance["epoch_losses"]  # the same sums, bit for bit
    assert windows.provenance["final_loss"] == every.provenance["final_loss"]
    a, b = load_file(every.path / "sowa.safetensors"), load_file(windows.path / "sowa.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "windows.checkpoints" / "train_log.jsonl").read_text()
           .splitlines()]
    every_log = {r["step"]: r for r in (json.loads(line) for line in (tmp_path / "every.checkpoints" /
                                                                      "train_log.jsonl").read_text().splitlines())}
    assert [r["step"] for r in log] == [4]
    assert log[0]["total"] == every_log[4]["total"] and log[0]["dice"] == every_log[4]["dice"]
    # the time limit is read at those same points: past it at once, the run stops at the first one
    late = train(_opts(toy, tmp_path / "late", epochs=2, log_every=2, max_minutes=1e-9))
    assert late is not None and late.provenance["stopped_by"] == "time limit" and late.provenance["steps"] == 2


def test_a_fresh_run_clears_the_previous_runs_checkpoints(toy: tuple[Path, Path], tmp_path: Path) -> None:
    train(_opts(toy, tmp_path / "b", epochs=2))  # 6 steps, checkpoints at 4 and 6
    ckpts = tmp_path / "b.checkpoints"
    (ckpts / "notes.txt").write_text("mine")
    train(_opts(toy, tmp_path / "b", max_steps=2, force=True))
    assert sorted(p.name for p in ckpts.iterdir()) == ["notes.txt", "step-00000002.pt", "train_log.jsonl"]
    assert [json.loads(line)["step"] for line in (ckpts / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    resumed = train(_opts(toy, tmp_path / "b", max_steps=3, resume=True))
    assert resumed is not None and resumed.provenance["resumed_from_step"] == 2


def test_resume_refuses_another_run_and_out_is_protected(toy: tuple[Path, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    train(_opts(toy, tmp_path / "b", max_steps=2))
    with pytest.raises(CheckpointMismatchError, match="batch_size"):
        train(_opts(toy, tmp_path / "b", batch_size=4, resume=True))
    with pytest.raises(ValueError, match="already holds a bundle"):
        train(_opts(toy, tmp_path / "b", max_steps=1))
    with pytest.raises(ValueError, match="precision"):
        train(_opts(toy, tmp_path / "c", precision="fp64"))
    data, arch = toy
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "d"), "--arch", str(arch),
                 "--pretrained", "none", "--no-progress"]) == 2
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "e"), "--arch", str(arch), "--pretrained",
                 "none", "--max-steps", "1", "--no-progress"]) == 0
    assert read_manifest(tmp_path / "e").provenance["steps"] == 1
    assert f"wrote {tmp_path / 'e'} (1 steps, 0 epochs, stopped by steps" in capsys.readouterr().out


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(toy: tuple[Path, Path], tmp_path: Path) -> None:
    """Two ranks of batch 4 see the same 8 images per step as one process of batch 8; the loss is a mean of
    per-sample means, so DDP's averaged gradients are the single-process ones (dropout off to compare)."""
    data, arch = toy
    single = train(_opts(toy, tmp_path / "single", epochs=2, batch_size=8, attn_drop=0.0))
    assert single is not None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "sowa", "train", "--data", str(data), "--out", str(tmp_path / "ddp"), "--arch", str(arch),
           "--pretrained", "none", "--epochs", "2", "--batch-size", "4", "--attn-drop", "0", "--device", "cpu",
           "--no-progress"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = read_manifest(tmp_path / "ddp")
    assert ddp.provenance["world_size"] == 2 and ddp.provenance["global_batch_size"] == 8
    assert ddp.provenance["steps"] == single.provenance["steps"] == 6
    a = load_file(single.path / "sowa.safetensors")
    b = load_file(tmp_path / "ddp" / "sowa.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert ddp.provenance["epoch_losses"] == pytest.approx(single.provenance["epoch_losses"], abs=1e-4)



def test_mosaic_tiles_four_images_of_the_class_with_their_masks(tmp_path: Path) -> None:
    """Class 'c': a plain red normal image and a plain blue anomalous one whose mask is everything. In a mosaic,
    every quadrant is red or blue, and the mask is exactly the blue quadrants; the label stays the item's."""
    for split_dir, color in (("good", (255, 0, 0)), ("bad", (0, 0, 255))):
        folder = tmp_path / "c" / "test" / split_dir
        folder.mkdir(parents=True)
        Image.new("RGB", (32, 32), color).save(folder / "000.png")
    (tmp_path / "c" / "ground_truth" / "bad").mkdir(parents=True)
    Image.new("L", (32, 32), 255).save(tmp_path / "c" / "ground_truth" / "bad" / "000_mask.png")
    from training.train_data import TrainSet

    plain = TrainSet(tmp_path, "test", 32, mosaic_rate=0.0)
    mosaic = TrainSet(tmp_path, "test", 32, mosaic_rate=1.0, seed=5)
    seen = set()
    for epoch in range(6):
        mosaic.set_epoch(epoch)
        for index in range(2):
            image, mask, label = mosaic[index]
            assert label.item() == plain[index][2].item()  # the reference keeps the item's label
            for qy in (0, 16):
                for qx in (0, 16):
                    tile = image[:, qy + 4:qy + 12, qx + 4:qx + 12]
                    blue = bool(tile[2].mean() > tile[0].mean())
                    assert bool(mask[qy + 4:qy + 12, qx + 4:qx + 12].all()) == blue
                    assert bool(mask[qy + 4:qy + 12, qx + 4:qx + 12].any()) == blue
                    seen.add(blue)
            again = mosaic[index]
            assert torch.equal(again[0], image)  # draws depend on (seed, epoch, index) only
    assert seen == {True, False}
    bad = next(i for i, item in enumerate(plain.items) if item.anomaly)
    assert torch.equal(plain[bad][1], torch.ones(32, 32))  # without mosaic: the blue item's own full mask


def test_augment_moves_the_mask_with_the_image() -> None:
    """A red square on grey: after flips, quarter turns and colour changes, the mask still covers exactly the
    pixels that differ from the (still uniform) background."""
    from training.train_data import augment

    a = np.full((40, 40, 3), 128, np.uint8)
    a[3:12, 25:37] = [220, 30, 30]
    mask = np.zeros((40, 40), bool)
    mask[3:12, 25:37] = True
    positions = set()
    for seed in range(12):
        img, m = augment(Image.fromarray(a), mask, np.random.default_rng(seed))
        out = np.asarray(img).astype(int)
        background = out[~m]
        assert (np.abs(background - background[0]).max(axis=1) <= 1).all()  # grey stays uniform
        assert (np.abs(out[m] - background[0]).max(axis=1) > 10).all()  # the square stays distinct
        assert m.sum() == mask.sum()
        ys, xs = np.nonzero(m)
        positions.add((ys.min(), xs.min()))
    assert len(positions) >= 4  # the square was moved around by the flips and turns


def test_anomalies_without_masks_are_counted_and_announced(toy: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    data, _ = toy
    root = tmp_path / "meta"
    root.mkdir()
    items = []
    for i, image in enumerate(sorted((data / "c1" / "test").rglob("*.png"))[:4]):
        (root / f"{i}.png").write_bytes(image.read_bytes())
        items.append({"img_path": f"{i}.png", "mask_path": "", "cls_name": "c1", "anomaly": int(i % 2)})
    (root / "meta.json").write_text(json.dumps({"train": {}, "test": {"c1": items}}))
    info = train(_opts(toy, tmp_path / "b", data=root, max_steps=1))
    assert info is not None and info.provenance["data"]["anomalous_without_mask"] == 2
    assert "2 anomalous image(s)" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; CI and dev machines have none")
def test_cuda_mixed_precision_training_tracks_fp32(toy: tuple[Path, Path], tmp_path: Path) -> None:
    """bf16 autocast on the GPU: the bundle is written and its loss curve follows the fp32 CPU run closely."""
    cpu = train(_opts(toy, tmp_path / "cpu", epochs=2, attn_drop=0.0, device="cpu"))
    gpu = train(_opts(toy, tmp_path / "gpu", epochs=2, attn_drop=0.0, device="cuda"))
    assert cpu is not None and gpu is not None
    assert gpu.provenance["precision"] in ("bf16", "fp16") and gpu.provenance["device"].startswith("cuda")
    assert gpu.provenance["epoch_losses"] == pytest.approx(cpu.provenance["epoch_losses"], rel=0.02)
