"""Tests of medmix-example-plugin.

The first two groups are parametrized over every name this plugin registers, so a new
expert or fuser added to the plugin is tested the moment it is registered. The rest check
what is specific to ``pca`` and ``logit-average``.
"""

from __future__ import annotations

import math

import medmix_example_plugin
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


def names(kind: str) -> list[str]:
    """Names of ``kind`` registered by this plugin (whatever its registration name)."""
    plugin = get_plugin_manager().get_name(medmix_example_plugin)
    return sorted(e.name for e in registry().entries[kind].values() if e.plugin == plugin)


EXPERTS = names("experts")
FUSERS = names("fusers")
VARIABLES = [f"v{i}" for i in range(6)]


def test_plugin_registers_its_names():
    assert EXPERTS == ["pca"]
    assert FUSERS == ["logit-average"]


# ------------------------------------------------------------------ payloads
def tabular(n: int, seed: int = 0, missing: float = 0.2):
    """N tabular payloads driven by one latent factor, with NaN holes."""
    rng = np.random.default_rng(seed)
    t = rng.normal(size=n)  # [N] the latent factor
    x = t[:, None] * np.linspace(1.0, 3.0, len(VARIABLES)) + 0.3 * rng.normal(size=(n, 6))
    x[rng.random(x.shape) < missing] = np.nan
    return t, [TabularData(list(VARIABLES), row.copy()) for row in x]


