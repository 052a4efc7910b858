"""MedMIX's equations, distillation, and the training loop's promises."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medmix_core import Batch, FusionSpec, StoreTensors, distill_weight
from medmix_core.config import make_config
from medmix_core.fusion import MASK_SCORE, adapter_bottleneck, masked_softmax
from medmix_core.plugins import get_fuser, get_loss
from medmix_core.training import _param_groups, make_spec, predict_rows, train_seed

SPEC = FusionSpec(modalities=["a", "b", "c"],
                  experts={"a": ["x", "y"], "b": ["x"], "c": ["x", "y", "z"]},
                  dims={"a": [5, 7], "b": [3], "c": [4, 6, 8]}, n_outputs=2, task_type="multilabel")


def random_batch(b: int, seed: int, p_missing: float = 0.4) -> Batch:
    g = torch.Generator().manual_seed(seed)
    experts, emask = {}, {}
    for m in SPEC.modalities:
        experts[m] = [torch.randn(b, d, generator=g) for d in SPEC.dims[m]]
        emask[m] = torch.rand(b, len(SPEC.dims[m]), generator=g) > p_missing
    mm = torch.stack([emask[m].any(1) for m in SPEC.modalities], 1)
    return Batch(experts=experts, expert_mask=emask, modality_mask=mm, modalities=SPEC.modalities)


def model(name="medmix", seed=0):
    torch.manual_seed(seed)
    return get_fuser(name)(SPEC, d=16, dropout=0.0).eval()


def test_adapter_bottleneck_follows_the_paper():
    assert adapter_bottleneck(64) == 32
    assert adapter_bottleneck(1024) == 64
    assert adapter_bottleneck(4096) == 128


def test_masked_softmax_gives_exact_zeros_and_empty_rows_zero():
    s = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    m = torch.tensor([[True, False, True], [False, False, False]])
    w = masked_softmax(s, m)
    assert w[0, 1] == 0.0 and torch.allclose(w[0].sum(), torch.tensor(1.0))
    assert torch.equal(w[1], torch.zeros(3))
    ref = torch.softmax(torch.tensor([1.0, 3.0]), 0)
    assert torch.allclose(w[0, [0, 2]], ref)


def test_eq2_router_weights_sum_to_one_over_available_experts_and_zero_elsewhere():
    out = model()(random_batch(64, 1))
    b = random_batch(64, 1)
    for j, m in enumerate(SPEC.modalities):
        w = out.router_weights[:, j, : len(SPEC.dims[m])]
        avail = b.expert_mask[m]
        assert torch.all(w[~avail] == 0)
        sums = w.sum(1)
        assert torch.allclose(sums[avail.any(1)], torch.ones(int(avail.any(1).sum())), atol=1e-6)
        assert torch.all(sums[~avail.any(1)] == 0)
        # z^(m) is exactly zero when no expert of m is present (eq. 2)
        assert torch.all(out.reps[~avail.any(1), j] == 0)
    assert torch.all(out.router_weights[:, 1, 1:] == 0)  # padding of a 1-expert modality


def test_eq3_fused_logits_are_the_weighted_sum_of_modality_logits():
    net = model()
    b = random_batch(32, 2)
    out = net(b)
    heads = torch.stack([net.heads[m](out.reps[:, j]) for j, m in enumerate(SPEC.modalities)], 1)
    any_mod = b.modality_mask.any(1)
    expect = torch.einsum("bm,bmc->bc", out.modality_weights, heads)
    assert torch.allclose(out.logits[any_mod], expect[any_mod], atol=1e-6)
    assert torch.all(out.modality_weights[~b.modality_mask] == 0)


def test_sample_without_any_modality_gets_the_learned_prior_not_nan():
    net = model()
    with torch.no_grad():
        net.prior.copy_(torch.tensor([0.3, -1.2]))
    b = random_batch(8, 3)
    for m in SPEC.modalities:
        b.expert_mask[m][0] = False
    b.modality_mask[0] = False
    out = net(b)
    assert torch.equal(out.logits[0], torch.tensor([0.3, -1.2]))
    assert torch.isfinite(out.logits).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), fill=st.sampled_from([float("nan"), 1e6, -3.0, float("inf")]))
def test_garbage_in_masked_slots_does_not_change_the_output(seed, fill):
    net = model(seed=seed % 3)
    b = random_batch(16, seed)
    ref = net(b)
    for m in SPEC.modalities:
        for k, x in enumerate(b.experts[m]):
            x[~b.expert_mask[m][:, k]] = fill
    out = net(b)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.modality_weights, ref.modality_weights)
    assert torch.equal(out.router_weights, ref.router_weights)


def test_distill_ramp_is_linear_from_zero():
    assert distill_weight(0, 0.5, 10) == 0.0
    assert distill_weight(5, 0.5, 10) == pytest.approx(0.25)
    assert distill_weight(10, 0.5, 10) == 0.5
    assert distill_weight(50, 0.5, 10) == 0.5
    assert distill_weight(0, 0.5, 0) == 0.5


def test_cosine_loss_matches_definition():
    s, t = torch.randn(10, 4), torch.randn(10, 4)
    ref = (1 - torch.nn.functional.cosine_similarity(s, t)).mean()
    assert torch.allclose(get_loss("cosine")()(s, t), ref)
    assert get_loss("cosine")()(s, 3 * s).item() == pytest.approx(0.0, abs=1e-6)


def test_rkd_is_zero_for_scaled_copies_and_positive_otherwise():
    s = torch.randn(12, 6)
    rkd = get_loss("rkd")()
    # distances are normalised by their mean and angles are scale-free
    assert rkd(s, 2.5 * s).item() == pytest.approx(0.0, abs=1e-5)
    assert rkd(s, torch.randn(12, 6)).item() > 0.01


def test_rkd_matches_an_independent_loop_computation():
    torch.manual_seed(0)
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    rkd = get_loss("rkd")(distance_weight=1.0, angle_weight=0.0)

    def dist(x):
        d = torch.tensor([[float(torch.dist(x[i], x[j])) for j in range(5)] for i in range(5)])
        return d / d[d > 0].mean()
    ref = torch.nn.functional.smooth_l1_loss(dist(s), dist(t))
    assert rkd(s, t).item() == pytest.approx(ref.item(), rel=1e-4)
    rka = get_loss("rkd")(distance_weight=0.0, angle_weight=1.0)
    angles = []
    for x in (s, t):
        a = []
        for i in range(5):
            for j in range(5):
                for k in range(5):
                    e1, e2 = x[j] - x[i], x[k] - x[i]
                    n1, n2 = e1.norm(), e2.norm()
                    a.append(0.0 if n1 == 0 or n2 == 0 else float(e1 @ e2 / (n1 * n2)))
        angles.append(torch.tensor(a))
    ref = torch.nn.functional.smooth_l1_loss(angles[0], angles[1])
    assert rka(s, t).item() == pytest.approx(ref.item(), rel=1e-4)


def test_router_parameters_get_their_own_learning_rate():
    cfg = make_config(lr=1e-3, router_lr_scale=0.3)
    net = model()
    groups = _param_groups(net, None, cfg)
    router = [g for g in groups if g.get("name") == "router"][0]
    assert router["lr"] == pytest.approx(3e-4)
    ids = {id(p) for p in router["params"]}
    assert ids == {id(p) for p in net.intra.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def _train(store, **kw):
    tensors = StoreTensors.from_store(store, teacher=kw.pop("teacher_name", None))
    spec = make_spec(tensors)
    seed = kw.pop("seed", 0)
    cfg = make_config(**{"epochs": 6, "patience": 3, "batch_size": 64, "d": 16, **kw})
    return tensors, spec, train_seed(cfg, tensors, spec, store.splits, seed)


def test_same_seed_same_data_same_metrics(synth_store):
    _, _, a = _train(synth_store, seed=3)
    t, _, b = _train(synth_store, seed=3)
    _, _, c = _train(synth_store, seed=4)
    assert a.history == b.history
    rows = torch.as_tensor(synth_store.splits["test"])
    pa = predict_rows(a.model, t, rows, torch.device("cpu"))["probs"]
    pb = predict_rows(b.model, t, rows, torch.device("cpu"))["probs"]
    assert torch.equal(pa, pb)
    assert a.history != c.history


def test_early_stopping_restores_the_best_validation_epoch(synth_store):
    t, spec, res = _train(synth_store, epochs=60, patience=4, lr=3e-2)
    losses = [h["val_loss"] for h in res.history]
    assert res.best_epoch == min(range(len(losses)), key=losses.__getitem__)
    assert res.epochs_run == res.best_epoch + 1 + 4 or res.epochs_run == 60
    # the returned model is the best epoch's: its validation loss equals the recorded best
    from medmix_core.training import _pos_weight, evaluate_loss
    cfg = make_config()
    rows = torch.as_tensor(synth_store.splits["val"])
    pw = _pos_weight(t, torch.as_tensor(synth_store.splits["train"]), cfg)
    vl = evaluate_loss(res.model, t, rows, torch.device("cpu"), cfg, pw)
    assert vl == pytest.approx(losses[res.best_epoch], rel=1e-5)


def test_distillation_runs_and_its_heads_stay_out_of_the_model(synth_store):
    t, spec, res = _train(synth_store, teacher_name="teacher", teacher="teacher", epochs=4,
                          distill_ramp_epochs=2)
    assert [round(h["lambda_d"], 3) for h in res.history] == [0.0, 0.25, 0.5, 0.5]
    assert res.history[-1]["distill_loss"] > 0
    assert not any("teacher" in k for k in res.model.state_dict())


def test_distill_without_teacher_embeddings_is_a_clear_error(synth_store):
    from medmix_core.errors import MedmixError

    with pytest.raises(MedmixError, match="no teacher embeddings"):
        _train(synth_store, distill=True)


def test_medmix_learns_to_weight_an_informative_expert_above_a_noise_expert(tmp_path):
    from medmix_datasets.synthetic import write_synthetic_store

    store = write_synthetic_store(tmp_path / "s", n=1500, n_modalities=2, dims=(32, 32),
                                  expert_informativeness=[[3.0, 0.0], [3.0, 0.0]],
                                  missing=0.0, expert_missing=0.0, teacher_dim=None, seed=5)
    t, spec, res = _train(store, epochs=40, patience=10, lr=3e-3)
    rows = torch.as_tensor(store.splits["test"])
    w = predict_rows(res.model, t, rows, torch.device("cpu"))["router_weights"]  # [N, M, K]
    mean = w.mean(0)
    assert torch.all(mean[:, 0] > mean[:, 1] + 0.2), mean


def test_pos_weight_is_neg_over_pos_of_the_training_split(synth_store):
    from medmix_core.training import _pos_weight

    t = StoreTensors.from_store(synth_store)
    rows = torch.as_tensor(synth_store.splits["train"])
    y = t.labels[rows]
    pw = _pos_weight(t, rows, make_config())
    assert pw.item() == pytest.approx(float((1 - y).sum() / y.sum()))
    assert _pos_weight(t, rows, make_config(pos_weight=False)) is None


def test_mask_score_is_the_papers_constant():
    assert MASK_SCORE == -1e4 and not math.isnan(MASK_SCORE)
