"""The training step is one object: ``train_seed`` runs it, ``medmix profile`` times it.

Training with :class:`TrainStep` by hand gives bit for bit what ``train_seed`` gives; the
profiler calls that step (not a copy of it), so it refuses what training refuses.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from medmix_core.batch import StoreTensors
from medmix_core.config import make_config
from medmix_core.errors import MedmixError
from medmix_core.profile import profile_fuser
from medmix_core.training import (
    TrainStep,
    build_fuser,
    evaluate_loss,
    make_spec,
    resolve_distill,
    train_seed,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher_tensors(synth_store):
    return StoreTensors.from_store(synth_store, teacher="teacher")


def _cfg(**kw):
    return make_config(**{"epochs": 3, "patience": 10, "batch_size": 64, "d": 16,
                          "device": "cpu", "progress": False, **kw})


def _by_hand(cfg, tensors, splits, seed):
    """train_seed's loop written against TrainStep: (history, state after each epoch)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_fuser(cfg, make_spec(tensors))
    train_rows = torch.as_tensor(splits["train"], dtype=torch.long)
    val_rows = torch.as_tensor(splits["val"], dtype=torch.long)
    step = TrainStep(cfg, model, tensors, CPU, train_rows, seed=seed)
    history, states = [], []
    for epoch in range(cfg.epochs):
        step.train()
        perm = train_rows[torch.randperm(len(train_rows), generator=gen)]
        tot = {"task": 0.0, "distill": 0.0, "aux": 0.0}
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            for k, v in step.step(idx, epoch, gen).items():
                tot[k] += v * len(idx)
        val = evaluate_loss(model, tensors, val_rows, CPU, cfg, step.pos_weight)
        history.append({"epoch": epoch, "train_loss": tot["task"] / len(train_rows),
                        "distill_loss": tot["distill"] / len(train_rows),
                        "aux_loss": tot["aux"] / len(train_rows), "val_loss": val,
                        "lambda_d": step.distill_weight(epoch)})
        states.append(copy.deepcopy(model.state_dict()))
    return history, states


@pytest.mark.parametrize("kw", [
    {"fuser": "medmix", "teacher": "teacher", "distill_ramp_epochs": 1,
     "modality_dropout": 0.2, "expert_dropout": 0.1},
    {"fuser": "concat"},
], ids=["medmix-distill-augment", "concat"])
def test_train_seed_is_the_training_step_run_over_epochs(synth_store, teacher_tensors, kw):
    cfg = _cfg(**kw)
    res = train_seed(cfg, teacher_tensors, make_spec(teacher_tensors), synth_store.splits, 7)
    history, states = _by_hand(cfg, teacher_tensors, synth_store.splits, 7)
    assert res.history == history  # exact floats, every epoch
    if cfg.distill_on:
        assert history[-1]["distill_loss"] > 0 and history[0]["distill_loss"] == 0.0
    best = states[res.best_epoch]
    got = res.model.state_dict()
    assert set(got) == set(best)
    assert all(torch.equal(got[k], best[k]) for k in best)


def test_optimizer_groups_warm_up_router_rate_and_clipping(synth_store, teacher_tensors):
    cfg = _cfg(teacher="teacher", lr=1e-2, router_lr_scale=0.3, warmup_epochs=1.0,
               batch_size=100, grad_clip=1e-3)
    torch.manual_seed(0)
    model = build_fuser(cfg, make_spec(teacher_tensors))
    rows = torch.as_tensor(synth_store.splits["train"], dtype=torch.long)
    step = TrainStep(cfg, model, teacher_tensors, CPU, rows)
    warm = math.ceil(len(rows) / 100)  # warm-up of one epoch, in steps
    assert step.heads is not None and len(step.losses) == 2
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_heads = sum(p.numel() for p in step.heads.parameters())
    assert sum(p.numel() for p in step.params) == n_trainable + n_heads
    router = next(g for g in step.optimizer.param_groups if g.get("name") == "router")
    assert {id(p) for p in router["params"]} == {id(p) for p in model.router_parameters()}
    gen = torch.Generator().manual_seed(0)
    step.train()
    for k in range(warm + 1):
        scale = min(1.0, (k + 1) / warm)
        assert step.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * scale)
        assert router["lr"] == pytest.approx(0.3 * 1e-2 * scale)
        losses = step.step(rows[:100], step.full_weight_epoch, gen)
        assert set(losses) == {"task", "distill"} and all(math.isfinite(v)
                                                          for v in losses.values())
        norm = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in step.params if p.grad is not None]))
        assert 0 < float(norm) <= 1e-3 * (1 + 1e-4)  # the gradients stepped on were clipped
    assert step.distill_weight(0) == 0.0
    assert step.distill_weight(step.full_weight_epoch) == cfg.lambda_d_max


