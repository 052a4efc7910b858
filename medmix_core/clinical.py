"""Clinical performance beyond AUROC: subgroups, calibration, recalibration, decision curves.

Everything here works on plain arrays of one binary risk (a probability per patient, a 0/1
label, NaN = unknown label) so it does not depend on how a run stored them. Unknown labels
are left out and counted, never read as 0.

Conventions:
    calibration slope / intercept   logistic recalibration of the outcome on logit(p)
        (Van Calster et al., J Clin Epidemiol 2019): the slope b of ``y ~ a + b logit(p)``
        (1 = ideal, < 1 = predictions too extreme) and the calibration-in-the-large
        intercept a of ``y ~ a + offset(logit p)`` (0 = ideal, < 0 = risks too high).
    net benefit   at threshold probability t: TP/n - FP/n * t / (1 - t) (Vickers & Elkin,
        Med Decis Making 2006); treat-all: prevalence - (1 - prevalence) t / (1 - t);
        treat-none: 0.
    recalibration   fitted on validation predictions, never on the test rows it is judged
        on. ``temperature``: sigmoid(logit(p) / T); ``platt``: sigmoid(a logit(p) + b);
        ``isotonic``: a monotone step map (scikit-learn's IsotonicRegression, an extra).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medmix_core.errors import DataError, MedmixError
from medmix_core.metrics import METRICS

#: file a run folder holds when recalibration was fitted (read by ``apply_calibration``)
CALIBRATION_FILE = "calibration.json"
CALIBRATION_FORMAT = "medmix-calibration"
METHODS = ("temperature", "platt", "isotonic")
#: probabilities are clipped to [EPS, 1 - EPS] before a logit
EPS = 1e-6
#: subgroups below either count are flagged "small" instead of reported as precise
MIN_SUBGROUP_N = 50
MIN_SUBGROUP_EVENTS = 10
#: label of the pooled rare missingness patterns; a mixture, so never compared in gaps
OTHER = "other patterns"
#: metrics where a lower value is better
LOWER_IS_BETTER = {"brier"}


# ----------------------------------------------------------------------------- inputs
def _binary_arrays(probs: Any, labels: Any, what: str = "predictions"
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """(p [n], y [n] of known labels, number of unknown labels dropped)."""
    p = np.asarray(probs, dtype=float).reshape(-1)
    y = np.asarray(labels, dtype=float).reshape(-1)
    if p.shape != y.shape:
        raise DataError(f"{what}: expected one label per probability, found {p.size} "
                        f"probabilities and {y.size} labels. Pass arrays of the same rows.")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        bad = int((~np.isfinite(p) | (p < 0) | (p > 1)).sum())
        raise DataError(f"{what}: expected probabilities in [0, 1], found {bad} values "
                        f"outside it (or NaN). Pass sigmoid outputs, not logits.")
    known = np.isfinite(y)
    if not np.isin(y[known], (0.0, 1.0)).all():
        raise DataError(f"{what}: expected 0/1 labels (NaN = unknown), found values "
                        f"{sorted(set(y[known].tolist()) - {0.0, 1.0})[:5]}.")
    return p[known], y[known], int((~known).sum())


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def logistic_fit(x: np.ndarray | None, y: np.ndarray, offset: np.ndarray | None = None,
                 intercept: bool = True, iters: int = 100) -> np.ndarray:
    """Maximum-likelihood logistic regression by Newton-Raphson (a handful of parameters).

    Args:
        x: ``[n]`` or ``[n, p]`` covariates, or None (intercept only).
        y: ``[n]`` 0/1 outcomes.
        offset: ``[n]`` fixed term added to the linear predictor.
        intercept: fit an intercept (first coefficient).
    Returns:
        coefficients ``[intercept, *slopes]`` (no intercept entry when ``intercept=False``).
    Raises:
        DataError: when the outcome has one class only (the fit has no finite optimum).
    """
    y = np.asarray(y, dtype=float)
    n = len(y)
    cols = [] if x is None else [np.asarray(x, float).reshape(n, -1)]
    if intercept:
        cols.insert(0, np.ones((n, 1)))
    X = np.concatenate(cols, axis=1)  # [n, q]
    if n == 0 or y.min() == y.max():
        raise DataError(f"A logistic fit needs both outcomes; found {int(y.sum())} events in "
                        f"{n} rows. Use a split with events and non-events.")
    off = np.zeros(n) if offset is None else np.asarray(offset, float)
    beta = np.zeros(X.shape[1])
    for _ in range(iters):
        mu = _sigmoid(X @ beta + off)
        grad = X.T @ (y - mu)
        hess = X.T @ (X * (mu * (1 - mu))[:, None]) + 1e-9 * np.eye(X.shape[1])
        step = np.linalg.solve(hess, grad)
        # halve the step while it lowers the likelihood (separable data, extreme offsets)
        ll = _loglik(X @ beta + off, y)
        t = 1.0
        while t > 1e-4 and _loglik(X @ (beta + t * step) + off, y) < ll - 1e-12:
            t /= 2
        beta = beta + t * step
        if np.max(np.abs(t * step)) < 1e-10:
            break
    return beta


def _loglik(eta: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(y * eta - np.logaddexp(0.0, eta)))


# ----------------------------------------------------------------------------- calibration
def reliability_bins(p: np.ndarray, y: np.ndarray, n_bins: int = 10
                     ) -> list[tuple[float, float, int]]:
    """(mean predicted, observed fraction, count) per non-empty equal-width bin."""
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    return [(float(p[idx == b].mean()), float(y[idx == b].mean()), int((idx == b).sum()))
            for b in range(n_bins) if (idx == b).any()]


def calibration_stats(probs: Any, labels: Any, n_bins: int = 10) -> dict[str, Any]:
    """Brier score, ECE, calibration slope and intercept, observed and expected risk.

    Args:
        probs: ``[n]`` predicted risks.
        labels: ``[n]`` 0/1 outcomes, NaN = unknown (left out, counted).
        n_bins: equal-width bins of the ECE.
    Returns:
        {"n", "n_unknown_label", "events", "observed_risk", "mean_predicted", "brier",
        "brier_skill" (1 - Brier / Brier of the prevalence), "ece", "slope", "intercept",
        "bins"}; slope and intercept are None when the outcome has one class only.
    """
    p, y, unknown = _binary_arrays(probs, labels)
    out: dict[str, Any] = {"n": int(len(p)), "n_unknown_label": unknown,
                           "events": int(y.sum())}
    if len(p) == 0:
        return {**out, **dict.fromkeys(("observed_risk", "mean_predicted", "brier",
                                         "brier_skill", "ece", "slope", "intercept")),
                "bins": []}
    bins = reliability_bins(p, y, n_bins)
    brier = float(np.mean((p - y) ** 2))
    prev = float(y.mean())
    ref = prev * (1 - prev)
    out.update(observed_risk=prev, mean_predicted=float(p.mean()), brier=brier,
               brier_skill=(1 - brier / ref) if ref > 0 else None,
               ece=float(sum(c / len(p) * abs(o - m) for m, o, c in bins)), bins=bins)
    z = logit(p)
    try:
        out["slope"] = float(logistic_fit(z, y)[1])
        out["intercept"] = float(logistic_fit(None, y, offset=z)[0])
    except DataError:
        out["slope"] = out["intercept"] = None
    return out


# ----------------------------------------------------------------------------- recalibration
def fit_calibration(method: str, probs: Any, labels: Any) -> dict[str, Any]:
    """Fit a post-hoc recalibration map on (validation) predictions.

    Args:
        method: "temperature", "platt" or "isotonic".
        probs: ``[n]`` or ``[n, C]`` predicted risks (one map per column: multi-label).
        labels: same shape, 0/1, NaN = unknown.
    Returns:
        the calibration record (see :func:`apply_calibration`), JSON-serialisable.
    """
    if method not in METHODS:
        raise MedmixError(f"Unknown recalibration method {method!r}; expected one of "
                          f"{', '.join(METHODS)}.")
    P = np.asarray(probs, float)
    Y = np.asarray(labels, float)
    P2, Y2 = P.reshape(len(P), -1), Y.reshape(len(Y), -1)
    if P2.shape != Y2.shape:
        raise DataError(f"fit_calibration: probabilities {list(P2.shape)} and labels "
                        f"{list(Y2.shape)} differ in shape; pass one label per probability.")
    columns = []
    for c in range(P2.shape[1]):
        p, y, unknown = _binary_arrays(P2[:, c], Y2[:, c], f"calibration column {c}")
        if len(p) < 10 or y.min() == y.max():
            raise DataError(f"Recalibration column {c}: expected at least 10 validation rows "
                            f"with both outcomes, found {len(p)} rows and {int(y.sum())} "
                            f"events. Recalibrate on a larger validation split.")
        z = logit(p)
        if method == "temperature":
            inv_t = float(logistic_fit(z, y, intercept=False)[0])
            if inv_t <= 0:
                raise DataError(f"Temperature scaling on column {c} found no positive "
                                f"temperature (the predictions rank patients backwards); "
                                f"use --recalibrate platt or isotonic.")
            params: dict[str, Any] = {"temperature": 1.0 / inv_t}
        elif method == "platt":
            b, a = logistic_fit(z, y)
            params = {"a": float(a), "b": float(b)}
        else:
            try:
                from sklearn.isotonic import IsotonicRegression
            except ImportError as exc:
                raise MedmixError("Isotonic recalibration needs scikit-learn: pip install "
                                  "'medmix[clinical]' (or use temperature / platt).") from exc
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
            params = {"x": [float(v) for v in iso.X_thresholds_],
                      "y": [float(v) for v in iso.y_thresholds_]}
        columns.append({**params, "n": int(len(p)), "events": int(y.sum()),
                        "n_unknown_label": unknown})
    return {"format": CALIBRATION_FORMAT, "version": 1, "method": method,
            "n_outputs": P2.shape[1], "columns": columns}


def apply_calibration(probs: Any, calib: dict[str, Any]) -> Any:
    """Recalibrated probabilities, same shape and type (numpy or torch) as ``probs``.

    Args:
        probs: ``[N]`` or ``[N, C]`` probabilities (the mean over seeds, as fitted).
        calib: a record from :func:`fit_calibration` or :func:`load_calibration`.
    """
    _check_record(calib)
    is_torch = type(probs).__module__.startswith("torch")
    arr = probs.detach().cpu().double().numpy() if is_torch else np.asarray(probs, float)
    P = arr.reshape(len(arr), -1)
    if P.shape[1] != calib["n_outputs"]:
        raise DataError(f"Calibration fitted for {calib['n_outputs']} output(s), applied to "
                        f"{P.shape[1]}. Use the calibration.json of the same run.")
    out = np.empty_like(P)
    for c, prm in enumerate(calib["columns"]):
        z = logit(P[:, c])
        if calib["method"] == "temperature":
            out[:, c] = _sigmoid(z / prm["temperature"])
        elif calib["method"] == "platt":
            out[:, c] = _sigmoid(prm["a"] * z + prm["b"])
        else:  # the map IsotonicRegression.predict applies (linear between thresholds)
            out[:, c] = np.interp(np.clip(P[:, c], prm["x"][0], prm["x"][-1]), prm["x"], prm["y"])
    out = out.reshape(arr.shape)
    if is_torch:
        import torch

        return torch.as_tensor(out, dtype=probs.dtype)
    return out


def _check_record(calib: Any, where: str = "calibration record") -> None:
    ok = (isinstance(calib, dict) and calib.get("format") == CALIBRATION_FORMAT
          and calib.get("method") in METHODS and isinstance(calib.get("columns"), list)
          and len(calib["columns"]) == calib.get("n_outputs"))
    if not ok:
        raise DataError(f"{where}: expected a {CALIBRATION_FORMAT!r} record with a method in "
                        f"{METHODS} and one parameter set per output; found "
                        f"{str(calib)[:120]!r}. Re-create it with `medmix report RUN "
                        f"--recalibrate METHOD`.")


def save_calibration(run_dir: str | Path, calib: dict[str, Any]) -> Path:
    """Write ``calibration.json`` into a run folder (atomically)."""
    from medmix_core.store import atomic_write_text

    _check_record(calib)
    path = Path(run_dir) / CALIBRATION_FILE
    atomic_write_text(path, json.dumps(calib, indent=1))
    return path


def load_calibration(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's fitted recalibration, or None when it has none."""
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        calib = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); delete it and re-run `medmix "
                        f"report RUN --recalibrate METHOD`.") from exc
    _check_record(calib, str(path))
    return calib


