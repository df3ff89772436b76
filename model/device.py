"""Device and precision choices, resolved once with clear errors."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

__all__ = ["DTYPES", "machine_description", "resolve_device", "resolve_dtype", "set_fp32_precision", "to_device"]

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{name}' requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device '{name}': use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str | torch.dtype = "fp32") -> torch.dtype:
    """'fp32' | 'fp16' | 'bf16' (or the torch names) -> torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"unsupported dtype {name}: use fp32, fp16 or bf16")
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}': use fp32, fp16 or bf16") from None


def machine_description(device: str) -> str:
    """The device in words, for reports and benchmark tables: the GPU's name, or the CPU's and its threads."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads"


def set_fp32_precision(device: torch.device | str, dtype: torch.dtype) -> bool:
    """For fp32 on CUDA, make cuBLAS matmuls and cuDNN convolutions full fp32 ("ieee"), not TF32; returns whether
    it did. Process-wide: the flags are global in torch.

    cuDNN convolutions default to TF32 (10-bit mantissa), which moves fp32 maps by ~1e-3 off the reference; the
    patch embedding is such a convolution. Only the new API (torch >= 2.9) is set: after it, torch refuses to
    read the legacy `allow_tf32` flags, and mixing the two is an error.
    """
    if torch.device(device).type != "cuda" or dtype != torch.float32:
        return False
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    return True


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without making the host wait: on CUDA it goes through pinned memory with
    a non-blocking copy (a pageable copy blocks the host until the device has run everything queued before it)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
