"""Clinical statistics: calibration, recalibration, decision curves, thresholds, subgroups."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medmix_core import clinical as C
from medmix_core.errors import DataError, MedmixError
from medmix_core.metrics import compute_metrics


def _cohort(n=4000, seed=0, scale=1.0, shift=0.0):
    """True risks, outcomes drawn from them, and a model's risks distorted on logit scale."""
    rng = np.random.default_rng(seed)
    true = 1 / (1 + np.exp(-rng.normal(-1.5, 1.2, n)))
    y = (rng.random(n) < true).astype(float)
    model = 1 / (1 + np.exp(-(scale * C.logit(true) + shift)))
    return model, y


def test_fast_metrics_equal_the_headline_metrics_with_ties():
    rng = np.random.default_rng(1)
    for n in (3, 17, 200):
        for _ in range(10):
            p = np.round(rng.random(n), 1)  # many ties
            y = (rng.random(n) < p).astype(float)
            fast = C._metric_row(p, y, 0.4)
            ref = compute_metrics(torch.tensor(p[:, None], dtype=torch.float32),
                                  torch.tensor(y[:, None]), "binary", 0.4)
            for k in ("auroc", "auprc", "macro_f1", "accuracy"):
                if math.isnan(ref[k]):
                    assert math.isnan(fast[k])
                else:
                    assert fast[k] == pytest.approx(ref[k], abs=1e-5), (n, k)


def test_calibration_slope_and_intercept_recover_the_distortion():
    good = C.calibration_stats(*_cohort())
    assert good["slope"] == pytest.approx(1.0, abs=0.1)
    assert good["intercept"] == pytest.approx(0.0, abs=0.1)
    assert good["ece"] < 0.03
    extreme = C.calibration_stats(*_cohort(scale=2.0))
    assert extreme["slope"] == pytest.approx(0.5, abs=0.06)  # too extreme: slope < 1
    high = C.calibration_stats(*_cohort(shift=1.0))
    assert high["intercept"] < -0.6 and high["mean_predicted"] > high["observed_risk"]


def test_brier_by_hand_and_unknown_labels_are_dropped_not_zero():
    s = C.calibration_stats([0.9, 0.2, 0.6, 0.5], [1, 0, np.nan, 0])
    assert s["n"] == 3 and s["n_unknown_label"] == 1 and s["events"] == 1
    assert s["brier"] == pytest.approx((0.01 + 0.04 + 0.25) / 3)
    assert s["observed_risk"] == pytest.approx(1 / 3)
    one_class = C.calibration_stats([0.2, 0.3], [0, 0])
    assert one_class["slope"] is None and one_class["brier_skill"] is None


def test_bad_inputs_are_clear_errors():
    with pytest.raises(DataError, match="one label per probability"):
        C.calibration_stats([0.1, 0.2], [1])
    with pytest.raises(DataError, match=r"probabilities in \[0, 1\]"):
        C.calibration_stats([1.7, 0.2], [1, 0])
    with pytest.raises(DataError, match="0/1 labels"):
        C.calibration_stats([0.1, 0.2], [2, 0])
    with pytest.raises(MedmixError, match="Unknown recalibration method 'beta'"):
        C.fit_calibration("beta", [0.1], [1])
    with pytest.raises(DataError, match="at least 10 validation rows"):
        C.fit_calibration("platt", [0.1, 0.9], [0, 1])


def test_logistic_fit_matches_scikit_learn():
    sk = pytest.importorskip("sklearn.linear_model")
    p, y = _cohort(n=800, seed=3, scale=1.7, shift=0.4)
    b0, b1 = C.logistic_fit(C.logit(p), y)
    ref = sk.LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(
        C.logit(p)[:, None], y)
    assert b1 == pytest.approx(float(ref.coef_[0, 0]), abs=1e-4)
    assert b0 == pytest.approx(float(ref.intercept_[0]), abs=1e-4)


def test_temperature_and_platt_recover_the_distortion_and_fix_calibration():
    val_p, val_y = _cohort(seed=1, scale=2.0)
    test_p, test_y = _cohort(seed=2, scale=2.0)
    t = C.fit_calibration("temperature", val_p, val_y)
    assert t["columns"][0]["temperature"] == pytest.approx(2.0, rel=0.1)
    plat = C.fit_calibration("platt", *_cohort(seed=1, scale=2.0, shift=1.0))
    assert plat["columns"][0]["a"] == pytest.approx(0.5, abs=0.06)
    assert plat["columns"][0]["b"] == pytest.approx(-0.5, abs=0.15)
    before = C.calibration_stats(test_p, test_y)
    after = C.calibration_stats(C.apply_calibration(test_p, t), test_y)
    assert after["ece"] < before["ece"] / 2 and abs(after["slope"] - 1) < 0.1
    # ranks are untouched by a monotone map
    assert np.array_equal(np.argsort(C.apply_calibration(test_p, t)), np.argsort(test_p))


def test_isotonic_map_equals_scikit_learn_predict():
    iso_mod = pytest.importorskip("sklearn.isotonic")
    p, y = _cohort(n=600, seed=4, shift=0.8)
    calib = C.fit_calibration("isotonic", p, y)
    ref = iso_mod.IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p, y)
    new = np.r_[np.linspace(0, 1, 101), p[:50]]
    assert C.apply_calibration(new, calib) == pytest.approx(ref.predict(new), abs=1e-12)


