"""AdaCoMed (Chen et al., CVPR 2025) as a fuser: a large and a small pathway, decision fusion.

Follows the released code (``Zoew420/AdaCoMed`` @3f85d6c, ``model.py`` / ``train.py``):

Large pathway: a MoME block over the *teacher-class* embeddings (``batch.teacher``, one
per modality; the original has two: DINOv2 image, LLM2Vec text), generalised to M
modalities:
    x_m = Linear_m(t_m) -> hidden                                   tokens [B, M, hidden]
    x = LayerNorm(x + Dropout(MHA(x)))        attention over the M tokens of each sample
    gate = softmax(Linear(concat x) -> M + 1)  experts E_m(x_m) and E_joint(concat x),
                                               each Linear-ReLU-Linear -> M * hidden
    x = LayerNorm(concat x + Dropout(sum_k gate_k E_k))
    large_feat = Linear(M * hidden -> d)
Small pathway: the expert embeddings, mean over available projected experts per modality,
then over available modalities (the ``meanavg`` representation) -> small_feat [B, d]; fed
to the classifier directly, with no projection, as in the original.
Shared classifier (the small model's): WN-Linear(d, 2d) - ReLU - Dropout(0.5) -
WN-Linear(2d, C), applied to both features.
Alignment ``sim``: l, s = L2-normalised large / small features; s_ij = <l_i, s_j> / tau
(tau 0.07) minus the row max (stop-grad);
    frac_i = e^{s_ii} / (e^{s_ii} + (1/B) sum_{j != i} e^{s_ij}),  sim = mean_i frac_i,
a batch scalar in (0, 1] (not a cosine, not per sample), recomputed for every batch.
Decision fusion: logits = w_L z_L + w_S z_S with (w_L, w_S) from ``weighting``:
    learnable  softmax of two parameters initialised to ones (0.5 / 0.5);
    inverse    w_L = sig(sim), w_S = u / (u + 1), u = 1 / (alpha sim / T + eps),
               then normalised to sum 1 (T = temperature 1, alpha 1, eps 1e-6);
    gaussian   w_S = exp(-sim^2 / (2 sigma^2)), w_L = 1 - w_S (sigma 1);
    threshold  w_L = 0.5 + 0.5 tanh(slope (sim - threshold)), w_S = 1 - w_L
               (threshold 0.95, slope 10: the values ``train.py`` passes).
Loss: the released training loop uses the task loss only; the line adding the contrastive
loss L_i = -log(e^{s_ii} / (e^{s_ii} + sum_{j != i} e^{s_ij})) is commented out. So
``contrastive_weight`` defaults to 0.0; a positive value adds weight * mean_i L_i as
``FusionOutput.aux_loss``.

Deviations, all deliberate:
    - The original applies ``nn.MultiheadAttention`` to a 2-D [B, 2 hidden] tensor, which
      PyTorch reads as one unbatched sequence of length B: attention mixes the samples of
      a batch. Here attention runs over the M modality tokens *within* each sample.
    - Missing data (absent from the original, which has complete pairs): a teacher
      embedding counts as present only where the teacher mask and the modality mask
      are both set (a protocol that removes a modality removes its large-model input
      too). Missing modality tokens are zeroed, key-padded in attention and their experts
      get zero gate weight (the joint expert stays). A sample with no teacher embedding
      uses the small pathway alone, one with no expert embedding the large pathway
      alone, one with neither the learned prior; ``sim`` is computed over the samples with
      both pathways.
    - ``sim`` (and so every weighting but ``learnable``) depends on the other samples of
      the batch, as in the original: inference is deterministic for a fixed batch, and the
      training code predicts in fixed row order and batch size.
    - Hidden width defaults to d (the original: 512 with d_small = 1024).
    - The MEVF-SAN small model is replaced by the frozen experts of this run; its
      classifier is the shared head above, trained from scratch.
    - ``reps`` are the small pathway's per-modality representations, so distillation can be
      applied; the MoME gate is not a per-modality weight and is not reported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from medmix_core import (
    Batch,
    Fuser,
    FuserPlugin,
    FusionOutput,
    FusionSpec,
    MedmixError,
    hookimpl,
    masked_softmax,
    mix,
    project_experts,
)
from medmix_fusers.baselines import (
    check_batch,
    clean_teacher,
    make_projectors,
    masked_mean,
    require_teacher,
    teacher_availability,
)

WEIGHTINGS = ("learnable", "inverse", "gaussian", "threshold")


def alignment(large: torch.Tensor, small: torch.Tensor, tau: float = 0.07,
              eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaCoMed's ``contrastive_loss``: per-sample frac and loss over ``[n, d]`` features.

    Returns:
        (frac [n], loss [n]) as in the released code; ``sim`` is ``frac.mean()``.
    """
    lp = F.normalize(large.float(), dim=1)
    sp = F.normalize(small.float(), dim=1)
    s = lp @ sp.T / tau  # [n, n]
    s = s - s.max(dim=1, keepdim=True).values.detach()
    pos = torch.diagonal(s)  # [n]
    exp_s = torch.exp(s)
    exp_pos = torch.exp(pos)
    neg = exp_s * ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    frac = (exp_pos + eps) / (exp_pos + neg.mean(dim=1) + eps)
    loss = -torch.log((exp_pos + eps) / (exp_pos + neg.sum(dim=1) + eps))
    return frac, loss


