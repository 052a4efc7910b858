"""The self-supervised sequence expert ``seqssl`` on real PhysioNet stays and on toy series."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _shared import TOY
from _shared import toy_ts as ts
from medmix_datasets.physionet2012 import PhysioNet2012, write_subset
from medmix_experts import seqssl
from medmix_experts.seqssl import SeqSSLExpert
from safetensors.numpy import load_file
from safetensors.torch import save_file

from medmix_core import ExpertEncoder, ModalitySpec
from medmix_core.errors import DataError

FAST = {"epochs": 3, "hidden": 16}  # a few seconds on one thread


def toy_cohort(n=40, seed=0):
    """Random hourly-ish toy stays: a drifts around 80, b is sparse around 1."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ta = np.sort(rng.uniform(0, 48, rng.integers(5, 30)))
        tb = np.sort(rng.uniform(0, 48, rng.integers(0, 4)))
        out.append(ts(list(zip(ta, 80 + 10 * np.sin(ta / 8) + rng.normal(0, 2, len(ta)))),
                      list(zip(tb, rng.normal(1, 0.3, len(tb))))))
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """(vitals spec, vitals payloads, labs spec, labs payloads) of 40 real stays."""
    d = PhysioNet2012(str(write_subset(tmp_path_factory.mktemp("p12") / "c", 40)))
    samples = d.samples()
    mods = {m.name: m for m in d.modalities()}
    out = {}
    for name in ("vitals", "labs"):
        out[name] = (mods[name], [s.modalities[name] for s in samples
                                  if s.modalities[name] is not None])
    return out


@pytest.fixture(scope="module")
def fitted(cohort):
    spec, pays = cohort["vitals"]
    e = SeqSSLExpert(**FAST)
    e.fit(spec, pays)
    return e, spec, pays


def test_shapes_dtype_finite_and_batch_independent(fitted):
    e, spec, pays = fitted
    x = e.encode(spec, pays)
    assert x.dtype == np.float32 and x.shape == (len(pays), e.dim(spec)) == (len(pays), 32)
    assert np.isfinite(x).all() and x.std(axis=0).max() > 0
    # a stay's embedding does not depend on the other stays of the call
    np.testing.assert_array_equal(x[3:4], e.encode(spec, pays[3:4]))
    np.testing.assert_array_equal(x[::-1], e.encode(spec, pays[::-1]))
    assert SeqSSLExpert().dim(spec) == 128


def test_fit_is_deterministic_and_leaves_the_global_rng_alone(fitted):
    e, spec, pays = fitted
    rng_before = torch.random.get_rng_state()
    again = SeqSSLExpert(**FAST)
    again.fit(spec, pays)
    assert torch.equal(rng_before, torch.random.get_rng_state())
    a, b = e.get_state(spec), again.get_state(spec)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(e.encode(spec, pays), again.encode(spec, pays))
    other = SeqSSLExpert(**FAST, seed=1)
    other.fit(spec, pays)
    assert not np.array_equal(e.encode(spec, pays), other.encode(spec, pays))


def test_state_round_trip_through_safetensors(fitted, tmp_path):
    e, spec, pays = fitted
    path = tmp_path / "state.safetensors"  # written and read as the store does
    save_file({k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in
               e.get_state(spec).items()}, str(path))
    fresh = SeqSSLExpert(**FAST)
    assert fresh.n_parameters() == 0
    fresh.set_state(spec, load_file(str(path)))
    np.testing.assert_array_equal(e.encode(spec, pays), fresh.encode(spec, pays))
    assert fresh.n_parameters() == e.n_parameters() == 3 * 16 * (3 * 9 + 16 + 2)
    prov = fresh.provenance()["trained"]["vitals"]
    assert prov["n_train"] == len(pays) and prov["seed"] == 0 and prov["epochs_run"] == 3
    assert prov["final_ssl_loss"] == pytest.approx(e.get_state(spec)["ssl_loss"][-1])


