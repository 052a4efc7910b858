"""Missing-modality protocols: rates, keep-last, determinism, rows, MAR/MNAR, imputation."""

from __future__ import annotations

import math

import pytest
import torch

from medmix_core.errors import DataError, MedmixError
from medmix_core.protocols import (
    Protocol,
    ProtocolError,
    apply_protocol,
    describe,
    impute_expert_embeddings,
    parse_protocols,
)

N = 20_000
MODS = ["cxr", "note", "ehr", "ecg", "lab"]
KS = [2, 3, 2, 3, 2]
AVAIL = [0.9, 0.8, 0.7, 0.6, 0.5]


@pytest.fixture(scope="module")
def masks() -> dict[str, torch.Tensor]:
    """Synthetic expert masks with natural missingness, single-modality and empty rows."""
    g = torch.Generator().manual_seed(123)
    out = {}
    for m, k, a in zip(MODS, KS, AVAIL):
        has = torch.rand(N, generator=g) < a  # [N]
        ex = torch.rand(N, k, generator=g) < 0.7  # [N, K]
        ex[:, 0] |= ~ex.any(dim=1)  # an available modality has at least one expert
        out[m] = ex & has[:, None]
    for j, m in enumerate(MODS):  # rows 0..299: only cxr; rows 300..399: nothing
        if j > 0:
            out[m][:300] = False
        out[m][300:400] = False
    out["cxr"][:300, 0] = True
    return out


