"""Simple fusion baselines and MedMIX ablations, on the same experts as MedMIX.

Every baseline starts from the same per-expert :class:`~medmix_core.ExpertProjector`
(residual adapter, then Linear-LayerNorm-GELU-Dropout to a shared width d) that MedMIX
uses, so a comparison isolates the fusion rule. Masks are honoured everywhere: masked
expert slots are replaced by zeros *before* projection (garbage, even NaN, cannot leak),
masked entries are excluded from every mean, max and attention, and a sample with no
available modality gets a learned prior (a ``[C]`` parameter) instead of a forward pass.

Registered fusers:
    meanavg             mean over available experts per modality, then over available
                        modalities, then an MLP head.
    concat              concatenation of all projected experts (missing ones zero-filled)
                        and their masks, then an MLP head.
    max                 element-wise max over available experts and modalities, MLP head.
    attention           a learned CLS token and the available expert tokens through a
                        masked transformer block; the CLS output feeds an MLP head.
    teacher-only        MLP head on one modality's teacher-class embedding (the paper's
                        "*-Large" rows); reads teacher embeddings at inference.
    medmix-best-expert  ablation: MedMIX with a single chosen expert per modality.
    medmix-no-inter     ablation: MedMIX on one modality only (no inter-modality fusion).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from medmix_core import (
    Batch,
    ExpertProjector,
    Fuser,
    FuserPlugin,
    FusionModel,
    FusionOutput,
    FusionSpec,
    MedmixError,
    hookimpl,
    mix,
    project_experts,
)
from medmix_fusers.medmix import build_medmix

# ----------------------------------------------------------------------------- helpers

def check_batch(spec: FusionSpec, batch: Batch, who: str) -> None:
    """Fail clearly when a batch does not match the spec the fuser was built for."""
    if batch.modalities and list(batch.modalities) != list(spec.modalities):
        raise MedmixError(f"{who} was built for modalities {spec.modalities}, but the batch has "
                          f"{batch.modalities}. Build the fuser from the same store and experts "
                          f"as the batches (medmix_core.training.make_spec).")
    for m in spec.modalities:
        got = len(batch.experts.get(m, []))
        if got != len(spec.experts[m]):
            raise MedmixError(f"{who}: modality {m!r} has {got} expert tensors in the batch, "
                              f"expected {len(spec.experts[m])} ({spec.experts[m]}). Build the "
                              f"fuser from the same expert selection as the batches.")


def make_projectors(spec: FusionSpec, d: int, dropout: float, adapter: bool) -> nn.ModuleDict:
    """One ExpertProjector per (modality, expert), as in MedMIX."""
    return nn.ModuleDict({
        m: nn.ModuleList([ExpertProjector(dk, d, dropout, adapter) for dk in spec.dims[m]])
        for m in spec.modalities})


def masked_mean(z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``z [B, K, d]`` over the entries with ``mask [B, K]``; 0 where none.

    Returns:
        (mean [B, d], weights [B, K]) with weights exactly 0 for masked entries.
    """
    w = mask.to(z.dtype)
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1.0)  # [B, K]
    return mix(w, z), w


