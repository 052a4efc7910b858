"""Seeds trained together (one vectorised model) equal each seed trained alone.

``train_seeds_together`` against ``train_seed`` seed by seed on the small synthetic store,
with every per-seed source of randomness on (dropout, modality / expert dropout), EMA,
smoothed early stopping and positive-class weighting: same best epochs and epochs run,
histories to 1e-5, validation and test metrics to 1e-4, weights to 1e-4. Fusers that cannot
be vectorised are refused with the reason; a resumed run equals an uninterrupted one bit for
bit.
"""

from __future__ import annotations

import pytest
import torch

from medmix_core.batch import StoreTensors
from medmix_core.config import make_config
from medmix_core.errors import MedmixError
from medmix_core.metrics import compute_metrics
from medmix_core.together import together_blocker, train_seeds_together
from medmix_core.training import make_spec, predict_rows, resolve_distill, train_seed


@pytest.fixture(scope="module")
def tensors(synth_store):
    return StoreTensors.from_store(synth_store, teacher="teacher")


@pytest.fixture(scope="module")
def plain_tensors(synth_store):
    return StoreTensors.from_store(synth_store)


def _cfg(**kw):
    base = {"epochs": 4, "patience": 2, "batch_size": 64, "d": 8, "device": "cpu",
            "progress": False, "dropout": 0.2, "expert_dropout": 0.2, "modality_dropout": 0.2,
            "ema_decay": 0.9, "val_smoothing": 2, "pos_weight": True, "threads": 1}
    return resolve_distill(make_config(**{**base, **kw}))


#: parameters whose gradient is identically zero in exact arithmetic (a constant added to
#: every score of a softmax): both implementations move them by Adam-normalised rounding
#: noise only, and no output depends on them. name -> slice of the tensor compared anyway
_SHIFT_INVARIANT = ("score.bias", "score.2.bias")


def _compared(name: str, t: torch.Tensor) -> torch.Tensor | None:
    if f".{name}".find(".intra.") >= 0 and name.endswith(_SHIFT_INVARIANT):
        return None
    if name.endswith("attn.in_proj_bias"):  # the key bias (middle third) is shift-invariant
        d = t.shape[0] // 3
        return torch.cat([t[:d], t[2 * d:]])
    return t


def _test_metrics(res, tensors, rows):
    pred = predict_rows(res.model, tensors, rows, torch.device("cpu"))
    return compute_metrics(pred["probs"], tensors.labels[rows], tensors.task_type,
                           res.threshold)


def _assert_same(seq, tog, tensors, splits):
    test_rows = torch.as_tensor(splits["test"], dtype=torch.long)
    for a, b in zip(seq, tog):
        assert (a.seed, a.best_epoch, a.epochs_run) == (b.seed, b.best_epoch, b.epochs_run)
        assert len(a.history) == len(b.history)
        for x, y in zip(a.history, b.history):
            assert x.keys() == y.keys()
            for k in x:
                assert abs(x[k] - y[k]) <= 1e-5, (a.seed, x["epoch"], k, x[k], y[k])
        assert a.threshold == pytest.approx(b.threshold, abs=1e-4)
        for metrics in ((a.val_metrics, b.val_metrics),
                        (_test_metrics(a, tensors, test_rows),
                         _test_metrics(b, tensors, test_rows))):
            for k, v in metrics[0].items():
                if isinstance(v, float):
                    assert abs(v - metrics[1][k]) <= 1e-4, (a.seed, k, v, metrics[1][k])
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            ta, tb = _compared(k, sa[k]), _compared(k, sb[k])
            if ta is not None:
                assert torch.allclose(ta, tb, rtol=0, atol=1e-4), (a.seed, k)
        assert not b.model.training and next(b.model.parameters()).device.type == "cpu"


CASES = {
    "medmix-distill": {"fuser": "medmix", "teacher": "teacher", "epochs": 3},
    "medmix-no-distill": {"fuser": "medmix", "teacher": "teacher", "distill": False},
    "concat": {"fuser": "concat"},
    "meanavg": {"fuser": "meanavg", "ema_decay": None, "val_smoothing": 1},
    "attention": {"fuser": "attention", "fuser_options": {"heads": 2}},
    "medmix-uniform": {"fuser": "medmix-uniform"},
    "max": {"fuser": "max", "pos_weight": False},
    "onellm": {"fuser": "onellm", "expert": 0},
    "medmix-no-inter": {"fuser": "medmix-no-inter", "modality": 1},
    "medmix-best-expert-chosen": {"fuser": "medmix-best-expert", "best": 1},
}


