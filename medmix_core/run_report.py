"""``medmix report`` for a run folder: metrics with CIs, calibration and recalibration,
decision curves, subgroups, fusion weights and a model card, rendered for clinicians and
reviewers. (Sweep folders and the console tables are :mod:`medmix_core.report`.)
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medmix_core.errors import DataError, MedmixError
from medmix_core.metrics import METRICS
from medmix_core.report import LABELS, _fmt
from medmix_core.store import atomic_write_text


def expected_calibration_error(probs, labels, n_bins: int = 10):
    """ECE with equal-width bins: sum_b |B|/N * |mean(y in B) - mean(p in B)|.

    Returns:
        (ece, bins) where bins lists (mean_prob, frac_positive, count) per non-empty bin.
    """
    import numpy as np

    p, y = np.asarray(probs, float), np.asarray(labels, float)
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    ece, bins = 0.0, []
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            bins.append((float(p[sel].mean()), float(y[sel].mean()), int(sel.sum())))
            ece += sel.mean() * abs(y[sel].mean() - p[sel].mean())
    return float(ece), bins


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------- the run's predictions
@dataclass
class RunFiles:
    """What a run folder holds, read once: config, metrics, test predictions, its store.

    Attributes:
        ids: test sample ids, in predictions.csv order.
        probs: ``[N, C]`` mean probability over seeds (as ``medmix run`` wrote it).
        labels: ``[N, C]`` 0/1 (or class index), NaN = unknown.
        store: the run's EmbeddingStore, or None when it cannot be opened (``store_error``).
    """

    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any]
    ids: list[str]
    probs: Any
    labels: Any
    store: Any = None
    store_error: str | None = None

    @property
    def binary(self) -> bool:
        return self.metrics.get("task_type") == "binary"

    @property
    def threshold(self) -> float:
        info = self.metrics.get("seed_info") or []
        return sum(s["threshold"] for s in info) / len(info) if info else 0.5

    def seeds(self) -> list[Path]:
        from medmix_core.runs import RunFolder

        return RunFolder(self.path).finished_seeds()

    def store_rows(self) -> Any:
        """Store row of every test id, ``[N]``."""
        import numpy as np

        where = {s: i for i, s in enumerate(self.store.sample_ids)}
        missing = [s for s in self.ids if s not in where]
        if missing:
            raise DataError(f"{self.path / 'predictions.csv'}: {len(missing)} sample ids (e.g. "
                            f"{missing[0]!r}) are not in store {self.store.path}; the store "
                            f"changed after the run. Re-run `medmix run` on it.")
        return np.array([where[s] for s in self.ids], dtype=int)


def read_run(path: str | Path) -> RunFiles:
    """Read a run folder's config, metrics and test predictions, and open its store."""
    import numpy as np

    from medmix_core.runs import open_run
    from medmix_core.store import EmbeddingStore

    path = Path(path)
    open_run(path)  # an incomplete run is refused, with how to finish it
    for name in ("metrics.json", "config.json", "predictions.csv"):
        if not (path / name).is_file():
            raise MedmixError(f"{path} lacks {name}: expected a folder written by `medmix run` "
                              f"(metrics.json, config.json, predictions.csv).")
    metrics = json.loads((path / "metrics.json").read_text("utf-8"))
    cfg = json.loads((path / "config.json").read_text("utf-8"))
    with open(path / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    head = list(rows[0]) if rows else []
    pcols = ["prob"] if "prob" in head else sorted(
        (c for c in head if c.startswith("prob_") and c[5:].isdigit()), key=lambda c: int(c[5:]))
    lcols = ["label"] if "label" in head else sorted(
        (c for c in head if c.startswith("label_")), key=lambda c: int(c[6:]))
    if rows and (not pcols or not lcols):
        raise DataError(f"{path / 'predictions.csv'}: expected prob/label columns, found "
                        f"{head[:8]}. Re-run `medmix run` to rewrite it.")
    probs = np.array([[float(r[c]) for c in pcols] for r in rows], dtype=float)
    labels = np.array([[float(r[c]) if r[c] != "" else np.nan for c in lcols] for r in rows],
                      dtype=float)
    run = RunFiles(path, metrics, cfg, [r["sample_id"] for r in rows],
                   probs.reshape(len(rows), -1), labels.reshape(len(rows), -1))
    if cfg.get("store"):
        try:
            run.store = EmbeddingStore.open(cfg["store"])
        except MedmixError as exc:  # moved store: the tables that need only the CSV stand
            run.store_error = str(exc)
    else:
        run.store_error = "the run's config names no store"
    return run


def ensemble_predict(run: RunFiles, rows: Any) -> dict[str, Any]:
    """Mean over the run's seeds of probabilities and fusion weights on store ``rows``.

    Returns:
        {"probs": [N, C], "modality_weights": [N, M] or absent, "router_weights":
        [N, M, K] or absent, "modality_mask": [N, M], "spec": FusionSpec} (torch tensors).
    """
    import torch

    from medmix_core.batch import StoreTensors
    from medmix_core.runner import load_model
    from medmix_core.training import predict_rows

    if run.store is None:
        raise MedmixError(f"Store of {run.path} unavailable ({run.store_error}); predictions "
                          f"beyond predictions.csv need it. Pass the run's store back in place.")
    models = [load_model(s)[0] for s in run.seeds()]
    if not models:
        raise MedmixError(f"{run.path} holds no seed_*/model.json; it is not a finished run.")
    spec = models[0].spec
    if models[0].uses_teacher_at_inference:
        raise MedmixError(f"Fuser {run.metrics['fuser']!r} reads teacher embeddings at "
                          f"inference; its predictions cannot be recomputed from experts only.")
    tensors = StoreTensors.from_store(run.store, run.metrics.get("task"),
                                      sorted({n for v in spec.experts.values() for n in v}))
    tensors.modalities = [m for m in tensors.modalities if m in spec.modalities]
    idx = torch.as_tensor(rows, dtype=torch.long)
    outs = [predict_rows(m, tensors, idx, torch.device("cpu")) for m in models]
    res: dict[str, Any] = {"probs": torch.stack([o["probs"] for o in outs]).mean(0),
                           "modality_mask": tensors.modality_mask()[idx], "spec": spec,
                           "tensors": tensors}
    for k in ("modality_weights", "router_weights"):
        if k in outs[0]:
            res[k] = torch.stack([o[k] for o in outs]).mean(0)
    res["labels"] = torch.where(tensors.label_mask[idx].reshape(-1, 1),
                                tensors.labels[idx].reshape(len(idx), -1).float(),
                                torch.tensor(float("nan")))
    return res


# ---------------------------------------------------------------- clinical sections
DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.5)
#: thresholds of the decision-curve table (the plot uses every 0.01)
DCA_TABLE = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