def avail_of(mask: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([mask[m].any(dim=1) for m in MODS], dim=1)  # [N, M]


def close(obs: float, exp: float, n: int) -> bool:
    """Within 4.5 binomial standard errors (plus a hair for exp near 0 or 1)."""
    return abs(obs - exp) <= 4.5 * math.sqrt(max(exp * (1 - exp), 1e-12) / n) + 1e-3


def apply(mask, name, rate=0.0, seed=0, rows=None, cov=None, labels=None, **kw):
    """apply_protocol on MODS; ``cov`` is the covariate's values, kw build the Protocol."""
    return apply_protocol(mask, MODS, Protocol(name=name, rate=rate, **kw), seed, rows=rows,
                          covariate=cov, labels=labels)


def test_fixture_has_the_edge_cases(masks):
    n_av = avail_of(masks).sum(1)
    assert int((n_av == 0).sum()) >= 100 and int((n_av == 1).sum()) >= 300
    assert int((n_av == 5).sum()) > 1000


def test_natural_is_identity_and_new_tensors(masks):
    out = apply(masks, "natural")
    for m in MODS:
        assert torch.equal(out[m], masks[m])
        assert out[m].data_ptr() != masks[m].data_ptr()


@pytest.mark.parametrize("name", ["train-one", "test-one"])
@pytest.mark.parametrize("p", [0.3, 0.7])
def test_one_drops_named_modality_at_rate(masks, name, p):
    before = avail_of(masks)
    n_av = before.sum(1)
    for j, m in enumerate(MODS):
        out = apply(masks, name, p, seed=j, modality=m)
        after = avail_of(out)
        eligible = before[:, j] & (n_av >= 2)
        dropped = before[:, j] & ~after[:, j]
        rate = float(dropped[eligible].float().mean())
        assert close(rate, p, int(eligible.sum())), (m, rate)
        assert not bool(dropped[~eligible].any())  # last modality kept
        assert not bool(out[m][dropped].any())  # every expert of a dropped modality is off
        assert torch.equal(out[m][~dropped], masks[m][~dropped])
        for o in MODS:
            if o != m:
                assert torch.equal(out[o], masks[o])


def test_one_without_keep_last_can_empty_rows(masks):
    before = avail_of(masks)
    single = before[:, 0] & (before.sum(1) == 1)
    out = apply(masks, "test-one", 0.5, modality="cxr", keep_last=False)
    lost = single & ~avail_of(out)[:, 0]
    assert close(float(lost[single].float().mean()), 0.5, int(single.sum()))


@pytest.mark.parametrize("r", [0.1, 0.5, 1.0])
def test_random_drops_exactly_one_uniformly(masks, r):
    before = avail_of(masks)
    n_av = before.sum(1)
    out = apply(masks, "test-random", r, seed=7)
    after = avail_of(out)
    lost = (before & ~after).sum(1)
    assert int(lost.max()) <= 1
    multi = n_av >= 2
    assert not bool(lost[~multi].any())  # single-modality rows keep theirs
    rate = float((lost[multi] == 1).float().mean())
    if r == 1.0:
        assert rate == 1.0
    else:
        assert close(rate, r, int(multi.sum()))
    # uniform choice: expected count of modality j = sum over dropped rows of 1/n_avail
    hit = lost == 1
    for j in range(len(MODS)):
        exp = float((before[hit, j].float() / n_av[hit].float()).sum())
        obs = int((before[hit, j] & ~after[hit, j]).sum())
        assert abs(obs - exp) <= 4.5 * math.sqrt(exp) + 1, (MODS[j], obs, exp)


def test_random_without_keep_last_r1_drops_one_from_every_nonempty_row(masks):
    before = avail_of(masks)
    out = apply(masks, "train-random", 1.0, keep_last=False)
    lost = (before & ~avail_of(out)).sum(1)
    assert torch.equal(lost, (before.sum(1) >= 1).long())
    assert int((avail_of(out).sum(1) == 0).sum()) == int((before.sum(1) <= 1).sum())


@pytest.mark.parametrize("keep_last", [True, False])
@pytest.mark.parametrize("r", [0.2, 0.6, 0.9])
def test_bernoulli_rate(masks, r, keep_last):
    before = avail_of(masks)
    n_av = before.sum(1).double()
    out = apply(masks, "test-bernoulli", r, seed=3, keep_last=keep_last)
    after = avail_of(out)
    for j in range(len(MODS)):
        av = before[:, j]
        obs = float((av & ~after[:, j])[av].float().mean())
        # keep_last: with n available, each is dropped w.p. r - r**n / n
        per_row = r - r ** n_av[av] / n_av[av] if keep_last else torch.full_like(n_av[av], r)
        assert close(obs, float(per_row.mean()), int(av.sum())), (MODS[j], obs)
    if keep_last:
        assert torch.equal(after.any(1), before.any(1))


@pytest.mark.parametrize("name,kw", [
    ("test-one", {"modality": "cxr"}), ("train-random", {}), ("test-bernoulli", {}),
    ("mar", {"modality": "cxr", "covariate": "n_available", "strength": 1.0}),
])
def test_keep_last_at_rate_one_never_empties_a_row(masks, name, kw):
    out = apply(masks, name, 1.0, **kw)
    assert torch.equal(avail_of(out).any(1), avail_of(masks).any(1))


def test_determinism_and_seed_sensitivity(masks):
    for name, kw in [("test-one", {"modality": "ehr"}), ("test-random", {}),
                     ("train-bernoulli", {})]:
        a = apply(masks, name, 0.5, seed=11, **kw)
        b = apply(masks, name, 0.5, seed=11, **kw)
        c = apply(masks, name, 0.5, seed=12, **kw)
        assert all(torch.equal(a[m], b[m]) for m in MODS)
        assert not all(torch.equal(a[m], c[m]) for m in MODS)


def test_thread_count_does_not_change_masks(masks):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = apply(masks, "test-bernoulli", 0.4, seed=5)
        torch.set_num_threads(max(2, threads))
        b = apply(masks, "test-bernoulli", 0.4, seed=5)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a[m], b[m]) for m in MODS)


