"""MedMIX (Cho, Li, Qiu 2026): mask-aware expert router inside each modality, mask-aware
scorer across modalities.

Eq. 2, per modality m with experts k = 1..K_m projected to z_k (missing experts zeroed):
    g = softmax_k(router(z_k)), unavailable experts scored -1e4;  z^(m) = sum_k g_k z_k,
    and z^(m) = 0 when no expert of m is present.
Eq. 3: per-modality head l^(m) = W_m z^(m); per-modality scorer s^(m) = u_m . z^(m);
    w = softmax_m(s), unavailable modalities scored -1e4; fused = sum_m w^(m) l^(m).
A sample with no modality gets the model's learned prior logits.

Inter-modality variants (option ``inter`` of ``medmix``; "convex" is eq. 3 exactly and the
default). A convex mix averages evidence: two modalities that each say +1 give +1. The
additive variants let it add up:
    gated-sum   fused = sum_m sigmoid(s^(m)) l^(m) over available m: the scorer gates each
                modality's contribution in [0, 1] instead of sharing a unit budget.
    sum         fused = sum_m l^(m) over available m (every gate 1; no scorer).
Every variant gives unavailable modalities weight exactly 0, so what is masked cannot
reach the output, and an empty row still gets the prior.

Registered fusers:
    medmix            the method.
    medmix-uniform    ablation: uniform mean over the available experts (no router).
    medmix-mlp-router variant: the shared router is a 2-layer MLP instead of a linear scorer.
    impute-zero, impute-mean, missing-token
                      imputation baselines (the reviewers' comparison): the MedMIX network,
                      but every missing expert is *filled* (zeros / training mean of that
                      expert's embedding / a learned token in the shared space) and then
                      treated as present, so no mask reaches the router or the scorer.
"""

from __future__ import annotations

import torch
from torch import nn

from medmix_core import (
    Batch,
    FusionModel,
    FusionOutput,
    FusionSpec,
    InterFuser,
    IntraFuser,
    MedmixError,
    hookimpl,
    masked_softmax,
    mix,
)


class RouterIntraFuser(IntraFuser):
    """One scorer shared by the experts of a modality (eq. 2)."""

    def __init__(self, d: int, n_experts: int, hidden: int = 0) -> None:
        super().__init__()
        if hidden:
            self.score = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, 1))
        else:
            self.score = nn.Linear(d, 1)

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.score(z).squeeze(-1)  # [B, K]
        g = masked_softmax(s, mask)  # [B, K], 0 where masked, all-0 rows when none present
        return mix(g, z), g


class MeanIntraFuser(IntraFuser):
    """Uniform mean over the available experts (the 'no intra-modality router' ablation)."""

    def __init__(self, d: int, n_experts: int) -> None:
        super().__init__()

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.to(z.dtype)  # [B, K]
        g = m / m.sum(dim=1, keepdim=True).clamp_min(1.0)
        return mix(g, z), g