def _f(x: Any, nd: int = 3) -> str:
    return "undefined" if x is None or (isinstance(x, float) and math.isnan(x)) \
        else f"{x:.{nd}f}"


def _ci(ci: list | None, nd: int = 3) -> str:
    return "undefined" if not ci or ci[0] is None else f"[{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"


def _calibration_section(run: RunFiles, recalibrate: str | None, lines: list[str],
                         clin: dict[str, Any]) -> Any:
    """Calibration statistics and reliability diagram; fits recalibration when asked.

    Returns:
        the deployed test probabilities ``[N]`` (recalibrated when a calibration is in force).
    """
    from medmix_core import clinical as C

    p, y = run.probs[:, 0], run.labels[:, 0]
    calib = None
    if recalibrate == "none":
        (run.path / C.CALIBRATION_FILE).unlink(missing_ok=True)
    elif recalibrate is not None:
        if recalibrate not in C.METHODS:
            raise MedmixError(f"--recalibrate {recalibrate!r}: expected one of "
                              f"{', '.join(C.METHODS)} or none.")
        if run.store is None:
            raise MedmixError(f"--recalibrate fits on the validation split, which needs the "
                              f"run's store; it is unavailable ({run.store_error}).")
        val = ensemble_predict(run, run.store.splits.get("val", []))
        calib = C.fit_calibration(recalibrate, val["probs"].numpy(), val["labels"].numpy())
        calib["fitted_on"] = {"split": "val", "of": "mean probability over seeds",
                              "seeds": run.metrics.get("seeds")}
        C.save_calibration(run.path, calib)
    else:
        calib = C.load_calibration(run.path)
    before = C.calibration_stats(p, y)
    clin["calibration"] = {"before": before}
    cols = [("raw model", before)]
    p_cal = p
    if calib is not None:
        p_cal = C.apply_calibration(p, calib)
        after = C.calibration_stats(p_cal, y)
        clin["calibration"].update(after=after, method=calib["method"],
                                   params=calib["columns"][0])
        cols.append((f"after {calib['method']} (fitted on validation)", after))
    lines += ["## Calibration", "",
              "| Test | Brier | Brier skill | ECE | slope | intercept | observed risk | mean "
              "predicted |", "|---|---|---|---|---|---|---|---|"]
    for name, s in cols:
        lines.append(f"| {name} | {_f(s['brier'])} | {_f(s['brier_skill'])} | {_f(s['ece'])} | "
                     f"{_f(s['slope'], 2)} | {_f(s['intercept'], 2)} | "
                     f"{_f(s['observed_risk'])} | {_f(s['mean_predicted'])} |")
    lines += ["", f"n = {before['n']} test patients with a known outcome ({before['events']} "
              f"events; {before['n_unknown_label']} with an unknown outcome left out). Slope "
              f"and intercept: logistic recalibration of the outcome on logit(p); ideal 1 and "
              f"0. A slope below 1 means risks too extreme, an intercept below 0 risks too "
              f"high on average. ECE: 10 equal-width bins. A run trained with `pos_weight` (the "
              f"default for binary tasks) over-predicts by design: weighting positives by "
              f"n_neg/n_pos shifts the logits by about log(n_neg/n_pos), which ranks (AUROC, "
              f"AUPRC) ignore and recalibration undoes."]
    if calib is not None:
        prm = {k: v for k, v in calib["columns"][0].items() if k not in ("x", "y")}
        lines += ["", f"Recalibration `{calib['method']}` fitted on {prm.get('n')} validation "
                  f"patients ({prm.get('events')} events), mean probability over seeds, saved "
                  f"to `calibration.json`; `medmix predict` applies it. Parameters: "
                  + ", ".join(f"{k} = {v:.4g}" for k, v in prm.items()
                              if k in ("temperature", "a", "b"))
                  + (f"{len(calib['columns'][0]['x'])} isotonic steps"
                     if calib["method"] == "isotonic" else "") + "."]
    try:
        plt = _plt()
    except ImportError:
        lines += ["", "_Plots need matplotlib: pip install 'medmix[plots]'._", ""]
        return p_cal
    from medmix_core.sweep import atomic_savefig

    fig, ax = plt.subplots(figsize=(4.8, 4.6), dpi=110)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for j, (name, s) in enumerate(cols):
        b = s["bins"]
        ax.plot([x[0] for x in b], [x[1] for x in b], "o-" if j == 0 else "s-", color=f"C{j}",
                label=f"{name}: ECE {_f(s['ece'])}, slope {_f(s['slope'], 2)}")
        if j == len(cols) - 1:
            for x in b:
                ax.annotate(str(x[2]), (x[0], x[1]), fontsize=6, xytext=(3, -8),
                            textcoords="offset points")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability (bin)")
    ax.set_ylabel("observed positive fraction")
    ax.set_title(f"Reliability (test, n = {before['n']})", fontsize=10)
    ax.legend(fontsize=6.5, loc="upper left")
    fig.tight_layout()
    atomic_savefig(fig, run.path / "reliability.png")
    plt.close(fig)
    lines += ["", "Numbers beside the points are bin counts.", "",
              "![reliability](reliability.png)", ""]
    return p_cal