def test_known_values_are_pinned():
    """A tiny case whose draws are fixed by torch's CPU generator (mt19937)."""
    mask = {"a": torch.ones(6, 1, dtype=torch.bool), "b": torch.ones(6, 2, dtype=torch.bool)}
    u = torch.rand((6, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = apply_protocol(mask, ["a", "b"], Protocol(name="test-one", rate=0.5, modality="b"), 0)
    assert torch.equal(out["b"].any(1), ~(u[:, 1] < 0.5))


def test_rows_restriction(masks):
    test_idx = torch.arange(N)[torch.arange(N) % 3 == 0]
    sel = torch.zeros(N, dtype=torch.bool)
    sel[test_idx] = True
    for name, kw in [("test-one", {"modality": "note"}), ("test-random", {}),
                     ("test-bernoulli", {}), ("mnar", {"modality": "note", "strength": 0.0})]:
        if name == "mnar":
            kw = {**kw, "labels": torch.zeros(N)}
        full = apply(masks, name, 0.6, seed=2, **kw)
        part = apply(masks, name, 0.6, seed=2, rows=test_idx, **kw)
        part_b = apply(masks, name, 0.6, seed=2, rows=sel, **kw)
        for m in MODS:
            assert torch.equal(part[m], part_b[m])
            assert torch.equal(part[m][~sel], masks[m][~sel])  # other rows unchanged
            assert torch.equal(part[m][sel], full[m][sel])  # a row's fate ignores the others
        assert not all(torch.equal(part[m], masks[m]) for m in MODS)


def test_larger_rate_drops_a_superset(masks):
    lo = avail_of(apply(masks, "test-bernoulli", 0.3, seed=9, keep_last=False))
    hi = avail_of(apply(masks, "test-bernoulli", 0.7, seed=9, keep_last=False))
    assert not bool((~lo & hi).any())
    lo = avail_of(apply(masks, "test-random", 0.3, seed=9))
    hi = avail_of(apply(masks, "test-random", 0.7, seed=9))
    assert not bool((~lo & hi).any())


def test_inputs_untouched(masks):
    snap = {m: x.clone() for m, x in masks.items()}
    age = torch.randn(N, generator=torch.Generator().manual_seed(1)) * 15 + 60
    age_snap = age.clone()
    y = (torch.arange(N) % 4 == 0).float()
    for name, kw in [("test-one", {"modality": "cxr"}), ("train-random", {}),
                     ("test-bernoulli", {}), ("natural", {}),
                     ("mar", {"modality": "ecg", "covariate": "age", "strength": 1.5,
                              "cov": age}),
                     ("mnar", {"modality": "ecg", "strength": 1.0, "labels": y})]:
        out = apply(masks, name, 0.9, **kw)
        assert all(out[m] is not masks[m] for m in MODS)
    assert all(torch.equal(masks[m], snap[m]) for m in MODS)
    assert torch.equal(age, age_snap)


@pytest.mark.parametrize("strength", [2.0, -2.0])
def test_mar_direction_and_mean_rate(masks, strength):
    age = torch.randn(N, generator=torch.Generator().manual_seed(4)) * 15 + 60
    before = avail_of(masks)
    j = MODS.index("note")
    eligible = before[:, j] & (before.sum(1) >= 2)
    out = apply(masks, "mar", 0.3, seed=1, modality="note", covariate="age",
                strength=strength, cov=age)
    dropped = before[:, j] & ~avail_of(out)[:, j]
    old = age > age[eligible].median()
    r_old = float(dropped[eligible & old].float().mean())
    r_young = float(dropped[eligible & ~old].float().mean())
    # positive strength: higher covariate, more drops
    assert (r_old > r_young + 0.2) if strength > 0 else (r_young > r_old + 0.2)
    assert close(float(dropped[eligible].float().mean()), 0.3, int(eligible.sum()))


def test_mar_uncalibrated_uses_logit_rate_and_strength0_matches_rate(masks):
    age = torch.randn(N, generator=torch.Generator().manual_seed(4)) * 15 + 60
    before = avail_of(masks)
    j = MODS.index("ehr")
    eligible = before[:, j] & (before.sum(1) >= 2)

    def rate(**kw):
        out = apply(masks, "mar", 0.1, modality="ehr", covariate="age", cov=age, **kw)
        return float((before[:, j] & ~avail_of(out)[:, j])[eligible].float().mean())

    assert close(rate(strength=0.0), 0.1, int(eligible.sum()))
    # without calibration the logistic-normal mean is pulled towards 0.5
    assert rate(strength=3.0, calibrate=False) > 0.2
    assert close(rate(strength=3.0), 0.1, int(eligible.sum()))


def test_mar_n_available_covariate_computed_from_masks(masks):
    before = avail_of(masks)
    n_av = before.sum(1)
    out = apply(masks, "mar", 0.4, modality="cxr", covariate="n_available", strength=2.0)
    dropped = before[:, 0] & ~avail_of(out)[:, 0]
    eligible = before[:, 0] & (n_av >= 2)
    assert float(dropped[eligible & (n_av == 5)].float().mean()) > \
        float(dropped[eligible & (n_av == 2)].float().mean()) + 0.2


@pytest.mark.parametrize("strength", [1.5, -1.5])
def test_mnar_direction_and_mean_rate(masks, strength):
    y = (torch.rand(N, generator=torch.Generator().manual_seed(8)) < 0.3).long()
    before = avail_of(masks)
    j = MODS.index("lab")
    eligible = before[:, j] & (before.sum(1) >= 2)
    out = apply(masks, "mnar", 0.4, seed=2, modality="lab", strength=strength, labels=y)
    dropped = before[:, j] & ~avail_of(out)[:, j]
    r_neg = float(dropped[eligible & (y == 0)].float().mean())
    r_pos = float(dropped[eligible & (y == 1)].float().mean())
    # documented: positive strength -> absent more often when y = 0 (e.g. survivors)
    assert (r_neg > r_pos + 0.2) if strength > 0 else (r_pos > r_neg + 0.2)
    assert close(float(dropped[eligible].float().mean()), 0.4, int(eligible.sum()))
    out2 = apply(masks, "mnar", 0.4, seed=2, modality="lab", strength=strength,
                 labels=y[:, None].float())
    assert all(torch.equal(out[m], out2[m]) for m in MODS)


def test_errors(masks):
    with pytest.raises(ProtocolError, match=r"Unknown modality 'xray'.*'cxr', 'note'"):
        apply(masks, "test-one", 0.3, modality="xray")
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ProtocolError, match=r"rate must be in \[0, 1\]"):
            Protocol(name="test-random", rate=bad)
    with pytest.raises(ProtocolError, match="needs an observed covariate"):
        Protocol(name="mar", rate=0.3, modality="cxr")
    with pytest.raises(ProtocolError, match="pass its values as covariate"):
        apply(masks, "mar", 0.3, modality="cxr", covariate="age", strength=1.0)
    with pytest.raises(ProtocolError, match="mnar.*pass labels"):
        apply(masks, "mnar", 0.3, modality="cxr", strength=1.0)
    with pytest.raises(ProtocolError, match="mnar.*pass labels"):
        apply(masks, "mnar", 0.0, modality="cxr")  # checked even when nothing is dropped
    with pytest.raises(DataError, match="0 or 1"):
        apply(masks, "mnar", 0.3, modality="cxr", labels=torch.full((N,), 2.0))
    with pytest.raises(DataError, match=r"shape \[20000\]"):
        apply(masks, "mnar", 0.3, modality="cxr", labels=torch.zeros(N - 1))
    age = torch.full((N,), 50.0)
    with pytest.raises(DataError, match="constant"):
        apply(masks, "mar", 0.3, modality="cxr", covariate="age", strength=1.0, cov=age)
    age[1000:1100] = float("nan")
    age[1100:1110] = 3.0
    with pytest.raises(DataError, match="non-finite"):
        apply(masks, "mar", 0.3, modality="cxr", covariate="age", strength=1.0, cov=age)
    with pytest.raises(ProtocolError, match="drops one named modality"):
        Protocol(name="test-one", rate=0.3)
    with pytest.raises(ProtocolError, match="does not take a modality"):
        Protocol(name="test-random", rate=0.3, modality="cxr")
    with pytest.raises(ProtocolError, match="does not take a strength"):
        Protocol(name="test-one", rate=0.3, modality="cxr", strength=1.0)
    with pytest.raises(ProtocolError, match="does not take a covariate"):
        Protocol(name="mnar", rate=0.3, modality="cxr", covariate="age")
    with pytest.raises(ProtocolError, match=r"cover modalities .* given \['cxr'\]"):
        apply_protocol(masks, ["cxr"], Protocol(name="test-random", rate=0.3), 0)
    with pytest.raises(DataError, match="bool tensor"):
        apply_protocol({"a": torch.ones(3, 2)}, ["a"], Protocol(name="natural"), 0)
    with pytest.raises(DataError, match="disagree on N"):
        apply_protocol({"a": torch.ones(3, 2, dtype=torch.bool),
                        "b": torch.ones(4, 1, dtype=torch.bool)}, ["a", "b"],
                       Protocol(name="natural"), 0)
    with pytest.raises(DataError, match="rows must index"):
        apply(masks, "test-random", 0.3, rows=torch.tensor([0, N]))
    with pytest.raises(DataError, match="integer indices"):
        apply(masks, "test-random", 0.3, rows=torch.tensor([0.0, 1.0]))
    with pytest.raises(ProtocolError, match="Did you mean 'test-one'"):
        parse_protocols("tset-one", [0.3], MODS)
    with pytest.raises(ProtocolError, match="at least one rate"):
        parse_protocols("test-random", [], MODS)
    assert all(issubclass(e, MedmixError) for e in (ProtocolError, DataError))


def test_parse_protocols_and_describe():
    ps = parse_protocols("train-one", [0.3, 0.5, 0.7], MODS, None)
    assert [(p.modality, p.rate) for p in ps][:4] == [("cxr", 0.3), ("cxr", 0.5),
                                                      ("cxr", 0.7), ("note", 0.3)]
    assert len(ps) == 15 and all(p.phase == "train" for p in ps)
    ps = parse_protocols("test-one", [0.5], MODS, "ehr")
    assert [describe(p) for p in ps] == ["test-one(ehr, p=0.5)"]
    ps = parse_protocols("test-random", [0.1, 1.0], MODS)
    assert [describe(p) for p in ps] == ["test-random(r=0.1)", "test-random(r=1)"]
    assert parse_protocols("natural", [0.3], MODS)[0].phase == "none"
    ps = parse_protocols("mar", [0.3], MODS, "cxr", strength=1.0, covariate="age")
    assert describe(ps[0]) == "mar(cxr, p=0.3, cov=age, s=1)" and ps[0].phase == "both"
    p = Protocol(name="test-bernoulli", rate=0.2, keep_last=False)
    assert describe(p) == "test-bernoulli(r=0.2, may empty)" and p.phase == "test"
    with pytest.raises(ProtocolError, match="Unknown modality"):
        parse_protocols("test-one", [0.5], MODS, "eeg")
    with pytest.raises(ProtocolError, match="takes no modality"):
        parse_protocols("test-bernoulli", [0.5], MODS, "cxr")


def make_emb(masks):
    g = torch.Generator().manual_seed(0)
    emb = {m: [torch.randn(N, 4 + k, generator=g) for k in range(masks[m].shape[1])]
           for m in MODS}
    for m in MODS:  # masked slots hold garbage that must never be read
        for k, x in enumerate(emb[m]):
            x[~masks[m][:, k]] = float("nan")
    return emb


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_impute(masks, method):
    emb = make_emb(masks)
    train = torch.arange(N) < N // 2
    emb[MODS[0]][0][~train & masks[MODS[0]][:, 0]] += 100.0  # test rows must not move the mean
    snap = {m: [x.clone() for x in xs] for m, xs in emb.items()}
    new, mask = impute_expert_embeddings(emb, masks, method, train)
    for m in MODS:
        assert bool(mask[m].all()) and mask[m].shape == masks[m].shape
        for k, x in enumerate(new[m]):
            present = masks[m][:, k]
            assert torch.equal(x[present], emb[m][k][present])
            want = (torch.zeros(x.shape[1]) if method == "zero"
                    else emb[m][k][present & train].mean(0))
            assert torch.allclose(x[~present], want.expand(int((~present).sum()), -1),
                                  atol=1e-6)
            assert bool(torch.isfinite(x).all())
    for m in MODS:  # inputs untouched (NaN slots compared as NaN)
        for a, b in zip(emb[m], snap[m]):
            assert torch.equal(a.isnan(), b.isnan())
            assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_impute_errors(masks):
    emb = make_emb(masks)
    dropped = apply(masks, "train-one", 1.0, modality="note", keep_last=False)
    with pytest.raises(DataError, match="present in no training row"):
        impute_expert_embeddings(emb, dropped, "mean", torch.arange(N))
    with pytest.raises(ProtocolError, match="Unknown imputation method"):
        impute_expert_embeddings(emb, masks, "median", torch.arange(N))  # type: ignore[arg-type]
    with pytest.raises(DataError, match="expert embeddings but the mask"):
        impute_expert_embeddings({**emb, "cxr": emb["cxr"][:1]}, masks, "zero", torch.arange(N))