def test_apply_keeps_type_and_shape_and_checks_the_record(tmp_path):
    calib = C.fit_calibration("platt", *_cohort(n=300))
    probs = torch.tensor([[0.1], [0.5], [0.9]])
    out = C.apply_calibration(probs, calib)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 1) and out.dtype == torch.float32
    assert C.load_calibration(tmp_path) is None
    C.save_calibration(tmp_path, calib)
    assert C.load_calibration(tmp_path) == json.loads(json.dumps(calib))
    with pytest.raises(DataError, match="fitted for 1 output"):
        C.apply_calibration(np.zeros((3, 2)), calib)
    (tmp_path / C.CALIBRATION_FILE).write_text('{"format": "other"}')
    with pytest.raises(DataError, match="medmix-calibration"):
        C.load_calibration(tmp_path)
    (tmp_path / C.CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        C.load_calibration(tmp_path)


def test_multilabel_calibration_fits_one_map_per_label():
    a, ya = _cohort(n=500, seed=5, scale=2.0)
    b, yb = _cohort(n=500, seed=6, scale=0.5)
    calib = C.fit_calibration("temperature", np.c_[a, b], np.c_[ya, yb])
    ts = [c["temperature"] for c in calib["columns"]]
    assert ts[0] > 1.4 and ts[1] < 0.7


def test_decision_curve_and_threshold_table_by_hand():
    p = [0.9, 0.8, 0.3, 0.2, 0.1]
    y = [1, 0, 1, 0, 0]
    (row,) = C.decision_curve(p, y, [0.25])
    # flagged: 0.9 (TP), 0.8 (FP), 0.3 (TP); n = 5, odds = 1/3
    assert row["model"] == pytest.approx(2 / 5 - 1 / 5 / 3)
    assert row["treat_all"] == pytest.approx(0.4 - 0.6 / 3) and row["treat_none"] == 0
    (t,) = C.threshold_table(p, y, [0.25])
    assert (t["tp"], t["fp"], t["tn"], t["fn"]) == (2, 1, 2, 0)
    assert t["sensitivity"] == 1.0 and t["specificity"] == pytest.approx(2 / 3)
    assert t["ppv"] == pytest.approx(2 / 3) and t["npv"] == 1.0
    (none_flagged,) = C.threshold_table(p, y, [0.95])
    assert none_flagged["ppv"] is None and none_flagged["ppv_ci95"] == [None, None]
    lo, hi = C.wilson(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)


def test_threshold_parsing():
    assert C.parse_thresholds("0.3, 0.1,0.1") == [0.1, 0.3]
    for bad in ("0,0.2", "abc", "", "1.5"):
        with pytest.raises(MedmixError, match="--thresholds"):
            C.parse_thresholds(bad)


def test_subgroups_find_a_real_gap_and_flag_small_groups():
    rng = np.random.default_rng(0)
    n = 600
    y = (rng.random(n) < 0.3).astype(float)
    group = np.where(np.arange(n) < 300, "A", "B").astype(object)
    p = np.where(group == "A", np.clip(0.3 + 0.4 * (y - 0.3) + rng.normal(0, 0.2, n), 0, 1),
                 rng.random(n))  # A: informative risk, B: noise
    group[:20] = "C"  # a tiny subgroup
    sex = [None if i % 50 == 0 else ("f" if i % 2 else "m") for i in range(n)]
    y[5] = np.nan
    res = C.subgroup_metrics(p, y, {"site": list(group), "sex": sex}, n_boot=100)
    rows = {(r["attribute"], r["value"]): r for r in res["rows"]}
    assert rows[("site", "C")]["small"] and not rows[("site", "A")]["small"]
    assert 0.8 < rows[("site", "A")]["auroc"] < 0.99 and 0.35 < rows[("site", "B")]["auroc"] < 0.65
    assert ("sex", "unknown") in rows and rows[("sex", "unknown")]["n"] == 12
    assert res["n_unknown_label"] == 1 and sum(r["n"] for r in res["rows"]
                                               if r["attribute"] == "site") == n - 1
    gap = next(g for g in res["gaps"] if g["attribute"] == "site" and g["metric"] == "auroc")
    assert (gap["better"], gap["worse"]) == ("A", "B") and gap["gap_ci95"][0] > 0.2
    brier = next(g for g in res["gaps"] if g["attribute"] == "site" and g["metric"] == "brier")
    assert brier["better"] == "A" and brier["gap"] > 0  # lower Brier is better
    lo, hi = rows[("site", "A")]["auroc_ci95"]
    assert lo < rows[("site", "A")]["auroc"] < hi
    with pytest.raises(DataError, match="one value per row"):
        C.subgroup_metrics(p, y, {"site": ["A"]})


def test_missingness_groups_name_the_missing_modalities():
    mask = np.array([[1, 1, 1], [1, 0, 1], [1, 0, 0], [1, 0, 1], [0, 1, 0]], dtype=bool)
    g = C.missingness_groups(mask, ["ehr", "cxr", "note"], top=2)
    # counts: "no cxr" 2, the rest 1 each; ties keep alphabetical order
    other = C.OTHER + " (2)"
    assert g["missing modalities"] == [other, "no cxr", "no cxr, note", "no cxr", other]
    assert g["modalities present"] == ["3 of 3", "2 of 3", "1 of 3", "2 of 3", "1 of 3"]
    with pytest.raises(DataError, match=r"\[N, 3\] mask"):
        C.missingness_groups(mask[:, :2], ["ehr", "cxr", "note"])
