"""M3Care (Zhang et al., KDD 2022) as a fuser over the same frozen experts as MedMIX.

Follows the official implementation (``choczhang/M3Care``, ODIR notebook), not a
re-derivation from the paper:

1. Modality token h_m [B, d]: here the mean of modality m's available projected experts
   (the original uses one encoder per modality).
2. Per-modality similarity over the *batch* (B x B), with the multi-bandwidth Gaussian
   kernel kappa(X) = mean_k exp(-D / b_k), D squared Euclidean, b = sum D / (n^2 - n)
   (1 when < 1e-3), b_k in {b/2, b, 2b}:
       S_m = [(1 - sig(eps_m)) kappa(BN(ReLU(phi_m(H_m)))) + sig(eps_m)] * kappa(BN(H_m)),
   phi_m a 3-layer MLP, eps_m initialised to 2, one BatchNorm shared by all modalities;
   S_m is multiplied by o_m o_m^T (o_m = observed indicator).
3. Fused graph S = sum_m S_m / sum_m o_m o_m^T; threshold t = sig(theta), theta init 2;
   A = ReLU(S - t) + 1[S > t] * stopgrad(t) (S kept above t, theta learned via the ReLU).
4. Imputation per modality: two GCN layers g = ReLU(A_m ReLU(A_m H W1 + b1) W2 + b2) with
   A_m = A * o_m o_m^T and no degree normalisation; gate
   lam = sig(w1.g) / (sig(w1.g) + sig(w2.h)); observed rows get lam g + (1 - lam) h,
   missing rows get g.
5. Fusion: modality tokens + token-type embeddings through two pre-norm transformer
   blocks (4 heads, then 1 head, d_ff = 4d, ReLU after each); the M output tokens are
   concatenated -> Linear(M d, 2d) -> ReLU -> Dropout(0.5) -> Linear(2d, C).
6. Loss: the task loss plus stab_weight (1e-7, the ODIR value) * L_stab, with
   L_stab = sum_m | ||phi_m(H_m)||_F - ||H_m||_F | over the observed rows; returned as
   ``FusionOutput.aux_loss``.

Batch dependence (the method, not a bug): the similarity graph links the samples of one
batch, so a sample's prediction depends on which other samples share its batch. For a
fixed batch the computation is deterministic (no sampling at inference); the training
code predicts in fixed row order with a fixed batch size, so reported metrics are
reproducible. Expect different numbers with a different inference batch size.

Simplifications and deviations, all deliberate:
    - Tokens come from the frozen experts (mean of projected experts per modality), not
      from end-to-end encoders; no text sequences, so one token per modality and the
      sinusoidal positional encoding is dropped (the token-type embedding identifies the
      modality).
    - Every modality may be missing here, so every S_m is masked by o_m o_m^T (the
      original leaves always-present modalities unmasked).
    - Pairs that share no observed modality have sum_m o_m o_m^T = 0; their S is set to 0
      instead of dividing by zero (the NaN risk of the iMML port).
    - The kernel bandwidth b and the BatchNorm statistics use observed rows / pairs only,
      so the zero placeholders of missing samples do not shift them (the original
      computes both over the whole batch, placeholders included). BatchNorm keeps running
      statistics for evaluation as usual.
    - ``impute="code"`` (default) reproduces the released code: A_m masks rows too, so a
      missing sample's g has no neighbour term (bias only). ``impute="neighbours"`` uses
      A_m = A * (1 o_m^T), letting missing samples aggregate their observed neighbours,
      which is what the paper describes.
    - A sample with no available modality gets the learned prior logits.
    - ``reps`` are the gated modality representations of the observed modalities (zero
      for missing ones), so distillation can be applied.
"""

from __future__ import annotations

import torch
from torch import nn

from medmix_core import (
    Batch,
    Fuser,
    FusionOutput,
    FusionSpec,
    MedmixError,
    hookimpl,
    project_experts,
)
from medmix_fusers.baselines import check_batch, make_projectors, masked_mean, with_prior

IMPUTE_MODES = ("code", "neighbours")


