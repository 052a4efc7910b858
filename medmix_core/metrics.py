"""Test metrics: AUROC, AUPRC (average precision), macro-F1 and accuracy (torchmetrics).

Conventions, stated in every results file:
    binary      probabilities p = sigmoid(logit); prediction p >= threshold; macro-F1 is
                the mean of the F1 of the positive and the negative class.
    multilabel  per label as binary, then the macro mean over labels; a label with no
                positive (or no negative) in the split has an undefined AUROC/AUPRC: it is
                left out of the mean and listed under ``undefined``.
    multiclass  softmax probabilities; one-vs-rest macro AUROC/AUPRC; argmax prediction.
A metric undefined for the whole split is NaN (JSON null), never a crash.
Unknown labels (NaN; -1 for a multi-class index) are left out of every metric: ``n`` counts
the rows with a known label, ``n_unknown`` the rows left out.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_average_precision,
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_average_precision,
    multiclass_f1_score,
)

METRICS = ("auroc", "auprc", "macro_f1", "accuracy")


def probabilities(logits: torch.Tensor, task_type: str) -> torch.Tensor:
    """Logits [N, C] -> probabilities [N, C]."""
    if task_type == "multiclass":
        return torch.softmax(logits.float(), dim=-1)
    return torch.sigmoid(logits.float())


def _binary(p: torch.Tensor, y: torch.Tensor, thr: float) -> dict[str, float]:
    known = ~torch.isnan(y.float())
    p, y = p[known], y[known].long()
    if len(y) == 0:
        return {k: math.nan for k in METRICS}
    pos = int(y.sum())
    defined = 0 < pos < len(y)
    pred = (p >= thr).long()
    return {
        "auroc": float(binary_auroc(p, y)) if defined else math.nan,
        "auprc": float(binary_average_precision(p, y)) if pos > 0 else math.nan,
        "macro_f1": float(multiclass_f1_score(pred, y, num_classes=2, average="macro")),
        "accuracy": float(binary_accuracy(pred, y)),
    }


def compute_metrics(probs: torch.Tensor, labels: torch.Tensor, task_type: str,
                    threshold: float = 0.5) -> dict[str, object]:
    """Metrics of one split.

    Args:
        probs: [N, C] probabilities (C = 1 for binary).
        labels: [N, C] 0/1 (binary, multilabel) or [N] class index (multiclass).
        task_type: "binary" | "multilabel" | "multiclass".
        threshold: decision threshold for binary and multilabel.
    Returns:
        {"auroc", "auprc", "macro_f1", "accuracy": float (NaN if undefined),
         "undefined": [labels left out], "n": N, "threshold": threshold}
    """
    probs, labels = probs.detach().cpu().float(), labels.detach().cpu()
    if task_type == "multiclass":
        lab = labels.reshape(-1)
        row_known = (lab >= 0) & ~torch.isnan(lab.float())
        probs, labels = probs[row_known], lab[row_known].long()
    else:
        row_known = ~torch.isnan(labels.float().reshape(len(labels), -1)).all(dim=1)
    n_known = int(row_known.sum())
    out: dict[str, object] = {"n": n_known, "n_unknown": int(len(row_known)) - n_known,
                              "threshold": threshold, "undefined": []}
    if n_known == 0:
        out.update({k: math.nan for k in METRICS})
        out["undefined"] = ["no known label"]
        return out
    if task_type == "binary":
        out.update(_binary(probs[:, 0], labels.reshape(-1), threshold))
        if math.isnan(out["auroc"]):
            out["undefined"] = ["target"]
    elif task_type == "multilabel":
        per = [_binary(probs[:, c], labels[:, c], threshold) for c in range(probs.shape[1])]
        out["undefined"] = [c for c, r in enumerate(per) if math.isnan(r["auroc"])]
        for k in METRICS:
            vals = [r[k] for r in per if not math.isnan(r[k])]
            out[k] = float(np.mean(vals)) if vals else math.nan
        out["per_label"] = per
    elif task_type == "multiclass":
        y = labels.reshape(-1).long()
        c = probs.shape[1]
        present = torch.bincount(y, minlength=c) > 0
        out["undefined"] = [i for i in range(c) if not present[i]]
        auroc = multiclass_auroc(probs, y, num_classes=c, average="none")
        ap = multiclass_average_precision(probs, y, num_classes=c, average="none")
        out["auroc"] = float(auroc[present].mean()) if present.any() else math.nan
        out["auprc"] = float(ap[present].mean()) if present.any() else math.nan
        pred = probs.argmax(1)
        out["macro_f1"] = float(multiclass_f1_score(pred, y, num_classes=c, average="macro"))
        out["accuracy"] = float(multiclass_accuracy(pred, y, num_classes=c, average="micro"))
    else:
        raise ValueError(f"task_type must be binary, multilabel or multiclass, got {task_type!r}")
    return out


def best_threshold(probs: torch.Tensor, labels: torch.Tensor, task_type: str) -> float:
    """Threshold in [0.05, 0.95] maximising macro-F1 on (validation) data."""
    if task_type == "multiclass":
        return 0.5
    grid = np.linspace(0.05, 0.95, 91)
    scores = [float(compute_metrics(probs, labels, task_type, float(t))["macro_f1"]) for t in grid]
    return float(grid[int(np.nanargmax(scores))])


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample std (ddof=1; 0 for one value) ignoring NaN."""
    arr = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return {"mean": math.nan, "std": math.nan}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0}


def bootstrap_ci(probs: torch.Tensor, labels: torch.Tensor, task_type: str, threshold: float,
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap CIs of every metric (resampling samples with replacement)."""
    rng = np.random.default_rng(seed)
    n = len(probs)
    draws: dict[str, list[float]] = {k: [] for k in METRICS}
    for _ in range(n_boot):
        idx = torch.as_tensor(rng.integers(0, n, n))
        m = compute_metrics(probs[idx], labels[idx], task_type, threshold)
        for k in METRICS:
            draws[k].append(m[k])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: [float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi))]
            for k, v in draws.items()}
