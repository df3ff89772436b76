"""What `sowa train` optimises and feeds: the reference losses term by term, gradients that reach only the
trainable tensors, mosaic and augmentation. The Lightning runs are in test_lightning_train.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.sowa import SowaModel, TrainOutput
from training.losses import dice_loss, focal_loss, sowa_loss


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