class ScorerInterFuser(InterFuser):
    """Per-modality scorer over modality representations (eq. 3)."""

    def __init__(self, n_modalities: int, d: int, n_outputs: int) -> None:
        super().__init__()
        self.score = nn.Parameter(torch.empty(n_modalities, d))  # u_m, one per modality
        self.bias = nn.Parameter(torch.zeros(n_modalities))
        nn.init.normal_(self.score, std=d ** -0.5)

    def forward(self, logits: torch.Tensor, reps: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.einsum("bmd,md->bm", reps, self.score) + self.bias  # [B, M]
        w = masked_softmax(s, mask)  # [B, M]
        return mix(w, logits), w


class GatedSumInterFuser(ScorerInterFuser):
    """Additive inter-modality fusion: each available modality's logits, gated by the
    sigmoid of its scorer, are summed (not mixed convexly)."""

    def forward(self, logits: torch.Tensor, reps: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.einsum("bmd,md->bm", reps, self.score) + self.bias  # [B, M]
        w = torch.sigmoid(s.float()).to(s.dtype) * mask.to(s.dtype)  # [B, M], 0 where masked
        return mix(w, logits), w


class SumInterFuser(InterFuser):
    """Additive inter-modality fusion without a scorer: the masked sum of modality logits."""

    def __init__(self, n_modalities: int, d: int, n_outputs: int) -> None:
        super().__init__()

    def forward(self, logits: torch.Tensor, reps: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = mask.to(logits.dtype)  # [B, M]
        return mix(w, logits), w


#: ``inter`` option of the medmix fuser -> its inter-modality fuser
INTER_FUSERS = {"convex": ScorerInterFuser, "gated-sum": GatedSumInterFuser,
                "sum": SumInterFuser}


def inter_fuser(name: str):
    """The inter-modality fuser class of option ``inter``; a clear error for unknown ones."""
    try:
        return INTER_FUSERS[name]
    except (KeyError, TypeError):
        raise MedmixError(f"medmix: inter={name!r} is not an inter-modality fusion; expected "
                          f"one of {sorted(INTER_FUSERS)} (convex is eq. 3, the paper's). "
                          f"Set it with --fuser-options '{{\"inter\": \"gated-sum\"}}'.") from None


def build_medmix(spec: FusionSpec, d: int = 128, dropout: float = 0.1, adapter: bool = True,
                 router_hidden: int = 0, inter: str = "convex", **_: object) -> FusionModel:
    """The MedMIX fuser.

    Args:
        spec: modalities, experts and their dims, outputs.
        d: shared representation width.
        dropout: dropout of the per-expert projections.
        adapter: keep the residual adapters (False = ablation).
        router_hidden: 0 for a linear shared router, else the hidden width of an MLP router.
        inter: inter-modality fusion: "convex" (eq. 3, the paper's; default), "gated-sum"
            (the scorer's sigmoid gates each modality's logits, which are summed) or "sum"
            (the masked sum of modality logits).
    """
    return FusionModel(spec, intra=lambda dd, k: RouterIntraFuser(dd, k, router_hidden),
                       inter=inter_fuser(inter), d=d, dropout=dropout, adapter=adapter)


def build_medmix_uniform(spec: FusionSpec, d: int = 128, dropout: float = 0.1,
                         adapter: bool = True, **_: object) -> FusionModel:
    """Ablation: MedMIX with the intra-modality router replaced by a uniform mean."""
    return FusionModel(spec, intra=MeanIntraFuser, inter=ScorerInterFuser, d=d,
                       dropout=dropout, adapter=adapter)


def build_medmix_mlp_router(spec: FusionSpec, d: int = 128, dropout: float = 0.1,
                            adapter: bool = True, **_: object) -> FusionModel:
    """Variant: MedMIX with a two-layer MLP as the shared expert router."""
    return build_medmix(spec, d=d, dropout=dropout, adapter=adapter, router_hidden=max(8, d // 2))


class ImputingFusionModel(FusionModel):
    """MedMIX with imputation instead of masking (a baseline, not the method).

    ``method``: "zero" fills a missing expert's raw embedding with zeros; "mean" with the
    running mean of that expert's present embeddings seen in training (a buffer, saved
    with the model, frozen at evaluation); "token" replaces its projection with a learned
    vector in the shared space. Afterwards every expert and modality counts as present.
    """

    imputes = True

    def __init__(self, spec: FusionSpec, method: str, d: int = 128, dropout: float = 0.1,
                 adapter: bool = True) -> None:
        super().__init__(spec, intra=lambda dd, k: RouterIntraFuser(dd, k),
                         inter=ScorerInterFuser, d=d, dropout=dropout, adapter=adapter)
        if method not in ("zero", "mean", "token"):
            raise ValueError(f"imputation method must be zero, mean or token, got {method!r}")
        self.method = method
        self.tokens = nn.ParameterDict({
            m: nn.Parameter(0.02 * torch.randn(len(spec.dims[m]), d)) for m in spec.modalities
        }) if method == "token" else None
        for j, m in enumerate(spec.modalities):
            for k, dk in enumerate(spec.dims[m]):
                self.register_buffer(f"sum_{j}_{k}", torch.zeros(dk, dtype=torch.float64))
                self.register_buffer(f"count_{j}_{k}", torch.zeros((), dtype=torch.float64))

    def _fill(self, j: int, k: int, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.method == "mean":
            s, c = getattr(self, f"sum_{j}_{k}"), getattr(self, f"count_{j}_{k}")
            if self.training:
                with torch.no_grad():
                    present = x[keep[:, 0]].double()
                    s += present.sum(0)
                    c += len(present)
            fill = (s / c.clamp_min(1.0)).to(x.dtype)
        else:
            fill = torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.where(keep, x, fill)

    def forward(self, batch: Batch) -> FusionOutput:
        reps, weights, logits = [], [], []
        kmax = self.spec.max_experts
        b = batch.size
        for j, m in enumerate(self.spec.modalities):
            mask = batch.expert_mask[m]
            zs = []
            for k, (proj, x) in enumerate(zip(self.projectors[m], batch.experts[m])):
                keep = mask[:, k:k + 1]
                z = proj(self._fill(j, k, x, keep))  # [B, d]
                if self.tokens is not None:
                    z = torch.where(keep, z, self.tokens[m][k].to(z.dtype).expand_as(z))
                zs.append(z)
            z = torch.stack(zs, 1)  # [B, K, d]
            everything = torch.ones(b, z.shape[1], dtype=torch.bool, device=z.device)
            zm, w = self.intra[m](z, everything)
            reps.append(zm)
            weights.append(nn.functional.pad(w, (0, kmax - w.shape[1])))
            logits.append(self.heads[m](zm))
        reps_t, logits_t = torch.stack(reps, 1), torch.stack(logits, 1)  # [B, M, d], [B, M, C]
        all_mod = torch.ones_like(batch.modality_mask)
        fused, mw = self.inter(logits_t, reps_t, all_mod)
        return FusionOutput(logits=fused, reps=reps_t, rep_mask=batch.modality_mask,
                            modality_weights=mw, router_weights=torch.stack(weights, 1))


def _imputer(method: str):
    def build(spec: FusionSpec, d: int = 128, dropout: float = 0.1, adapter: bool = True,
              **_: object) -> ImputingFusionModel:
        return ImputingFusionModel(spec, method, d=d, dropout=dropout, adapter=adapter)
    build.__doc__ = f"Imputation baseline: MedMIX network with missing experts filled by {method}."
    return build


@hookimpl
def register_fusers(register):
    register("medmix", build_medmix)
    register("medmix-uniform", build_medmix_uniform)
    register("medmix-mlp-router", build_medmix_mlp_router)
    register("impute-zero", _imputer("zero"))
    register("impute-mean", _imputer("mean"))
    register("missing-token", _imputer("token"))
