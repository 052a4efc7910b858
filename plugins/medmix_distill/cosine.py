"""Cosine distillation loss: mean over available samples of 1 - cos(student, teacher)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medmix_core import DistillLoss, hookimpl


class CosineDistill(DistillLoss):
    """``mean_i (1 - cos(s_i, t_i))`` over the N available samples."""

    name = "cosine"
    min_samples = 1

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).mean()


@hookimpl
def register_losses(register):
    register("cosine", CosineDistill)
