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
    if not ms or ms.get("mean") is None or (isinstance(ms["mean"], float) and math.isnan(ms["mean"])):
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