def test_wrong_state_is_refused_with_what_was_expected(fitted, cohort):
    e, spec, _ = fitted
    labs = cohort["labs"][0]
    state = e.get_state(spec)
    with pytest.raises(DataError, match="variables"):
        SeqSSLExpert(**FAST).set_state(labs, state)
    with pytest.raises(DataError, match="hidden"):
        SeqSSLExpert(epochs=3, hidden=32).set_state(spec, state)
    bad = dict(state)
    bad["net.reconstruct.weight"] = np.zeros((9, 17), dtype=np.float32)
    with pytest.raises(DataError, match=r"expected.*\(9, 16\).*found.*\(9, 17\)"):
        SeqSSLExpert(**FAST).set_state(spec, bad)
    missing = {k: v for k, v in state.items() if k != "net.gru.weight_hh_l0"}
    with pytest.raises(DataError, match="weight_hh_l0"):
        SeqSSLExpert(**FAST).set_state(spec, missing)
    with pytest.raises(DataError, match="lacks"):
        SeqSSLExpert(**FAST).set_state(spec, {k: state[k] for k in ("mean", "std",
                                                                     "variables")})
    with pytest.raises(DataError, match="not fitted"):
        SeqSSLExpert(**FAST).encode(spec, [])


@pytest.mark.parametrize("options, match", [
    ({"hiden": 64}, "unknown option"),
    ({"hidden": 0}, "hidden"),
    ({"hidden": True}, "hidden"),
    ({"epochs": "3"}, "epochs"),
    ({"mask_rate": 1.5}, "mask_rate"),
    ({"bin_hours": -1}, "bin_hours"),
    ({"max_seconds": 0}, "max_seconds"),
])
def test_bad_options(options, match):
    with pytest.raises(DataError, match=match):
        SeqSSLExpert(**options)


def test_refuses_tabular_and_empty_training_set():
    with pytest.raises(DataError, match="time series"):
        SeqSSLExpert().dim(ModalitySpec("static", "tabular", ["Age"]))
    with pytest.raises(DataError, match="at least one"):
        SeqSSLExpert().fit(TOY, [])


def test_absent_nan_and_out_of_window_observations():
    e = SeqSSLExpert(**FAST)
    e.fit(TOY, toy_cohort())
    empty = ts()
    nan_only = ts([(1.0, np.nan), (np.nan, 80.0)], [(60.0, 1.0), (-2.0, 1.0)])
    measured = ts([(1.0, 80.0)])
    x = e.encode(TOY, [empty, nan_only, measured])
    assert np.isfinite(x).all()
    # NaN values/times and observations outside [0, 48] h count as not measured
    np.testing.assert_array_equal(x[0], x[1])
    assert not np.array_equal(x[0], x[2])


def test_inputs_carry_masks_and_time_since_last():
    e = SeqSSLExpert(**FAST)
    e.fit(TOY, toy_cohort())
    vals, observed = e.grid(TOY, [ts([(2.5, 80.0), (2.7, 84.0)])], np.array([82.0, 0.0]),
                            np.array([2.0, 1.0]))
    assert vals.shape == observed.shape == (1, 48, 2)
    assert observed[0, 2, 0] and observed.sum() == 1 and vals[0, 2, 0] == 0.0  # bin mean
    x = seqssl.model_inputs(torch.from_numpy(vals), torch.from_numpy(observed), 1 / 48)
    assert x.shape == (1, 48, 6)
    np.testing.assert_allclose(x[0, :, 1].numpy(), 0.0)  # b: never measured, value 0
    assert x[0, 2, 2] == 1 and x[0, 3, 2] == 0  # mask of a
    np.testing.assert_allclose(x[0, :4, 4].numpy(), np.array([1, 2, 0, 1]) / 48, rtol=1e-6)


def test_training_reduces_the_self_supervised_loss(cohort):
    spec, pays = cohort["labs"]
    train, held_out = pays[:30], pays[30:]
    e = SeqSSLExpert(epochs=8, hidden=16)
    e.fit(spec, train)
    hist = e.get_state(spec)["ssl_loss"]
    assert hist.shape == (8,) and hist[-1] < hist[0]
    untrained = SeqSSLExpert(epochs=0, hidden=16)
    untrained.fit(spec, train)
    assert untrained.get_state(spec)["ssl_loss"].shape == (0,)
    assert e.ssl_loss(spec, held_out)["total"] < untrained.ssl_loss(spec, held_out)["total"]


def test_time_cap_stops_after_an_epoch():
    e = SeqSSLExpert(epochs=50, hidden=8, max_seconds=1e-9)
    e.fit(TOY, toy_cohort(10))
    assert e.get_state(TOY)["epochs_run"][0] == 1


def test_hook_registers_the_expert():
    seen = []
    seqssl.register_experts(lambda name, cls: seen.append((name, cls)))
    assert seen == [("seqssl", SeqSSLExpert)]
    assert issubclass(SeqSSLExpert, ExpertEncoder)
    assert (SeqSSLExpert.name, SeqSSLExpert.kinds, SeqSSLExpert.family,
            SeqSSLExpert.version) == ("seqssl", ("timeseries",), "domain", "1")