def masked_max(z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise max of ``z [B, K, d]`` over available entries only; 0 where none.

    Returns:
        (max [B, d], share [B, K]): share = fraction of the d features won by each entry,
        exactly 0 for masked entries and for rows with nothing available.
    """
    neg = torch.finfo(z.dtype).min
    filled = z.masked_fill(~mask.unsqueeze(-1), neg)  # [B, K, d]
    best, arg = filled.max(dim=1)  # [B, d]
    has = mask.any(dim=1, keepdim=True)  # [B, 1]
    best = torch.where(has, best, torch.zeros_like(best))
    won = nn.functional.one_hot(arg, z.shape[1]).to(z.dtype).mean(dim=1)  # [B, K]
    return best, won * mask.to(z.dtype) * has.to(z.dtype)


class MLPHead(nn.Module):
    """Linear-GELU-Dropout-Linear: fused representation -> logits."""

    def __init__(self, d_in: int, hidden: int, n_outputs: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def with_prior(logits: torch.Tensor, empty: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """``logits [B, C]`` with rows where ``empty [B]`` replaced by the learned prior."""
    return torch.where(empty.unsqueeze(1), prior.to(logits.dtype).expand_as(logits), logits)


def pad_weights(weights: list[torch.Tensor], kmax: int) -> torch.Tensor:
    """Per-modality ``[B, K_m]`` weights -> ``[B, M, K_max]`` (zero padding)."""
    return torch.stack([nn.functional.pad(w, (0, kmax - w.shape[1])) for w in weights], dim=1)


def _check_d(d: int, dropout: float, who: str) -> None:
    if int(d) < 1:
        raise MedmixError(f"{who}: d must be a positive width, got {d}.")
    if not 0.0 <= float(dropout) < 1.0:
        raise MedmixError(f"{who}: dropout must be in [0, 1), got {dropout}.")


class ProjectedFuser(Fuser):
    """Base of the baselines: per-expert projectors, a learned prior, mask helpers."""

    name = "baseline"

    def __init__(self, spec: FusionSpec, d: int, dropout: float, adapter: bool) -> None:
        super().__init__(spec)
        _check_d(d, dropout, self.name)
        self.d = int(d)
        self.projectors = make_projectors(spec, self.d, dropout, adapter)
        self.prior = nn.Parameter(torch.zeros(spec.n_outputs))

    def project(self, batch: Batch) -> list[torch.Tensor]:
        """Projected experts per modality, ``[B, K_m, d]`` each, zero where masked."""
        check_batch(self.spec, batch, self.name)
        return [project_experts(self.projectors, batch, m) for m in self.spec.modalities]


# ----------------------------------------------------------------------------- meanavg

class PooledFuser(ProjectedFuser):
    """Pool the available experts of each modality, then the available modalities, then an
    MLP head; ``pool(x [B, N, d], mask [B, N]) -> (pooled [B, d], weights [B, N])``."""

    pool = staticmethod(masked_mean)

    def __init__(self, spec: FusionSpec, d: int = 128, dropout: float = 0.1,
                 adapter: bool = True) -> None:
        super().__init__(spec, d, dropout, adapter)
        self.rep_dim = self.d
        self.head = MLPHead(self.d, self.d, spec.n_outputs, dropout)

    def forward(self, batch: Batch) -> FusionOutput:
        reps, router = [], []
        for m, z in zip(self.spec.modalities, self.project(batch)):
            zm, w = self.pool(z, batch.expert_mask[m])  # [B, d], [B, K]
            reps.append(zm)
            router.append(w)
        reps_t = torch.stack(reps, dim=1)  # [B, M, d]
        mmask = batch.modality_mask
        fused, mw = self.pool(reps_t, mmask)  # [B, d], [B, M]
        logits = with_prior(self.head(fused), ~mmask.any(dim=1), self.prior)
        return FusionOutput(logits=logits, reps=reps_t, rep_mask=mmask, modality_weights=mw,
                            router_weights=pad_weights(router, self.spec.max_experts))


class MeanAvgFuser(PooledFuser):
    """Mean over available experts per modality, mean over available modalities, MLP."""

    name = "meanavg"
    pool = staticmethod(masked_mean)


def build_meanavg(spec: FusionSpec, d: int = 128, dropout: float = 0.1,
                  adapter: bool = True) -> MeanAvgFuser:
    """Mean-average fusion baseline.

    Args:
        spec: modalities, experts, dims, outputs.
        d: shared width of the projected experts and of the MLP head.
        dropout: dropout of the projections and the head.
        adapter: keep the residual adapters of the expert projections.
    """
    return MeanAvgFuser(spec, d=d, dropout=dropout, adapter=adapter)


# ----------------------------------------------------------------------------- concat

class ConcatFuser(ProjectedFuser):
    """Concatenation of all projected experts (zero where missing) and the expert masks."""

    name = "concat"

    def __init__(self, spec: FusionSpec, d: int = 128, dropout: float = 0.1,
                 adapter: bool = True) -> None:
        super().__init__(spec, d, dropout, adapter)
        n_exp = sum(len(spec.experts[m]) for m in spec.modalities)
        self.head = MLPHead(n_exp * self.d + n_exp, self.d, spec.n_outputs, dropout)

    def forward(self, batch: Batch) -> FusionOutput:
        zs = self.project(batch)  # M x [B, K_m, d], zeros where missing
        flat = [z.flatten(1) for z in zs]
        masks = [batch.expert_mask[m].to(zs[0].dtype) for m in self.spec.modalities]
        x = torch.cat(flat + masks, dim=1)  # [B, sum_K * d + sum_K]
        logits = with_prior(self.head(x), ~batch.modality_mask.any(dim=1), self.prior)
        return FusionOutput(logits=logits)


def build_concat(spec: FusionSpec, d: int = 128, dropout: float = 0.1,
                 adapter: bool = True) -> ConcatFuser:
    """Concatenation (early fusion) baseline with the expert masks as extra inputs.

    Args:
        spec: modalities, experts, dims, outputs.
        d: width of each projected expert and hidden width of the MLP head.
        dropout: dropout of the projections and the head.
        adapter: keep the residual adapters of the expert projections.
    """
    return ConcatFuser(spec, d=d, dropout=dropout, adapter=adapter)


# ----------------------------------------------------------------------------- max

class MaxFuser(PooledFuser):
    """Element-wise max over available experts, then over available modalities, MLP.

    ``router_weights`` / ``modality_weights`` report the share of the d features that each
    expert / modality wins in the max (0 for unavailable ones).
    """

    name = "max"
    pool = staticmethod(masked_max)


def build_max(spec: FusionSpec, d: int = 128, dropout: float = 0.1,
              adapter: bool = True) -> MaxFuser:
    """Masked element-wise max-pooling baseline.

    Args:
        spec: modalities, experts, dims, outputs.
        d: shared width of the projected experts and of the MLP head.
        dropout: dropout of the projections and the head.
        adapter: keep the residual adapters of the expert projections.
    """
    return MaxFuser(spec, d=d, dropout=dropout, adapter=adapter)


# ----------------------------------------------------------------------------- attention

class AttentionFuser(ProjectedFuser):
    """Pre-norm transformer block(s) over [CLS; available expert tokens], CLS pooled.

    Each projected expert gets a learned identity embedding (which expert of which
    modality it is). Unavailable tokens are key-padded, so they receive exactly zero
    attention; the CLS token is always present, so a row with nothing available is still
    defined (and then replaced by the learned prior). Weights reported are the last
    block's CLS attention: ``router_weights`` within each modality (renormalised over its
    experts), ``modality_weights`` the attention mass per modality over all expert tokens.
    ``reps`` are the masked means of each modality's contextualised tokens.
    """

    name = "attention"

    def __init__(self, spec: FusionSpec, d: int = 128, dropout: float = 0.1,
                 adapter: bool = True, heads: int = 4, layers: int = 1) -> None:
        super().__init__(spec, d, dropout, adapter)
        if int(heads) < 1 or self.d % int(heads):
            raise MedmixError(f"attention: heads must divide d; got heads={heads}, d={d}. Pass "
                              f"e.g. fuser_options {{\"heads\": 1}} or a d divisible by heads.")
        if int(layers) < 1:
            raise MedmixError(f"attention: layers must be >= 1, got {layers}.")
        self.rep_dim = self.d
        n_tok = sum(len(spec.experts[m]) for m in spec.modalities)
        self.cls = nn.Parameter(torch.randn(1, 1, self.d) * 0.02)
        self.token_type = nn.Parameter(torch.randn(1, n_tok, self.d) * 0.02)
        self.blocks = nn.ModuleList([_Block(self.d, int(heads), dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(self.d)
        self.head = MLPHead(self.d, self.d, spec.n_outputs, dropout)

    def forward(self, batch: Batch) -> FusionOutput:
        zs = self.project(batch)
        tokens = torch.cat(zs, dim=1) + self.token_type  # [B, T, d]
        tmask = torch.cat([batch.expert_mask[m] for m in self.spec.modalities], dim=1)  # [B, T]
        b = tokens.shape[0]
        x = torch.cat([self.cls.expand(b, -1, -1), tokens], dim=1)  # [B, 1+T, d]
        pad = torch.cat([torch.zeros_like(tmask[:, :1]), ~tmask], dim=1)  # True = ignore
        attn = None
        for block in self.blocks:
            x, attn = block(x, pad)
        x = self.norm(x)
        mmask = batch.modality_mask
        logits = with_prior(self.head(x[:, 0]), ~mmask.any(dim=1), self.prior)

        cls_w = attn[:, 0, 1:] * tmask.to(attn.dtype)  # [B, T], exact 0 where padded
        total = cls_w.sum(dim=1, keepdim=True)  # [B, 1]
        reps, router, mweights, start = [], [], [], 0
        for m, z in zip(self.spec.modalities, zs):
            k = z.shape[1]
            em = batch.expert_mask[m]
            w = cls_w[:, start:start + k]  # [B, K]
            mass = w.sum(dim=1, keepdim=True)
            router.append(torch.where(mass > 0, w / mass.clamp_min(1e-12), torch.zeros_like(w)))
            mweights.append(torch.where(total > 0, mass / total.clamp_min(1e-12),
                                        torch.zeros_like(mass)))
            rep, _ = masked_mean(x[:, 1 + start:1 + start + k], em)  # [B, d]
            reps.append(rep)
            start += k
        mw = torch.cat(mweights, dim=1) * mmask.to(cls_w.dtype)  # [B, M]
        return FusionOutput(logits=logits, reps=torch.stack(reps, dim=1), rep_mask=mmask,
                            modality_weights=mw,
                            router_weights=pad_weights(router, self.spec.max_experts))


class _Block(nn.Module):
    """Pre-norm self-attention + feed-forward block that also returns attention weights."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm1(x)
        a, w = self.attn(h, h, h, key_padding_mask=pad, need_weights=True,
                         average_attn_weights=True)  # [B, L, d], [B, L, L]
        x = x + self.drop(a)
        x = x + self.drop(self.ff(self.norm2(x)))
        return x, w


