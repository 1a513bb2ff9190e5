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

On a CPU without bf16 kernels in oneDNN (an AVX2-only x86 CPU: no AVX-512, no AMX), `auto` keeps
the activations in fp32 but stores each linear layer's weight in bf16 (`HalfWeightLinear`, as
llama.cpp keeps f16 weights beside f32 activations): a decode step multiplies one row by the bf16
weight, reading half the bytes (2x the tokens/s of fp32 on a 2-core AMD EPYC, the same greedy
tokens), and a prefill of many rows upcasts the weight and multiplies in fp32, where that CPU's
fp32 kernels are 3-5x faster than its bf16 ones. `--precision fp32` keeps every weight as saved.

The packed model is for the forward pass only: it has no `lm_head.weight` to train, export or
save. Everything that writes weights loads the model directory afresh.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
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


class HalfWeightLinear(nn.Module):
    """`nn.Linear` without bias, its weight stored in bf16, for fp32 activations: fewer than
    `FP32_FROM_ROWS` rows (a decode step) multiply in bf16, reading half the bytes of fp32; more
    (a prefill) multiply in fp32 on the upcast weight."""

    FP32_FROM_ROWS = 8

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight_bf16", weight.detach().to(torch.bfloat16).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.size(-1) < self.FP32_FROM_ROWS:
            return F.linear(x.to(torch.bfloat16), self.weight_bf16).to(x.dtype)
        return F.linear(x, self.weight_bf16.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 weight"


def half_weights_gain(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `auto` stores fp32 linears' weights in bf16 (`HalfWeightLinear`): fp32 on an x86 CPU
    with AVX2 whose oneDNN has no bf16 kernels (else `can_pack`'s packed bf16 runs, or fp32 stays)."""
    return (device.type == "cpu" and dtype == torch.float32 and not _cpu_packs_bf16()
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def replace_linears(model: nn.Module, make: type[nn.Module]) -> int:
    """Replace every bias-free `nn.Linear` in `model` by `make(its weight)`; returns how many. A
    tied head gets its own copy (the embedding keeps the plain one for lookups)."""
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, name, make(child.weight))
                n += 1
    return n


def pack_linears(model: nn.Module) -> int:
    """Replace every bias-free `nn.Linear` in `model` by a `PackedLinear` of its weight; returns how many."""
    return replace_linears(model, PackedLinear)


def load_for_inference(model_dir: str | Path, device: str | torch.device = "auto", precision: str = "auto",
                       pack: bool = True) -> tuple[LlamaModel, Tokenizer, ModelMeta]:
    """Load `model_dir` in eval mode on `device` in `precision` (see the module docstring); `pack`
    lays the weights out for the kernels where that is faster: packed bf16 on an AVX-512 / AMX
    CPU, and with `auto`, bf16 weights beside fp32 activations on an AVX2-only one."""
    dev = resolve_device(device) if isinstance(device, str) else device
    dtype = inference_dtype(precision, dev)
    model, tokenizer, meta = load_model_dir(model_dir, dev, dtype=dtype)
    model.eval()
    if pack and can_pack(dev, dtype):
        pack_linears(model)
    elif pack and precision == "auto" and half_weights_gain(dev, dtype):
        replace_linears(model, HalfWeightLinear)
    return model, tokenizer, meta

