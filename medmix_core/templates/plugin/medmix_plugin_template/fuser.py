"""A fuser: mean of each modality's available experts, then a learned, mask-aware score
per modality weighting the per-modality classifier logits.

Built from medmix's FusionModel, which adds the per-expert adapters and projections, one
head per modality, and a learned prior for samples with no modality at all.
"""

from __future__ import annotations

import torch
from medmix_core import FusionModel, FusionSpec, InterFuser, IntraFuser, masked_softmax
from torch import nn


class MeanOfExperts(IntraFuser):
    """Uniform mean over the available experts; 0 when none is present."""

    def __init__(self, d: int, n_experts: int) -> None:
        super().__init__()

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.to(z.dtype)  # [B, K]
        g = m / m.sum(dim=1, keepdim=True).clamp_min(1.0)
        return torch.einsum("bk,bkd->bd", g, z), g


class ScoredModalities(InterFuser):
    """w = softmax over available modalities of a linear score of each representation."""

    def __init__(self, n_modalities: int, d: int, n_outputs: int) -> None:
        super().__init__()
        self.score = nn.Linear(d, 1)

    def forward(self, logits: torch.Tensor, reps: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = masked_softmax(self.score(reps).squeeze(-1), mask)  # [B, M]
        return torch.einsum("bm,bmc->bc", w, logits), w


def build_fuser(spec: FusionSpec, d: int = 128, dropout: float = 0.1, **_: object) -> FusionModel:
    """Factory medmix calls with the run's FusionSpec and fuser options."""
    return FusionModel(spec, intra=MeanOfExperts, inter=ScoredModalities, d=d, dropout=dropout)