def test_prepare_carries_teacher_embeddings_only_where_they_are_read(synth_store,
                                                                     teacher_tensors):
    rows = torch.as_tensor(synth_store.splits["train"], dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    spec = make_spec(teacher_tensors)
    for fuser, distill, reads in (("concat", False, False), ("medmix", True, True),
                                  ("adacomed", False, True)):
        cfg = _cfg(fuser=fuser, teacher="teacher", distill=distill)
        step = TrainStep(cfg, build_fuser(cfg, spec), teacher_tensors, CPU, rows)
        batch = step.prepare(rows[:32], gen)
        assert (batch.teacher is not None) is reads, fuser
        assert (batch.teacher_mask is not None) is reads, fuser


def test_prepare_uses_the_protocol_mask_and_augments_it(synth_store, teacher_tensors):
    rows = torch.as_tensor(synth_store.splits["train"], dtype=torch.long)
    m0 = teacher_tensors.modalities[0]
    mask = {m: v.clone() for m, v in teacher_tensors.mask.items()}
    mask[m0][:] = False  # the protocol removes modality m0 everywhere
    cfg = _cfg(modality_dropout=0.5)
    step = TrainStep(cfg, build_fuser(cfg, make_spec(teacher_tensors)), teacher_tensors, CPU,
                     rows, train_mask=mask)
    batch = step.prepare(rows[:200], torch.Generator().manual_seed(0))
    assert not batch.expert_mask[m0].any()
    had = torch.stack([mask[m][rows[:200]].any(1) for m in teacher_tensors.modalities], 1)
    assert bool((batch.modality_mask <= had).all())  # augmentation only removes
    assert bool((batch.modality_mask < had).any())  # and it does remove at p = 0.5
    assert bool(batch.modality_mask.any(1)[had.any(1)].all())  # never empties a sample


def test_a_non_finite_loss_is_a_clear_error(synth_store, teacher_tensors):
    m0 = teacher_tensors.modalities[0]
    emb = {m: [x.clone() for x in xs] for m, xs in teacher_tensors.emb.items()}
    emb[m0][0][:] = float("inf")  # a damaged store: infinite embeddings where present
    tensors = replace(teacher_tensors, emb=emb)
    rows = torch.as_tensor(synth_store.splits["train"], dtype=torch.long)
    cfg = _cfg(fuser="concat")
    step = TrainStep(cfg, build_fuser(cfg, make_spec(tensors)), tensors, CPU, rows, seed=3)
    with pytest.raises(MedmixError, match=r"Training loss became nan at epoch 2 \(seed 3\)"):
        step.step(rows[:64], 2, torch.Generator().manual_seed(0))


def test_distillation_without_teacher_embeddings_is_refused(synth_store):
    tensors = StoreTensors.from_store(synth_store)
    cfg = _cfg(distill=True)
    rows = torch.as_tensor(synth_store.splits["train"], dtype=torch.long)
    with pytest.raises(MedmixError, match="no teacher embeddings were loaded"):
        TrainStep(cfg, build_fuser(cfg, make_spec(tensors)), tensors, CPU, rows)


def test_profile_refuses_what_training_refuses(synth_store, teacher_tensors):
    """concat exposes no modality representations: distilling it is an error in training,
    so it is the same error in profiling (not a profile of a step training never takes)."""
    cfg = _cfg(fuser="concat", teacher="teacher")
    assert cfg.distill_on
    with pytest.raises(MedmixError) as trained:
        train_seed(cfg, teacher_tensors, make_spec(teacher_tensors), synth_store.splits, 0)
    with pytest.raises(MedmixError) as profiled:
        profile_fuser("concat", teacher_tensors, cfg, device="cpu", batch_size=32, repeats=1,
                      warmup=0)
    assert "exposes no modality representations" in str(trained.value)
    assert str(profiled.value) == str(trained.value)


def test_profile_times_the_training_step(teacher_tensors, monkeypatch):
    calls = []
    update = TrainStep.update

    def counted(self, batch, epoch):
        calls.append((epoch, self.distill_weight(epoch), batch.teacher is not None))
        return update(self, batch, epoch)

    monkeypatch.setattr(TrainStep, "update", counted)
    cfg = _cfg(fuser="medmix", teacher="teacher", distill_ramp_epochs=4)
    res = profile_fuser("medmix", teacher_tensors, cfg, device="cpu", batch_size=32,
                        repeats=2, warmup=1)
    # one step for the optimizer state, one measured for memory, warm-up + timed steps
    assert len(calls) == 1 + 1 + 1 + 2
    assert set(calls) == {(4, cfg.lambda_d_max, True)}  # distillation at its full weight
    assert res["distillation"] is True


def test_resolve_distill_follows_the_run_rule():
    # a fuser reading teacher embeddings at inference takes its teacher as an input
    assert resolve_distill(make_config(fuser="adacomed", teacher="t")).distill_on is False
    assert resolve_distill(make_config(fuser="adacomed", teacher="t",
                                       distill=True)).distill_on is True
    assert resolve_distill(make_config(fuser="medmix", teacher="t")).distill_on is True
    assert resolve_distill(make_config(fuser="medmix")).distill_on is False