def _options(kw, t):
    """CASES entries that name an expert or modality by position, as fuser options."""
    kw = dict(kw)
    if "expert" in kw:
        kw["fuser_options"] = {"expert": t.experts[t.modalities[0]][kw.pop("expert")]}
    if "modality" in kw:
        kw["fuser_options"] = {"modality": t.modalities[kw.pop("modality")]}
    if "best" in kw:
        k = kw.pop("best")
        kw["fuser_options"] = {"expert": {m: t.experts[m][min(k, len(t.experts[m]) - 1)]
                                          for m in t.modalities}}
    return kw


@pytest.mark.parametrize("case", list(CASES))
def test_together_equals_sequential(case, tensors, plain_tensors, synth_store):
    kw = CASES[case]
    t = tensors if kw.get("teacher") else plain_tensors
    cfg = _cfg(**_options(kw, t))
    spec = make_spec(t)
    assert together_blocker(cfg, t, spec) is None
    seeds = [0, 1]
    seq = [train_seed(cfg, t, spec, synth_store.splits, s) for s in seeds]
    seen = []
    tog = train_seeds_together(cfg, t, spec, synth_store.splits, seeds,
                               on_epoch=lambda s, rec: seen.append((s, rec["epoch"])))
    _assert_same(seq, tog, t, synth_store.splits)
    assert sorted(seen) == sorted((r.seed, h["epoch"]) for r in tog for h in r.history)
    if cfg.distill_on:
        assert any(h["distill_loss"] > 0 for h in tog[0].history)


def test_seeds_stop_at_different_epochs_and_protocol_masks(plain_tensors, synth_store):
    """Seeds leave the stack at their own early stop; per-seed protocol masks are honoured."""
    cfg = _cfg(fuser="medmix", epochs=8, patience=1, lr=3e-2, val_smoothing=1)
    spec = make_spec(plain_tensors)
    seeds = [0, 1, 2]
    masks = {}
    for s in seeds:  # a different random expert removal per seed, on every split
        g = torch.Generator().manual_seed(100 + s)
        masks[s] = {m: v & (torch.rand(v.shape, generator=g) > 0.3)
                    for m, v in plain_tensors.mask.items()}
    seq = [train_seed(cfg, plain_tensors, spec, synth_store.splits, s, masks[s], masks[s])
           for s in seeds]
    tog = train_seeds_together(cfg, plain_tensors, spec, synth_store.splits, seeds,
                               train_masks=masks, val_masks=masks)
    assert len({r.epochs_run for r in seq}) > 1, "the case must stop seeds at different epochs"
    _assert_same(seq, tog, plain_tensors, synth_store.splits)


@pytest.mark.parametrize("fuser", ["m3care", "adacomed"])
def test_unvectorisable_fusers_say_why(fuser, tensors, synth_store):
    cfg = _cfg(fuser=fuser, teacher="teacher", distill=False)
    plain_tensors = tensors
    spec = make_spec(plain_tensors)
    state = torch.get_rng_state()
    reason = together_blocker(cfg, plain_tensors, spec)
    assert torch.equal(state, torch.get_rng_state())  # the trial leaves the RNG alone
    assert isinstance(reason, str) and fuser in reason
    with pytest.raises(MedmixError, match="--sequential"):
        train_seeds_together(cfg, plain_tensors, spec, synth_store.splits, [0, 1])


def test_candidate_fusers_are_left_to_the_runner(plain_tensors):
    cfg = _cfg(fuser="medmix-best-expert")
    assert "candidates" in together_blocker(cfg, plain_tensors, make_spec(plain_tensors))


def test_resume_from_checkpoint_is_bitwise(tmp_path, tensors, synth_store):
    cfg = _cfg(fuser="medmix", teacher="teacher", epochs=4, patience=2)
    spec = make_spec(tensors)
    seeds = [3, 4]
    whole = train_seeds_together(cfg, tensors, spec, synth_store.splits, seeds)

    class Stop(Exception):
        pass

    def stop_at_2(seed, rec):
        if rec["epoch"] == 2:
            raise Stop

    ck = tmp_path / "together.ckpt"
    with pytest.raises(Stop):
        train_seeds_together(cfg, tensors, spec, synth_store.splits, seeds, on_epoch=stop_at_2,
                             checkpoint=ck)
    assert ck.is_file()
    resumed = train_seeds_together(cfg, tensors, spec, synth_store.splits, seeds,
                                   checkpoint=ck, log=lambda msg: None)
    for a, b in zip(whole, resumed):
        assert (a.best_epoch, a.epochs_run, a.threshold) == (b.best_epoch, b.epochs_run,
                                                             b.threshold)
        assert a.history == b.history
        assert a.val_metrics == b.val_metrics
        for k, v in a.model.state_dict().items():
            assert torch.equal(v, b.model.state_dict()[k]), k
    with pytest.raises(MedmixError, match="another run"):
        train_seeds_together(cfg, tensors, spec, synth_store.splits, [3, 5], checkpoint=ck)
