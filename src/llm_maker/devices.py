"""Devices and precision: the bottom layer that training, evaluation and serving all stand on.

    resolve_device("auto")             cuda if present, else mps, else cpu
    device_caps(device)                what the device can do that the precision rule needs
    auto_precision(caps)               the `auto` rule, a pure function of those capabilities
    resolve_precision(name, device)    `train.precision` -> the autocast dtype (None: fp32), or a clear error
    inference_dtype(name, device)      `--precision` / `eval.precision` -> the dtype weights are cast to
                                       for evaluation, generation and serving (same rule, same errors)
    autocast(device, dtype)            torch.autocast for that dtype, or a no-op for fp32

The `auto` rule:
  CUDA with bf16 (compute capability 8.0+: A100, L20, RTX 30xx/40xx, H100/H200)   bf16
  CUDA without (T4, V100)                                                      fp16 with loss scaling
  CPU with AMX-BF16 matrix units (Xeon Sapphire Rapids and later)              bf16: its matmuls run
      on the tiles, 2-3x the fp32 rate at 1024-2048 (bench/cpu_precision.py measures a whole step)
  CPU without (most laptops, AMD, Apple's x86 emulation)                       fp32: bf16 there is
      emulated in AVX-512/AVX2 and measures slower than fp32
  MPS (Apple GPUs)                                                             fp32: PyTorch's MPS autocast
      and fp16 loss scaling are recent and untested here, so the safe default; ask for bf16 or
      fp16 explicitly to try them

Inference follows the same rule, with the weights themselves cast (not autocast): bf16 weights
halve the bytes a decode step reads, which is what bounds it (bench/decode_cpu.py measures it).
Norms, RoPE and the softmax over the vocabulary still run in fp32 inside the model.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from llm_maker.errors import RecipeError

DTYPES: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {dtype: name for name, dtype in DTYPES.items()} | {torch.float32: "fp32"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


@dataclass(frozen=True)
class DeviceCaps:
    kind: str  # "cuda" | "cpu" | "mps"
    bf16: bool  # bf16 matrix math in hardware (CUDA 8.0+, CPU AMX-BF16)
    name: str = ""  # for messages: "NVIDIA H200", "cpu (AMX-BF16)"


@lru_cache(maxsize=None)
def cpu_has_amx_bf16() -> bool:
    """AMX-BF16 tiles, from the kernel's CPU flags (Linux) or PyTorch's own probe."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        return " amx_bf16" in cpuinfo.read_text(errors="replace")
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def device_caps(device: torch.device) -> DeviceCaps:
    if device.type == "cuda":
        return DeviceCaps("cuda", torch.cuda.is_bf16_supported(including_emulation=False),
                          torch.cuda.get_device_name(device))
    if device.type == "cpu":
        amx = cpu_has_amx_bf16()
        return DeviceCaps("cpu", amx, "cpu (AMX-BF16)" if amx else "cpu")
    return DeviceCaps(device.type, False, device.type)


def auto_precision(caps: DeviceCaps) -> str:
    """The `auto` rule of the module docstring: "bf16", "fp16" or "fp32"."""
    if caps.kind == "cuda":
        return "bf16" if caps.bf16 else "fp16"
    if caps.kind == "cpu":
        return "bf16" if caps.bf16 else "fp32"
    return "fp32"


def choose_precision(name: str, caps: DeviceCaps, key: str = "train.precision") -> str:
    """The precision to run: `auto` by the rule, or the one asked for if the device can run it."""
    if name == "auto":
        return auto_precision(caps)
    if name not in DTYPES:
        raise RecipeError(f"`{key}` is {name!r}; choose one of auto, {', '.join(DTYPES)}")
    if name == "bf16" and caps.kind == "cuda" and not caps.bf16:
        raise RecipeError(f"`{key}` is bf16, but {caps.name} has no bf16 support (compute capability < 8.0); "
                          f"use fp16 (loss-scaled) or auto")
    return name


def resolve_precision(name: str, device: torch.device, key: str = "train.precision") -> Optional[torch.dtype]:
    """The autocast dtype for `name` on `device` (None: fp32); a RecipeError naming `key` and the
    device when the device cannot run it."""
    return DTYPES[choose_precision(name, device_caps(torch.device(device)), key)]


def inference_dtype(name: str, device: torch.device | str, key: str = "--precision") -> torch.dtype:
    """The dtype to cast a model's weights (and so its activations and KV cache) to for evaluation,
    generation and serving: `auto` by the rule above, or the one asked for if `device` can run it."""
    return DTYPES[choose_precision(name, device_caps(torch.device(device)), key)] or torch.float32


def precision_name(dtype: Optional[torch.dtype]) -> str:
    return NAMES[dtype]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to `dtype` on `device`; fp32 (None) runs as written."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()