def build_attention(spec: FusionSpec, d: int = 128, dropout: float = 0.1, adapter: bool = True,
                    heads: int = 4, layers: int = 1) -> AttentionFuser:
    """Attention-pooling baseline over the available expert tokens.

    Args:
        spec: modalities, experts, dims, outputs.
        d: token width (heads must divide it).
        dropout: dropout of projections, attention, feed-forward and head.
        adapter: keep the residual adapters of the expert projections.
        heads: attention heads.
        layers: transformer blocks.
    """
    return AttentionFuser(spec, d=d, dropout=dropout, adapter=adapter, heads=heads,
                          layers=layers)


# ----------------------------------------------------------------------------- teacher-only

def teacher_availability(spec: FusionSpec, batch: Batch, who: str) -> torch.Tensor:
    """``[B, M]`` bool: teacher embedding present *and* the modality itself available.

    A teacher-class embedding encodes the same raw input as the experts, so where a
    missingness protocol (or modality dropout) removes a modality, its teacher embedding is
    treated as gone too.
    """
    if batch.teacher is None or batch.teacher_mask is None:
        raise MedmixError(f"{who} reads teacher-class embeddings at inference, but the batch "
                          f"carries none. Load the store with a teacher: pass --teacher NAME "
                          f"(extracted with `medmix extract ... --teacher NAME`).")
    return batch.teacher_mask & batch.modality_mask


