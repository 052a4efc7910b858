"""Teacher-student distillation (training only).

Per modality a learned linear head maps the frozen teacher embedding to d; the loss of
each modality is computed over the samples where both the student's modality and the
teacher embedding are available, and summed over modalities (availability a^(m)).
The heads live outside the fuser, so a deployed model holds no teacher parameter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class DistillLoss(nn.Module, ABC):
    """``forward(student [N, d], teacher [N, d]) -> scalar`` over N available samples.

    Class attribute ``min_samples``: fewer available samples than this give a zero loss.
    """

    name: str = ""
    min_samples: int = 1

    @abstractmethod
    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor: ...


class TeacherHeads(nn.Module):
    """Per modality ``Linear(d_T, d)``: teacher embedding -> student space."""

    def __init__(self, teacher_dims: dict[str, int], d: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({m: nn.Linear(dt, d) for m, dt in teacher_dims.items()})

    def forward(self, modality: str, t: torch.Tensor) -> torch.Tensor:
        return self.heads[modality](t)


def distill_weight(epoch: int, lambda_max: float, ramp_epochs: int) -> float:
    """lambda_D(t): linear ramp from 0 at epoch 0 to lambda_max at epoch ramp_epochs."""
    if ramp_epochs <= 0:
        return lambda_max
    return lambda_max * min(1.0, epoch / ramp_epochs)


def distillation_loss(reps: torch.Tensor, rep_mask: torch.Tensor, modalities: list[str],
                      teacher: dict[str, torch.Tensor], teacher_mask: torch.Tensor,
                      heads: TeacherHeads, losses: dict[DistillLoss, float]) -> torch.Tensor:
    """Sum over modalities of the weighted distillation losses on available samples.

    Args:
        reps: [B, M, d] student modality representations.
        rep_mask: [B, M] student modality available.
        teacher: modality -> [B, d_T] teacher embeddings.
        teacher_mask: [B, M] teacher embedding present.
        heads: teacher projection heads.
        losses: loss module -> weight (e.g. {cosine: 1, rkd: lambda_RKD}).
    """
    total = reps.new_zeros(())
    for j, m in enumerate(modalities):
        if m not in teacher:
            continue
        avail = rep_mask[:, j] & teacher_mask[:, j]  # [B]
        n = int(avail.sum())
        if n == 0:
            continue
        s = reps[avail, j].float()  # [n, d]
        t = heads(m, teacher[m][avail].float())  # [n, d]
        for loss, w in losses.items():
            if w and n >= loss.min_samples:
                total = total + w * loss(s, t)
    return total
