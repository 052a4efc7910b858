"""Fusion interfaces and the generic two-level FusionModel.

A *fuser plugin* registers a factory ``factory(spec: FusionSpec, **options) -> Fuser``.
A :class:`Fuser` is an ``nn.Module`` mapping a :class:`~medmix_core.batch.Batch` to a
:class:`FusionOutput`. MedMIX and the simpler baselines are :class:`FusionModel` instances
with different :class:`IntraFuser` / :class:`InterFuser` parts; methods that do not split
that way (concatenation, M3Care, AdaCoMed) subclass :class:`Fuser` directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from medmix_core.batch import Batch

#: score given to unavailable experts/modalities before a softmax (the paper's -1e4)
MASK_SCORE = -1e4


@dataclass
class FusionSpec:
    """What a fuser is built for.

    Attributes:
        modalities: modality names, in order (M of them).
        experts: modality -> expert names (K_m each).
        dims: modality -> expert dims d_k.
        n_outputs: C (1 for binary).
        task_type: "binary" | "multilabel" | "multiclass".
        teacher_dims: modality -> d_T when teacher embeddings exist (for fusers that use
            them at inference, like AdaCoMed; empty otherwise).
        expert_families: modality -> family per expert ("general", "domain", "rag").
    """

    modalities: list[str]
    experts: dict[str, list[str]]
    dims: dict[str, list[int]]
    n_outputs: int
    task_type: str = "binary"
    teacher_dims: dict[str, int] = field(default_factory=dict)
    expert_families: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_modalities(self) -> int:
        return len(self.modalities)

    @property
    def max_experts(self) -> int:
        return max(len(v) for v in self.experts.values())


@dataclass
class FusionOutput:
    """What a fuser returns.

    Attributes:
        logits: ``[B, C]`` fused logits.
        reps: ``[B, M, d]`` per-modality representations (zero where unavailable), used
            for distillation; None when the method has none.
        rep_mask: ``[B, M]`` bool, which reps are real.
        modality_weights: ``[B, M]`` inter-modality weights (0 for unavailable), or None.
        router_weights: ``[B, M, K_max]`` intra-modality expert weights (0 for unavailable
            experts and padding), or None.
        aux_loss: a scalar training loss the method defines itself (e.g. M3Care's
            stability loss), added to the task loss; None when there is none.
    """

    logits: torch.Tensor
    reps: torch.Tensor | None = None
    rep_mask: torch.Tensor | None = None
    modality_weights: torch.Tensor | None = None
    router_weights: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass(frozen=True)
class FuserPlugin:
    """What a fuser plugin registers: its builder and its contract with the runner.

    Attributes:
        build: ``build(spec, **options) -> Fuser``; its named parameters are the fuser's
            options (unknown ``--fuser-options`` keys are refused with them).
        reads_teacher: the fuser reads teacher-class embeddings at inference (AdaCoMed), so
            the run loads them for every row and predict needs them too.
        candidates: ``candidates(spec) -> [options, ...]``: option sets the runner trains
            and compares on validation when the user gives none (e.g. the best single
            expert); None for a fuser without such a choice.

    A plain callable registered instead is taken as ``FuserPlugin(build=callable)``.
    """

    build: Callable[..., Fuser]
    reads_teacher: bool = False
    candidates: Callable[[FusionSpec], list[dict]] | None = None

    def __call__(self, spec: FusionSpec, **options) -> Fuser:
        return self.build(spec, **options)

    @property
    def doc(self) -> str:
        """The builder's docstring: what documents the fuser and its options."""
        return self.build.__doc__ or ""

    @classmethod
    def of(cls, obj: FuserPlugin | Callable[..., Fuser]) -> FuserPlugin:
        return obj if isinstance(obj, FuserPlugin) else cls(build=obj)


class Fuser(nn.Module, ABC):
    """Base of every fuser: ``forward(batch) -> FusionOutput``.

    Class attributes:
        uses_teacher_at_inference: True when the method reads teacher-class embeddings at
            inference (AdaCoMed): those encoders then count as deployed in profiling. Its
            registration says so too (:class:`FuserPlugin` ``reads_teacher``), so the
            runner can load teacher embeddings before building it.
        rep_dim: d of ``FusionOutput.reps`` (0 = no reps, distillation not applicable).
    """

    uses_teacher_at_inference: bool = False
    rep_dim: int = 0
    #: True for imputation baselines: missing entries are filled and then used, so their
    #: weights are not zero (every other fuser gives masked entries weight exactly 0).
    imputes: bool = False

    def __init__(self, spec: FusionSpec) -> None:
        super().__init__()
        self.spec = spec

    @abstractmethod
    def forward(self, batch: Batch) -> FusionOutput: ...

    def router_parameters(self) -> list[nn.Parameter]:
        """Parameters trained at the router learning rate (0.3 x base in the paper)."""
        return []