# ----------------------------------------------------------------------------- decisions
def parse_thresholds(text: str | Sequence[float]) -> list[float]:
    """``"0.1,0.2"`` -> [0.1, 0.2]; every value strictly between 0 and 1."""
    items = [x.strip() for x in text.split(",") if x.strip()] if isinstance(text, str) \
        else list(text)
    try:
        vals = [float(x) for x in items]
    except ValueError as exc:
        raise MedmixError(f"--thresholds {text!r}: expected comma-separated probabilities "
                          f"such as 0.1,0.2,0.3.") from exc
    bad = [v for v in vals if not 0 < v < 1]
    if not vals or bad:
        raise MedmixError(f"--thresholds {text!r}: expected probabilities strictly between 0 "
                          f"and 1, found {bad or 'none'}.")
    return sorted(set(vals))


def decision_curve(probs: Any, labels: Any,
                   thresholds: Sequence[float] | None = None) -> list[dict[str, float]]:
    """Net benefit of the model, treat-all and treat-none at each threshold probability.

    Returns:
        one row per threshold: {"threshold", "model", "treat_all", "treat_none", "tp", "fp"}.
    """
    p, y, _ = _binary_arrays(probs, labels)
    ts = np.round(np.arange(0.01, 1.0, 0.01), 2) if thresholds is None else thresholds
    n, prev = len(p), float(y.mean()) if len(y) else math.nan
    rows = []
    for t in ts:
        odds = t / (1 - t)
        flag = p >= t
        tp, fp = int((flag & (y == 1)).sum()), int((flag & (y == 0)).sum())
        rows.append({"threshold": float(t), "model": tp / n - fp / n * odds if n else math.nan,
                     "treat_all": prev - (1 - prev) * odds, "treat_none": 0.0,
                     "tp": tp, "fp": fp})
    return rows


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float | None, float | None]:
    """Wilson score 95% interval of a proportion k / n; (None, None) when n = 0."""
    if n == 0:
        return None, None
    ph = k / n
    den = 1 + z * z / n
    mid = (ph + z * z / (2 * n)) / den
    half = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def threshold_table(probs: Any, labels: Any, thresholds: Sequence[float]
                    ) -> list[dict[str, Any]]:
    """Sensitivity, specificity, PPV, NPV (Wilson 95% CIs) and net benefit per threshold.

    A rate whose denominator is empty (no one flagged: PPV) is None, not 0.
    """
    p, y, _ = _binary_arrays(probs, labels)
    rows = []
    for t in thresholds:
        flag = p >= t
        tp = int((flag & (y == 1)).sum())
        fp = int((flag & (y == 0)).sum())
        fn = int((~flag & (y == 1)).sum())
        tn = int((~flag & (y == 0)).sum())
        row: dict[str, Any] = {"threshold": float(t), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
                               "flagged": tp + fp, "n": len(p)}
        for name, k, d in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                           ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
            row[name] = k / d if d else None
            row[f"{name}_ci95"] = list(wilson(k, d))
        row["net_benefit"] = (tp - fp * t / (1 - t)) / len(p) if len(p) else None
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- subgroups
def missingness_groups(modality_mask: Any, modalities: Sequence[str],
                       top: int = 6) -> dict[str, list[str]]:
    """Subgroups by missingness: the set of missing modalities, and how many are present.

    Args:
        modality_mask: ``[N, M]`` bool, True = modality available.
        modalities: the M names.
        top: the most frequent patterns keep their own group; the rest share one.
    Returns:
        {"missing modalities": [label per row], "modalities present": ["k of M" per row]}
    """
    a = np.asarray(modality_mask, dtype=bool)
    if a.ndim != 2 or a.shape[1] != len(modalities):
        raise DataError(f"missingness_groups: expected a [N, {len(modalities)}] mask, found "
                        f"{list(a.shape)}.")
    labels = ["none missing" if r.all() else "no " + ", ".join(
        m for m, v in zip(modalities, r) if not v) for r in a]
    names, counts = np.unique(labels, return_counts=True)
    keep = set(names[np.argsort(-counts, kind="stable")[:top]].tolist())
    rest = len(names) - len(keep)
    other = f"{OTHER} ({rest})"
    return {"missing modalities": [lab if lab in keep else other for lab in labels],
            "modalities present": [f"{int(r.sum())} of {len(modalities)}" for r in a]}


