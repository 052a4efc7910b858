"""Relational knowledge distillation (Park et al., CVPR 2019), as in the authors' code.

Distance-wise: pairwise Euclidean distances, each network's divided by the mean of its
positive entries, compared with smooth-L1 (Huber, delta 1) over all N^2 entries.
Angle-wise: for every triplet (i, j, k) the cosine of the angle between the unit vectors
x_j - x_i and x_k - x_i, compared with smooth-L1 over all N^3 entries.
At most ``max_samples`` (default 64) available samples of a batch enter the relations.
The teacher side carries no gradient to the student's relations (it is a target), but the
teacher projection head is trained through the cosine term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medmix_core import DistillLoss, hookimpl


def _pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.t()).clamp_min(1e-12)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(x), device=x.device, dtype=x.dtype))  # [N, N], zero diagonal


def _normalised_distance(x: torch.Tensor) -> torch.Tensor:
    d = _pairwise_distance(x)
    mu = d[d > 0].mean()
    return d / mu


def _angles(x: torch.Tensor) -> torch.Tensor:
    e = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)  # [N, N, d], e_ij
    return torch.bmm(e, e.transpose(1, 2)).reshape(-1)  # [N^3]


class RKDDistill(DistillLoss):
    """``w_dist * L_distance + w_angle * L_angle`` (paper recipe: 1 and 2)."""

    name = "rkd"
    min_samples = 3

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 2.0,
                 max_samples: int = 64) -> None:
        super().__init__()
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.max_samples = max_samples

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        # The angle term costs O(N^3 d); batches are shuffled, so the first max_samples
        # available rows are a random subset.
        if self.max_samples and len(student) > self.max_samples:
            student, teacher = student[: self.max_samples], teacher[: self.max_samples]
        teacher = teacher.detach()
        loss = student.new_zeros(())
        if self.distance_weight:
            loss = loss + self.distance_weight * F.smooth_l1_loss(
                _normalised_distance(student), _normalised_distance(teacher))
        if self.angle_weight:
            loss = loss + self.angle_weight * F.smooth_l1_loss(_angles(student), _angles(teacher))
        return loss


@hookimpl
def register_losses(register):
    register("rkd", RKDDistill)
