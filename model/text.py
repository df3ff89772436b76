"""Text side: prompts -> CLIP text tower -> fusion linear -> the normalised (normal, anomaly) vectors.

The result depends on parameters only, never on the image (SOWA_SPEC.md §3-4), so inference computes it once
at load and the text tower can then be dropped from the serving device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from .prompts import PromptLearner

__all__ = ["PromptFusion", "encode_prompts", "text_vectors"]


def encode_prompts(clip: CLIP, prompts: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(P, T, width) prompt embeddings -> (P, D) raw text features, read at the EOT token (the argmax id)."""
    x = prompts + clip.positional_embedding.to(prompts.dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
    proj = clip.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


class PromptFusion(nn.Module):
    """Trainable linear on the raw text features, mean over templates, L2 normalisation (spec §4 steps 1-2, 4)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, text_features: torch.Tensor, num_classes: int) -> torch.Tensor:
        """(2*M*K, D) -> (M, 2, D): per prompt class, the unit (normal, anomaly) vectors."""
        x = self.linear(text_features)
        x = x.view(2, num_classes, -1, x.shape[-1]).mean(dim=2)  # (2, M, D)
        return F.normalize(x.permute(1, 0, 2), dim=-1)


def text_vectors(clip: CLIP, prompt_learner: PromptLearner, fusion: PromptFusion) -> torch.Tensor:
    """(M, 2, D) normalised text vectors; differentiable in the contexts and the fusion linear."""
    prompts, ids = prompt_learner(clip.token_embedding)
    return fusion(encode_prompts(clip, prompts, ids), prompt_learner.ctx_pos.shape[0])
