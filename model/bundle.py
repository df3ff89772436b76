"""Bundles: a directory with a `sowa.json` manifest and safetensors weight files. Never a pickle.

    sowa.json            format + version, the ModelConfig, `trained`, sha256 and size of every weight file,
                         provenance (who made it, from what)
    sowa.safetensors     adapters, prompt contexts and token ids, fusion linear
    backbone.safetensors the open_clip CLIP weights (absent when the manifest names a pretrained tag)

Loading checks the format and config, then every file's size and hash and every tensor's name and shape against
the (randomly initialised) model the config builds, before loading any weight into it; the first problem is one
`BundleError` line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbone import BackboneError, load_pretrained_tag
from .config import ConfigError, ModelConfig
from .factory import build_config, build_model
from .files import atomic_write, sha256_file
from .provenance import provenance_base
from .sowa import SowaModel

__all__ = [
    "BACKBONE_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "SOWA_FILE",
    "BundleError",
    "BundleInfo",
    "check_output_dir",
    "init_bundle",
    "load_bundle",
    "read_manifest",
    "save_bundle",
]

FORMAT = "sowa-bundle"
FORMAT_VERSION = 1
MANIFEST = "sowa.json"
SOWA_FILE = "sowa.safetensors"
BACKBONE_FILE = "backbone.safetensors"


class BundleError(ValueError):
    """A bundle that is missing, malformed, tampered with or incompatible."""


@dataclass(frozen=True)
class BundleInfo:
    """What a manifest says: config, whether adapters/prompts are trained, file hashes, provenance."""

    path: Path
    config: ModelConfig
    trained: bool
    files: dict[str, dict[str, Any]]
    provenance: dict[str, Any]

    @cached_property  # read per class on restore and per request in the service: hash once
    def fingerprint(self) -> str:
        """Identifies the weights: banks computed with one bundle are only valid for the same fingerprint."""
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(f"{name}:{self.files[name]['sha256']};".encode())
        if BACKBONE_FILE not in self.files:
            h.update(f"backbone:{self.config.backbone.arch}/{self.config.backbone.weights}".encode())
        return h.hexdigest()


def save_bundle(model: SowaModel, out: str | Path, provenance: dict[str, Any] | None = None) -> BundleInfo:
    """Write `model` as a bundle into directory `out` (created if needed; weight files first, manifest last)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {SOWA_FILE: model.sowa_state_dict()}
    if model.cfg.backbone.weights == "bundle":
        tensors[BACKBONE_FILE] = {k.removeprefix("clip."): v for k, v in model.state_dict().items()
                                  if k.startswith("clip.")}
    files: dict[str, dict[str, Any]] = {}
    for name, state in tensors.items():
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        atomic_write(out / name, lambda tmp, s=state: save_file(s, tmp))
        files[name] = {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
    if BACKBONE_FILE not in files:  # a stale backbone from an earlier save must not sit beside a tag bundle
        (out / BACKBONE_FILE).unlink(missing_ok=True)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.cfg.to_dict(),
        "trained": model.trained,
        "files": files,
        "provenance": provenance or {},
    }
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))
    return read_manifest(out)


def read_manifest(path: str | Path) -> BundleInfo:
    """Parse and validate `sowa.json` (not the weight files)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle directory")
    if not manifest_path.is_file():
        raise BundleError(f"{path}: no {MANIFEST} (is this a bundle directory?)")
    try:
        m = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{manifest_path}: unreadable manifest: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: not a {FORMAT} manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{manifest_path}: format_version {m.get('format_version')!r} is not supported "
                          f"(this version reads {FORMAT_VERSION})")
    try:
        cfg = ModelConfig.from_dict(m["model"])
        files = dict(m["files"])
        for name, meta in files.items():
            if name not in (SOWA_FILE, BACKBONE_FILE) or not isinstance(meta.get("sha256"), str):
                raise BundleError(f"{manifest_path}: unexpected file entry {name!r}")
    except (KeyError, TypeError, AttributeError, ConfigError) as e:
        raise BundleError(f"{manifest_path}: invalid manifest: {e}") from None
    if SOWA_FILE not in files:
        raise BundleError(f"{manifest_path}: the manifest lists no {SOWA_FILE}")
    if cfg.backbone.weights == "bundle" and BACKBONE_FILE not in files:
        raise BundleError(f"{manifest_path}: backbone weights are 'bundle' but no {BACKBONE_FILE} is listed")
    return BundleInfo(path, cfg, bool(m.get("trained", True)), files, dict(m.get("provenance", {})))


def _read_checked(info: BundleInfo, name: str, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Verify size, sha256, tensor names and shapes of one weight file against the model built from the config."""
    path = info.path / name
    meta = info.files[name]
    if not path.is_file():
        raise BundleError(f"{path}: missing weight file")
    size = path.stat().st_size
    if "bytes" in meta and size != meta["bytes"]:
        raise BundleError(f"{path}: {size} bytes, the manifest says {meta['bytes']} (truncated or replaced)")
    if sha256_file(path) != meta["sha256"]:
        raise BundleError(f"{path}: sha256 does not match the manifest (corrupted or tampered with)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable safetensors file: {e}") from None
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise BundleError(f"{path}: tensors do not match the config: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise BundleError(f"{path}: tensor '{key}' has shape {tuple(state[key].shape)}, the config needs "
                              f"{tuple(ref.shape)}")
    return state


def load_bundle(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    keep_text_tower: bool = False,
) -> tuple[SowaModel, BundleInfo]:
    """Load and verify a bundle -> (model in eval mode on `device` in `dtype`, its manifest).

    Text vectors are computed once in float32 before the cast; the text tower is dropped unless asked for.
    """
    info = read_manifest(path)
    try:
        model = build_model(info.config, "bundle", trained=info.trained)
    except (ConfigError, BackboneError, ValueError) as e:
        raise BundleError(f"{info.path}: cannot build the model of this manifest: {e}") from None
    own = model.sowa_state_dict()
    model.load_state_dict(_read_checked(info, SOWA_FILE, own), strict=False)
    if BACKBONE_FILE in info.files:
        clip_expected = model.clip.state_dict()
        model.clip.load_state_dict(_read_checked(info, BACKBONE_FILE, clip_expected), strict=True)
    else:
        try:
            load_pretrained_tag(info.config.backbone, model.clip)
        except BackboneError as e:
            raise BundleError(f"{info.path}: {e}") from None
    model.refresh_text()
    if not keep_text_tower:
        model.drop_text_tower()
    return model.to_inference(device, dtype), info


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to write over a non-bundle directory, or over a bundle without `force`."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise ValueError(f"{out} is a non-empty directory that is not a bundle; choose another --out")
        if not force:
            raise ValueError(f"{out} already holds a bundle; pass --force to overwrite it")


def init_bundle(arch: str, pretrained: str, out: Path, taps: list[int] | None = None,
                window_size: int | None = None, seed: int = 0, force: bool = False) -> BundleInfo:
    """An untrained bundle: adapters and prompts at their init, marked untrained (few-shot-only serving)."""
    check_output_dir(out, force)
    cfg = build_config(arch, pretrained, taps, window_size)
    model = build_model(cfg, pretrained, seed, trained=False)
    model.refresh_text()
    prov = {**provenance_base("init"), "arch": arch, "pretrained": pretrained, "seed": seed}
    return save_bundle(model, out, prov)
