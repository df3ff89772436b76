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

__all__ = ["FixedPrompts", "PromptLearner", "prompt_strings", "template_sentences", "tokenize_prompts",
           "tokenize_templates"]


def prompt_strings(cfg: PromptConfig) -> tuple[list[list[str]], list[list[str]]]:
    """(normal, anomaly) prompt strings, each M classes x K templates: "X .. X <template>." for the learned
    scheme, "<template>." (no context words) for zero_finetune."""
    ctx = " ".join(["X"] * cfg.length) + " " if cfg.scheme == "learned" else ""

    def fill(templates: tuple[str, ...]) -> list[list[str]]:
        return [[f"{ctx}{t.format(name)}." for t in templates] for name in cfg.class_names]

    return fill(cfg.normal_templates), fill(cfg.anomaly_templates)


def template_sentences(cfg: PromptConfig) -> tuple[list[list[str]], list[list[str]]]:
    """Scheme "template" (the research code's PromptEncoder): per class, every state phrase put into every
    sentence template, state-major: [template.format(state.format(name)) for state for template]."""

    def fill(states: tuple[str, ...]) -> list[list[str]]:
        return [[t.format(s.format(name)) for s in states for t in cfg.templates] for name in cfg.class_names]

    return fill(cfg.normal_templates), fill(cfg.anomaly_templates)


def _tokenize(rows: list[list[str]], context_length: int) -> torch.Tensor:
    tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    flat = [s for row in rows for s in row]
    too_long = [s for s in flat if len(tokenizer.encode(s)) + 2 > context_length]  # + SOT, EOT
    if too_long:  # the research code's tokenize(truncate=False) refuses these too
        raise ValueError(f"prompt {too_long[0]!r} is too long for context length {context_length}")
    return tokenizer(flat).to(torch.int32).view(len(rows), len(rows[0]), context_length)


def tokenize_prompts(cfg: PromptConfig, context_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP BPE token ids of the prompts: two (M, K, context_length) int32 tensors (normal, anomaly)."""
    normal, anomaly = prompt_strings(cfg)
    return _tokenize(normal, context_length), _tokenize(anomaly, context_length)


def tokenize_templates(cfg: PromptConfig, context_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of `template_sentences`: (M, Kn * T, context_length) and (M, Ka * T, context_length) int32."""
    normal, anomaly = template_sentences(cfg)
    return _tokenize(normal, context_length), _tokenize(anomaly, context_length)


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


class FixedPrompts(nn.Module):
    """Prompts without learned context (schemes "zero_finetune" and "template"): only the token ids, saved in
    bundles like the learned prompts' ids. `forward` embeds them with the frozen token embedding."""

    def __init__(self, ids_normal: torch.Tensor, ids_anomaly: torch.Tensor) -> None:
        super().__init__()
        if ids_normal.dim() != 3 or ids_anomaly.dim() != 3 or ids_normal.shape[0] != ids_anomaly.shape[0]:
            raise ValueError(f"prompt token ids must be two (M, K, T) tensors, got {tuple(ids_normal.shape)} and "
                             f"{tuple(ids_anomaly.shape)}")
        self.register_buffer("tokenized_prompts_pos", ids_normal.to(torch.int32))
        self.register_buffer("tokenized_prompts_neg", ids_anomaly.to(torch.int32))

    def token_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M * Kn, T) normal and (M * Ka, T) anomaly ids, class-major."""
        return self.tokenized_prompts_pos.flatten(0, 1), self.tokenized_prompts_neg.flatten(0, 1)

    def forward(self, token_embedding: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """-> prompts (2*M*K, T, width) (normal block first) and their token ids (2*M*K, T)."""
        ids = torch.cat(self.token_ids())
        return token_embedding(ids.long()), ids
