"""A model loaded for inference (generation, chat, serving): on its device, in the precision the
device runs best, its weights laid out for the kernels that will read them.

    model, tokenizer, meta = load_for_inference(model_dir, device="auto", precision="auto")

Precision follows `devices.inference_dtype` (the training rule: bf16 on GPUs and AMX-BF16 CPUs
that have it, fp16 on older GPUs, fp32 elsewhere). On a CPU in bf16 every linear layer's weight is
also reordered once, at load, into oneDNN's blocked layout (`PackedLinear`): a decode step is one
row times each weight matrix, bound by the bytes it reads, and PyTorch's plain bf16 path converts
the weight on every call, reading it at about half the memory bandwidth that fp32 gets; the
packed weight is read at full bandwidth, so bf16 halves the bytes and decodes faster than fp32
(bench/decode_cpu.py measures both against llama.cpp). The products are the same numbers as
`F.linear` on the bf16 weight (tests/test_inference.py).

The packed model is for the forward pass only: it has no `lm_head.weight` to train, export or
save. Everything that writes weights loads the model directory afresh.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from llm_maker.devices import inference_dtype, resolve_device
from llm_maker.model.llama import LlamaModel
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.checkpoint import ModelMeta, load_model_dir


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's packed bf16 linear: bf16 on a CPU, in PyTorch builds that have it, on a processor
    that it runs on (oneDNN picks the instructions: AMX tiles where the CPU has them; it refuses a
    CPU without AVX-512 or AVX-NE-CONVERT, e.g. an AVX2-only one)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and _cpu_packs_bf16()


def _reorder_linear_weight(weight: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)


@functools.cache
def _cpu_packs_bf16() -> bool:
    """Whether oneDNN packs a bf16 weight on this CPU: tried once on a tiny one."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        _reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), 1)
    except RuntimeError:  # "bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq"
        return False
    return True


class PackedLinear(nn.Module):
    """`nn.Linear` without bias, its weight reordered once into oneDNN's blocked bf16 layout."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        packed = _reorder_linear_weight(weight.detach().contiguous(), 1)  # laid out for M=1
        self.register_buffer("packed_weight", packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed bf16"


def pack_linears(model: nn.Module) -> int:
    """Replace every bias-free `nn.Linear` in `model` by a `PackedLinear` of its weight; returns how
    many. A tied head gets its own packed copy (the embedding keeps the plain one for lookups)."""
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, name, PackedLinear(child.weight))
                n += 1
    return n


def load_for_inference(model_dir: str | Path, device: str | torch.device = "auto", precision: str = "auto",
                       pack: bool = True) -> tuple[LlamaModel, Tokenizer, ModelMeta]:
    """Load `model_dir` in eval mode on `device` in `precision` (see the module docstring); `pack`
    reorders the weights where that is faster (bf16 on an AMX CPU)."""
    dev = resolve_device(device) if isinstance(device, str) else device
    dtype = inference_dtype(precision, dev)
    model, tokenizer, meta = load_model_dir(model_dir, dev, dtype=dtype)
    model.eval()
    if pack and can_pack(dev, dtype):
        pack_linears(model)
    return model, tokenizer, meta

