"""SowaModel: CLIP backbone + one HFWA adapter per tap + prompts + fusion (SOWA_SPEC.md §1-6).

`forward` is the differentiable training path (text vectors recomputed from the prompts); `predict` is the
inference path (text vectors cached at load, maps in float32, optional few-shot banks per image).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import HFWAAdapter
from .backbone import build_clip, take_taps
from .config import ModelConfig
from .device import set_fp32_precision, to_device
from .maps import final_map, patch_anomaly_logits, zero_shot_map
from .memory_bank import MemoryBank, min_distances
from .prompts import PromptLearner, tokenize_prompts
from .text import PromptFusion, text_vectors

__all__ = ["SowaFeatures", "SowaModel", "SowaOutput", "TrainOutput"]

UNTRAINED_TEXT_SCORE = 0.5  # an untrained bundle's text side carries no information (docs/scoring.md)


@dataclass(frozen=True)
class SowaFeatures:
    """One vision pass: `image_embeds` (B, D); per-stage `raw` and `adapted` patch features (B, S, L, D)."""

    image_embeds: torch.Tensor
    raw: torch.Tensor
    adapted: torch.Tensor | None


@dataclass(frozen=True)
class SowaOutput:
    """Inference result, float32 on the model's device.

    `anomaly_maps` (B, H, W) reference scale: filtered zero-shot sum + k-shot map where the image has a bank;
    `zero_shot_maps` (B, H, W); `text_scores` (B,); `raw_patches` (B, S, L, D) for building banks.
    """

    anomaly_maps: torch.Tensor
    zero_shot_maps: torch.Tensor
    text_scores: torch.Tensor
    raw_patches: torch.Tensor


@dataclass(frozen=True)
class TrainOutput:
    """Differentiable outputs: `text_probs` (B, 2) softmax of cos / T; `patch_logits` (B, S, G, G)."""

    text_probs: torch.Tensor
    patch_logits: torch.Tensor


class SowaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, trained: bool = True) -> None:
        super().__init__()
        self.cfg, self.trained = cfg, trained
        bb = cfg.backbone
        self.taps = cfg.taps
        self.grid, self.image_size = bb.grid_size, bb.image_size
        self.clip = build_clip(bb)
        a = cfg.adapter
        self.adapters = nn.ModuleList(
            HFWAAdapter(bb.width, bb.grid_size, a.window_size, a.depth, a.num_heads, a.cpb_dim, a.attn_drop)
            for _ in cfg.taps
        )
        ids_normal, ids_anomaly = tokenize_prompts(cfg.prompt, self.clip.context_length)
        self.prompt_learner = PromptLearner(ids_normal, ids_anomaly, cfg.prompt.length, self.clip.token_embedding
                                            .embedding_dim)
        self.fusion = PromptFusion(bb.embed_dim)
        # (M, 2, D) unit text vectors for inference, derived from parameters: see refresh_text()
        self.register_buffer("text_features", torch.zeros(len(cfg.prompt.class_names), 2, bb.embed_dim),
                             persistent=False)
        self._text_tower = True
        self._inference_encoder: Callable[..., SowaFeatures] | None = None
        self.eval()  # inference by default; training code switches to train() explicitly (adapter dropout)

    # -- parameters ------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Adapters, prompt contexts and fusion linear; CLIP stays frozen (spec §7.2)."""
        return [*self.adapters.parameters(), *self.prompt_learner.parameters(), *self.fusion.parameters()]

    def sowa_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the CLIP backbone: what a bundle's `sowa.safetensors` holds."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    @torch.no_grad()
    def refresh_text(self) -> None:
        """Recompute the cached text vectors (float32) from the prompts; call after loading weights."""
        if not self._text_tower:
            raise RuntimeError("the text tower was dropped; reload the bundle to recompute text vectors")
        was_training = self.training
        self.eval()
        dtype = self.text_features.dtype
        self.text_features = text_vectors(self.clip, self.prompt_learner, self.fusion).float().to(dtype)
        self.train(was_training)

    def drop_text_tower(self) -> None:
        """Free the text tower (about a third of ViT-L CLIP); inference only needs the cached vectors."""
        for name in ("transformer", "token_embedding", "ln_final"):
            setattr(self.clip, name, nn.Identity())
        self._text_tower = False

    def to_inference(self, device: torch.device | str, dtype: torch.dtype) -> SowaModel:
        """Move to `device` and cast weights to `dtype` for inference; the cached text vectors stay float32.
        fp32 on CUDA also turns TF32 off (`set_fp32_precision`): fp32 serving gives the reference's numbers."""
        set_fp32_precision(device, dtype)
        text = self.text_features.float()
        self.to(device=device, dtype=dtype).eval()
        self.text_features = text.to(device)
        return self

    def set_inference_encoder(self, encoder: Callable[..., SowaFeatures] | None) -> None:
        """What `predict` runs for the vision pass instead of `encode` (same signature and results), e.g. a
        `CompiledVision`; None goes back to `encode`. Training (`forward`) always runs `encode`."""
        self._inference_encoder = encoder

    # -- passes ----------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, adapt: bool = True) -> SowaFeatures:
        """(B, 3, S, S) normalised images -> image embedding and per-stage raw / adapted patch features."""
        vis = self.clip.visual
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])}")
        taps = take_taps(self.clip, images, self.taps)
        proj = vis.proj
        raw = torch.stack([t @ proj for t in taps.tokens], dim=1)  # (B, S, L, D)
        adapted = None
        if adapt:
            stages = []
            for adapter, tap, tokens in zip(self.adapters, self.taps, taps.tokens, strict=True):
                attn = vis.transformer.resblocks[tap].attn
                width = tokens.shape[-1]
                value_weight = attn.in_proj_weight[2 * width:]  # only the value rows; CLIP's in_proj_bias unused
                stages.append(adapter(tokens, value_weight, attn.out_proj) @ proj)
            adapted = torch.stack(stages, dim=1)  # (B, S, L, D)
        return SowaFeatures(taps.image_embeds, raw, adapted)

    def forward(self, images: torch.Tensor) -> TrainOutput:
        """Training pass: text vectors from the live prompts, so gradients reach contexts and fusion."""
        feats = self.encode(images)
        text = text_vectors(self.clip, self.prompt_learner, self.fusion)[0]  # (2, D): prompt class 0 (spec §4)
        return TrainOutput(
            text_probs=self._text_probs(feats.image_embeds, text),
            patch_logits=patch_anomaly_logits(feats.adapted, text.unsqueeze(0), self.grid),
        )

    def _text_probs(self, image_embeds: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(image_embeds.float(), dim=-1) @ text.float().T  # (B, 2)
        return torch.softmax(cos / self.cfg.temperature, dim=-1)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, banks: Sequence[MemoryBank | None] | None = None) -> SowaOutput:
        """Inference on a batch; `banks[i]` is image i's class bank, or None for zero-shot only."""
        b = images.shape[0]
        if banks is not None and len(banks) != b:
            raise ValueError(f"need one bank (or None) per image: {b} images, {len(banks)} banks")
        param = self.clip.visual.proj
        encode = self._inference_encoder or self.encode
        feats = encode(images.to(device=param.device, dtype=param.dtype), adapt=self.trained)
        size = self.image_size
        if self.trained:
            text = self.text_features[0].float()  # (2, D)
            zero_shot = zero_shot_map(patch_anomaly_logits(feats.adapted, text.unsqueeze(0), self.grid), size,
                                      self.cfg.filter_sigma)
            text_scores = self._text_probs(feats.image_embeds, text)[:, 1]
        else:  # untrained adapters and prompts: only the shots speak
            zero_shot = torch.zeros(b, size, size, device=param.device)
            text_scores = torch.full((b,), UNTRAINED_TEXT_SCORE, device=param.device)
        maps = zero_shot
        with_bank = [i for i in range(b) if banks is not None and banks[i] is not None]
        if with_bank and len(with_bank) == b:  # every image has a class: no index needed
            maps = final_map(zero_shot, min_distances(feats.raw, list(banks)), self.grid)  # type: ignore[arg-type]
        elif with_bank:
            idx = to_device(torch.tensor(with_bank), param.device)
            dist = min_distances(feats.raw.index_select(0, idx), [banks[i] for i in with_bank])
            maps = final_map(zero_shot, dist, self.grid, rows=idx)
        return SowaOutput(maps, zero_shot, text_scores, feats.raw)