def timeseries(n: int, seed: int = 0):
    """N irregular series; variable v5 is never measured in the first 3 payloads."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        times, values = [], []
        for j in range(len(VARIABLES)):
            k = 0 if (j == 5 and i < 3) else int(rng.integers(1, 6))
            times.append(np.sort(rng.uniform(0, 48, size=k)))
            values.append(rng.normal(loc=j, size=k))
        out.append(TimeSeriesData(list(VARIABLES), times, values))
    return out


MODALITIES = {
    "tabular": (ModalitySpec("labs", "tabular", list(VARIABLES)), lambda n: tabular(n)[1]),
    "timeseries": (ModalitySpec("vitals", "timeseries", list(VARIABLES)), timeseries),
}


def kinds_of(name: str) -> list[str]:
    return [k for k in get_expert(name).kinds if k in MODALITIES]


EXPERT_KINDS = [(n, k) for n in EXPERTS for k in kinds_of(n)]


# ------------------------------------------------------------------ every expert
@pytest.mark.parametrize("name,kind", EXPERT_KINDS)
def test_expert_encodes_to_its_dim_finite_and_deterministic(name, kind):
    modality, make = MODALITIES[kind]
    payloads = make(40)
    expert = get_expert(name)()
    expert.fit(modality, payloads[:30])  # "training split"
    out = expert.encode(modality, payloads)
    assert out.shape == (40, expert.dim(modality))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    again = get_expert(name)()
    again.fit(modality, payloads[:30])
    np.testing.assert_array_equal(again.encode(modality, payloads), out)


@pytest.mark.parametrize("name,kind", EXPERT_KINDS)
def test_expert_state_round_trip_encodes_the_same(name, kind):
    modality, make = MODALITIES[kind]
    payloads = make(40)
    fitted = get_expert(name)()
    fitted.fit(modality, payloads[:30])
    fresh = get_expert(name)()
    fresh.set_state(modality, fitted.get_state(modality))
    np.testing.assert_array_equal(fresh.encode(modality, payloads[30:]),
                                  fitted.encode(modality, payloads[30:]))


@pytest.mark.parametrize("name,kind", EXPERT_KINDS)
def test_expert_refuses_to_encode_before_fit(name, kind):
    modality, make = MODALITIES[kind]
    with pytest.raises(MedmixError, match="not fitted"):
        get_expert(name)().encode(modality, make(3))


@pytest.mark.parametrize("name", EXPERTS)
def test_expert_rejects_unknown_options(name):
    with pytest.raises(MedmixError, match="unknown option"):
        get_expert(name)(no_such_option=1)


# ------------------------------------------------------------------ every fuser
def make_batch(n_modalities: int = 3, b: int = 32, c: int = 1, seed: int = 0):
    """A random batch with ragged masks; rows 0-1 have no modality at all."""
    g = torch.Generator().manual_seed(seed)
    mods = [f"m{i}" for i in range(n_modalities)]
    ks = [1 + i % 3 for i in range(n_modalities)]
    dims = {m: [4 + 2 * k for k in range(kk)] for m, kk in zip(mods, ks)}
    spec = FusionSpec(modalities=mods, experts={m: [f"e{k}" for k in range(len(dims[m]))]
                                                 for m in mods},
                      dims=dims, n_outputs=c, task_type="binary" if c == 1 else "multilabel")
    experts = {m: [torch.randn(b, dk, generator=g) for dk in dims[m]] for m in mods}
    mask = {m: torch.rand(b, len(dims[m]), generator=g) > 0.3 for m in mods}
    for m in mods:
        mask[m][:2] = False
    mm = torch.stack([mask[m].any(1) for m in mods], 1)  # [B, M]
    labels = (torch.rand(b, c, generator=g) > 0.5).float()
    batch = Batch(experts=experts, expert_mask=mask, modality_mask=mm, labels=labels,
                  label_mask=torch.ones(b, dtype=torch.bool), modalities=mods)
    return spec, batch


def build(name: str, spec: FusionSpec, **options) -> Fuser:
    torch.manual_seed(0)
    return get_fuser(name)(spec, d=16, dropout=0.0, **options).eval()


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("name", FUSERS)
def test_fuser_shapes_and_modality_weights(name, c):
    spec, batch = make_batch(c=c)
    model = build(name, spec)
    assert isinstance(model, Fuser)
    out = model(batch)
    assert out.logits.shape == (batch.size, c) and torch.isfinite(out.logits).all()
    if out.modality_weights is not None:
        w = out.modality_weights
        assert w.shape == (batch.size, spec.n_modalities)
        assert (w[~batch.modality_mask] == 0).all()
        has = batch.modality_mask.any(1)
        torch.testing.assert_close(w[has].sum(1), torch.ones(int(has.sum())))


@pytest.mark.parametrize("name", FUSERS)
def test_fuser_ignores_garbage_in_masked_slots(name):
    spec, batch = make_batch()
    model = build(name, spec)
    clean = model(batch).logits
    dirty = {m: [torch.where(batch.expert_mask[m][:, k:k + 1], x, torch.full_like(x, math.nan))
                 for k, x in enumerate(xs)] for m, xs in batch.experts.items()}
    batch.experts = dirty
    torch.testing.assert_close(model(batch).logits, clean)


@pytest.mark.parametrize("name", FUSERS)
def test_fuser_trains(name):
    spec, batch = make_batch(b=64, seed=1)
    model = build(name, spec).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch).logits,
                                                                    batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ------------------------------------------------------------------ pca
def test_pca_first_component_recovers_the_latent_factor():
    t, payloads = tabular(400, missing=0.0)
    modality = MODALITIES["tabular"][0]
    expert = get_expert("pca")(n_components=2, indicators=False)
    expert.fit(modality, payloads[:300])
    scores = expert.encode(modality, payloads[300:])
    assert scores.shape == (100, 2)
    assert abs(np.corrcoef(scores[:, 0], t[300:])[0, 1]) > 0.95


def test_pca_missing_variable_is_flagged_not_hidden():
    modality = MODALITIES["tabular"][0]
    _, payloads = tabular(200, missing=0.0)
    expert = get_expert("pca")()
    expert.fit(modality, payloads)
    mean = np.nanmean(np.stack([p.values for p in payloads]), axis=0)
    measured = TabularData(list(VARIABLES), mean.copy())
    unmeasured = TabularData(list(VARIABLES), np.full(len(VARIABLES), np.nan))
    a, b = expert.encode(modality, [measured, unmeasured])
    k = expert.dim(modality) - len(VARIABLES)
    np.testing.assert_allclose(a[:k], b[:k], atol=1e-5)  # same scores (mean imputation) ...
    assert (a[k:] == 1).all() and (b[k:] == 0).all()  # ... told apart by the indicators


def test_pca_time_series_summary_is_the_last_observation_in_time():
    from medmix_example_plugin.pca import summary_matrix

    modality = MODALITIES["timeseries"][0]
    p = TimeSeriesData(list(VARIABLES), [np.array([5.0, 1.0, 3.0])] + [np.array([])] * 5,
                       [np.array([50.0, 10.0, 30.0])] + [np.array([])] * 5)
    row = summary_matrix(modality, [p])[0]
    assert row[0] == 50.0 and np.isnan(row[1:]).all()


def test_pca_needs_enough_training_samples_and_declared_variables():
    modality = MODALITIES["tabular"][0]
    _, payloads = tabular(5)
    with pytest.raises(MedmixError, match="at least 7"):
        get_expert("pca")(n_components=8).fit(modality, payloads)
    with pytest.raises(MedmixError, match="lists none"):
        get_expert("pca")().dim(ModalitySpec("x", "tabular", []))
    with pytest.raises(MedmixError, match="must be int"):
        get_expert("pca")(n_components=2.5)


# ------------------------------------------------------------------ logit-average
def test_logit_average_is_the_mean_of_the_available_modality_logits():
    spec, batch = make_batch(c=2)
    model = build("logit-average", spec)
    out = model(batch)
    per_modality = []
    for m in spec.modalities:
        from medmix_core import project_experts

        z = project_experts(model.projectors, batch, m)  # [B, K, d]
        zm, _ = model.intra[m](z, batch.expert_mask[m])
        per_modality.append(model.heads[m](zm))
    logits = torch.stack(per_modality, 1)  # [B, M, C]
    a = batch.modality_mask.float()
    expected = (a[:, :, None] * logits).sum(1) / a.sum(1, keepdim=True).clamp_min(1)
    has = batch.modality_mask.any(1)
    torch.testing.assert_close(out.logits[has], expected[has])
    # a sample with nothing available gets the learned prior
    torch.testing.assert_close(out.logits[~has], model.prior.expand(int((~has).sum()), 2))


def test_logit_average_learned_weighting_and_bad_option():
    spec, batch = make_batch()
    model = build("logit-average", spec, weighting="learned")
    with torch.no_grad():
        model.inter.score.copy_(torch.tensor([3.0, 0.0, 0.0]))
    w = model(batch).modality_weights
    both = batch.modality_mask[:, 0] & batch.modality_mask[:, 1]
    assert (w[both, 0] > w[both, 1]).all()
    with pytest.raises(MedmixError, match="weighting must be one of"):
        build("logit-average", spec, weighting="softmax")
