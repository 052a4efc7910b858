"""``onellm``: the OneLLM baseline (Han et al., CVPR 2024), "fine-tuned on each task".

The fuser reads only the ``onellm`` expert's embeddings (the frozen universal encoder and
universal projection module, mean of the projected tokens per modality; see
``medmix_experts.foundation.onellm``) and trains a head on them for the run's task:

    per modality m with a OneLLM embedding e_m:  h_m = Dropout(GELU(Linear(LayerNorm(e_m))))
    fused = masked mean of h_m over the modalities whose OneLLM embedding is present
    logits = Linear(fused); the learned prior where no OneLLM embedding is present.

Every other expert of the run is ignored, so a comparison (``--fuser medmix,onellm``)
extracted with ``onellm`` among the experts gives the OneLLM row. What this does not
reproduce: OneLLM feeds its modality tokens to LLaMA-2-7B and fine-tunes with the language
modelling loss on instructions; here the LLM is not run and the head is a classifier.

Options:
    expert: the name of the OneLLM expert in the run (default "onellm").
"""

from __future__ import annotations

import torch
from torch import nn

from medmix_core import Batch, Fuser, FusionOutput, FusionSpec, MedmixError, hookimpl, mix


class OneLLMFuser(Fuser):
    """A task head on OneLLM's frozen per-modality embeddings."""

    name = "onellm"

    def __init__(self, spec: FusionSpec, d: int = 128, dropout: float = 0.1,
                 expert: str = "onellm") -> None:
        super().__init__(spec)
        if int(d) < 1 or not 0.0 <= float(dropout) < 1.0:
            raise MedmixError(f"onellm: d must be >= 1 and dropout in [0, 1); got d={d}, "
                              f"dropout={dropout}.")
        self.expert = expert
        #: modality -> position of the OneLLM expert among its experts
        self.slots = {m: spec.experts[m].index(expert) for m in spec.modalities
                      if expert in spec.experts[m]}
        if not self.slots:
            raise MedmixError(
                f"onellm: no modality of this run has the expert {expert!r} (experts: "
                f"{spec.experts}). Extract OneLLM embeddings (`medmix extract ... --experts "
                f"onellm`, weights csuhan/OneLLM-7B) and run with --experts including onellm, "
                f"or name the OneLLM expert with fuser_options {{\"expert\": NAME}}.")
        self.rep_dim = int(d)
        self.encoders = nn.ModuleDict({
            m: nn.Sequential(nn.LayerNorm(spec.dims[m][k]), nn.Linear(spec.dims[m][k], d),
                             nn.GELU(), nn.Dropout(dropout))
            for m, k in self.slots.items()})
        self.head = nn.Linear(d, spec.n_outputs)
        self.prior = nn.Parameter(torch.zeros(spec.n_outputs))

    def forward(self, batch: Batch) -> FusionOutput:
        mods = self.spec.modalities
        if batch.modalities and list(batch.modalities) != list(mods):
            raise MedmixError(f"onellm was built for modalities {mods}, but the batch has "
                              f"{batch.modalities}. Build it from the same store and experts.")
        b, kmax = batch.size, self.spec.max_experts
        dev = batch.modality_mask.device
        # per-modality parts stacked at the end (no slice writes: seeds stacked under vmap)
        reps, avail, router = [], [], []
        for j, m in enumerate(mods):
            if m not in self.slots:
                reps.append(None)
                avail.append(torch.zeros(b, dtype=torch.bool, device=dev))
                router.append(None)
                continue
            k = self.slots[m]
            keep = batch.expert_mask[m][:, k] & batch.modality_mask[:, j]  # [B]
            x = batch.experts[m][k]
            x = torch.where(keep.unsqueeze(1), x, torch.zeros((), dtype=x.dtype, device=dev))
            h = self.encoders[m](x) * keep.unsqueeze(1).to(x.dtype)  # [B, d]
            reps.append(h)
            avail.append(keep)
            slot = nn.functional.one_hot(torch.tensor(k, device=dev), kmax)  # [K_max]
            router.append(keep.unsqueeze(1) & slot.bool())  # [B, K_max]
        dtype = next(r.dtype for r in reps if r is not None)
        zero = torch.zeros(b, self.rep_dim, dtype=dtype, device=dev)
        reps = torch.stack([zero if r is None else r for r in reps], 1)  # [B, M, d]
        avail = torch.stack(avail, 1)  # [B, M]
        none = torch.zeros(b, kmax, dtype=torch.bool, device=dev)
        router = torch.stack([none if r is None else r for r in router], 1).to(dtype)
        w = avail.to(reps.dtype)
        w = w / w.sum(dim=1, keepdim=True).clamp_min(1.0)  # [B, M]
        fused = mix(w, reps)  # [B, d]
        empty = ~avail.any(dim=1, keepdim=True)  # [B, 1]
        logits = torch.where(empty, self.prior.expand(b, -1), self.head(fused))
        return FusionOutput(logits=logits, reps=reps, rep_mask=avail, modality_weights=w,
                            router_weights=router)


def build_onellm(spec: FusionSpec, d: int = 128, dropout: float = 0.1,
                 expert: str = "onellm") -> OneLLMFuser:
    """The OneLLM baseline: a task head fine-tuned on OneLLM's frozen embeddings.

    Args:
        spec: modalities, experts, dims, outputs; some modality must have ``expert``.
        d: hidden width of the head.
        dropout: dropout after the per-modality layer.
        expert: the OneLLM expert's name in the run.
    """
    return OneLLMFuser(spec, d=d, dropout=dropout, expert=expert)


@hookimpl
def register_fusers(register):
    register("onellm", build_onellm)
