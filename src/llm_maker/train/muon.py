"""Muon for the transformer blocks' matrices, AdamW for everything else (`train.optimizer: muon`).

Muon (Keller Jordan, 2024) replaces each 2-D weight's momentum update by its nearest
semi-orthogonal matrix (a few Newton-Schulz iterations): every direction of the update moves
at the same rate. It is meant for hidden matrices only; the embedding table, the output head
and the norms' gains keep AdamW, as in the fastest public GPT-2 speedruns and Moonlight.

We use PyTorch's own `torch.optim.Muon` with `adjust_lr_fn="match_rms_adamw"` (Moonlight's
scaling: the update's RMS matches AdamW's), so both halves share one learning rate, one
weight decay and the trainer's one schedule.
"""
from __future__ import annotations

from typing import Any

import torch

from llm_maker.model.llama import LlamaModel


def split_parameters(model: LlamaModel) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(Muon matrices, AdamW matrices, AdamW vectors): the blocks' 2-D weights go to Muon; the
    embedding, head (tied or not) and norm gains to AdamW. Each parameter appears exactly once."""
    seen: set[int] = set()
    muon, adamw_decay, adamw_no_decay = [], [], []
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if name.startswith("layers.") and p.dim() == 2:
            muon.append(p)
        elif p.dim() >= 2:
            adamw_decay.append(p)
        else:
            adamw_no_decay.append(p)
    return muon, adamw_decay, adamw_no_decay


class MuonWithAdamW:
    """Two optimizers stepped as one: the trainer sees one `param_groups` list (so the schedule
    sets every group's lr), one `step`, one `zero_grad` and one state dict."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.optimizers = {"muon": muon, "adamw": adamw}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state has parts {sorted(state)}, expected {sorted(self.optimizers)} "
                             f"(was the checkpoint written with train.optimizer: adamw?)")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def make_muon_optimizer(model: LlamaModel, lr: float, weight_decay: float, betas: tuple[float, float],
                        fused: bool) -> MuonWithAdamW:
    muon_params, decay, no_decay = split_parameters(model)
    muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay, momentum=0.95, nesterov=True,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, fused=fused)
    return MuonWithAdamW(muon, adamw)
