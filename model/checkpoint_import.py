"""Import of an official SOWA Lightning checkpoint (SOWA_SPEC.md §10) into a SowaModel, without running its pickles.

The checkpoint's `hyper_parameters` pickle objects of the research package (losses, optimiser partials), so it
cannot be read with `weights_only=True`. `SafeUnpickler` resolves only the handful of globals needed to rebuild
tensors and containers; every other global becomes an inert stub, so no code named by the file ever runs.
Hyper-parameters are inferred from tensor shapes and the taps from which CLIP block each adapter aliases.
"""

from __future__ import annotations

import pickle
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from .adapter import shifted_window_mask
from .bundle import BundleInfo, check_output_dir, save_bundle
from .config import AdapterConfig, BackboneConfig, ConfigError, ModelConfig, PromptConfig, default_taps
from .factory import build_model
from .files import sha256_file
from .prompts import tokenize_prompts
from .provenance import provenance_base
from .sowa import SowaModel
from .window_attention import relative_coords_table, relative_position_index

__all__ = ["CheckpointError", "ImportedCheckpoint", "SafeUnpickler", "import_checkpoint", "import_to_bundle",
           "read_checkpoint"]

# Exactly what rebuilding tensors and plain containers needs; cf. torch's own weights_only allow-list.
_ALLOWED: dict[str, set[str]] = {
    "torch._utils": {"_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                     "_rebuild_parameter_with_state"},
    "torch": {"Size", "device", *(n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype))},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict", "int", "float", "bool", "str", "bytes", "complex",
                 "slice"},
}


class CheckpointError(ValueError):
    """A file that is not a readable SOWA checkpoint."""


class _Stub:
    """Stands in for any global outside the allow-list: accepts any construction and state, does nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that never imports or calls anything outside `_ALLOWED`."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        return type(name, (_Stub,), {"__module__": "sowa_stub." + module})


# torch.load takes a "pickle module": anything with an Unpickler class and a load function.
_safe_pickle = types.SimpleNamespace(Unpickler=SafeUnpickler, load=lambda f, **kw: SafeUnpickler(f, **kw).load(),
                                     __name__="sowa_safe_pickle")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint with the allow-list unpickler; returns its top-level dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        ckpt = torch.load(str(path), map_location="cpu", pickle_module=_safe_pickle, weights_only=False,
                          mmap=False)
    except Exception as e:  # truncated zip, foreign format, garbage: all one clear line
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: no 'state_dict' in the checkpoint (is it a Lightning .ckpt?)")
    bad = [k for k, v in ckpt["state_dict"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entry '{bad[0]}' is not a tensor")
    return ckpt


@dataclass(frozen=True)
class ImportedCheckpoint:
    model: SowaModel
    provenance: dict[str, Any]


def _find_prefix(sd: dict[str, torch.Tensor], path: Path) -> str:
    for key in sd:
        if key.endswith("clip_model.visual.conv1.weight") and ".visual_encoder." not in key \
                and ".prompt_learner." not in key:
            return key[: -len("clip_model.visual.conv1.weight")]
    raise CheckpointError(f"{path}: no CLIP vision tower (…clip_model.visual.conv1.weight) in the state_dict")


def _text_heads(width: int) -> int:
    # OpenAI's build_model uses width // 64; narrower test towers of the research code use 16-wide heads.
    return width // 64 if width >= 64 else max(1, width // 16)


def infer_clip_config(clip: dict[str, torch.Tensor], text_heads: int | None = None) -> dict[str, Any]:
    """open_clip model config of an OpenAI-format CLIP state dict (the research code's CLIP is OpenAI's)."""
    try:
        width = clip["visual.conv1.weight"].shape[0]
        patch = clip["visual.conv1.weight"].shape[-1]
        grid = round((clip["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = len({k.split(".")[3] for k in clip if k.startswith("visual.transformer.resblocks.")})
        text_width = clip["ln_final.weight"].shape[0]
        text_layers = len({k.split(".")[2] for k in clip if k.startswith("transformer.resblocks.")})
        return {
            "embed_dim": int(clip["text_projection"].shape[1]),
            "quick_gelu": True,  # OpenAI CLIP, as the research code loads it
            "vision_cfg": {"image_size": int(grid * patch), "layers": layers, "width": int(width),
                           "patch_size": int(patch), "head_width": 64},  # OpenAI CLIP: heads = width // 64
            "text_cfg": {"context_length": int(clip["positional_embedding"].shape[0]),
                         "vocab_size": int(clip["token_embedding.weight"].shape[0]), "width": int(text_width),
                         "heads": int(text_heads or _text_heads(text_width)), "layers": text_layers},
        }
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"incomplete CLIP weights in the checkpoint: missing {e}") from None


def _known_arch(model_config: dict[str, Any]) -> str | None:
    """The open_clip name whose config equals the inferred one (e.g. ViT-L-14-336-quickgelu), if any."""
    def core(c: dict[str, Any]) -> tuple:
        v, t = c["vision_cfg"], c["text_cfg"]
        return (c["embed_dim"], bool(c.get("quick_gelu")), v.get("image_size"), v.get("layers"), v.get("width"),
                v.get("patch_size"), v.get("head_width", 64), t.get("width"), t.get("heads"), t.get("layers"),
                t.get("context_length"), t.get("vocab_size"))

    want = core(model_config)
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        try:
            if cfg and core(cfg) == want and not cfg["vision_cfg"].get("timm_model_name"):
                return name
        except (KeyError, TypeError):
            continue
    return None


@dataclass(frozen=True)
class _Adapters:
    """What the checkpoint's adapters say: one configuration per stage, whether one module serves every stage,
    the CLIP block each stage's frozen projections alias (None when unknown) and the research MLP layer
    indices of each stage's linears."""

    stages: tuple[AdapterConfig, ...]
    shared: bool
    alias_taps: tuple[int | None, ...]
    mlp_layers: tuple[tuple[int, ...], ...]