class IntraFuser(nn.Module, ABC):
    """Fuses the K experts of one modality.

    ``forward(z [B, K, d], mask [B, K] bool) -> (z_m [B, d], weights [B, K])``; weights are
    exactly 0 for masked experts, and z_m is exactly 0 for a row with no expert present.
    """

    @abstractmethod
    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class InterFuser(nn.Module, ABC):
    """Fuses M modalities.

    ``forward(logits [B, M, C], reps [B, M, d], mask [B, M] bool) -> (fused [B, C],
    weights [B, M])``; weights are exactly 0 for unavailable modalities.
    """

    @abstractmethod
    def forward(self, logits: torch.Tensor, reps: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax with unavailable entries scored ``MASK_SCORE``; then zeroed exactly.

    A row with nothing available gets all-zero weights (not a uniform 1/K).
    """
    scores = scores.masked_fill(~mask, MASK_SCORE)
    w = torch.softmax(scores.float(), dim=dim).to(scores.dtype)
    return w * mask.to(w.dtype)


def mix(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[..., k] * values[..., k, :]``: ``[B, K] x [B, K, d] -> [B, d]``.

    Broadcast and sum, not ``einsum``: at K of a few, einsum's B tiny matrix products cost
    3-4 times as much on the CPU, forward and backward.
    """
    return (weights.unsqueeze(-1) * values).sum(dim=-2)


def adapter_bottleneck(d_k: int) -> int:
    """The paper's adapter width r = min(128, max(32, d_k // 16))."""
    return min(128, max(32, d_k // 16))


class ExpertProjector(nn.Module):
    """Residual adapter then projection: e + Adapter(e) -> Linear-LayerNorm-GELU-Dropout -> d."""

    def __init__(self, d_k: int, d: int, dropout: float = 0.1, adapter: bool = True) -> None:
        super().__init__()
        self.adapter = None
        if adapter:
            r = adapter_bottleneck(d_k)
            self.adapter = nn.Sequential(nn.Linear(d_k, r), nn.GELU(), nn.Linear(r, d_k))
            nn.init.zeros_(self.adapter[2].weight)  # starts as the identity map
            nn.init.zeros_(self.adapter[2].bias)
        self.proj = nn.Sequential(
            nn.Linear(d_k, d), nn.LayerNorm(d), nn.GELU(), nn.Dropout(dropout)
        )

    def forward(self, e: torch.Tensor) -> torch.Tensor:  # [B, d_k] -> [B, d]
        if self.adapter is not None:
            e = e + self.adapter(e)
        return self.proj(e)


def project_experts(projectors: nn.ModuleDict, batch: Batch, modality: str,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Project every expert of one modality and zero the masked ones: ``[B, K, d]``.

    Masked inputs are replaced by zeros *before* projection, so garbage (even NaN) in a
    masked slot cannot reach the output.
    """
    mask = batch.expert_mask[modality] if mask is None else mask
    outs = []
    for k, (proj, x) in enumerate(zip(projectors[modality], batch.experts[modality])):
        keep = mask[:, k:k + 1]
        x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
        outs.append(proj(x) * keep.to(x.dtype))
    return torch.stack(outs, dim=1)  # [B, K, d]


class FusionModel(Fuser):
    """Per-expert projectors, one IntraFuser and one head per modality, one InterFuser.

    A sample with no available modality gets the learned ``prior`` logits (a [C]
    parameter), never NaN.
    """

    def __init__(self, spec: FusionSpec, intra: Callable[[int, int], IntraFuser],
                 inter: Callable[[int, int, int], InterFuser], d: int = 128,
                 dropout: float = 0.1, adapter: bool = True) -> None:
        super().__init__(spec)
        self.rep_dim = d
        self.projectors = nn.ModuleDict({
            m: nn.ModuleList([ExpertProjector(dk, d, dropout, adapter) for dk in spec.dims[m]])
            for m in spec.modalities})
        self.intra = nn.ModuleDict({m: intra(d, len(spec.experts[m])) for m in spec.modalities})
        self.heads = nn.ModuleDict({m: nn.Linear(d, spec.n_outputs) for m in spec.modalities})
        self.inter = inter(spec.n_modalities, d, spec.n_outputs)
        self.prior = nn.Parameter(torch.zeros(spec.n_outputs))

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.intra.parameters())

    def forward(self, batch: Batch) -> FusionOutput:
        reps, weights, logits = [], [], []
        kmax = self.spec.max_experts
        for m in self.spec.modalities:
            z = project_experts(self.projectors, batch, m)  # [B, K, d]
            zm, w = self.intra[m](z, batch.expert_mask[m])  # [B, d], [B, K]
            reps.append(zm)
            weights.append(nn.functional.pad(w, (0, kmax - w.shape[1])))
            logits.append(self.heads[m](zm))
        reps_t = torch.stack(reps, dim=1)  # [B, M, d]
        logits_t = torch.stack(logits, dim=1)  # [B, M, C]
        mmask = batch.modality_mask
        fused, mw = self.inter(logits_t, reps_t, mmask)  # [B, C], [B, M]
        empty = ~mmask.any(dim=1, keepdim=True)  # [B, 1]
        fused = torch.where(empty, self.prior.to(fused.dtype).expand_as(fused), fused)
        return FusionOutput(logits=fused, reps=reps_t, rep_mask=mmask, modality_weights=mw,
                            router_weights=torch.stack(weights, dim=1))
