"""Devices and precision: the bottom layer that training, evaluation and serving all stand on.

    resolve_device("auto")           cuda if present, else mps, else cpu
    resolve_precision(name, device)  the autocast dtype for `train.precision`, or None for fp32
    autocast(device, dtype)          torch.autocast for that dtype, or a no-op for fp32
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for fp32. `auto`: bf16 on GPUs that support it, fp32 on CPU
    (CPU bf16 autocast is slower than fp32 on most laptops)."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to `dtype` on `device`; fp32 (None) runs as written."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()
