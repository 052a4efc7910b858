"""Tests parametrized over every name this plugin registers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from medmix_core import (
    Batch,
    Fuser,
    FusionSpec,
    ModalitySpec,
    TabularData,
    TimeSeriesData,
)
from medmix_core.errors import MedmixError
from medmix_core.plugins import get_expert, get_fuser, get_plugin_manager, registry

import medmix_plugin_template


def names(kind: str) -> list[str]:
    plugin = get_plugin_manager().get_name(medmix_plugin_template)
    return sorted(e.name for e in registry().entries[kind].values() if e.plugin == plugin)


EXPERTS = names("experts")
FUSERS = names("fusers")
VARS = ["a", "b", "c", "d"]


def test_registers_its_names():
    expected = {"experts": [], "fusers": []}
    expected["experts"] = ["plugin-template"]  # template: expert
    expected["fusers"] = ["plugin-template"]  # template: fuser
    assert {"experts": EXPERTS, "fusers": FUSERS} == expected


def payloads(kind: str, n: int = 30):
    rng = np.random.default_rng(0)
    if kind == "tabular":
        x = rng.normal(size=(n, len(VARS)))
        x[rng.random(x.shape) < 0.2] = np.nan
        return ModalitySpec("tab", "tabular", VARS), [TabularData(VARS, r) for r in x]
    series = []
    for _ in range(n):
        k = [int(rng.integers(0, 4)) for _ in VARS]
        series.append(TimeSeriesData(VARS, [np.sort(rng.uniform(0, 48, j)) for j in k],
                                     [rng.normal(size=j) for j in k]))
    return ModalitySpec("ts", "timeseries", VARS), series


CASES = [(n, k) for n in EXPERTS for k in get_expert(n).kinds if k in ("tabular", "timeseries")]


@pytest.mark.parametrize("name,kind", CASES)
def test_expert_output_and_state(name, kind):
    modality, items = payloads(kind)
    expert = get_expert(name)()
    with pytest.raises(MedmixError):
        expert.encode(modality, items)  # not fitted yet
    expert.fit(modality, items[:20])
    out = expert.encode(modality, items)
    assert out.shape == (len(items), expert.dim(modality))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    fresh = get_expert(name)()
    fresh.set_state(modality, expert.get_state(modality))
    np.testing.assert_array_equal(fresh.encode(modality, items), out)


def batch_and_spec(b: int = 32):
    g = torch.Generator().manual_seed(0)
    dims = {"m0": [6, 4], "m1": [5], "m2": [3, 7, 2]}
    spec = FusionSpec(modalities=list(dims), experts={m: [f"e{k}" for k in range(len(d))]
                                                      for m, d in dims.items()},
                      dims=dims, n_outputs=1)
    experts = {m: [torch.randn(b, k, generator=g) for k in d] for m, d in dims.items()}
    mask = {m: torch.rand(b, len(d), generator=g) > 0.3 for m, d in dims.items()}
    for m_mask in mask.values():
        m_mask[:2] = False  # two samples with nothing available
    mm = torch.stack([mask[m].any(1) for m in dims], 1)  # [B, M]
    labels = (torch.rand(b, 1, generator=g) > 0.5).float()
    return spec, Batch(experts=experts, expert_mask=mask, modality_mask=mm, labels=labels,
                       label_mask=torch.ones(b, dtype=torch.bool), modalities=list(dims))


@pytest.mark.parametrize("name", FUSERS)
def test_fuser_shapes_masks_and_training(name):
    spec, batch = batch_and_spec()
    torch.manual_seed(0)
    model = get_fuser(name)(spec, d=16, dropout=0.0)
    assert isinstance(model, Fuser)
    out = model.eval()(batch)
    assert out.logits.shape == (batch.size, 1) and torch.isfinite(out.logits).all()
    if out.modality_weights is not None:
        assert (out.modality_weights[~batch.modality_mask] == 0).all()
    # garbage in masked slots must not reach the output
    batch.experts = {m: [torch.where(batch.expert_mask[m][:, k:k + 1], x,
                                     torch.full_like(x, math.nan)) for k, x in enumerate(xs)]
                     for m, xs in batch.experts.items()}
    torch.testing.assert_close(model(batch).logits, out.logits)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch).logits,
                                                                    batch.labels)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
