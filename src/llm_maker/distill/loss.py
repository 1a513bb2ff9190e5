"""The distillation loss, applied to the student from outside it (as train/loss.py's CausalLMLoss):

    loss = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, targets)

p^T = softmax(logits / T). The T^2 keeps the KL's gradient on the same scale as the
cross-entropy's whatever T (Hinton et al., 2015). Both terms count only the positions whose target
is not -100 (SFT: the supervised tokens), and the KL is their mean.

The teacher comes in one of two forms, from the batch source (distill/teacher.py):
  full   teacher_logp (B, T, V): the teacher's log-probs at temperature T (online mode)
  top-k  teacher_logp (B, T, k) and teacher_ids (B, T, k): its k most likely ids (cached mode);
         the k probabilities are renormalised over the kept ids, and the student's log-probs
         (over the whole vocabulary) are read at those ids. With k >= V this is the full KL.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from llm_maker.model.llama import LlamaModel
from llm_maker.train.loss import IGNORE_INDEX, CausalLMLoss


def distill_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, temperature: float,
               mask: torch.Tensor, teacher_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over the `mask`ed positions of KL(teacher || student) at `temperature`, in fp32.

    student_logits (N, V); teacher_logp (N, V), or (N, k) with teacher_ids (N, k); mask (N,) bool."""
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    teacher_logp = teacher_logp.float()
    if teacher_ids is not None:  # top-k: the teacher renormalised over its kept ids
        teacher_logp = teacher_logp - torch.logsumexp(teacher_logp, dim=-1, keepdim=True)  # (N, k)
        student_logp = student_logp.gather(-1, teacher_ids.long())  # (N, k)
    p = teacher_logp.exp()
    # 0 * log 0 = 0: ids the teacher gives no mass (a padded vocabulary) add nothing
    per_position = torch.where(p > 0, p * (teacher_logp - student_logp), 0.0).sum(-1)  # (N,)
    mask = mask.float()
    return (per_position * mask).sum() / mask.sum().clamp(min=1.0)


class DistillLoss(CausalLMLoss):
    """The student with the distillation loss: `forward(x, y, teacher_logp[, teacher_ids])` is
    (loss, {"ce", "kl"}); `forward(x, y)` the plain mean next-token loss (validation) and
    `forward(x)` the logits, as CausalLMLoss. The teacher is not in here: it stays outside the
    module tree (in the batch source), so DDP / FSDP2 never see its parameters.

    The distilled step needs the full (B, T, V) student logits for the KL, so chunk_size (the
    chunked loss) applies to validation only."""

    def __init__(self, model: LlamaModel, alpha: float, temperature: float, chunk_size: int = 0):
        super().__init__(model, chunk_size)
        self.alpha, self.temperature = alpha, temperature

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                teacher_logp: Optional[torch.Tensor] = None, teacher_ids: Optional[torch.Tensor] = None):
        if targets is None or teacher_logp is None:
            return super().forward(idx, targets)
        logits = self.model.lm_head(self.model.hidden_states(idx))  # (B, T, V)
        flat = logits.float().view(-1, logits.size(-1))  # (B*T, V): the loss in fp32 whatever the autocast dtype
        y = targets.reshape(-1)
        ce = F.cross_entropy(flat, y, ignore_index=IGNORE_INDEX)  # exactly CausalLMLoss's
        ids = None if teacher_ids is None else teacher_ids.reshape(-1, teacher_ids.size(-1))
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.alpha > 0):  # alpha 0: only logged
            kl = distill_kl(flat, teacher_logp.reshape(-1, teacher_logp.size(-1)), self.temperature,
                            y != IGNORE_INDEX, ids)
        if self.alpha == 0:  # plain training: the same loss and gradients, the KL only logged
            loss = ce
        elif self.alpha == 1:
            loss = self.temperature ** 2 * kl
        else:
            loss = self.alpha * self.temperature ** 2 * kl + (1 - self.alpha) * ce
        return loss, {"ce": ce.detach(), "kl": kl.detach()}
