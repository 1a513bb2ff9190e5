"""The training loss, applied to the model from outside it: `CausalLMLoss` wraps a model and
returns the mean next-token cross-entropy (in fp32, targets of -100 ignored), either through the
full logits or through the head a chunk of tokens at a time.

Chunked: cross-entropy through the output head without the full (N, V) logits (Liger-style).

The plain loss builds logits (N, V) in the autocast dtype, an fp32 copy of them, and keeps both
(or their gradient) alive until backward: at N = 16 x 1024 tokens and a 100K vocabulary that is
~6.6 GB in fp32 alone. Here the tokens go through the head `chunk_size` rows at a time; for each
chunk the forward pass computes the fp32 log-softmax, the loss and, while the chunk's logits
are at hand, the gradients of the hidden states and of the head weight. Backward then only
scales the stored gradients. Peak extra memory is one chunk's logits; the FLOPs are the same
as the plain loss (logits, grad of hidden, grad of weight: 3 matmuls), with no recomputation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_maker.model.llama import LlamaModel

IGNORE_INDEX = -100  # targets that do not count: prompts and padding in SFT


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, ignore_index: int, with_grad: bool):
        # hidden (N, C), weight (V, C), targets (N,); the matmuls follow the caller's autocast,
        # exactly as lm_head would, and the softmax is in fp32.
        valid = targets != ignore_index  # (N,)
        n_valid = valid.sum()  # a tensor: dividing by it needs no host-device sync
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grad else None
        for start in range(0, hidden.size(0), chunk_size):
            h = hidden[start:start + chunk_size]  # (n, C)
            t, v = targets[start:start + chunk_size], valid[start:start + chunk_size]
            logits = (h @ weight.t()).float()  # (n, V): the only vocabulary-sized tensor, one chunk of it
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            t_safe = t.clamp(min=0)  # ignored rows (-100) gather a dummy column, then get masked
            target_logit = logits.gather(1, t_safe[:, None]).squeeze(1)
            total += ((lse - target_logit) * v).sum()
            if with_grad:
                # d(mean loss)/d(logits) = (softmax - onehot) / n_valid on counted rows.
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place over the logits
                g[torch.arange(g.size(0), device=g.device), t_safe] -= 1.0
                g.mul_((v.float() / n_valid)[:, None])
                g = g.to(hidden.dtype)
                grad_hidden[start:start + chunk_size] = g @ weight  # (n, C)
                grad_weight += (g.t() @ h).float()  # (V, C)
        if with_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype  # hand back a gradient of the parameter's own dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, (grad_weight * grad_loss).to(ctx.weight_dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (rows equal to `ignore_index`
    do not count), computed `chunk_size` rows at a time. hidden (N, C), weight (V, C), targets (N,)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    # Without autograd (evaluation) the per-chunk gradients are not computed at all.
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index, with_grad)


class CausalLMLoss(nn.Module):
    """The model with its training loss: `forward(idx, targets)` is the mean next-token loss,
    `forward(idx)` the logits. This is the module the trainer wraps (DDP, FSDP2's root,
    torch.compile: one graph with the loss), so evaluations that call it work under any of them.

    chunk_size > 0: the loss goes through the head `chunk_size` tokens at a time and the
    (B*T, V) logits are never materialised (same loss and gradients)."""

    def __init__(self, model: LlamaModel, chunk_size: int = 0):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    @property
    def config(self):
        return self.model.config

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        if targets is None:
            return self.model(idx)  # (B, T, V)
        hidden = self.model.hidden_states(idx)  # (B, T, C)
        if self.chunk_size:
            return linear_cross_entropy(hidden.flatten(0, 1), self.model.lm_head.weight, targets.reshape(-1),
                                        self.chunk_size)
        logits = self.model.lm_head(hidden)  # (B, T, V)
        # The loss in fp32 whatever the autocast dtype.
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)