def _decision_section(run: RunFiles, p: Any, thresholds: list[float], lines: list[str],
                      clin: dict[str, Any], recalibrated: bool) -> None:
    from medmix_core import clinical as C

    y = run.labels[:, 0]
    which = "recalibrated" if recalibrated else "model"
    curve = C.decision_curve(p, y)
    raw_curve = C.decision_curve(run.probs[:, 0], y) if recalibrated else None
    table = C.threshold_table(p, y, thresholds)
    clin["decision_curve"] = curve
    clin["thresholds"] = table
    at = {round(r["threshold"], 2): r for r in curve}
    lines += ["## Decision curve", "",
              f"Net benefit of acting on the {which} risk at threshold probability t "
              f"(TP/n − FP/n · t/(1−t)), against treating everyone and no one. A model is "
              f"useful at t where its curve lies above both.", "",
              "| threshold | model | treat all | treat none |", "|---|---|---|---|"]
    for t in DCA_TABLE:
        r = at[round(t, 2)]
        lines.append(f"| {t:.2f} | {r['model']:.4f} | {r['treat_all']:.4f} | 0 |")
    lines += ["", "### At stated thresholds", "",
              f"The {which} risk ≥ threshold counts as positive. 95% Wilson intervals.", "",
              "| threshold | flagged | sensitivity | specificity | PPV | NPV | net benefit |",
              "|---|---|---|---|---|---|---|"]
    for r in table:
        cells = [f"{_f(r[k])} {_ci(r[f'{k}_ci95'], 2)}" if r[k] is not None else "undefined"
                 for k in ("sensitivity", "specificity", "ppv", "npv")]
        lines.append(f"| {r['threshold']:.2f} | {r['flagged']} of {r['n']} | "
                     + " | ".join(cells) + f" | {_f(r['net_benefit'], 4)} |")
    lines.append("")
    _write_csv(run.path / "decision_curve.csv", curve)
    _write_csv(run.path / "thresholds.csv", [
        {k: (v if not isinstance(v, list) else ";".join("" if x is None else f"{x:.4f}"
                                                        for x in v)) for k, v in r.items()}
        for r in table])
    try:
        plt = _plt()
    except ImportError:
        return
    from medmix_core.sweep import atomic_savefig

    ts = [r["threshold"] for r in curve]
    prev = float((y[~_isnan(y)]).mean())
    fig, ax = plt.subplots(figsize=(5.6, 4), dpi=110)
    ax.plot(ts, [r["model"] for r in curve], color="C0", lw=2, label=which)
    if raw_curve is not None:
        ax.plot(ts, [r["model"] for r in raw_curve], color="C0", lw=1, ls=":",
                label="model before recalibration")
    ax.plot(ts, [r["treat_all"] for r in curve], color="C1", lw=1.2, label="treat all")
    ax.axhline(0, color="k", lw=1, label="treat none")
    ax.set_xlim(0, min(1.0, max(0.6, 3 * prev)))
    ax.set_ylim(-0.02, max(0.05, prev * 1.1))
    ax.set_xlabel("threshold probability")
    ax.set_ylabel("net benefit")
    ax.set_title(f"Decision curve (test, prevalence {prev:.3f})", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, run.path / "decision_curve.png")
    plt.close(fig)
    lines += ["![decision curve](decision_curve.png)", ""]


