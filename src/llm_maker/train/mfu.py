"""Model FLOPs utilisation, and the one table of devices that it and the plan (plan.py) read.

FLOPs per token follow PaLM (appendix B): 6·N + 12·L·d·T. N counts every parameter that takes
part in a matmul: the attention and MLP projections and the output head (a tied head counts
once, as the head), but not the input embedding, which is a table lookup. 12·L·d·T is the
attention-score work (QKᵀ and AV, forward and backward) at sequence length T. See
LlamaModel.flops_per_token. The peak is per device: with N ranks, MFU divides the run's
tokens/s by N.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from llm_maker.errors import RecipeError


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator as the plan and MFU see it."""

    key: str  # what `llm-maker plan --device` takes
    name: str
    memory_gib: Optional[float]  # per GPU, as nvidia-smi / torch report it (the marketed "GB" is larger)
    bf16: bool  # bf16 tensor cores (compute capability 8.0+); without them `auto` trains in fp16
    peak_tflops: Optional[float]  # dense (no 2:4 sparsity) bf16, or fp16 where there is no bf16
    price_per_hour: Optional[float]  # USD per GPU-hour, on-demand, indicative (late 2025); --price-per-hour wins
    pattern: str = ""  # regex found in torch.cuda.get_device_name(); "" for none (the cpu row)


# Matched in order against torch.cuda.get_device_name(): the first row whose pattern is found wins,
# so variants (H100 PCIe, A100 80GB) come before the family name. Peaks are NVIDIA's datasheet
# dense figures; prices are typical on-demand rates of public clouds, meant to be overridden.
DEVICES: tuple[DeviceSpec, ...] = (
    DeviceSpec("t4", "NVIDIA T4", 15.0, False, 65.0, 0.35, r"\bT4\b"),  # fp16 peak: no bf16
    DeviceSpec("l4", "NVIDIA L4", 22.5, True, 121.0, 0.80, r"\bL4\b"),
    DeviceSpec("a10g", "NVIDIA A10G", 22.5, True, 70.0, 1.01, r"\bA10G\b"),
    DeviceSpec("rtx3090", "NVIDIA GeForce RTX 3090", 24.0, True, 71.0, 0.25, r"\b3090"),
    DeviceSpec("rtx4090", "NVIDIA GeForce RTX 4090", 24.0, True, 165.2, 0.45, r"\b4090"),
    DeviceSpec("l20", "NVIDIA L20", 45.0, True, 119.5, 0.90, r"\bL20\b"),
    DeviceSpec("l40s", "NVIDIA L40S", 45.0, True, 362.0, 1.20, r"\bL40S\b"),
    DeviceSpec("a100-80gb", "NVIDIA A100 80 GB", 80.0, True, 312.0, 1.80, r"\bA100\b.*80\s?GB"),
    DeviceSpec("a100-40gb", "NVIDIA A100 40 GB", 39.6, True, 312.0, 1.30, r"\bA100\b"),
    DeviceSpec("h100-pcie", "NVIDIA H100 PCIe", 79.6, True, 756.0, 2.50, r"\bH100 PCIe\b"),
    DeviceSpec("h100-nvl", "NVIDIA H100 NVL", 93.6, True, 835.0, 2.80, r"\bH100 NVL\b"),
    DeviceSpec("h100", "NVIDIA H100 SXM", 79.6, True, 989.0, 3.00, r"\bH100\b"),
    DeviceSpec("h200", "NVIDIA H200", 140.4, True, 989.0, 3.80, r"\bH200\b"),  # the H100 chip, more memory
    DeviceSpec("cpu", "cpu", None, False, None, None),  # memory: this machine's RAM (plan.py); no peak
)


def _normal(key: str) -> str:
    return re.sub(r"[\s_-]", "", key.lower())


def device_spec(key: str) -> DeviceSpec:
    """The table's row for a name such as `h100`, `A100-80GB` or `rtx 4090`; a RecipeError listing
    the known names otherwise."""
    for spec in DEVICES:
        if _normal(spec.key) == _normal(key):
            return spec
    raise RecipeError(f"unknown device {key!r}; the known devices are {', '.join(s.key for s in DEVICES)}")


def device_spec_for_name(device_name: str) -> Optional[DeviceSpec]:
    """The table's row for a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None."""
    for spec in DEVICES:
        if spec.pattern and re.search(spec.pattern, device_name):
            return spec
    return None


def peak_tflops_for_name(device_name: str) -> Optional[float]:
    """The table's peak for a CUDA device name, or None."""
    spec = device_spec_for_name(device_name)
    return spec.peak_tflops if spec else None


def device_peak_tflops(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    """`override` (train.peak_tflops) if given; else the table's entry for a CUDA device; None
    for CPUs and unknown cards (MFU is then left blank rather than guessed)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    return peak_tflops_for_name(torch.cuda.get_device_name(device))


def mfu(flops_per_token: float, tokens_per_second: float, peak_tflops: Optional[float],
        n_devices: int = 1) -> Optional[float]:
    """Fraction of the peak used: tokens/s of the whole run spread over `n_devices` devices."""
    if not peak_tflops:
        return None
    return flops_per_token * tokens_per_second / (n_devices * peak_tflops * 1e12)