def gaussian_kernel(x: torch.Tensor, pair_mask: torch.Tensor, kernel_mul: float = 2.0,
                    kernel_num: int = 3) -> torch.Tensor:
    """Multi-bandwidth Gaussian kernel over the rows of ``x [B, d]``.

    The base bandwidth is the mean squared distance over the off-diagonal pairs in
    ``pair_mask [B, B]`` (1 when below 1e-3 or when there is no such pair).

    Returns:
        ``[B, B]`` kernel, mean of exp(-D / b_k) over b_k = b / mul^(num//2) * mul^k.
    """
    sq = (x * x).sum(dim=1, keepdim=True)  # [B, 1]
    dist = (sq + sq.T - 2.0 * x @ x.T).clamp_min(0.0)  # [B, B]
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    off = pair_mask & ~eye
    n_pairs = off.sum()
    total = torch.where(off, dist, torch.zeros_like(dist)).sum().detach()
    bw = torch.where(n_pairs > 0, total / n_pairs.clamp_min(1), torch.ones_like(total))
    bw = torch.where(bw < 1e-3, torch.ones_like(bw), bw)
    bw = bw / kernel_mul ** (kernel_num // 2)
    return sum(torch.exp(-dist / (bw * kernel_mul ** i)) for i in range(kernel_num)) / kernel_num


class MaskedBatchNorm(nn.Module):
    """BatchNorm1d whose batch statistics use the observed rows only.

    Training with fewer than two observed rows falls back to the running statistics.
    """

    def __init__(self, d: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.register_buffer("running_mean", torch.zeros(d))
        self.register_buffer("running_var", torch.ones(d))
        self.momentum, self.eps = momentum, eps

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = int(mask.sum())
        if self.training and n >= 2:
            xo = x[mask]  # [n, d]
            mean = xo.mean(dim=0)
            var = xo.var(dim=0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                unbiased = var.detach() * n / (n - 1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        out = (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias
        return out * mask.unsqueeze(1).to(out.dtype)


class _GCN(nn.Module):
    """Graph convolution without normalisation: A (x W) + b."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)
        self.bias = nn.Parameter(torch.empty(d).uniform_(-d ** -0.5, d ** -0.5))

    def forward(self, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return adj @ self.lin(x) + self.bias


class _EncoderBlock(nn.Module):
    """Pre-norm self-attention + feed-forward block (as the original MM_transformer_encoder)."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Dropout(dropout),
                                nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        x = x + self.drop(a)
        return x + self.drop(self.ff(self.norm2(x)))


class M3CareFuser(Fuser):
    """M3Care over frozen experts; see the module docstring for the method and deviations."""

    name = "m3care"

    def __init__(self, spec: FusionSpec, d: int = 128, dropout: float = 0.1,
                 adapter: bool = True, stab_weight: float = 1e-7, threshold_init: float = 2.0,
                 eps_init: float = 2.0, head_dropout: float = 0.5, impute: str = "code",
                 heads: int = 4) -> None:
        super().__init__(spec)
        if impute not in IMPUTE_MODES:
            raise MedmixError(f"m3care: impute must be one of {IMPUTE_MODES}, got {impute!r}.")
        if int(heads) < 1 or d % int(heads):
            raise MedmixError(f"m3care: heads must divide d; got heads={heads}, d={d}.")
        if not 0.0 <= float(head_dropout) < 1.0 or not 0.0 <= float(dropout) < 1.0:
            raise MedmixError(f"m3care: dropouts must be in [0, 1), got dropout={dropout}, "
                              f"head_dropout={head_dropout}.")
        if float(stab_weight) < 0:
            raise MedmixError(f"m3care: stab_weight must be >= 0, got {stab_weight}.")
        M = spec.n_modalities
        self.rep_dim = d
        self.impute = impute
        self.stab_weight = float(stab_weight)
        self.projectors = make_projectors(spec, d, dropout, adapter)
        self.phi = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d),
                                                nn.ReLU(), nn.Linear(d, d)) for _ in range(M)])
        self.bn = MaskedBatchNorm(d)
        self.eps = nn.Parameter(torch.full((M,), float(eps_init)))
        self.threshold = nn.Parameter(torch.tensor(float(threshold_init)))
        self.gcn1 = nn.ModuleList([_GCN(d) for _ in range(M)])
        self.gcn2 = nn.ModuleList([_GCN(d) for _ in range(M)])
        self.gate_g = nn.ModuleList([nn.Linear(d, 1) for _ in range(M)])
        self.gate_h = nn.ModuleList([nn.Linear(d, 1) for _ in range(M)])
        self.token_type = nn.Embedding(M, d)
        nn.init.normal_(self.token_type.weight, std=0.02)
        self.blocks = nn.ModuleList([_EncoderBlock(d, int(heads), dropout),
                                     _EncoderBlock(d, 1, dropout)])
        self.out = nn.Sequential(nn.Linear(M * d, 2 * d), nn.ReLU(), nn.Dropout(head_dropout),
                                 nn.Linear(2 * d, spec.n_outputs))
        self.prior = nn.Parameter(torch.zeros(spec.n_outputs))

    def forward(self, batch: Batch) -> FusionOutput:
        check_batch(self.spec, batch, self.name)
        obs = batch.modality_mask  # [B, M]
        H = []
        for m in self.spec.modalities:
            z = project_experts(self.projectors, batch, m)  # [B, K, d]
            H.append(masked_mean(z, batch.expert_mask[m])[0].float())  # [B, d], 0 if missing
        # the kernels exponentiate squared distances: keep the graph in float32 under AMP
        with torch.autocast(H[0].device.type, enabled=False):
            tokens, reps, stab = self._graph(H, obs)
        x = torch.stack(tokens, dim=1) + self.token_type.weight.unsqueeze(0)  # [B, M, d]
        for block in self.blocks:
            x = torch.relu(block(x))
        logits = self.out(x.flatten(1))  # [B, C]
        logits = with_prior(logits, ~obs.any(dim=1), self.prior)
        aux = self.stab_weight * stab if self.stab_weight > 0 else None
        return FusionOutput(logits=logits, reps=torch.stack(reps, dim=1), rep_mask=obs,
                            aux_loss=aux)

    def _graph(self, H: list[torch.Tensor], obs: torch.Tensor
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Similarity graph, imputation and gating.

        Returns:
            (tokens: M x [B, d] own-or-imputed tokens, reps: M x [B, d] gated observed
            representations (0 where missing), L_stab scalar).
        """
        of = obs.float()
        B = obs.shape[0]

        # per-modality similarity, fused graph, learned threshold
        num = H[0].new_zeros(B, B)  # [B, B]
        den = torch.zeros_like(num)
        stab = H[0].new_zeros(())
        for j, h in enumerate(H):
            o = obs[:, j]
            pair = o.unsqueeze(1) & o.unsqueeze(0)  # [B, B]
            ph = self.phi[j](h)  # [B, d]
            k_phi = gaussian_kernel(self.bn(torch.relu(ph), o), pair)
            k_h = gaussian_kernel(self.bn(h, o), pair)
            e = torch.sigmoid(self.eps[j])
            s = ((1 - e) * k_phi + e) * k_h * pair.float()
            num = num + s
            den = den + pair.float()
            ph_obs = ph * of[:, j:j + 1]
            stab = stab + (torch.linalg.norm(ph_obs) - torch.linalg.norm(h)).abs()
        # pairs sharing no observed modality: no edge (instead of 0 / 0)
        S = torch.where(den > 0, num / den.clamp_min(1.0), torch.zeros_like(num))
        t = torch.sigmoid(self.threshold)
        A = torch.relu(S - t)
        A = A + (A > 0).float() * t.detach()

        # imputation by two GCN layers, gated with the modality's own token
        tokens, reps = [], []
        for j, h in enumerate(H):
            o = of[:, j]
            if self.impute == "code":
                adj = A * (o.unsqueeze(1) * o.unsqueeze(0))
            else:
                adj = A * o.unsqueeze(0)
            g = torch.relu(self.gcn1[j](adj, h))
            g = torch.relu(self.gcn2[j](adj, g))  # [B, d]
            a_g = torch.sigmoid(self.gate_g[j](g))
            a_h = torch.sigmoid(self.gate_h[j](h))
            lam = a_g / (a_g + a_h)  # [B, 1]
            own = lam * g + (1 - lam) * h
            tok = torch.where(obs[:, j:j + 1], own, g)
            tokens.append(tok)
            reps.append(own * o.unsqueeze(1))
        return tokens, reps, stab


def build_m3care(spec: FusionSpec, d: int = 128, dropout: float = 0.1, adapter: bool = True,
                 stab_weight: float = 1e-7, threshold_init: float = 2.0, eps_init: float = 2.0,
                 head_dropout: float = 0.5, impute: str = "code", heads: int = 4) -> M3CareFuser:
    """M3Care baseline (batch-level similarity graph imputation + transformer fusion).

    Args:
        spec: modalities, experts, dims, outputs.
        d: hidden width h (the original uses 128 or 256).
        dropout: dropout of the expert projections and the transformer blocks.
        adapter: keep the residual adapters of the expert projections.
        stab_weight: weight of the stability loss L_stab (1e-7 ODIR, 1e-8 OV).
        threshold_init: theta, the threshold is sigmoid(theta) (2 ODIR, 0 OV).
        eps_init: eps_m of the similarity mixing (2 ODIR).
        head_dropout: dropout of the output MLP (0.5).
        impute: "code" (released code: missing rows get bias-only g) or "neighbours"
            (missing rows aggregate their observed neighbours, as the paper describes).
        heads: heads of the first transformer block (the second has one).
    """
    return M3CareFuser(spec, d=d, dropout=dropout, adapter=adapter, stab_weight=stab_weight,
                       threshold_init=threshold_init, eps_init=eps_init,
                       head_dropout=head_dropout, impute=impute, heads=heads)


@hookimpl
def register_fusers(register):
    register("m3care", build_m3care)
