"""SowaModel: CLIP backbone + one HFWA adapter per tap + prompts + fusion (SOWA_SPEC.md §1-6).

`forward` is the differentiable training path (text vectors recomputed from the prompts); `predict` is the
inference path (text vectors cached at load, maps in float32, optional few-shot banks per image). Both take
`class_ids`, indices into `cfg.prompt.class_names`: each image is scored against its own prompt class's
(normal, anomaly) vectors, as the research code picks them by class name (None: class 0 for every image).
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
from .prompts import FixedPrompts, PromptLearner, tokenize_prompts, tokenize_templates
from .text import PromptFusion, encode_prompts_with_taps, template_features

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
    """Differentiable outputs: `text_probs` (B, 2) softmax of cos / T; `patch_logits` (B, S, G, G);
    `text_maps`: one (2*M*K, D) tensor per `prompt.text_taps` entry (empty when none are set)."""

    text_probs: torch.Tensor
    patch_logits: torch.Tensor
    text_maps: tuple[torch.Tensor, ...] = ()


class SowaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, trained: bool = True) -> None:
        super().__init__()
        self.cfg, self.trained = cfg, trained
        bb = cfg.backbone
        self.taps = cfg.taps
        self.grid, self.image_size = bb.grid_size, bb.image_size
        self.clip = build_clip(bb)
        stages = cfg.stage_adapters[:1] if cfg.share_weight else cfg.stage_adapters
        # share_weight: one module (and the frozen projections of the first tap's block) for every tap
        self.adapters = nn.ModuleList(
            HFWAAdapter(bb.width, bb.grid_size, a.window_size, a.depth, a.num_heads, a.cpb_dim, a.attn_drop,
                        a.value_only, a.hidden_features, a.drop)
            for a in stages
        )
        self.stage_module = tuple(0 if cfg.share_weight else i for i in range(len(cfg.taps)))
        self.stage_block = tuple(cfg.taps[0] if cfg.share_weight else t for t in cfg.taps)
        p, context = cfg.prompt, self.clip.context_length
        self.prompt_learner: PromptLearner | FixedPrompts
        if p.scheme == "learned":
            ids_normal, ids_anomaly = tokenize_prompts(p, context)
            self.prompt_learner = PromptLearner(ids_normal, ids_anomaly, p.length,
                                                self.clip.token_embedding.embedding_dim)
        elif p.scheme == "zero_finetune":
            self.prompt_learner = FixedPrompts(*tokenize_prompts(p, context))
        else:
            self.prompt_learner = FixedPrompts(*tokenize_templates(p, context))
        self.fusion = PromptFusion(bb.embed_dim)
        # (M, 2, D) unit text vectors for inference, derived from parameters: see refresh_text()
        self.register_buffer("text_features", torch.zeros(len(p.class_names), 2, bb.embed_dim),
                             persistent=False)
        # frozen schemes: the text tower's features of the fixed prompts, computed once (they never change)
        self.register_buffer("frozen_text", torch.zeros(0), persistent=False)
        self._text_tower = True
        self._inference_encoder: Callable[..., SowaFeatures] | None = None
        self.eval()  # inference by default; training code switches to train() explicitly (adapter dropout)

    # -- parameters ------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Adapters, prompt contexts (scheme "learned") and fusion linear; CLIP stays frozen (spec §7.2). A
        shared adapter's parameters appear once."""
        return [*self.adapters.parameters(), *self.prompt_learner.parameters(), *self.fusion.parameters()]

    def sowa_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the CLIP backbone: what a bundle's `sowa.safetensors` holds."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    # -- text side -------------------------------------------------------------------------------------------
    def _raw_text(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(2*M*K, D) text features before the fusion linear, and the text taps' features."""
        scheme, taps = self.cfg.prompt.scheme, self.cfg.prompt.text_taps
        if scheme == "learned":
            prompts, ids = self.prompt_learner(self.clip.token_embedding)
            return encode_prompts_with_taps(self.clip, prompts, ids, taps)
        if self.frozen_text.numel() == 0 or taps:  # taps: their features are not cached
            with torch.no_grad():
                if scheme == "template":
                    ids_normal = self.prompt_learner.tokenized_prompts_pos
                    raw, maps = template_features(self.clip, ids_normal, self.prompt_learner.tokenized_prompts_neg), []
                else:
                    prompts, ids = self.prompt_learner(self.clip.token_embedding)
                    raw, maps = encode_prompts_with_taps(self.clip, prompts, ids, taps)
            self.frozen_text = raw
            return raw, maps
        return self.frozen_text, []

    def text_vectors(self) -> torch.Tensor:
        """(M, 2, D) unit (normal, anomaly) vectors of every prompt class; differentiable in the trainables."""
        return self.fusion(self._raw_text()[0], len(self.cfg.prompt.class_names))

    @torch.no_grad()
    def refresh_text(self) -> None:
        """Recompute the cached text vectors (float32) from the prompts; call after loading weights."""
        if not self._text_tower:
            raise RuntimeError("the text tower was dropped; reload the bundle to recompute text vectors")
        was_training = self.training
        self.eval()
        dtype = self.text_features.dtype
        self.text_features = self.text_vectors().float().to(dtype)
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

    def class_index(self, name: str) -> int:
        """The prompt class serving images of class `name`: its index in `class_names`, else 0."""
        return self.cfg.prompt.class_index(name)

    def _class_ids(self, class_ids: torch.Tensor | Sequence[int] | None, b: int, device: torch.device
                   ) -> torch.Tensor:
        m = len(self.cfg.prompt.class_names)
        if class_ids is None:
            return torch.zeros(b, dtype=torch.long, device=device)
        ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1)
        if ids.numel() != b:
            raise ValueError(f"need one class id per image: {b} images, {ids.numel()} class ids")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= m):
            raise ValueError(f"class ids must index the {m} prompt classes, got {ids.tolist()}")
        return ids.to(device)

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
            for module, block, tokens in zip(self.stage_module, self.stage_block, taps.tokens, strict=True):
                attn = vis.transformer.resblocks[block].attn  # CLIP's in_proj_bias is unused, as the reference
                stages.append(self.adapters[module](tokens, attn.in_proj_weight, attn.out_proj) @ proj)
            adapted = torch.stack(stages, dim=1)  # (B, S, L, D)
        return SowaFeatures(taps.image_embeds, raw, adapted)

    def forward(self, images: torch.Tensor, class_ids: torch.Tensor | None = None) -> TrainOutput:
        """Training pass: text vectors from the live prompts, so gradients reach contexts and fusion; image i
        is scored against prompt class `class_ids[i]` (None: class 0), so each class trains its own context."""
        feats = self.encode(images)
        raw, text_maps = self._raw_text()
        every = self.fusion(raw, len(self.cfg.prompt.class_names))  # (M, 2, D)
        text = every[self._class_ids(class_ids, images.shape[0], every.device)]  # (B, 2, D)
        return TrainOutput(
            text_probs=self._text_probs(feats.image_embeds, text),
            patch_logits=patch_anomaly_logits(feats.adapted, text, self.grid),
            text_maps=tuple(text_maps),
        )

    def _text_probs(self, image_embeds: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, D) image embeddings x (B or 1, 2, D) unit text vectors -> (B, 2) softmax of cos / T."""
        cos = torch.einsum("bd,bcd->bc", F.normalize(image_embeds.float(), dim=-1),
                           text.float().expand(image_embeds.shape[0], -1, -1))
        return torch.softmax(cos / self.cfg.temperature, dim=-1)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, banks: Sequence[MemoryBank | None] | None = None,
                class_ids: torch.Tensor | Sequence[int] | None = None) -> SowaOutput:
        """Inference on a batch; `banks[i]` is image i's class bank, or None for zero-shot only; `class_ids[i]`
        the prompt class (index into `cfg.prompt.class_names`) scoring image i, None: class 0 for all."""
        b = images.shape[0]
        if banks is not None and len(banks) != b:
            raise ValueError(f"need one bank (or None) per image: {b} images, {len(banks)} banks")
        ids = self._class_ids(class_ids, b, self.text_features.device)
        param = self.clip.visual.proj
        encode = self._inference_encoder or self.encode
        feats = encode(images.to(device=param.device, dtype=param.dtype), adapt=self.trained)
        size = self.image_size
        if self.trained:
            every = self.text_features.float()  # (M, 2, D)
            text = every[:1] if class_ids is None else every[ids]  # (1 or B, 2, D)
            zero_shot = zero_shot_map(patch_anomaly_logits(feats.adapted, text.to(param.device), self.grid), size,
                                      self.cfg.sigma)
            text_scores = self._text_probs(feats.image_embeds, text.to(param.device))[:, 1]
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
