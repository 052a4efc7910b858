"""``logit-average``: late fusion by averaging per-modality predictions.

Each modality gets its own classifier from the mean of its available projected experts;
the fused logits are the mean of those per-modality logits over the modalities available
in the sample:

    z^(m) = mean_{k available} z_k,      l^(m) = W_m z^(m) + b_m
    fused = sum_m w^(m) l^(m),           w^(m) = a^(m) / sum_m' a^(m')

with a^(m) = 1 when modality m is available. ``weighting="learned"`` replaces the uniform
weights by one learned score per modality, softmaxed over the available ones (a global
modality preference, the same for every sample: unlike MedMIX's scorer it does not look
at the sample). A sample with no modality gets the model's learned prior logits.

It is built from the core's :class:`~medmix_core.FusionModel`, so it shares MedMIX's
per-expert adapters and projections, and its per-modality representations can be
distilled from a teacher like MedMIX's.
"""

from __future__ import annotations

import torch
from torch import nn

from medmix_core import FusionModel, FusionSpec, InterFuser, IntraFuser, masked_softmax
from medmix_core.errors import MedmixError

WEIGHTINGS = ("uniform", "learned")


class MeanOfExperts(IntraFuser):
    """Uniform mean over a modality's available experts; 0 when none is present."""

    def __init__(self, d: int, n_experts: int) -> None:
        super().__init__()

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.to(z.dtype)  # [B, K]
        g = m / m.sum(dim=1, keepdim=True).clamp_min(1.0)  # [B, K], all-0 rows stay 0
        return torch.einsum("bk,bkd->bd", g, z), g


class LogitAverage(InterFuser):
    """Average of the per-modality logits over the available modalities."""

    def __init__(self, n_modalities: int, d: int, n_outputs: int,
                 weighting: str = "uniform") -> None:
        super().__init__()
        self.weighting = weighting
        # one preference per modality; zeros = uniform at the start
        self.score = nn.Parameter(torch.zeros(n_modalities)) if weighting == "learned" else None

    def forward(self, logits: torch.Tensor, reps: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.score is None:
            m = mask.to(logits.dtype)  # [B, M]
            w = m / m.sum(dim=1, keepdim=True).clamp_min(1.0)
        else:
            w = masked_softmax(self.score.to(logits.dtype).expand(mask.shape), mask)  # [B, M]
        return torch.einsum("bm,bmc->bc", w, logits), w  # [B, C], [B, M]


def build_logit_average(spec: FusionSpec, d: int = 128, dropout: float = 0.1,
                        adapter: bool = True, weighting: str = "uniform",
                        **_: object) -> FusionModel:
    """The ``logit-average`` fuser.

    Args:
        spec: modalities, experts and their dims, outputs.
        d: shared representation width.
        dropout: dropout of the per-expert projections.
        adapter: keep the residual adapters.
        weighting: "uniform" (plain average) or "learned" (one softmaxed score per modality).
    Returns:
        a :class:`~medmix_core.FusionModel`.
    """
    if weighting not in WEIGHTINGS:
        raise MedmixError(f"Fuser 'logit-average': weighting must be one of {list(WEIGHTINGS)}, "
                          f"got {weighting!r}. Pass e.g. --fuser-options "
                          f"'{{\"weighting\": \"learned\"}}'.")
    return FusionModel(spec, intra=MeanOfExperts,
                       inter=lambda m, dd, c: LogitAverage(m, dd, c, weighting),
                       d=d, dropout=dropout, adapter=adapter)