def inverse_weight(sim: torch.Tensor, temperature: float = 1.0, alpha: float = 1.0,
                   eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Large weight sigmoid(sim), small weight u / (u + 1) with u = 1 / (alpha sim / T + eps)."""
    inv = 1.0 / (alpha * (sim / temperature) + eps)
    large = torch.sigmoid(sim)
    small = inv / (inv + 1)
    total = large + small
    return large / total, small / total


def gaussian_weight(sim: torch.Tensor, sigma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Small weight exp(-sim^2 / (2 sigma^2)), large weight its complement."""
    small = torch.exp(-sim ** 2 / (2 * sigma ** 2))
    return 1 - small, small


def threshold_weight(sim: torch.Tensor, threshold: float = 0.95,
                     slope: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Large weight 0.5 + 0.5 tanh(slope (sim - threshold)), small weight its complement."""
    large = 0.5 + 0.5 * torch.tanh(slope * (sim - threshold))
    return large, 1 - large


class _Expert(nn.Module):
    """Linear-ReLU-Linear (the original ModalityExpert)."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class MoMEBlock(nn.Module):
    """The MoME transformer block over M modality tokens, mask-aware.

    ``forward(tokens [B, M, h], avail [B, M]) -> (x [B, M h], gate [B, M + 1])``.
    """

    def __init__(self, n_modalities: int, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        M = n_modalities
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(hidden)
        self.experts = nn.ModuleList([_Expert(hidden, hidden, M * hidden) for _ in range(M)]
                                     + [_Expert(M * hidden, hidden, M * hidden)])
        self.gate = nn.Linear(M * hidden, M + 1)
        self.norm2 = nn.LayerNorm(M * hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, avail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        any_av = avail.any(dim=1, keepdim=True)  # [B, 1]
        # rows with nothing available attend to their (zero) tokens; their output is unused
        pad = ~(avail | ~any_av)  # [B, M], True = ignore
        a, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)
        x = self.norm1(x + self.drop(a))
        x = x * avail.unsqueeze(-1).to(x.dtype)  # [B, M, h], missing tokens back to zero
        flat = x.flatten(1)  # [B, M h]
        gmask = torch.cat([avail, any_av], dim=1)  # [B, M + 1]
        g = masked_softmax(self.gate(flat), gmask)
        outs = [e(x[:, j]) for j, e in enumerate(self.experts[:-1])] + [self.experts[-1](flat)]
        mixed = mix(g, torch.stack(outs, dim=1))  # [B, M h]
        return self.norm2(flat + self.drop(mixed)), g


class AdaCoMedFuser(Fuser):
    """AdaCoMed over teacher-class (large) and expert (small) embeddings; see module doc."""

    uses_teacher_at_inference = True
    name = "adacomed"

    def __init__(self, spec: FusionSpec, d: int = 128, dropout: float = 0.1,
                 adapter: bool = True, weighting: str = "learnable", hidden: int | None = None,
                 heads: int = 8, tau: float = 0.07, contrastive_weight: float = 0.0,
                 classifier_dropout: float = 0.5, temperature: float = 1.0,
                 alpha: float = 1.0, eps: float = 1e-6, sigma: float = 1.0,
                 threshold: float = 0.95, slope: float = 10.0) -> None:
        super().__init__(spec)
        require_teacher(spec, self.name)
        if weighting not in WEIGHTINGS:
            raise MedmixError(f"adacomed: weighting must be one of {WEIGHTINGS}, got "
                              f"{weighting!r}.")
        hidden = int(d if hidden is None else hidden)
        if int(heads) < 1 or hidden % int(heads):
            raise MedmixError(f"adacomed: heads must divide the hidden width; got heads={heads}, "
                              f"hidden={hidden}. Pass fuser_options {{\"heads\": 1}} or another "
                              f"hidden.")
        if tau <= 0 or temperature <= 0 or sigma <= 0:
            raise MedmixError(f"adacomed: tau, temperature and sigma must be > 0; got tau={tau}, "
                              f"temperature={temperature}, sigma={sigma}.")
        if contrastive_weight < 0:
            raise MedmixError(f"adacomed: contrastive_weight must be >= 0, got "
                              f"{contrastive_weight}.")
        self.rep_dim = d
        self.weighting = weighting
        self.tau = float(tau)
        self.contrastive_weight = float(contrastive_weight)
        self.weight_kwargs = {"inverse": {"temperature": temperature, "alpha": alpha, "eps": eps},
                              "gaussian": {"sigma": sigma},
                              "threshold": {"threshold": threshold, "slope": slope}
                              }.get(weighting, {})
        self.large_modalities = [m for m in spec.modalities if m in spec.teacher_dims]
        self.large_index = [spec.modalities.index(m) for m in self.large_modalities]
        M = len(self.large_modalities)
        self.teacher_proj = nn.ModuleDict({m: nn.Linear(spec.teacher_dims[m], hidden)
                                           for m in self.large_modalities})
        self.mome = MoMEBlock(M, hidden, int(heads), dropout)
        self.large_proj = nn.Linear(M * hidden, d)
        self.projectors = make_projectors(spec, d, dropout, adapter)
        self.classifier = nn.Sequential(weight_norm(nn.Linear(d, 2 * d)), nn.ReLU(),
                                        nn.Dropout(classifier_dropout),
                                        weight_norm(nn.Linear(2 * d, spec.n_outputs)))
        self.fusion_weights = nn.Parameter(torch.ones(2))
        self.prior = nn.Parameter(torch.zeros(spec.n_outputs))

    def decision_weights(self, sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_large, w_small) scalars for the configured weighting."""
        if self.weighting == "learnable":
            w = torch.softmax(self.fusion_weights, dim=0)
            return w[0], w[1]
        fn = {"inverse": inverse_weight, "gaussian": gaussian_weight,
              "threshold": threshold_weight}[self.weighting]
        return fn(sim, **self.weight_kwargs)

    def forward(self, batch: Batch) -> FusionOutput:
        check_batch(self.spec, batch, self.name)
        t_avail = teacher_availability(self.spec, batch, self.name)[:, self.large_index]
        missing = [m for m in self.large_modalities if m not in batch.teacher]
        if missing:
            raise MedmixError(f"adacomed was built with teacher embeddings for {missing}, but the "
                              f"batch has none for them. Use the same --teacher as in training.")
        # large pathway
        tokens = torch.stack([self.teacher_proj[m](clean_teacher(batch, m, t_avail[:, j]))
                              for j, m in enumerate(self.large_modalities)], dim=1)  # [B, M_T, h]
        tokens = tokens * t_avail.unsqueeze(-1).to(tokens.dtype)
        x, _ = self.mome(tokens, t_avail)  # [B, M_T h]
        large_feat = self.large_proj(x)  # [B, d]
        # small pathway: mean over available experts, then over available modalities
        reps = []
        for m in self.spec.modalities:
            z = project_experts(self.projectors, batch, m)  # [B, K, d]
            reps.append(masked_mean(z, batch.expert_mask[m])[0])
        reps_t = torch.stack(reps, dim=1)  # [B, M, d]
        mmask = batch.modality_mask
        small_feat, _ = masked_mean(reps_t, mmask)  # [B, d]

        z_large = self.classifier(large_feat)  # [B, C]
        z_small = self.classifier(small_feat)
        has_l = t_avail.any(dim=1)  # [B]
        has_s = mmask.any(dim=1)
        both = has_l & has_s
        n = int(both.sum())
        frac = loss = None
        if n > 0:
            frac, loss = alignment(large_feat[both], small_feat[both], self.tau)
            sim = frac.mean()
        else:
            sim = large_feat.new_ones((), dtype=torch.float32)  # unused: no row has both
        w_l, w_s = self.decision_weights(sim)
        fused = w_l.to(z_large.dtype) * z_large + w_s.to(z_large.dtype) * z_small
        fused = torch.where(both.unsqueeze(1), fused,
                            torch.where(has_l.unsqueeze(1), z_large, z_small))
        empty = ~(has_l | has_s)
        fused = torch.where(empty.unsqueeze(1), self.prior.to(fused.dtype).expand_as(fused),
                            fused)
        aux = None
        if self.contrastive_weight > 0:
            aux = (self.contrastive_weight * loss.mean() if loss is not None
                   else fused.sum() * 0.0)
        return FusionOutput(logits=fused, reps=reps_t, rep_mask=mmask, aux_loss=aux)


def build_adacomed(spec: FusionSpec, d: int = 128, dropout: float = 0.1, adapter: bool = True,
                   weighting: str = "learnable", hidden: int | None = None, heads: int = 8,
                   tau: float = 0.07, contrastive_weight: float = 0.0,
                   classifier_dropout: float = 0.5, temperature: float = 1.0, alpha: float = 1.0,
                   eps: float = 1e-6, sigma: float = 1.0, threshold: float = 0.95,
                   slope: float = 10.0) -> AdaCoMedFuser:
    """AdaCoMed baseline; needs teacher-class embeddings at inference (``--teacher NAME``).

    Args:
        spec: modalities, experts, dims, outputs and ``teacher_dims`` (non-empty).
        d: width of the small pathway and the shared classifier input.
        dropout: dropout of the expert projections and the MoME block.
        adapter: keep the residual adapters of the expert projections.
        weighting: "learnable" | "inverse" | "gaussian" | "threshold".
        hidden: MoME token width (default d); ``heads`` must divide it.
        heads: attention heads of the MoME block (8).
        tau: temperature of the alignment similarity (0.07).
        contrastive_weight: weight of the contrastive aux loss (0.0, as released).
        classifier_dropout: dropout of the shared classifier (0.5).
        temperature, alpha, eps: the inverse weighting's parameters (1, 1, 1e-6).
        sigma: the gaussian weighting's parameter (1).
        threshold, slope: the threshold weighting's parameters (0.95, 10).
    """
    return AdaCoMedFuser(spec, d=d, dropout=dropout, adapter=adapter, weighting=weighting,
                         hidden=hidden, heads=heads, tau=tau,
                         contrastive_weight=contrastive_weight,
                         classifier_dropout=classifier_dropout, temperature=temperature,
                         alpha=alpha, eps=eps, sigma=sigma, threshold=threshold, slope=slope)


@hookimpl
def register_fusers(register):
    register("adacomed", FuserPlugin(build_adacomed, reads_teacher=True))
