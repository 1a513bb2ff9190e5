"""Held-out metrics of a model: the mean next-token loss (one definition, for the training loop
and the eval stage alike) and the token accuracy that SFT reports.

Both take any module that maps (x, y) to the mean loss and x to logits, `CausalLMLoss` (which
the trainer may have wrapped with FSDP2), and batches of (x (B, T), y (B, T)) with -100 where a
target does not count.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from llm_maker.devices import autocast
from llm_maker.train.loss import IGNORE_INDEX

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def mean_loss(module: torch.nn.Module, batches: Batches, device: torch.device | str,
              amp_dtype: Optional[torch.dtype] = None) -> Optional[float]:
    """Mean loss per counted target over all `batches`: weighted by each batch's counted
    targets, so a short last batch (or an SFT batch that is mostly prompt) counts for what it
    holds. None when there is nothing to score."""
    device = torch.device(device)
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    for batch in batches:  # (x, y), or (x, y, *more) from an objective's batch source: scored as (x, y)
        x, y = batch[0], batch[1]
        n = int((y != IGNORE_INDEX).sum())
        if n == 0:
            continue
        with autocast(device, amp_dtype):
            loss = module(x.to(device), y.to(device))
        total += loss.item() * n
        count += n
    module.train(was_training)
    return total / count if count else None


@torch.no_grad()
def token_accuracy(module: torch.nn.Module, batches: Batches, device: torch.device | str,
                   amp_dtype: Optional[torch.dtype] = None) -> Optional[float]:
    """Share of counted targets that greedy decoding predicts: SFT's held-out token accuracy,
    plotted on the model card. Needs the full logits (B, T, V), so it is for short SFT batches."""
    device = torch.device(device)
    was_training = module.training
    module.eval()
    correct = total = 0
    for x, y in batches:
        with autocast(device, amp_dtype):
            logits = module(x.to(device))  # (B, T, V)
        y = y.to(device)
        mask = y != IGNORE_INDEX
        correct += int(((logits.argmax(-1) == y) & mask).sum())
        total += int(mask.sum())
    module.train(was_training)
    return correct / total if total else None
