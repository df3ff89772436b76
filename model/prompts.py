"""Learnable prompt contexts between frozen token embeddings (SOWA_SPEC.md §3).

Prompt strings are "X X ... X <template>." with `length` placeholder words; the placeholders' embeddings are
replaced by the learned contexts. The token ids are kept as buffers (and saved in bundles), so a bundle never
depends on the tokenizer of the installed open_clip; the frozen prefix/suffix embeddings are taken from the
backbone's token embedding on every call, so they always match the loaded backbone.
"""

from __future__ import annotations

import open_clip
import torch
from torch import nn

from .config import PromptConfig

__all__ = ["PromptLearner", "prompt_strings", "tokenize_prompts"]


def prompt_strings(cfg: PromptConfig) -> tuple[list[list[str]], list[list[str]]]:
    """(normal, anomaly) prompt strings, each M classes x K templates."""
    ctx = " ".join(["X"] * cfg.length)

    def fill(templates: tuple[str, ...]) -> list[list[str]]:
        return [[f"{ctx} {t.format(name)}." for t in templates] for name in cfg.class_names]

    return fill(cfg.normal_templates), fill(cfg.anomaly_templates)


def tokenize_prompts(cfg: PromptConfig, context_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP BPE token ids of the prompts: two (M, K, context_length) int32 tensors (normal, anomaly)."""
    tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    normal, anomaly = prompt_strings(cfg)
    m, k = len(cfg.class_names), len(cfg.normal_templates)

    def ids(rows: list[list[str]]) -> torch.Tensor:
        flat = [s for row in rows for s in row]
        return tokenizer(flat).to(torch.int32).view(m, k, context_length)

    return ids(normal), ids(anomaly)


class PromptLearner(nn.Module):
    """Holds `ctx_pos` (normal) and `ctx_neg` (anomaly) contexts, each (M, K, length, width), init N(0, 0.02^2)."""

    def __init__(self, ids_normal: torch.Tensor, ids_anomaly: torch.Tensor, length: int, width: int) -> None:
        super().__init__()
        if ids_normal.shape != ids_anomaly.shape or ids_normal.dim() != 3:
            raise ValueError(f"prompt token ids must be two (M, K, T) tensors, got {tuple(ids_normal.shape)} and "
                             f"{tuple(ids_anomaly.shape)}")
        m, k, _ = ids_normal.shape
        self.length = length
        self.ctx_pos = nn.Parameter(torch.empty(m, k, length, width).normal_(std=0.02))
        self.ctx_neg = nn.Parameter(torch.empty(m, k, length, width).normal_(std=0.02))
        self.register_buffer("tokenized_prompts_pos", ids_normal.to(torch.int32))
        self.register_buffer("tokenized_prompts_neg", ids_anomaly.to(torch.int32))

    def forward(self, token_embedding: nn.Embedding) -> tuple[torch.Tensor, torch.Tensor]:
        """-> prompts (2*M*K, T, width) (normal block first, then anomaly) and their token ids (2*M*K, T)."""
        prompts, ids = [], []
        for ctx, tok in ((self.ctx_pos, self.tokenized_prompts_pos), (self.ctx_neg, self.tokenized_prompts_neg)):
            emb = token_embedding(tok.long()).to(ctx.dtype)  # (M, K, T, width)
            # [SOT] + learned context + (class words, period, EOT, padding) -- the placeholders are dropped
            x = torch.cat([emb[:, :, :1], ctx, emb[:, :, 1 + self.length:]], dim=2)
            prompts.append(x.flatten(0, 1))
            ids.append(tok.flatten(0, 1))
        return torch.cat(prompts), torch.cat(ids)
