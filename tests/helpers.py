"""Small real models and files for tests: random-weight open_clip towers, never mocks."""

from __future__ import annotations

import asyncio
import copy
import inspect
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

from model.config import AdapterConfig, BackboneConfig, ModelConfig

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
GOLDEN = DATA / "golden"  # golden cases computed by the research code
PARITY = GOLDEN / "parity_tiny"

TINY_CLIP: dict[str, Any] = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_config(taps: tuple[int, ...] = (0, 1, 2, 3), window: int = 4, depth: int = 1, image_size: int = 64,
                layers: int = 4, patch_size: int = 8, **adapter: Any) -> ModelConfig:
    mc = copy.deepcopy(TINY_CLIP)
    mc["vision_cfg"].update(image_size=image_size, layers=layers, patch_size=patch_size)
    return ModelConfig(backbone=BackboneConfig(model_config=mc), taps=taps,
                       adapter=AdapterConfig(window_size=window, depth=depth, **adapter))


def perturb_trainables(model: torch.nn.Module, seed: int = 0) -> None:
    """Move adapters, prompts and fusion away from their init, as a trained model would be."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("clip."):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


class ForeignLoss:
    """Stands for the research package's pickled loss objects: importable here, unknown to the importer."""

    def __init__(self) -> None:
        self.gamma = 2


def reference_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """A SowaModel's weights laid out as the research code's Lightning `state_dict` (SOWA_SPEC.md §10)."""
    clip = {k.removeprefix("clip."): v.clone() for k, v in model.state_dict().items() if k.startswith("clip.")}
    sd: dict[str, torch.Tensor] = {}
    for k, v in clip.items():
        sd["net.clip_model." + k] = v
        sd["net.visual_encoder.clip_model." + k] = v
        sd["net.prompt_learner.clip_model." + k] = v
        if not k.startswith(("visual.", "token_embedding", "logit_scale")):
            sd["net.text_encoder." + k] = v
    sd["net.visual_encoder.proj"] = clip["visual.proj"]
    for s, tap in enumerate(model.taps):
        for j, blk in enumerate(model.adapters[s].blocks):
            p = f"net.visual_encoder.adapters.{s}.blocks.{j}."
            for name, v in blk.state_dict().items():
                sd[p + name.replace("mlp.weight", "mlp.layers.0.weight")] = v.clone()
            sd[p + "attn.relative_coords_table"] = blk.attn.relative_coords_table.clone()
            sd[p + "attn.relative_position_index"] = blk.attn.relative_position_index.clone()
            sd[p + "attn.qkv"] = clip[f"visual.transformer.resblocks.{tap}.attn.in_proj_weight"]
            sd[p + "attn.proj.weight"] = clip[f"visual.transformer.resblocks.{tap}.attn.out_proj.weight"]
            sd[p + "attn.proj.bias"] = clip[f"visual.transformer.resblocks.{tap}.attn.out_proj.bias"]
            if blk.attn_mask is not None:
                sd[p + "attn_mask"] = blk.attn_mask.clone()
    pl = model.prompt_learner
    emb = model.clip.token_embedding
    pairs = (("pos", pl.ctx_pos, pl.tokenized_prompts_pos), ("neg", pl.ctx_neg, pl.tokenized_prompts_neg))
    for state, ctx, ids in pairs:
        e = emb(ids.long()).detach()
        sd[f"net.prompt_learner.ctx_{state}"] = ctx.detach().clone()
        sd[f"net.prompt_learner.tokenized_prompts_{state}"] = ids.clone()
        sd[f"net.prompt_learner.token_prefix_{state}"] = e[:, :, :1].clone()
        sd[f"net.prompt_learner.token_suffix_{state}"] = e[:, :, 1 + pl.length:].clone()
    sd["net.cross_fusion.linear.weight"] = model.fusion.linear.weight.detach().clone()
    sd["net.cross_fusion.linear.bias"] = model.fusion.linear.bias.detach().clone()
    return sd


def write_reference_checkpoint(model: Any, path: Path, **extra: Any) -> Path:
    """A Lightning-style checkpoint of `model` whose hyper_parameters pickle a foreign object."""
    ckpt = {"epoch": 0, "global_step": 7, "pytorch-lightning_version": "2.3.3",
            "state_dict": reference_state_dict(model), "loops": {}, "callbacks": {}, "optimizer_states": [],
            "lr_schedulers": [], "hparams_name": "kwargs",
            "hyper_parameters": {"loss": ForeignLoss(), "k_shot": False, "filter": True}, **extra}
    torch.save(ckpt, path)
    return path


def wait_for(condition: Callable[[], object], timeout: float, what: str = "condition",
             interval: float = 0.05) -> float:
    """Poll `condition` until it is truthy: the seconds that took. Fails, naming `what`, at the deadline.

    Tests wait on something observable (a metric, a file, an answer), never for a fixed time: a loaded machine
    only makes them slower, and an idle one does not wait for nothing."""
    start = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not met within {timeout} s")
        time.sleep(interval)


async def wait_for_async(condition: Callable[[], object | Awaitable[object]], timeout: float,
                         what: str = "condition", interval: float = 0.01) -> float:
    """`wait_for` inside an event loop (the condition may be a coroutine function): the loop runs meanwhile."""
    start = time.monotonic()
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not met within {timeout} s")
        await asyncio.sleep(interval)
