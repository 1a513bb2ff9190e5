"""The DPO objective (Rafailov et al., 2023) as the trainer's loss module, and the log-prob helpers.

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))      averaged over pairs

pi_c, pi_r: the policy's log-probs of the chosen and rejected completions, summed over their
tokens (fp32 log-softmax, prompt and padding masked with -100); ref_c, ref_r: the frozen
reference's, computed once before training (`reference_logprobs`) and carried in each
micro-batch. The reward margin is beta * ((pi_c - ref_c) - (pi_r - ref_r)); a pair is "preferred"
when it is > 0. At the first step, with the policy equal to the reference, the margin is 0 and
the loss log 2.

DPO can raise the margin by lowering both completions, the chosen one less (the chosen answer's
likelihood falls: bench/dpo_cpu.py measures it). `sft_weight` > 0 adds that weight times the
chosen completions' mean next-token cross-entropy (Pang et al., 2024, "Iterative Reasoning
Preference Optimization": DPO + NLL), which holds the chosen answer up; logged as "ce".
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F

from llm_maker.devices import autocast
from llm_maker.model.llama import LlamaModel
from llm_maker.train.loss import IGNORE_INDEX, CausalLMLoss


def completion_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of each row's labelled targets: logits (B, T, V), labels (B, T) -> (B,), in fp32."""
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.float().reshape(B * T, V), labels.reshape(B * T), ignore_index=IGNORE_INDEX,
                          reduction="none")  # (B*T,): 0 on ignored targets
    return -nll.view(B, T).sum(dim=1)


def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean DPO loss over pairs (all (B,)) and its parts: the mean reward margin and the share
    of pairs whose margin is positive."""
    margin = beta * ((pi_c - ref_c.float()) - (pi_r - ref_r.float()))  # (B,)
    loss = -F.logsigmoid(margin).mean()
    return loss, {"reward_margin": margin.detach().mean(), "pref_acc": (margin.detach() > 0).float().mean()}


class DPOLoss(CausalLMLoss):
    """The policy with the DPO loss. `forward(x, y)` is the plain next-token loss (the trainer's
    validation loss: the held-out chosen completions); `forward(xc, yc, xr, yr, ref_c, ref_r)`, a
    DPOBatches micro-batch, returns (loss, {"reward_margin", "pref_acc"})."""

    def __init__(self, model: LlamaModel, beta: float, chunk_size: int = 0, sft_weight: float = 0.0):
        super().__init__(model, chunk_size)
        self.beta, self.sft_weight = beta, sft_weight

    def pair_logprobs(self, xc: torch.Tensor, yc: torch.Tensor, xr: torch.Tensor,
                      yr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pi_c, pi_r), each (B,): chosen and rejected through the model in one forward (2B, T)."""
        logits = self.model(torch.cat([xc, xr]))  # (2B, T, V)
        logps = completion_logprobs(logits, torch.cat([yc, yr]))
        return logps[: xc.size(0)], logps[xc.size(0):]

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, xr: Optional[torch.Tensor] = None,
                yr: Optional[torch.Tensor] = None, ref_c: Optional[torch.Tensor] = None,
                ref_r: Optional[torch.Tensor] = None) -> Any:
        if xr is None:
            return super().forward(x, y)
        pi_c, pi_r = self.pair_logprobs(x, y, xr, yr)
        loss, parts = dpo_loss(pi_c, pi_r, ref_c, ref_r, self.beta)
        if self.sft_weight > 0:  # + the chosen completions' mean per-token cross-entropy
            ce = -pi_c.sum() / (y != IGNORE_INDEX).sum().clamp(min=1)
            loss = loss + self.sft_weight * ce
            parts["ce"] = ce.detach()
        return loss, parts


@torch.no_grad()
def reference_logprobs(module: DPOLoss, batches: Iterable[tuple[torch.Tensor, ...]], device: torch.device,
                       amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """(n, 2) summed log-probs (chosen, rejected) of every pair of `batches` ((xc, yc, xr, yr, ...)
    tuples) under `module`'s model, computed as the training forward computes them (same autocast)."""
    was_training = module.training
    module.eval()
    out = []
    for batch in batches:
        with autocast(device, amp_dtype):
            pi_c, pi_r = module.pair_logprobs(*(t.to(device) for t in batch[:4]))
        out.append(torch.stack([pi_c, pi_r], dim=1).float().cpu())
    module.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


@torch.no_grad()
def preference_metrics(module: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, ...]],
                       device: torch.device, amp_dtype: Optional[torch.dtype]) -> dict[str, Optional[float]]:
    """Held-out preference accuracy (share of pairs with a positive reward margin) and mean margin,
    over DPOBatches.val_batches(); None when there is no pair."""
    was_training = module.training
    module.eval()
    correct = total = 0
    margin_sum = 0.0
    for batch in batches:
        xc, yc, xr, yr, ref_c, ref_r = (t.to(device) for t in batch)
        with autocast(device, amp_dtype):
            _, parts = module(xc, yc, xr, yr, ref_c, ref_r)
        n = xc.size(0)
        correct += round(float(parts["pref_acc"]) * n)
        margin_sum += float(parts["reward_margin"]) * n
        total += n
    module.train(was_training)
    if not total:
        return {"val_pref_acc": None, "val_reward_margin": None}
    return {"val_pref_acc": correct / total, "val_reward_margin": margin_sum / total}
