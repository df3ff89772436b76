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

__all__ = ["PromptFusion", "encode_prompts", "encode_prompts_with_taps", "template_features", "text_vectors"]


def _project(clip: CLIP, x: torch.Tensor) -> torch.Tensor:
    proj = clip.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def encode_prompts(clip: CLIP, prompts: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(P, T, width) prompt embeddings -> (P, D) raw text features, read at the EOT token (the argmax id)."""
    return encode_prompts_with_taps(clip, prompts, ids)[0]


def encode_prompts_with_taps(clip: CLIP, prompts: torch.Tensor, ids: torch.Tensor, taps: tuple[int, ...] = ()
                             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`encode_prompts`, plus (P, D) features of the text blocks `taps` (negative: from the end): each block's
    output at the EOT token times the text projection, without the final LayerNorm -- the research code's
    TextMapEncoder feature maps."""
    x = prompts + clip.positional_embedding.to(prompts.dtype)
    rows, eot = torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)
    tower = clip.transformer
    if not taps:
        x = tower(x, attn_mask=clip.attn_mask)
        maps: list[torch.Tensor] = []
    else:
        blocks = len(tower.resblocks)
        wanted = {t % blocks for t in taps}
        found: dict[int, torch.Tensor] = {}
        batch_first = getattr(tower, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        for i, block in enumerate(tower.resblocks):
            x = block(x, attn_mask=clip.attn_mask)
            if i in wanted:
                found[i] = x if batch_first else x.transpose(0, 1)
        x = x if batch_first else x.transpose(0, 1)
        maps = [_project(clip, found[t % blocks][rows, eot]) for t in taps]
    x = clip.ln_final(x)
    return _project(clip, x[rows, eot]), maps


def template_features(clip: CLIP, ids_normal: torch.Tensor, ids_anomaly: torch.Tensor) -> torch.Tensor:
    """Scheme "template" (the research code's PromptEncoder.encode_prompt): per class and state, the frozen text
    features of its sentences, each normalised, averaged and renormalised -> (2 * M, D), normal block first."""
    out = []
    for ids in (ids_normal, ids_anomaly):
        m, k, t = ids.shape
        flat = ids.reshape(m * k, t).long()
        feats = encode_prompts(clip, clip.token_embedding(flat), flat).view(m, k, -1)
        mean = (feats / feats.norm(dim=-1, keepdim=True)).mean(dim=1)
        out.append(mean / mean.norm(dim=-1, keepdim=True))
    return torch.cat(out)


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
    """(M, 2, D) normalised text vectors of learned prompts (scheme "learned"; `SowaModel.text_vectors` serves
    every scheme); differentiable in the contexts and the fusion linear."""
    prompts, ids = prompt_learner(clip.token_embedding)
    return fusion(encode_prompts(clip, prompts, ids), prompt_learner.ctx_pos.shape[0])