def _auroc(p: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUROC with mid-ranks for ties (equals the trapezoidal ROC area)."""
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return math.nan
    order = np.argsort(p, kind="mergesort")
    ps = p[order]
    ranks = np.empty(len(p))
    # mid-rank of each run of tied scores
    starts = np.r_[0, np.flatnonzero(np.diff(ps)) + 1]
    ends = np.r_[starts[1:], len(ps)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _average_precision(p: np.ndarray, y: np.ndarray) -> float:
    """Step-wise average precision, sum_t (R_t - R_t-1) P_t over distinct thresholds."""
    pos = int(y.sum())
    if pos == 0:
        return math.nan
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]  # last row of each tie run
    tp = np.cumsum(ys)[last]
    prec = tp / (last + 1)
    rec = tp / pos
    return float(np.sum(np.diff(np.r_[0.0, rec]) * prec))


def _metric_row(p: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, float]:
    """The headline metrics of :mod:`medmix_core.metrics` (binary), plus Brier and risks.

    Computed in numpy (the bootstrap calls it thousands of times); the tests check it
    against :func:`medmix_core.metrics.compute_metrics`.
    """
    n = len(p)
    if n == 0:
        return dict.fromkeys(SUBGROUP_METRICS, math.nan)
    pred = p >= threshold
    pos = y == 1
    f1 = []
    for c_pred, c_true in ((pred, pos), (~pred, ~pos)):
        tp = float((c_pred & c_true).sum())
        den = float(c_pred.sum() + c_true.sum())
        f1.append(2 * tp / den if den else 0.0)
    return {"auroc": _auroc(p, y), "auprc": _average_precision(p, y),
            "macro_f1": float(np.mean(f1)), "accuracy": float((pred == pos).mean()),
            "brier": float(np.mean((p - y) ** 2)), "observed_risk": float(y.mean()),
            "mean_predicted": float(p.mean())}


SUBGROUP_METRICS = (*METRICS, "brier", "observed_risk", "mean_predicted")


def subgroup_metrics(probs: Any, labels: Any, groups: dict[str, Sequence[str | None]],
                     threshold: float = 0.5, n_boot: int = 200, seed: int = 0,
                     level: float = 0.95, min_n: int = MIN_SUBGROUP_N,
                     min_events: int = MIN_SUBGROUP_EVENTS) -> dict[str, Any]:
    """Metrics with percentile-bootstrap CIs per subgroup, and the gap between subgroups.

    Each subgroup is resampled on its own (a stratified bootstrap), so the difference of two
    subgroups' draws is a draw of their gap. A row with an unknown attribute (None) forms
    the group "unknown"; a row with an unknown label is left out and counted.

    Args:
        probs: ``[n]`` predicted risks of the rows.
        labels: ``[n]`` 0/1, NaN = unknown.
        groups: attribute name -> one value per row (str or None).
        threshold: decision threshold for macro-F1 and accuracy.
        n_boot: bootstrap resamples per subgroup.
        seed: seeds the resampling.
        min_n / min_events: a subgroup with fewer rows, or fewer events or non-events, is
            flagged ``small``: its interval is reported, and it is left out of the gaps
            (as are "unknown" and the pooled rare patterns, which are no population).
    Returns:
        {"rows": [{"attribute", "value", "n", "events", "small", <metric>: float,
        "<metric>_ci95": [lo, hi]}], "gaps": [{"attribute", "metric", "better", "worse",
        "gap" (>= 0, how much better), "gap_ci95"}], "n_unknown_label", "settings"}
    """
    p_all = np.asarray(probs, float).reshape(-1)
    y_all = np.asarray(labels, float).reshape(-1)
    _binary_arrays(p_all, y_all, "subgroup predictions")  # validates, raises on bad input
    known = np.isfinite(y_all)
    rng = np.random.default_rng(seed)
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    rows, gaps = [], []
    for attr, values in groups.items():
        vals = ["unknown" if v is None else str(v) for v in values]
        if len(vals) != len(p_all):
            raise DataError(f"Subgroup attribute {attr!r}: expected one value per row "
                            f"({len(p_all)}), found {len(vals)}. Pass row-aligned values.")
        draws: dict[str, dict[str, np.ndarray]] = {}
        attr_rows = []
        for v in sorted(set(vals), key=lambda s: (s == "unknown", s)):
            sel = np.array([x == v for x in vals]) & known
            p, y = p_all[sel], y_all[sel]
            ev = int(y.sum())
            row: dict[str, Any] = {"attribute": attr, "value": v, "n": int(sel.sum()),
                                   "events": ev,
                                   "small": bool(len(y) < min_n or min(ev, len(y) - ev)
                                                 < min_events)}
            row.update(_metric_row(p, y, threshold))
            d = {k: np.full(n_boot, np.nan) for k in SUBGROUP_METRICS}
            if len(p):
                for b in range(n_boot):
                    idx = rng.integers(0, len(p), len(p))
                    for k, val in _metric_row(p[idx], y[idx], threshold).items():
                        d[k][b] = val
            for k in SUBGROUP_METRICS:
                row[f"{k}_ci95"] = _pct(d[k], lo_q, hi_q)
            draws[v] = d
            attr_rows.append(row)
        rows += attr_rows
        ok = [r for r in attr_rows if not r["small"] and r["value"] != "unknown"
              and not r["value"].startswith(OTHER)]
        for k in (*METRICS, "brier"):
            cand = [r for r in ok if not math.isnan(r[k])]
            if len(cand) < 2:
                continue
            sign = -1.0 if k in LOWER_IS_BETTER else 1.0
            best = max(cand, key=lambda r: sign * r[k])
            worst = min(cand, key=lambda r: sign * r[k])
            diff = sign * (draws[best["value"]][k] - draws[worst["value"]][k])
            gaps.append({"attribute": attr, "metric": k, "better": best["value"],
                         "worse": worst["value"], "gap": sign * (best[k] - worst[k]),
                         "gap_ci95": _pct(diff, lo_q, hi_q)})
    return {"rows": rows, "gaps": gaps, "n_unknown_label": int((~known).sum()),
            "settings": {"resamples": n_boot, "seed": seed, "level": level, "min_n": min_n,
                         "min_events": min_events, "threshold": threshold,
                         "bootstrap": "stratified by subgroup, percentile interval"}}


def _pct(x: np.ndarray, lo: float, hi: float) -> list[float | None]:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return [None, None]
    return [float(np.percentile(x, lo)), float(np.percentile(x, hi))]
