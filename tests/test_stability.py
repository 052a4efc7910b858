"""Training-stability options, the additive inter-modality variants of MedMIX, refitting on
train + validation, and the paper preset."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medmix_core import Batch, FusionSpec, StoreTensors
from medmix_core.config import PAPER_PRESET, RunConfig, make_config
from medmix_core.errors import MedmixError
from medmix_core.plugins import get_fuser
from medmix_core.training import (
    TrainStep,
    WeightEMA,
    evaluate_loss,
    make_spec,
    refit_seed,
    task_loss,
    train_seed,
)

SPEC = FusionSpec(modalities=["a", "b", "c"],
                  experts={"a": ["x", "y"], "b": ["x"], "c": ["x", "y", "z"]},
                  dims={"a": [5, 7], "b": [3], "c": [4, 6, 8]}, n_outputs=2, task_type="multilabel")
ADDITIVE = ("gated-sum", "sum")


def random_batch(b: int, seed: int, p_missing: float = 0.4) -> Batch:
    g = torch.Generator().manual_seed(seed)
    experts, emask = {}, {}
    for m in SPEC.modalities:
        experts[m] = [torch.randn(b, d, generator=g) for d in SPEC.dims[m]]
        emask[m] = torch.rand(b, len(SPEC.dims[m]), generator=g) > p_missing
    mm = torch.stack([emask[m].any(1) for m in SPEC.modalities], 1)
    return Batch(experts=experts, expert_mask=emask, modality_mask=mm, modalities=SPEC.modalities)


def model(inter: str, seed: int = 0):
    torch.manual_seed(seed)
    return get_fuser("medmix")(SPEC, d=16, dropout=0.0, inter=inter).eval()


# ---------------------------------------------------------------- inter-modality variants
def test_convex_is_the_default_and_exactly_the_papers_eq3():
    torch.manual_seed(0)
    default = get_fuser("medmix")(SPEC, d=16, dropout=0.0).eval()
    convex = model("convex")
    b = random_batch(32, 1)
    assert torch.equal(default(b).logits, convex(b).logits)
    w = convex(b).modality_weights
    avail = b.modality_mask.any(1)
    assert torch.allclose(w[avail].sum(1), torch.ones(int(avail.sum())), atol=1e-6)


@pytest.mark.parametrize("inter", ADDITIVE)
def test_additive_variants_sum_the_gated_modality_logits(inter):
    net = model(inter)
    b = random_batch(32, 2)
    out = net(b)
    heads = torch.stack([net.heads[m](out.reps[:, j]) for j, m in enumerate(SPEC.modalities)], 1)
    s = torch.einsum("bmd,md->bm", out.reps, net.inter.score) + net.inter.bias \
        if inter == "gated-sum" else torch.zeros(b.modality_mask.shape)
    gate = torch.sigmoid(s) if inter == "gated-sum" else torch.ones_like(s)
    want = torch.einsum("bm,bmc->bc", gate * b.modality_mask, heads)
    any_mod = b.modality_mask.any(1)
    assert torch.allclose(out.logits[any_mod], want[any_mod], atol=1e-5)
    assert torch.all(out.modality_weights[~b.modality_mask] == 0)


def test_additive_evidence_adds_up_where_the_convex_mix_averages():
    # two modalities whose heads both say +1: the sum says +2, the convex mix +1
    spec = FusionSpec(["a", "b"], {"a": ["x"], "b": ["x"]}, {"a": [3], "b": [3]}, 1)
    b = Batch(experts={"a": [torch.randn(4, 3)], "b": [torch.randn(4, 3)]},
              expert_mask={"a": torch.ones(4, 1, dtype=torch.bool),
                           "b": torch.ones(4, 1, dtype=torch.bool)},
              modality_mask=torch.ones(4, 2, dtype=torch.bool), modalities=["a", "b"])
    got = {}
    for inter in ("convex", "sum"):
        net = get_fuser("medmix")(spec, d=8, dropout=0.0, inter=inter).eval()
        with torch.no_grad():
            for m in ("a", "b"):
                net.heads[m].weight.zero_()
                net.heads[m].bias.fill_(1.0)
        got[inter] = net(b).logits
    assert torch.allclose(got["convex"], torch.ones(4, 1))
    assert torch.allclose(got["sum"], torch.full((4, 1), 2.0))


@pytest.mark.parametrize("inter", ADDITIVE)
def test_empty_rows_get_the_prior_in_every_variant(inter):
    net = model(inter)
    with torch.no_grad():
        net.prior.copy_(torch.tensor([0.7, -0.4]))
    b = random_batch(8, 3)
    for m in SPEC.modalities:
        b.expert_mask[m][:2] = False
    b.modality_mask[:2] = False
    out = net(b)
    assert torch.equal(out.logits[:2], torch.tensor([[0.7, -0.4]] * 2))
    assert torch.all(out.modality_weights[:2] == 0)
    assert torch.isfinite(out.logits).all()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), inter=st.sampled_from(ADDITIVE),
       fill=st.sampled_from([float("nan"), 1e6, -3.0, float("inf")]))
def test_masked_inputs_cannot_change_an_additive_variants_output(seed, inter, fill):
    net = model(inter, seed % 3)
    b = random_batch(16, seed)
    ref = net(b)
    for m in SPEC.modalities:
        for k, x in enumerate(b.experts[m]):
            x[~b.expert_mask[m][:, k]] = fill
    out = net(b)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.modality_weights, ref.modality_weights)
    assert torch.equal(out.router_weights, ref.router_weights)


def test_an_unknown_inter_variant_is_a_clear_error():
    with pytest.raises(MedmixError, match="expected one of.*convex.*gated-sum.*sum"):
        get_fuser("medmix")(SPEC, inter="average")


# ---------------------------------------------------------------- stability options
def _cfg(**kw) -> RunConfig:
    return make_config(**{"epochs": 5, "patience": 3, "batch_size": 64, "d": 16,
                          "device": "cpu", "progress": False, **kw})


def test_label_smoothing_moves_bce_targets_toward_one_half_and_keeps_nan_unknown():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    labels = torch.tensor([[1.0, 0.0], [float("nan"), 1.0]])
    b = Batch(experts={}, expert_mask={}, modality_mask=torch.ones(2, 1, dtype=torch.bool),
              modalities=[], labels=labels)
    got = task_loss(logits, b, "multilabel", None, smoothing=0.2)
    y = torch.tensor([[0.9, 0.1], [0.0, 0.9]])
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    known = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert got.item() == pytest.approx(float((per * known).sum() / 3))
    assert task_loss(logits, b, "multilabel", None).item() != pytest.approx(got.item())


def test_ema_moves_the_average_toward_the_weights_with_a_warmed_up_decay():
    net = torch.nn.Linear(3, 1)
    ema = WeightEMA(net, 0.9)
    before = ema.module.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)  # step 0: decay min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.module.weight, 0.1 * before + 0.9 * net.weight)
    assert not any(p.requires_grad for p in ema.module.parameters())


@pytest.mark.slow
def test_ema_training_validates_and_returns_the_averaged_weights(synth_store):
    t = StoreTensors.from_store(synth_store)
    spec = make_spec(t)
    cfg = _cfg(ema_decay=0.9, epochs=3, patience=10)
    res = train_seed(cfg, t, spec, synth_store.splits, 0)
    plain = train_seed(_cfg(epochs=3, patience=10), t, spec, synth_store.splits, 0)
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in plain.history]
    assert [h["val_loss"] for h in res.history] != [h["val_loss"] for h in plain.history]
    rows = torch.as_tensor(synth_store.splits["val"])
    step = TrainStep(cfg, get_fuser("medmix")(spec, d=16), t, torch.device("cpu"),
                     torch.as_tensor(synth_store.splits["train"]))
    vl = evaluate_loss(res.model, t, rows, torch.device("cpu"), cfg, step.pos_weight)
    assert vl == pytest.approx(res.history[res.best_epoch]["val_loss"], rel=1e-5)


def test_smoothed_validation_picks_the_best_window_mean(synth_store):
    t = StoreTensors.from_store(synth_store)
    res = train_seed(_cfg(val_smoothing=3, epochs=12, patience=4, lr=3e-2), t, make_spec(t),
                     synth_store.splits, 0)
    losses = [h["val_loss"] for h in res.history]
    crit = [sum(losses[max(0, e - 2):e + 1]) / len(losses[max(0, e - 2):e + 1])
            for e in range(len(losses))]
    assert [h["val_criterion"] for h in res.history] == pytest.approx(crit)
    assert res.best_epoch == min(range(len(crit)), key=crit.__getitem__)


def test_defaults_leave_the_stability_options_off():
    cfg = RunConfig()
    assert (cfg.ema_decay, cfg.label_smoothing, cfg.val_smoothing, cfg.refit, cfg.preset) == \
        (None, 0.0, 1, False, "default")


# ---------------------------------------------------------------- refit
def test_refit_trains_on_exactly_train_plus_validation(synth_store, monkeypatch):
    t = StoreTensors.from_store(synth_store)
    seen: list[int] = []
    real = TrainStep.step

    def spy(self, idx, epoch, gen):
        seen.extend(idx.tolist())
        return real(self, idx, epoch, gen)

    monkeypatch.setattr(TrainStep, "step", spy)
    splits = synth_store.splits
    res = refit_seed(_cfg(), t, make_spec(t), splits, 0, epochs=2, threshold=0.4,
                     val_metrics={"auroc": 0.7})
    want = sorted(list(splits["train"]) + list(splits["val"]))
    assert sorted(seen[:len(want)]) == want and sorted(seen[len(want):]) == want
    assert len(seen) == 2 * len(want)
    assert not set(seen) & set(splits["test"])
    assert (res.epochs_run, res.best_epoch, res.threshold, res.val_metrics) == \
        (2, 1, 0.4, {"auroc": 0.7})
    assert all("val_loss" not in h for h in res.history)


def test_refit_needs_an_epoch(synth_store):
    t = StoreTensors.from_store(synth_store)
    with pytest.raises(MedmixError, match="at least 1 epoch"):
        refit_seed(_cfg(), t, make_spec(t), synth_store.splits, 0, epochs=0)


# ---------------------------------------------------------------- the paper preset
def test_paper_preset_fills_the_papers_recipe_and_explicit_values_win():
    cfg = make_config(preset="paper")
    for k, v in PAPER_PRESET.items():
        assert getattr(cfg, k) == v
    assert cfg.lr == 1e-5 and cfg.patience == 20 and cfg.epochs == 200
    assert cfg.fuser_options == {}  # eq. 3's convex mix
    assert make_config(preset="paper", lr=1e-4).lr == 1e-4
    assert make_config().lr == 1e-3


def test_an_unknown_preset_is_refused():
    with pytest.raises(MedmixError, match="preset"):
        make_config(preset="fast")
