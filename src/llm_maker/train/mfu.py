"""Model FLOPs utilisation: achieved training FLOP/s over the device's dense bf16 peak.

FLOPs per token follow PaLM (appendix B): 6·N + 12·L·d·T, where N counts every matmul
parameter (the head included, the input embedding lookup excluded) -- see
LlamaModel.flops_per_token.
"""
from __future__ import annotations

from typing import Optional

import torch

# Dense bf16 peak TFLOP/s (no sparsity), matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "A100": 312.0,
    "L20": 119.5,
    "L40S": 362.0,
    "4090": 165.2,
    "3090": 71.0,
    "A10G": 70.0,
    "T4": 65.0,
}


def device_peak_tflops(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    if override is not None:
        return override
    if device.type != "cuda":
        return None  # no meaningful table for CPUs; MFU is left blank
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756.0
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops
    return None


def mfu(flops_per_token: float, tokens_per_second: float, peak_tflops: Optional[float]) -> Optional[float]:
    if not peak_tflops:
        return None
    return flops_per_token * tokens_per_second / (peak_tflops * 1e12)