def clean_teacher(batch: Batch, modality: str, avail: torch.Tensor) -> torch.Tensor:
    """The teacher embedding of ``modality`` with unavailable rows replaced by zeros."""
    t = batch.teacher[modality]
    return torch.where(avail.unsqueeze(1), t, torch.zeros((), dtype=t.dtype, device=t.device))


def require_teacher(spec: FusionSpec, who: str) -> None:
    if not spec.teacher_dims:
        raise MedmixError(f"{who} needs teacher-class embeddings (spec.teacher_dims is empty). "
                          f"Pass --teacher NAME with a teacher extracted into the store "
                          f"(`medmix extract ... --teacher NAME`).")


class TeacherOnlyFuser(Fuser):
    """MLP head on one modality's teacher embedding; the learned prior where it is missing."""

    uses_teacher_at_inference = True
    name = "teacher-only"

    def __init__(self, spec: FusionSpec, d: int = 128, dropout: float = 0.1,
                 modality: str | None = None) -> None:
        super().__init__(spec)
        _check_d(d, dropout, self.name)
        require_teacher(spec, self.name)
        with_t = [m for m in spec.modalities if m in spec.teacher_dims]
        if modality is None:
            if not with_t:
                raise MedmixError(f"teacher-only: none of the modalities {spec.modalities} has "
                                  f"a teacher embedding (teachers for "
                                  f"{sorted(spec.teacher_dims)}). Extract a teacher for one of "
                                  f"them.")
            modality = with_t[0]
        if modality not in with_t:
            raise MedmixError(f"teacher-only: modality={modality!r} has no teacher embedding; "
                              f"modalities with one: {with_t}. Pass one of them as "
                              f"fuser_options {{\"modality\": NAME}}.")
        self.modality = modality
        self.index = spec.modalities.index(modality)
        self.encode = nn.Sequential(nn.Linear(spec.teacher_dims[modality], d), nn.LayerNorm(d),
                                    nn.GELU(), nn.Dropout(dropout))
        self.head = nn.Linear(d, spec.n_outputs)
        self.prior = nn.Parameter(torch.zeros(spec.n_outputs))

    def forward(self, batch: Batch) -> FusionOutput:
        check_batch(self.spec, batch, self.name)
        avail = teacher_availability(self.spec, batch, self.name)[:, self.index]  # [B]
        t = clean_teacher(batch, self.modality, avail)  # [B, d_T]
        logits = with_prior(self.head(self.encode(t)), ~avail, self.prior)
        mw = torch.zeros_like(batch.modality_mask, dtype=logits.dtype)
        mw[:, self.index] = avail.to(logits.dtype)
        return FusionOutput(logits=logits, modality_weights=mw)


