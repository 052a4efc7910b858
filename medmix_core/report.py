"""Tables of results: the console summary of a run and the paper-style comparison table."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from medmix_core.metrics import METRICS
from medmix_core.store import atomic_write_text

LABELS = {"auroc": "AUROC", "auprc": "AUPRC", "macro_f1": "macro-F1", "accuracy": "Accuracy"}


def _fmt(ms: dict[str, Any] | None) -> str:
    if (
        not ms
        or ms.get("mean") is None
        or (isinstance(ms["mean"], float) and math.isnan(ms["mean"]))
    ):
        return "undefined"
    return f"{ms['mean']:.3f} ± {ms['std']:.3f}"


def print_metrics(metrics: dict[str, Any]) -> None:
    """Rich table of one run's test (and external) metrics."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{metrics['fuser']} on {metrics['task']} — test, {len(metrics['seeds'])} "
                    f"seed(s), n = {metrics['n_test']}")
    t.add_column("split")
    for k in METRICS:
        t.add_column(LABELS[k])
    t.add_row("test", *[_fmt(metrics["test"][k]) for k in METRICS])
    if "external" in metrics:
        t.add_row("external", *[_fmt(metrics["external"][k]) for k in METRICS])
    c = Console()
    c.print(t)
    c.print(f"experts: {', '.join(sorted(set(metrics['experts'])))}; threshold "
            f"{metrics['threshold_rule']}; results in {metrics.get('out', '')}")


def comparison_rows(results: list[dict[str, Any]], split: str = "test") -> list[dict[str, Any]]:
    return [{"method": r["fuser"] if not r.get("label") else r["label"],
             **{k: r[split][k] for k in METRICS}} for r in results if split in r]


def write_comparison(results: list[dict[str, Any]], folder: str | Path,
                     split: str = "test", name: str = "comparison") -> tuple[Path, Path]:
    """Markdown + CSV table shaped like the paper's Table 1 (best mean per column in bold).

    Returns:
        paths of the markdown and CSV files.
    """
    folder = Path(folder)
    rows = comparison_rows(results, split)
    best = {}
    for k in METRICS:
        vals = [r[k]["mean"] for r in rows if r[k]["mean"] is not None
                and not math.isnan(r[k]["mean"])]
        best[k] = max(vals) if vals else None
    md = ["| Method | " + " | ".join(LABELS[k] for k in METRICS) + " |",
          "|---|" + "---|" * len(METRICS)]
    for r in rows:
        cells = []
        for k in METRICS:
            s = _fmt(r[k])
            cells.append(f"**{s}**" if best[k] is not None and r[k]["mean"] == best[k] else s)
        md.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method"] + [f"{k}_{s}" for k in METRICS for s in ("mean", "std")])
    for r in rows:
        w.writerow([r["method"]] + [r[k][s] for k in METRICS for s in ("mean", "std")])
    folder.mkdir(parents=True, exist_ok=True)
    mdp, csvp = folder / f"{name}.md", folder / f"{name}.csv"
    atomic_write_text(mdp, "\n".join(md) + "\n")
    atomic_write_text(csvp, buf.getvalue())
    print("\n".join(md))
    return mdp, csvp


# ---------------------------------------------------------------- medmix report
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


