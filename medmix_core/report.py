"""Tables of results: the console summary of a run, the paper-style comparison table, and
``medmix report``'s entry point (a sweep folder here; a run folder in
:mod:`medmix_core.run_report`).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from medmix_core.errors import MedmixError
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


def _fmt_value(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "undefined"
    return f"{v:.3f}"


def print_metrics(metrics: dict[str, Any]) -> None:
    """Rich table of one run's test (and external) metrics."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{metrics['fuser']} on {metrics['task']} — test, {len(metrics['seeds'])} "
                    f"seed(s), n = {metrics['n_test']}")
    t.add_column("split")
    for k in METRICS:
        t.add_column(LABELS[k])
    t.add_row("test, mean ± std over seeds", *[_fmt(metrics["test"][k]) for k in METRICS])
    if "test_ensemble" in metrics and len(metrics["seeds"]) > 1:
        t.add_row("test, ensemble of the seeds", *[_fmt_value(metrics["test_ensemble"][k])
                                                   for k in METRICS])
    if "external" in metrics:
        t.add_row("external, mean ± std", *[_fmt(metrics["external"][k]) for k in METRICS])
    if "external_ensemble" in metrics and len(metrics["seeds"]) > 1:
        t.add_row("external, ensemble", *[_fmt_value(metrics["external_ensemble"][k])
                                          for k in METRICS])
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


def render_report(path: str | Path, **options: Any) -> Path:
    """Render a run or sweep folder into ``report.md`` with its tables and plots.

    Args:
        path: a run folder (``metrics.json``) or a sweep folder (``sweep.json``).
        options: for a run, those of :func:`render_run_report`.
    """
    path = Path(path)
    if (path / "sweep.json").is_file():
        lines = [(path / "sweep.md").read_text(), ""]
        for k in METRICS:
            for png in sorted(path.glob(f"sweep*_{k}.png")):
                lines += [f"![{png.stem}]({png.name})", ""]
        runs = sorted(p.parent for p in path.glob("*/*/metrics.json"))
        if runs:
            lines += ["## Runs", ""] + [f"- `{r.relative_to(path)}`" for r in runs] + [""]
        out = path / "report.md"
        atomic_write_text(out, "\n".join(lines) + "\n")
        return out
    if (path / "metrics.json").is_file() or (path / "config.json").is_file():
        from medmix_core.run_report import render_run_report

        return render_run_report(path, **options)  # an incomplete run is refused there
    raise MedmixError(f"{path} is neither a run folder (metrics.json) nor a sweep folder "
                      f"(sweep.json). Pass a folder written by `medmix run` or "
                      f"`medmix sweep`.")


def __getattr__(name: str) -> Any:
    """The run report's names, still importable from here."""
    if name in ("RunFiles", "read_run", "render_run_report", "expected_calibration_error",
                "ensemble_predict"):
        from medmix_core import run_report

        return getattr(run_report, name)
    raise AttributeError(f"module 'medmix_core.report' has no attribute {name!r}")