def build_teacher_only(spec: FusionSpec, d: int = 128, dropout: float = 0.1,
                       modality: str | None = None) -> TeacherOnlyFuser:
    """The "*-Large" baseline: a classifier on one modality's teacher-class embedding.

    Args:
        spec: must carry ``teacher_dims`` (run with ``--teacher NAME``).
        d: hidden width.
        dropout: dropout after the hidden layer.
        modality: the modality whose teacher embedding is used (default: the first
            modality with a teacher).
    """
    return TeacherOnlyFuser(spec, d=d, dropout=dropout, modality=modality)


# ----------------------------------------------------------------------------- MedMIX ablations

def narrow_batch(batch: Batch, spec: FusionSpec, keep: dict[str, list[int]]) -> Batch:
    """A batch restricted to the modalities in ``keep`` and, per modality, the listed experts.

    The modality mask is recomputed: a modality whose kept experts are all missing is
    unavailable in the narrowed batch.
    """
    mods = [m for m in spec.modalities if m in keep]
    cols = [spec.modalities.index(m) for m in mods]
    experts = {m: [batch.experts[m][k] for k in keep[m]] for m in mods}
    emask = {m: batch.expert_mask[m][:, keep[m]] for m in mods}
    mm = torch.stack([emask[m].any(dim=1) for m in mods], dim=1)  # [B, M']
    teacher = None if batch.teacher is None else {
        m: x for m, x in batch.teacher.items() if m in keep}
    tmask = None if batch.teacher_mask is None else batch.teacher_mask[:, cols]
    return replace(batch, experts=experts, expert_mask=emask, modality_mask=mm,
                   teacher=teacher, teacher_mask=tmask, modalities=mods)


def narrow_spec(spec: FusionSpec, keep: dict[str, list[int]]) -> FusionSpec:
    mods = [m for m in spec.modalities if m in keep]
    return FusionSpec(
        modalities=mods, experts={m: [spec.experts[m][k] for k in keep[m]] for m in mods},
        dims={m: [spec.dims[m][k] for k in keep[m]] for m in mods}, n_outputs=spec.n_outputs,
        task_type=spec.task_type,
        teacher_dims={m: v for m, v in spec.teacher_dims.items() if m in keep},
        expert_families={m: [f[k] for k in keep[m]] for m, f in spec.expert_families.items()
                         if m in keep and len(f) == len(spec.experts[m])})


class NarrowedMedmix(Fuser):
    """MedMIX on a subset of the modalities / experts; outputs mapped back to the full spec.

    ``reps`` / ``rep_mask`` / weights are ``[B, M, ...]`` over the full spec, zero (False)
    for dropped modalities and experts, so distillation and weight reports line up.
    """

    name = "medmix-narrowed"

    def __init__(self, spec: FusionSpec, keep: dict[str, list[int]], d: int, dropout: float,
                 adapter: bool, router_hidden: int) -> None:
        super().__init__(spec)
        _check_d(d, dropout, self.name)
        self.keep = keep
        self.inner: FusionModel = build_medmix(narrow_spec(spec, keep), d=d, dropout=dropout,
                                               adapter=adapter, router_hidden=router_hidden)
        self.rep_dim = self.inner.rep_dim

    def router_parameters(self) -> list[nn.Parameter]:
        return self.inner.router_parameters()

    def forward(self, batch: Batch) -> FusionOutput:
        check_batch(self.spec, batch, self.name)
        out = self.inner(narrow_batch(batch, self.spec, self.keep))
        b, mods = batch.size, self.spec.modalities
        kmax = self.spec.max_experts
        dev = out.reps.device
        inner = self.inner.spec.modalities
        # out of place (index_copy, not slice writes), so that seeds stacked under vmap work
        cols = torch.tensor([mods.index(m) for m in inner], device=dev)  # inner -> outer j
        reps = out.reps.new_zeros(b, len(mods), out.reps.shape[-1]).index_copy(
            1, cols, out.reps)  # [B, M, d]
        rep_mask = torch.zeros(b, len(mods), dtype=torch.bool, device=dev).index_copy(
            1, cols, out.rep_mask)  # [B, M]
        mw = out.modality_weights.new_zeros(b, len(mods)).index_copy(
            1, cols, out.modality_weights)  # [B, M]
        pairs = [(j_in, k_in, mods.index(m) * kmax + k) for j_in, m in enumerate(inner)
                 for k_in, k in enumerate(self.keep[m])]
        src = out.router_weights[:, [p[0] for p in pairs], [p[1] for p in pairs]]  # [B, P]
        rw = out.router_weights.new_zeros(b, len(mods) * kmax).index_copy(
            1, torch.tensor([p[2] for p in pairs], device=dev), src).view(b, len(mods), kmax)
        return FusionOutput(logits=out.logits, reps=reps, rep_mask=rep_mask,
                            modality_weights=mw, router_weights=rw, aux_loss=out.aux_loss)