def _run_plots(run_dir: Path, lines: list[str]) -> None:
    """Reliability diagram, weights by missingness pattern, router heatmap of one run."""
    import json

    import numpy as np
    import torch

    from medmix_core.batch import StoreTensors
    from medmix_core.runner import load_model
    from medmix_core.store import EmbeddingStore
    from medmix_core.sweep import atomic_savefig
    from medmix_core.training import predict_rows

    plt = _plt()
    import csv as _csv

    with open(run_dir / "predictions.csv") as fh:
        preds = list(_csv.DictReader(fh))
    if preds and "prob" in preds[0] and "label" in preds[0]:
        rows = [r for r in preds if r["label"] != ""]
        p = [float(r["prob"]) for r in rows]
        y = [float(r["label"]) for r in rows]
        ece, bins = expected_calibration_error(p, y)
        fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.plot([b[0] for b in bins], [b[1] for b in bins], "o-", label="model")
        for b in bins:
            ax.annotate(str(b[2]), (b[0], b[1]), fontsize=6, xytext=(3, -8),
                        textcoords="offset points")
        ax.set_xlabel("mean predicted probability (bin)")
        ax.set_ylabel("observed positive fraction")
        ax.set_title(f"Reliability (test), ECE = {ece:.3f}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        atomic_savefig(fig, run_dir / "reliability.png")
        plt.close(fig)
        lines += ["## Calibration", "",
                  f"Expected calibration error (10 equal-width bins, mean probability over "
                  f"seeds): **{ece:.3f}**. Numbers beside points are bin counts. A run "
                  f"trained with `pos_weight` (the default for binary tasks) over-predicts "
                  f"positives by design: weighting positives by n_neg/n_pos shifts the "
                  f"logits by about log(n_neg/n_pos), which ranks (AUROC, AUPRC) ignore.",
                  "",
                  "![reliability](reliability.png)", ""]

    cfg = json.loads((run_dir / "config.json").read_text())
    seeds = sorted(run_dir.glob("seed_*"))
    if not seeds or not cfg.get("store"):
        return
    try:
        store = EmbeddingStore.open(cfg["store"])
    except Exception as exc:  # the store may have moved; the tables above still stand
        lines += [f"_Fusion-weight plots skipped: store {cfg['store']} unavailable ({exc})._", ""]
        return
    model, meta = load_model(seeds[0])
    spec = model.spec
    if model.uses_teacher_at_inference:
        return
    tensors = StoreTensors.from_store(store, cfg.get("task"),
                                      sorted({n for v in spec.experts.values() for n in v}))
    tensors.modalities = [m for m in tensors.modalities if m in spec.modalities]
    rows = torch.as_tensor(store.splits["test"], dtype=torch.long)
    outs = [predict_rows(load_model(s)[0], tensors, rows, torch.device("cpu")) for s in seeds]
    if "modality_weights" in outs[0]:
        w = torch.stack([o["modality_weights"] for o in outs]).mean(0).numpy()  # [N, M]
        avail = tensors.modality_mask()[rows].numpy()
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
        atomic_savefig(fig, run_dir / "modality_weights.png")
        plt.close(fig)
        lines += ["## Modality weights by missingness pattern", "",
                  f"Patterns list the modalities in order: {', '.join(spec.modalities)}. "
                  "Missing modalities get weight exactly 0.", "",
                  "![modality weights](modality_weights.png)", ""]
    if "router_weights" in outs[0]:
        rw = torch.stack([o["router_weights"] for o in outs]).mean(0)  # [N, M, K]
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
        atomic_savefig(fig, run_dir / "router_weights.png")
        plt.close(fig)
        lines += ["## Router weights per expert", "",
                  "![router weights](router_weights.png)", ""]


def render_report(path: str | Path) -> Path:
    """Render a run or sweep folder into ``report.md`` with its tables and plots."""
    import json

    from medmix_core.errors import MedmixError

    path = Path(path)
    lines: list[str] = []
    if (path / "sweep.json").is_file():
        lines += [(path / "sweep.md").read_text(), ""]
        for k in METRICS:
            for png in sorted(path.glob(f"sweep*_{k}.png")):
                lines += [f"![{png.stem}]({png.name})", ""]
        runs = sorted(p.parent for p in path.glob("*/*/metrics.json"))
        if runs:
            lines += ["## Runs", ""] + [f"- `{r.relative_to(path)}`" for r in runs] + [""]
    elif (path / "metrics.json").is_file():
        m = json.loads((path / "metrics.json").read_text())
        lines += [f"# {m['fuser']} on {m['task']}", "",
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
        try:
            _run_plots(path, lines)
        except ImportError:
            lines += ["_Plots need matplotlib: pip install 'medmix[plots]'._", ""]
    else:
        raise MedmixError(f"{path} is neither a run folder (metrics.json) nor a sweep folder "
                          f"(sweep.json). Pass a folder written by `medmix run` or "
                          f"`medmix sweep`.")
    out = path / "report.md"
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out
