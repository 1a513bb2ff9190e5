"""Dynamic NTK RoPE scaling: serve a model on a longer context than it was trained on.

slm-124M-llama32k-fwedu-sft stretches a 1,024-token model to 2,048 with transformers'
`rope_type: dynamic`, factor 2. Beyond the trained length L, the rotary base grows with the
sequence length S:

    theta' = theta * (factor * S / L - (factor - 1)) ** (hd / (hd - 2))

so the lowest frequencies stretch to cover S positions while the highest (local detail)
barely move; up to L the model is exactly the trained one. transformers recomputes theta'
at every step past L, so keys already in its KV cache keep the base they were rotated with;
here one base is chosen per generation from its planned length (prompt + max new tokens),
so every cached key and every query share it (and the server batches together only jobs that
need the same base). A full forward over S tokens matches transformers' dynamic RoPE exactly
(tests/test_rope_scaling.py). The tables are the model's own (`LlamaModel.set_rope`); this
module only chooses the base.
"""
from __future__ import annotations

from llm_maker.errors import LLMMakerError
from llm_maker.model.llama import LlamaModel

MAX_FACTOR = 8.0  # NTK-aware scaling degrades well before this; a typo like 20 is refused


def dynamic_ntk_theta(theta: float, head_dim: int, seq_len: int, trained_len: int, factor: float) -> float:
    """The rotary base for a sequence of `seq_len` tokens (transformers' dynamic NTK formula)."""
    if seq_len <= trained_len:
        return theta
    return theta * ((factor * seq_len / trained_len) - (factor - 1)) ** (head_dim / (head_dim - 2))


class DynamicRope:
    """Stretch a loaded model's context `factor` times; call `prepare(total_len)` before each
    generation. The model's rotary tables then cover the stretched context (`model.context_len`),
    so generation and the server budget against it; `model.config` keeps the trained values."""

    def __init__(self, model: LlamaModel, factor: float):
        if not 1.0 <= factor <= MAX_FACTOR:
            raise LLMMakerError(f"rope scaling factor must be in [1, {MAX_FACTOR:g}], got {factor}")
        self.model = model
        self.factor = factor
        self.trained_len = model.config.seq_len
        self.base_theta = model.config.rope_theta
        self.context_len = int(self.trained_len * factor)
        self.theta = None
        self.prepare(self.trained_len)

    def theta_for(self, total_len: int) -> float:
        """The rotary base a generation of `total_len` tokens needs."""
        if total_len > self.context_len:
            raise LLMMakerError(f"{total_len} tokens exceed the stretched context of {self.context_len}")
        return dynamic_ntk_theta(self.base_theta, self.model.config.head_dim, total_len, self.trained_len,
                                 self.factor)

    def prepare(self, total_len: int) -> float:
        """Set the rotary tables for a generation of `total_len` tokens; returns the base used."""
        theta = self.theta_for(total_len)
        if theta != self.theta:
            self.model.set_rope(theta, self.context_len)
            self.theta = theta
        return theta