def build_medmix_best_expert(spec: FusionSpec, d: int = 128, dropout: float = 0.1,
                             adapter: bool = True, router_hidden: int = 0,
                             expert: dict[str, str] | None = None) -> NarrowedMedmix:
    """Ablation: MedMIX where each modality uses a single expert.

    The runner picks the expert per modality on validation and passes it here; a modality
    not named uses its first expert. A sample whose chosen expert is missing counts that
    modality as unavailable.

    Args:
        spec: modalities, experts, dims, outputs.
        d, dropout, adapter, router_hidden: as for ``medmix``.
        expert: modality -> expert name, e.g. ``{"cxr": "biomedclip", "note": "bioclinicalbert"}``.
    """
    expert = dict(expert or {})
    unknown = sorted(set(expert) - set(spec.modalities))
    if unknown:
        raise MedmixError(f"medmix-best-expert: expert names modalities {unknown}, which are not "
                          f"in this run (modalities: {spec.modalities}).")
    keep = {}
    for m in spec.modalities:
        name = expert.get(m, spec.experts[m][0])
        if name not in spec.experts[m]:
            raise MedmixError(f"medmix-best-expert: modality {m!r} has no expert {name!r}; its "
                              f"experts are {spec.experts[m]}.")
        keep[m] = [spec.experts[m].index(name)]
    model = NarrowedMedmix(spec, keep, d, dropout, adapter, router_hidden)
    model.name = "medmix-best-expert"
    return model


def build_medmix_no_inter(spec: FusionSpec, d: int = 128, dropout: float = 0.1,
                          adapter: bool = True, router_hidden: int = 0,
                          modality: str | None = None) -> NarrowedMedmix:
    """Ablation: MedMIX on one modality (all its experts, the router); output = its head.

    Args:
        spec: modalities, experts, dims, outputs.
        d, dropout, adapter, router_hidden: as for ``medmix``.
        modality: the modality kept (default: the first one).
    """
    modality = spec.modalities[0] if modality is None else modality
    if modality not in spec.modalities:
        raise MedmixError(f"medmix-no-inter: modality={modality!r} is not in this run; "
                          f"modalities: {spec.modalities}.")
    keep = {modality: list(range(len(spec.experts[modality])))}
    model = NarrowedMedmix(spec, keep, d, dropout, adapter, router_hidden)
    model.name = "medmix-no-inter"
    return model


def _best_expert_candidates(spec: FusionSpec) -> list[dict]:
    """Options the runner compares on validation when none are given: the k-th expert of
    every modality (clamped to its expert count), for k = 1..max K."""
    return [{"expert": {m: spec.experts[m][min(k, len(spec.experts[m]) - 1)]
                        for m in spec.modalities}} for k in range(spec.max_experts)]


@hookimpl
def register_fusers(register):
    register("meanavg", build_meanavg)
    register("concat", build_concat)
    register("max", build_max)
    register("attention", build_attention)
    register("teacher-only", FuserPlugin(build_teacher_only, reads_teacher=True))
    register("medmix-best-expert", FuserPlugin(build_medmix_best_expert,
                                               candidates=_best_expert_candidates))
    register("medmix-no-inter", build_medmix_no_inter)
