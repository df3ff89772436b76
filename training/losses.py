"""The reference training objective (SOWA_SPEC.md §7.1), term for term.

    loss = CE(text_probs, label) + sum over stages s of [ Focal(P_s, Y) + Dice(P_s, Y) + Dice(1 - P_s, 1 - Y) ]

P_s is stage s's per-pixel anomaly probability at image resolution. The research code's quirks are kept on
purpose, because they are what the published numbers were trained with: the cross-entropy is applied to
probabilities that are already a softmax (a double softmax), and the focal term's "smoothing" clamps the
one-hot target and adds 1e-5 to p_t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.maps import stage_anomaly_probs
from model.sowa import TrainOutput

__all__ = ["FOCAL_GAMMA", "FOCAL_SMOOTH", "LossTerms", "dice_loss", "focal_loss", "sowa_loss"]

FOCAL_GAMMA = 2.0
FOCAL_SMOOTH = 1e-5


def focal_loss(anomaly_prob: torch.Tensor, target: torch.Tensor, gamma: float = FOCAL_GAMMA,
               smooth: float = FOCAL_SMOOTH) -> torch.Tensor:
    """Mean focal loss over pixels of a two-class map given by its anomaly probability (B, H, W).

    With two classes the clamped one-hot puts 1 - smooth on the true class and smooth on the other, and the
    reference adds `smooth` once more: p_t = (1 - smooth) p_true + smooth (1 - p_true) + smooth.
    """
    y = target.to(anomaly_prob.dtype)
    p_true = y * anomaly_prob + (1 - y) * (1 - anomaly_prob)
    pt = (1 - smooth) * p_true + smooth * (1 - p_true) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean over the batch of (2 sum(p y) + 1) / (sum p + sum y + 1), sums over each sample's pixels."""
    p = prob.flatten(1)
    y = target.to(p.dtype).flatten(1)
    dice = (2 * (p * y).sum(1) + 1) / (p.sum(1) + y.sum(1) + 1)
    return 1 - dice.mean()


@dataclass(frozen=True)
class LossTerms:
    """The total and its parts (summed over stages), for logging."""

    total: torch.Tensor
    ce: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor


def sowa_loss(out: TrainOutput, masks: torch.Tensor, labels: torch.Tensor) -> LossTerms:
    """Reference loss of a training pass. `masks` (B, H, W) in {0, 1} at image size (thresholded > 0 for
    training), `labels` (B,) 0 normal / 1 anomalous."""
    size = masks.shape[-1]
    probs = stage_anomaly_probs(out.patch_logits.float(), size)  # (B, S, H, W) float32
    y = masks.float()
    focal = probs.new_zeros(())
    dice = probs.new_zeros(())
    for s in range(probs.shape[1]):
        p = probs[:, s]
        focal = focal + focal_loss(p, y)
        dice = dice + dice_loss(p, y) + dice_loss(1 - p, 1 - y)
    ce = F.cross_entropy(out.text_probs.float(), labels.long())  # double softmax, as the reference trains
    return LossTerms(ce + focal + dice, ce, focal, dice)