def _mlp_layers(sd: dict[str, torch.Tensor], block: str) -> list[int]:
    """Indices of the research MLP's linears in block `block` (…mlp.layers.N.weight), in order."""
    pattern = re.compile(re.escape(block) + r"mlp\.layers\.(\d+)\.weight")
    return sorted(int(m.group(1)) for k in sd if (m := pattern.fullmatch(k)))


def _stage_config(sd: dict[str, torch.Tensor], pre: str, s: int, blocks: set[int], grid: int, value_only: bool,
                  path: Path) -> tuple[AdapterConfig, tuple[int, ...]]:
    """One stage's configuration from its tensors' shapes; its derived buffers must be what this implementation
    derives, else the checkpoint is another variant."""
    a = f"{pre}visual_encoder.adapters.{s}.blocks."
    try:
        heads = sd[a + "0.attn.logit_scale"].shape[0]
        window = (sd[a + "0.attn.relative_coords_table"].shape[1] + 1) // 2
        cpb = sd[a + "0.attn.cpb_mlp.0.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{path}: adapter tensor missing: {e}") from None
    layers = _mlp_layers(sd, a + "0.")
    if not layers:
        raise CheckpointError(f"{path}: adapter {s} has no MLP (…blocks.0.mlp.layers.N.weight)")
    hidden = tuple(int(sd[f"{a}0.mlp.layers.{i}.weight"].shape[0]) for i in layers[:-1])
    for j in sorted(blocks):
        b = f"{a}{j}."
        if b + "attn.relative_coords_table" in sd and not torch.allclose(sd[b + "attn.relative_coords_table"],
                                                                         relative_coords_table(window), atol=1e-6):
            raise CheckpointError(f"{path}: adapter {s} block {j} has an unexpected position table")
        if b + "attn.relative_position_index" in sd and not torch.equal(sd[b + "attn.relative_position_index"],
                                                                        relative_position_index(window)):
            raise CheckpointError(f"{path}: adapter {s} block {j} has an unexpected position index")
        mask = sd.get(b + "attn_mask")
        if mask is not None and not torch.equal(mask, shifted_window_mask(grid, window, window // 2)):
            raise CheckpointError(f"{path}: adapter {s} block {j} has an unexpected shifted-window mask")
        if _mlp_layers(sd, b) != layers:
            raise CheckpointError(f"{path}: adapter {s} blocks have different MLPs")
    try:
        cfg = AdapterConfig(window_size=window, depth=len(blocks), num_heads=heads, cpb_dim=cpb,
                            value_only=value_only, hidden_features=hidden)
    except ConfigError as e:
        raise CheckpointError(f"{path}: adapter {s}: {e}") from None
    return cfg, tuple(layers)


def _adapter_config(sd: dict[str, torch.Tensor], pre: str, clip: dict[str, torch.Tensor], grid: int,
                    value_only: bool, path: Path) -> _Adapters:
    pattern = re.compile(re.escape(pre) + r"visual_encoder\.adapters\.(\d+)\.blocks\.(\d+)\.")
    found: dict[int, set[int]] = {}
    for k in sd:
        m = pattern.match(k)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not found or sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{path}: no HFWA adapters (…visual_encoder.adapters.N.blocks.M.*) found")
    stages, mlp_layers = zip(*(_stage_config(sd, pre, s, found[s], grid, value_only, path) for s in sorted(found)),
                             strict=True)
    # one module instance in every stage (share_weight): torch.save keeps the storage shared
    first = f"{pre}visual_encoder.adapters.0.blocks.0.attn.logit_scale"
    shared = len(found) > 1 and all(
        sd[f"{pre}visual_encoder.adapters.{s}.blocks.0.attn.logit_scale"].data_ptr() == sd[first].data_ptr()
        for s in found)
    # taps: the CLIP block whose frozen in_proj_weight each adapter aliases
    taps: list[int | None] = []
    for s in range(len(found)):
        qkv = sd.get(f"{pre}visual_encoder.adapters.{s}.blocks.0.attn.qkv")
        match = None
        if qkv is not None:
            for key, w in clip.items():
                m = re.fullmatch(r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight", key)
                if m and w.shape == qkv.shape and torch.equal(w, qkv):
                    match = int(m.group(1))
                    break
        taps.append(match)
    return _Adapters(tuple(stages), shared, tuple(taps), tuple(mlp_layers))


def import_checkpoint(
    path: str | Path, taps: list[int] | None = None, text_heads: int | None = None, temperature: float = 0.07,
    value_only: bool = True, class_names: list[str] | None = None,
) -> ImportedCheckpoint:
    """Official SOWA checkpoint -> SowaModel (eval, float32, text vectors computed) + provenance.

    Per-stage adapters (windows, depths, heads, hidden MLPs may differ), a shared adapter module and the MLP's
    layers are read from the tensors; `value_only` cannot be (the research code saves no `net` arguments), so it
    is given, as `--qk-attention` does. The research code's `filter` is read from its hyper-parameters."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    sd: dict[str, torch.Tensor] = ckpt["state_dict"]
    pre = _find_prefix(sd, path)
    clip = _clip_state(sd, pre)
    model_config = infer_clip_config(clip, text_heads)
    grid = model_config["vision_cfg"]["image_size"] // model_config["vision_cfg"]["patch_size"]
    found = _adapter_config(sd, pre, clip, grid, value_only, path)
    n_adapters = len(found.stages)
    alias = found.alias_taps
    if found.shared or (None not in alias and len(set(alias)) < len(alias)):
        alias = (None,) * n_adapters  # one block aliased by every stage says nothing about the taps
    taps = _choose_taps(taps, list(alias), n_adapters, model_config["vision_cfg"]["layers"], path)
    blocks = set(found.alias_taps) - {None}
    if found.shared and blocks and blocks != {taps[0]}:
        raise CheckpointError(f"{path}: the shared adapter uses CLIP block {sorted(blocks)[0]}'s projections; this "
                              f"implementation uses the first tap's ({taps[0]}): pass --taps starting with it")
    if not found.shared and None not in found.alias_taps and len(blocks) < n_adapters:
        raise CheckpointError(f"{path}: separate adapters that alias the same CLIP block are not supported")
    prompt, prompts_are_default = _prompt_config(sd, pre, path, class_names)
    hparams = ckpt.get("hyper_parameters")
    use_filter = hparams.get("filter", True) if isinstance(hparams, dict) else True
    stages = found.stages
    same = len(set(stages)) == 1
    try:
        cfg = ModelConfig(
            backbone=BackboneConfig(model_config=model_config, arch=_known_arch(model_config), weights="bundle"),
            taps=tuple(taps), adapter=stages[0], adapters=() if same else stages, share_weight=found.shared,
            prompt=prompt, temperature=temperature, filter=use_filter if isinstance(use_filter, bool) else True,
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: inferred configuration is invalid: {e}") from None
    model = build_model(cfg)
    try:
        model.clip.load_state_dict(clip, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: CLIP weights do not fit the inferred architecture: "
                              f"{str(e).splitlines()[0]}") from None
    _load_sowa_state(model, _sowa_state(sd, pre, found), path)
    model.refresh_text()
    provenance = {
        "source": "import-checkpoint",
        "checkpoint": path.name,
        "checkpoint_sha256": sha256_file(path),
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
        "lightning_version": ckpt.get("pytorch-lightning_version"),
        "text_heads": model_config["text_cfg"]["heads"],
        "prompts": "default" if prompts_are_default else "token ids from the checkpoint",
    }
    return ImportedCheckpoint(model, provenance)


def _clip_state(sd: dict[str, torch.Tensor], pre: str) -> dict[str, torch.Tensor]:
    """The research code's CLIP weights under open_clip's names, without its non-tensor attributes."""
    clip = {k[len(pre) + len("clip_model."):]: v for k, v in sd.items() if k.startswith(pre + "clip_model.")}
    for key in ("input_resolution", "context_length", "vocab_size"):
        clip.pop(key, None)
    return clip


def _choose_taps(taps: list[int] | None, alias_taps: list[int | None], n_adapters: int, layers: int,
                 path: Path) -> list[int]:
    """The taps given, else those the adapters alias, else the defaults for 4 adapters."""
    if taps is None:
        if all(t is not None for t in alias_taps):
            taps = [int(t) for t in alias_taps]  # type: ignore[arg-type]
        elif n_adapters == 4:
            taps = list(default_taps(layers))
        else:
            raise CheckpointError(f"{path}: cannot tell which blocks the {n_adapters} adapters tap; pass --taps")
    if len(taps) != n_adapters:
        raise CheckpointError(f"{path}: {n_adapters} adapters but {len(taps)} taps given")
    return taps


def _prompt_config(sd: dict[str, torch.Tensor], pre: str, path: Path, class_names: list[str] | None = None
                   ) -> tuple[PromptConfig, bool]:
    """The prompt layout from the learned contexts' shape, and whether the token ids are the default prompts'.
    `class_names` (the research config's, in order) name the prompt classes; they must reproduce the file's
    token ids with the default templates, so a wrong or reordered list is refused."""
    try:
        ctx = sd[pre + "prompt_learner.ctx_pos"]
        ids_pos = sd[pre + "prompt_learner.tokenized_prompts_pos"]
        ids_neg = sd[pre + "prompt_learner.tokenized_prompts_neg"]
    except KeyError as e:
        raise CheckpointError(f"{path}: prompt learner tensor missing: {e}") from None
    m, k, length = ctx.shape[0], ctx.shape[1], ctx.shape[2]
    if class_names is not None and len(class_names) != m:
        raise CheckpointError(f"{path}: {len(class_names)} class names given for the checkpoint's {m} prompt classes")
    names = tuple(class_names) if class_names else ("object",) if m == 1 else tuple(f"class{i}" for i in range(m))
    try:
        prompt = PromptConfig(length=length, class_names=names, normal_templates=("{}",) * k,
                              anomaly_templates=("damaged {}",) * k)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    default_ids = tokenize_prompts(prompt, ids_pos.shape[-1])
    prompts_are_default = torch.equal(default_ids[0], ids_pos.int()) and torch.equal(default_ids[1], ids_neg.int())
    if class_names and not prompts_are_default:
        raise CheckpointError(f"{path}: the class names {list(class_names)} (with the default templates) do not "
                              "give the checkpoint's prompt token ids: wrong names or order, or other templates")
    return prompt, prompts_are_default


def _mlp_name(layers: tuple[int, ...], index: int) -> str:
    """This implementation's name of the research MLP's `layers.{index}` (see `adapter.block_mlp`): `mlp` for a
    single linear; else linear k is `mlp.{2k}` (its Dropouts, inactive at inference, are not kept)."""
    return "mlp" if len(layers) == 1 else f"mlp.{2 * layers.index(index)}"


def _sowa_state(sd: dict[str, torch.Tensor], pre: str, found: _Adapters) -> dict[str, torch.Tensor]:
    """Adapters, prompt contexts and fusion under this implementation's names; aliases and derived buffers
    dropped; a shared adapter once."""
    own: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith(pre + "visual_encoder.adapters."):
            name = key[len(pre + "visual_encoder."):]
            if re.search(r"\.attn\.(qkv|proj\.weight|proj\.bias|relative_coords_table|relative_position_index)$",
                         name) or name.endswith(".attn_mask"):
                continue  # frozen CLIP aliases and derived buffers
            stage = int(name.split(".")[1])
            if found.shared and stage > 0:
                continue  # the same tensors as stage 0's
            m = re.search(r"\.mlp\.layers\.(\d+)\.", name)
            if m:
                name = name.replace(m.group(0), f".{_mlp_name(found.mlp_layers[stage], int(m.group(1)))}.")
            own[name] = value
        elif key.startswith(pre + "prompt_learner.") and re.search(r"\.(ctx_pos|ctx_neg|tokenized_prompts_pos|"
                                                                    r"tokenized_prompts_neg)$", key):
            own[key[len(pre):]] = value
        elif key.startswith(pre + "cross_fusion.linear."):
            own["fusion." + key[len(pre + "cross_fusion."):]] = value
    return own


def _load_sowa_state(model: SowaModel, own: dict[str, torch.Tensor], path: Path) -> None:
    """Load `own` into the model's non-CLIP part after checking it has exactly its keys and shapes."""
    expected = model.sowa_state_dict()
    missing, extra = sorted(set(expected) - set(own)), sorted(set(own) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: checkpoint does not match the inferred SOWA layout: missing "
                              f"{missing[:3]}, unexpected {extra[:3]}")
    for key, ref in expected.items():
        if own[key].shape != ref.shape:
            raise CheckpointError(f"{path}: '{key}' has shape {tuple(own[key].shape)}, expected {tuple(ref.shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in own.items()}, strict=False)


def import_to_bundle(ckpt: Path, out: Path, taps: list[int] | None = None, text_heads: int | None = None,
                     temperature: float = 0.07, force: bool = False, value_only: bool = True,
                     class_names: list[str] | None = None) -> BundleInfo:
    """`sowa import-checkpoint`: an official checkpoint written as a bundle at `out`."""
    check_output_dir(out, force)
    imported = import_checkpoint(ckpt, taps=taps, text_heads=text_heads, temperature=temperature,
                                 value_only=value_only, class_names=class_names)
    return save_bundle(imported.model, out, {**provenance_base("import-checkpoint"), **imported.provenance})