def _isnan(a: Any) -> Any:
    import numpy as np

    return np.isnan(a)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _subgroup_section(run: RunFiles, p: Any, n_boot: int, lines: list[str],
                      clin: dict[str, Any]) -> None:
    from medmix_core import clinical as C

    lines += ["## Subgroups", ""]
    if run.store is None:
        lines += [f"_Subgroups skipped: the run's store is unavailable ({run.store_error})._",
                  ""]
        return
    rows = run.store_rows()
    groups = {k: [v[i] for i in rows] for k, v in run.store.attributes().items()}
    import numpy as np

    spec_mods = run.metrics.get("modalities") or []
    mm = _test_modality_mask(run, rows, spec_mods)
    groups.update(C.missingness_groups(mm, spec_mods))
    res = C.subgroup_metrics(p, run.labels[:, 0], groups, threshold=run.threshold,
                             n_boot=n_boot, seed=0)
    clin["subgroups"] = res
    attrs = list(groups)
    have = [a for a in attrs if a not in ("missing modalities", "modalities present")]
    lines += [f"Test patients by {', '.join(f'`{a}`' for a in attrs)}"
              + ("" if have else " (the dataset declares no sample attributes)")
              + f". 95% CIs: {n_boot} bootstrap resamples within each subgroup. A subgroup "
              f"with fewer than {C.MIN_SUBGROUP_N} patients or fewer than "
              f"{C.MIN_SUBGROUP_EVENTS} events or non-events is marked **small**: its "
              f"interval is given, its point estimate is not precise, and it is left out of "
              f"the gaps. Threshold {run.threshold:.2f} for macro-F1. Missingness patterns are "
              f"the stored ones"
              + (" (the run's test-time protocol is not applied here)"
                 if (run.metrics.get("protocol") or {}).get("phase") in ("test", "both")
                 else "") + ".", ""]
    lines += ["| attribute | subgroup | n | events | AUROC (95% CI) | AUPRC | Brier | "
              "observed risk | mean predicted |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        flag = " **small**" if r["small"] else ""
        lines.append(f"| {r['attribute']} | {r['value']}{flag} | {r['n']} | {r['events']} | "
                     f"{_f(r['auroc'])}"
                     + (f" {_ci(r['auroc_ci95'])}" if r["auroc_ci95"][0] is not None else "")
                     + f" | {_f(r['auprc'])} | "
                     f"{_f(r['brier'])} | {_f(r['observed_risk'])} | "
                     f"{_f(r['mean_predicted'])} |")
    lines += ["", "### Gaps between subgroups", "",
              "Largest difference between two subgroups of an attribute that are not small, "
              "with its 95% bootstrap interval (an interval that covers 0 is no evidence of "
              "a gap). Lower is better for Brier, higher for AUROC.", "",
              "| attribute | metric | better | worse | gap (95% CI) |",
              "|---|---|---|---|---|"]
    for g in res["gaps"]:
        if g["metric"] in ("auroc", "brier"):
            lines.append(f"| {g['attribute']} | {LABELS.get(g['metric'], 'Brier')} | "
                         f"{g['better']} | {g['worse']} | {g['gap']:.3f} {_ci(g['gap_ci95'])} |")
    lines.append("")
    flat = [{k: (";".join("" if x is None else f"{x:.4f}" for x in v) if isinstance(v, list)
                 else v) for k, v in r.items()} for r in res["rows"]]
    _write_csv(run.path / "subgroups.csv", flat)
    try:
        plt = _plt()
    except ImportError:
        return
    from medmix_core.sweep import atomic_savefig

    rs = res["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.24 * (len(rs) + len(attrs))), dpi=110)
    ypos, labels, y0 = [], [], 0
    for a in attrs:
        y0 += 1  # a gap row before each attribute
        for r in (r for r in rs if r["attribute"] == a):
            ypos.append(y0)
            labels.append(f"{a}: {r['value']} (n={r['n']})")
            lo, hi = r["auroc_ci95"]
            col = "0.6" if r["small"] else "C0"
            if lo is not None:
                ax.plot([lo, hi], [y0, y0], color=col, lw=1.5)
            if not math.isnan(r["auroc"]):
                ax.plot(r["auroc"], y0, "o", color=col, mfc="white" if r["small"] else col)
            else:
                ax.text(0.5, y0, "undefined (one outcome class only)", fontsize=6,
                        va="center", ha="center", color="0.4")
            y0 += 1
    overall = run.metrics.get("test", {}).get("auroc", {}).get("mean")
    if overall is not None:
        ax.axvline(overall, color="k", ls="--", lw=0.8, label=f"all test (seed mean) "
                                                              f"{overall:.3f}")
    ax.set_yticks(ypos)
    ax.set_yticklabels(labels, fontsize=6.5)
    ax.set_xlim(min(0.5, ax.get_xlim()[0]), 1.0)
    ax.invert_yaxis()
    ax.set_xlabel("AUROC, 95% bootstrap CI (hollow grey: small subgroup)", fontsize=8)
    ax.set_title("AUROC by subgroup (test)", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, run.path / "subgroups.png")
    plt.close(fig)
    lines += ["![subgroups](subgroups.png)", ""]
    del np


def _test_modality_mask(run: RunFiles, rows: Any, modalities: list[str]) -> Any:
    """``[N, M]`` availability of the test rows in the run's modalities (stored masks)."""
    import numpy as np

    cols = []
    for m in modalities:
        present = np.zeros(run.store.n_samples, dtype=bool)
        for e in run.store.experts.get(m, []):
            if e.name in set((run.metrics.get("experts_by_modality") or {}).get(m, [e.name])):
                present |= run.store.load(e)[1].numpy()
        cols.append(present[rows])
    return np.stack(cols, axis=1) if cols else np.zeros((len(rows), 0), dtype=bool)


def _weight_plots(run: RunFiles, lines: list[str]) -> None:
    """Modality weights by missingness pattern and the router heatmap of one run."""
    import numpy as np

    from medmix_core.sweep import atomic_savefig

    plt = _plt()
    if run.store is None:
        lines += [f"_Fusion-weight plots skipped: store {run.config.get('store')} unavailable "
                  f"({run.store_error})._", ""]
        return
    if not run.seeds():
        return
    from medmix_core.runner import load_model

    if load_model(run.seeds()[0])[0].uses_teacher_at_inference:
        return
    out = ensemble_predict(run, run.store.splits["test"])
    spec = out["spec"]
    if "modality_weights" in out:
        w = out["modality_weights"].numpy()  # [N, M]
        avail = out["modality_mask"].numpy()
        pats, counts = np.unique(avail, axis=0, return_counts=True)
        order = np.argsort(-counts)[:8]
        fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
        width = 0.8 / len(spec.modalities)
        labels = []
        for i, pi in enumerate(order):
            sel = (avail == pats[pi]).all(1)
            labels.append("".join("●" if a else "○" for a in pats[pi]) + f"\nn={counts[pi]}")
            for j in range(len(spec.modalities)):
                ax.bar(i + j * width, w[sel, j].mean(), width,
                       color=f"C{j}", label=spec.modalities[j] if i == 0 else None)
        ax.set_xticks(np.arange(len(order)) + 0.4 - width / 2)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("mean modality weight")
        ax.set_title("Inter-modality weights by missingness pattern (● present, ○ missing)")
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        atomic_savefig(fig, run.path / "modality_weights.png")
        plt.close(fig)
        lines += ["## Modality weights by missingness pattern", "",
                  f"Patterns list the modalities in order: {', '.join(spec.modalities)}. "
                  "Missing modalities get weight exactly 0.", "",
                  "![modality weights](modality_weights.png)", ""]
    if "router_weights" in out:
        rw = out["router_weights"]  # [N, M, K]
        tensors = out["tensors"]
        rows = np.asarray(run.store.splits["test"])
        emask = [tensors.mask[m][rows] for m in spec.modalities]
        kmax = rw.shape[2]
        heat = np.full((len(spec.modalities), kmax), np.nan)
        for j, m in enumerate(spec.modalities):
            for k in range(len(spec.experts[m])):
                sel = emask[j][:, k] & emask[j].any(1)
                if sel.any():
                    heat[j, k] = float(rw[sel, j, k].mean())
        fig, ax = plt.subplots(figsize=(1.6 + 1.3 * kmax, 0.6 + 0.5 * len(spec.modalities)),
                               dpi=110)
        im = ax.imshow(heat, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for j, m in enumerate(spec.modalities):
            for k in range(kmax):
                txt = spec.experts[m][k] if k < len(spec.experts[m]) else ""
                if txt:
                    ax.text(k, j, f"{txt}\n{heat[j, k]:.2f}", ha="center", va="center",
                            fontsize=7, color="w" if heat[j, k] < 0.6 else "k")
        ax.set_yticks(range(len(spec.modalities)))
        ax.set_yticklabels(spec.modalities, fontsize=8)
        ax.set_xticks(range(kmax))
        ax.set_xticklabels([f"expert {k + 1}" for k in range(kmax)], fontsize=8)
        ax.set_title("Mean router weight (test, where the expert is present)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
        fig.tight_layout()
        atomic_savefig(fig, run.path / "router_weights.png")
        plt.close(fig)
        lines += ["## Router weights per expert", "",
                  "![router weights](router_weights.png)", ""]


def _metrics_table(m: dict[str, Any]) -> list[str]:
    lines = [f"# {m['fuser']} on {m['task']}", "",
             f"Experts: {', '.join(sorted(set(m['experts'])))}. Seeds: {m['seeds']}. "
             f"Test n = {m['n_test']}. Threshold {m['threshold_rule']}.", "",
             "| Split | " + " | ".join(LABELS[k] for k in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for split in ("test", "external"):
        if split in m:
            lines.append(f"| {split} (mean ± std over seeds) | "
                         + " | ".join(_fmt(m[split][k]) for k in METRICS) + " |")
    if "test_ci95" in m:
        ci = m["test_ci95"]
        lines.append("| test 95% bootstrap CI | " + " | ".join(
            "undefined" if ci[k][0] is None else f"[{ci[k][0]:.3f}, {ci[k][1]:.3f}]"
            for k in METRICS) + " |")
        b = m.get("bootstrap", {})
        lines += ["", f"Bootstrap: {b.get('resamples')} resamples of test patients "
                      f"(seed {b.get('seed')}), percentile interval of the seed-averaged "
                      f"prediction."]
    lines.append("")
    return lines


def render_run_report(path: str | Path, subgroups: bool = True,
                      recalibrate: str | None = None,
                      thresholds: str | Sequence[float] | None = None,
                      n_boot: int | None = None, model_card: bool = True) -> Path:
    """Render a run folder into ``report.md``, ``clinical.json`` and ``model_card.md``.

    Args:
        path: a folder written by ``medmix run``.
        subgroups: metrics per sample attribute and missingness pattern.
        recalibrate: "temperature", "platt" or "isotonic" fits a recalibration on the
            validation split and saves ``calibration.json`` (used by ``medmix predict``);
            "none" removes it; None keeps whatever the run holds.
        thresholds: decision thresholds of the sensitivity/specificity/PPV/NPV table
            ("0.1,0.2" or a list; default 0.1, 0.2, 0.3, 0.5).
        n_boot: bootstrap resamples per subgroup (default: the run's ``--bootstrap``, or 200).
        model_card: also write ``model_card.md`` (TRIPOD+AI items, from the run's files).
    Returns:
        the path of ``report.md``.
    """
    from medmix_core import clinical as C

    ths = C.parse_thresholds(thresholds) if thresholds is not None else list(DEFAULT_THRESHOLDS)
    if recalibrate is not None and recalibrate not in (*C.METHODS, "none"):
        raise MedmixError(f"--recalibrate {recalibrate!r}: expected one of "
                          f"{', '.join(C.METHODS)} or none.")
    run = read_run(path)
    m = run.metrics
    lines = _metrics_table(m)
    clin: dict[str, Any] = {"task": m.get("task"), "task_type": m.get("task_type"),
                            "n_test": m.get("n_test"), "threshold": run.threshold}
    boots = n_boot if n_boot is not None else (m.get("bootstrap") or {}).get("resamples") or 200
    if run.binary and len(run.ids):
        p = _calibration_section(run, recalibrate, lines, clin)
        _decision_section(run, p, ths, lines, clin, recalibrated="after" in clin["calibration"])
        if subgroups:
            _subgroup_section(run, p, boots, lines, clin)
    else:
        lines += [f"_Calibration statistics, decision curves and subgroup tables describe one "
                  f"risk per patient; this run's task is {m.get('task_type')}, so they are "
                  f"not computed. Run a binary task (e.g. --task mortality) for them._", ""]
    try:
        _weight_plots(run, lines)
    except ImportError:
        lines += ["_Plots need matplotlib: pip install 'medmix[plots]'._", ""]
    from medmix_core.runner import clean_json

    atomic_write_text(run.path / "clinical.json", json.dumps(clean_json(clin), indent=1))
    if model_card:
        from medmix_core.modelcard import write_model_card

        card = write_model_card(run, clin)
        lines += ["## Model card", "", f"TRIPOD+AI items filled from this run's files: "
                  f"[{card.name}]({card.name}).", ""]
    out = run.path / "report.md"
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out
