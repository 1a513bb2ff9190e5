"""Model FLOPs utilisation: achieved training FLOP/s over the device's dense bf16 peak.

FLOPs per token follow PaLM (appendix B): 6·N + 12·L·d·T. N counts every parameter that takes
part in a matmul: the attention and MLP projections and the output head (a tied head counts
once, as the head), but not the input embedding, which is a table lookup. 12·L·d·T is the
attention-score work (QKᵀ and AV, forward and backward) at sequence length T. See
LlamaModel.flops_per_token. The peak is per device: with N ranks, MFU divides the run's
tokens/s by N.
"""
from __future__ import annotations

from typing import Optional

import torch

# Dense bf16 peak TFLOP/s (no 2:4 sparsity), matched in order against torch.cuda.get_device_name();
# the first key found in the name wins, so variants come before the family name.
PEAK_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,  # the H100 SXM chip with more and faster memory
    "A100": 312.0,
    "L40S": 362.0,
    "L20": 119.5,
    "4090": 165.2,
    "3090": 71.0,
    "A10G": 70.0,
    "T4": 65.0,
}


def peak_tflops_for_name(device_name: str) -> Optional[float]:
    """The table's peak for a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None."""
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name:
            return tflops
    return None


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
