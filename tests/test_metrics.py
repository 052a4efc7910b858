"""Metrics against an independent numpy computation on fixed inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medmix_core.metrics import bootstrap_ci, compute_metrics, mean_std


def ref_auroc(p, y):
    # Mann-Whitney U with average ranks for ties
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p))
    sp = p[order]
    i = 0
    while i < len(p):
        j = i
        while j + 1 < len(p) and sp[j + 1] == sp[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = y == 1
    n1, n0 = pos.sum(), (~pos).sum()
    return (ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


def ref_ap(p, y):
    order = np.argsort(-p, kind="mergesort")
    y = y[order]
    tp = np.cumsum(y)
    prec = tp / np.arange(1, len(y) + 1)
    return float((prec * y).sum() / y.sum())


def ref_f1(pred, y, c):
    f = []
    for k in range(c):
        tp = ((pred == k) & (y == k)).sum()
        fp = ((pred == k) & (y != k)).sum()
        fn = ((pred != k) & (y == k)).sum()
        f.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f))


P = np.array([0.9, 0.8, 0.7, 0.65, 0.6, 0.55, 0.4, 0.3, 0.2, 0.1, 0.05, 0.7])
Y = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1])


def test_binary_metrics_match_reference():
    m = compute_metrics(torch.tensor(P)[:, None], torch.tensor(Y)[:, None].float(), "binary", 0.5)
    assert m["auroc"] == pytest.approx(ref_auroc(P, Y), abs=1e-6)
    assert m["auprc"] == pytest.approx(ref_ap(P, Y), abs=1e-6)
    pred = (P >= 0.5).astype(int)
    assert m["macro_f1"] == pytest.approx(ref_f1(pred, Y, 2), abs=1e-6)
    assert m["accuracy"] == pytest.approx((pred == Y).mean(), abs=1e-6)


def test_threshold_changes_f1_and_accuracy_only():
    a = compute_metrics(torch.tensor(P)[:, None], torch.tensor(Y)[:, None].float(), "binary", 0.5)
    b = compute_metrics(torch.tensor(P)[:, None], torch.tensor(Y)[:, None].float(), "binary", 0.75)
    assert a["auroc"] == b["auroc"] and a["accuracy"] != b["accuracy"]


def test_multilabel_label_without_positive_is_undefined_not_a_crash():
    p = np.stack([P, P[::-1], P], 1)
    y = np.stack([Y, Y, np.zeros_like(Y)], 1)
    m = compute_metrics(torch.tensor(p), torch.tensor(y).float(), "multilabel")
    assert m["undefined"] == [2]
    expect = np.mean([ref_auroc(p[:, 0], y[:, 0]), ref_auroc(p[:, 1], y[:, 1])])
    assert m["auroc"] == pytest.approx(expect, abs=1e-6)


def test_binary_split_without_positive_reports_undefined():
    m = compute_metrics(torch.tensor(P)[:, None], torch.zeros(len(P), 1), "binary")
    assert math.isnan(m["auroc"]) and math.isnan(m["auprc"]) and m["undefined"] == ["target"]
    assert m["accuracy"] == pytest.approx((P < 0.5).mean())


def test_multiclass_macro_one_vs_rest():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 3))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 3, 60)
    m = compute_metrics(torch.tensor(p), torch.tensor(y), "multiclass")
    expect = np.mean([ref_auroc(p[:, k], (y == k).astype(int)) for k in range(3)])
    assert m["auroc"] == pytest.approx(expect, abs=1e-5)
    ap = np.mean([ref_ap(p[:, k], (y == k).astype(int)) for k in range(3)])
    assert m["auprc"] == pytest.approx(ap, abs=1e-5)
    assert m["macro_f1"] == pytest.approx(ref_f1(p.argmax(1), y, 3), abs=1e-6)
    assert m["accuracy"] == pytest.approx((p.argmax(1) == y).mean(), abs=1e-6)


def test_mean_std_uses_sample_std_and_skips_nan():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2))}
    assert mean_std([1.0, float("nan")]) == {"mean": 1.0, "std": 0.0}


def test_bootstrap_ci_brackets_the_point_estimate_and_is_seeded():
    p, y = torch.tensor(P)[:, None], torch.tensor(Y)[:, None].float()
    a = bootstrap_ci(p, y, "binary", 0.5, n_boot=200, seed=1)
    b = bootstrap_ci(p, y, "binary", 0.5, n_boot=200, seed=1)
    assert a == b
    point = compute_metrics(p, y, "binary")["auroc"]
    assert a["auroc"][0] <= point <= a["auroc"][1]
