"""The paper's efficiency table (Appendix Table 6): Perf, Cost, EffScore, the Pareto front.

Perf = mean(AUROC, AUPRC, macro-F1, accuracy) of a run's test split; Cost = the geometric
mean of the deployed-parameter, MAC and peak-memory ratios relative to the reference
(MedMIX), from :func:`medmix_core.profile.profile_fuser` results; EffScore =
(Perf / Perf_ref) / Cost. Written as Markdown, CSV and a Perf-against-Cost plot.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medmix_core.errors import MedmixError
from medmix_core.metrics import METRICS
from medmix_core.store import atomic_write_text
from medmix_core.units import format_bytes, format_count, format_macs


def read_perf(results_dir: str | Path) -> tuple[str, float, dict[str, float]]:
    """(fuser, Perf, the four metric means) from a results folder's metrics.json.

    Perf = mean of the test AUROC, AUPRC, macro-F1 and accuracy means over seeds.
    """
    path = Path(results_dir) / "metrics.json"
    if not path.is_file():
        raise MedmixError(f"{path} is missing: {results_dir} is not a results folder of "
                          f"`medmix run` (expected metrics.json).")
    try:
        data = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise MedmixError(f"{path} is not valid JSON ({exc}).") from exc
    test = data.get("test")
    if not isinstance(test, dict):
        raise MedmixError(f"{path} has no 'test' metrics (keys: {sorted(data)}).")
    vals = {}
    for k in METRICS:
        entry = test.get(k)
        v = entry.get("mean") if isinstance(entry, dict) else None
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise MedmixError(f"{path}: test.{k}.mean is missing or undefined ({v!r}); Perf "
                              f"needs all of {list(METRICS)}.")
        vals[k] = float(v)
    return str(data.get("fuser") or Path(results_dir).name), sum(vals.values()) / len(vals), vals


def pareto_front(cost: Sequence[float], perf: Sequence[float]) -> list[bool]:
    """Which points no other point dominates (lower-or-equal cost and higher-or-equal perf,
    strictly better in one)."""
    n = len(cost)
    if len(perf) != n:
        raise MedmixError(f"pareto_front: {n} costs but {len(perf)} perf values.")
    front = []
    for i in range(n):
        dominated = any(cost[j] <= cost[i] and perf[j] >= perf[i]
                        and (cost[j] < cost[i] or perf[j] > perf[i]) for j in range(n) if j != i)
        front.append(not dominated)
    return front


def _profile_figures(p: dict[str, Any], name: str) -> tuple[float, float, float]:
    try:
        return (float(p["params"]["deployed"]), float(p["macs"]["per_sample"]),
                float(p["memory"]["inference"]["peak_bytes"]))
    except (KeyError, TypeError) as exc:
        raise MedmixError(f"Profile of {name!r} lacks params.deployed, macs.per_sample or "
                          f"memory.inference.peak_bytes ({exc}); make it with "
                          f"profile_fuser.") from exc


def efficiency_table(results_dirs: dict[str, Path] | list[Path], profiles: dict[str, dict],
                     reference: str = "medmix") -> list[dict[str, Any]]:
    """The paper's efficiency table: Perf, Cost and EffScore per method.

    Args:
        results_dirs: method -> results folder of ``medmix run``, or a list of folders
            (the method is the ``fuser`` named in each metrics.json).
        profiles: method -> :func:`profile_fuser` result.
        reference: the method every ratio is taken against (Cost 1, EffScore 1).
    Returns:
        one row per method, in the given order: ``method``, ``params``, ``macs_per_sample``,
        ``peak_memory_bytes``, the four metrics, ``perf``, the three ``*_ratio``s, ``cost``
        (their geometric mean), ``eff_score`` and ``pareto`` (on the cost-perf front).
    Raises:
        MedmixError: a missing metrics file or profile, a missing reference, profiles
            measured on different devices or batch sizes, a zero reference figure.
    """
    if isinstance(results_dirs, dict):
        items = [(str(k), Path(v)) for k, v in results_dirs.items()]
    else:
        items = []
        for d in results_dirs:
            name = read_perf(d)[0]
            if name in {k for k, _ in items}:
                raise MedmixError(f"Two results folders are runs of {name!r}; pass a mapping "
                                  f"method -> folder to name them apart.")
            items.append((name, Path(d)))
    missing = [k for k, _ in items if k not in profiles]
    if missing:
        raise MedmixError(f"No profile for {missing}; profiles exist for {sorted(profiles)}. "
                          f"Profile them with `medmix profile --fuser {','.join(missing)}`.")
    names = [k for k, _ in items]
    if reference not in names:
        raise MedmixError(f"The reference method {reference!r} is not among the runs {names}. "
                          f"Include its results folder, or choose another reference.")
    methods = {(profiles[k].get("machine", {}).get("device"), profiles[k].get("batch_size"),
                profiles[k].get("memory", {}).get("inference", {}).get("method"))
               for k in names}
    if len(methods) > 1:
        raise MedmixError(f"The profiles were measured on different devices / batch sizes "
                          f"({sorted(map(str, methods))}); their ratios are not comparable. "
                          f"Profile every method in one `medmix profile` call.")
    rows = []
    for name, folder in items:
        _, perf, vals = read_perf(folder)
        params, macs, mem = _profile_figures(profiles[name], name)
        rows.append({"method": name, "params": int(params), "macs_per_sample": macs,
                     "peak_memory_bytes": int(mem), **vals, "perf": perf,
                     "results_dir": str(folder)})
    ref = next(r for r in rows if r["method"] == reference)
    for key in ("params", "macs_per_sample", "peak_memory_bytes"):
        if not ref[key] > 0:
            raise MedmixError(f"The reference {reference!r} has {key} = {ref[key]}; ratios "
                              f"need a positive reference figure.")
    for r in rows:
        r["params_ratio"] = r["params"] / ref["params"]
        r["macs_ratio"] = r["macs_per_sample"] / ref["macs_per_sample"]
        r["memory_ratio"] = r["peak_memory_bytes"] / ref["peak_memory_bytes"]
        ratios = (r["params_ratio"], r["macs_ratio"], r["memory_ratio"])
        r["cost"] = (math.prod(ratios) ** (1 / 3)) if min(ratios) > 0 else 0.0
        r["eff_score"] = ((r["perf"] / ref["perf"]) / r["cost"]) if r["cost"] > 0 else math.inf
    for r, f in zip(rows, pareto_front([r["cost"] for r in rows], [r["perf"] for r in rows])):
        r["pareto"] = f
    return rows


COLUMNS = ("method", "params", "macs_per_sample", "peak_memory_bytes", "auroc", "auprc",
           "macro_f1", "accuracy", "perf", "params_ratio", "macs_ratio", "memory_ratio", "cost",
           "eff_score", "pareto")


def efficiency_markdown(rows: list[dict[str, Any]], reference: str = "medmix") -> str:
    """The efficiency table as Markdown: what each column means, then one row per method."""
    intro = (f"Perf = mean(AUROC, AUPRC, macro-F1, accuracy) on the test split (mean over "
             f"seeds). Cost = geometric mean of the deployed-parameter, MAC and peak-memory "
             f"ratios relative to {reference}. EffScore = (Perf / Perf_{reference}) / Cost. "
             f"Pareto: no other method has lower-or-equal Cost and higher-or-equal Perf.")
    lines = ["# Efficiency", "", intro, "",
             "| method | params | MACs / sample | peak memory | Perf | Cost | EffScore | Pareto |",
             "|---|---:|---:|---:|---:|---:|---:|:-:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {format_count(r['params'])} | "
                     f"{format_macs(r['macs_per_sample'])} | "
                     f"{format_bytes(r['peak_memory_bytes'])} | {r['perf']:.4f} | "
                     f"{r['cost']:.3f} | {r['eff_score']:.3f} | "
                     f"{'*' if r['pareto'] else ''} |")
    return "\n".join(lines) + "\n"


def efficiency_csv(rows: list[dict[str, Any]]) -> str:
    """The efficiency table as CSV, every column of :data:`COLUMNS`."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([(f"{r[c]:.6g}" if isinstance(r[c], float) else r[c]) for c in COLUMNS])
    return buf.getvalue()


def efficiency_plot(rows: list[dict[str, Any]], path: str | Path,
                    reference: str = "medmix") -> Path:
    """PNG of Perf against Cost with the Pareto front marked (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MedmixError("The efficiency plot needs matplotlib: pip install 'medmix[plots]' "
                          "(or pass plot=False for the table only).") from exc
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=150)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["cost"])
    ax.plot([r["cost"] for r in front], [r["perf"] for r in front], "-", color="tab:orange",
            lw=1.5, zorder=1)
    for r in rows:
        is_ref = r["method"] == reference
        ax.scatter(r["cost"], r["perf"], s=70 if is_ref else 40, zorder=2,
                   marker="*" if is_ref else "o",
                   color="tab:orange" if r["pareto"] else "tab:blue",
                   edgecolors="black" if r["pareto"] else "none", linewidths=0.6)
        ax.annotate(r["method"], (r["cost"], r["perf"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    costs = [r["cost"] for r in rows if r["cost"] > 0]
    if costs and max(costs) / min(costs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(f"Cost (geometric mean of params, MACs, memory ratios to {reference})")
    ax.set_ylabel("Perf (mean of AUROC, AUPRC, macro-F1, accuracy)")
    ax.set_title("Performance against cost (lower cost, higher Perf is better)", fontsize=10)
    ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="tab:orange", lw=1.5, label="Pareto front"),
               Line2D([], [], ls="", marker="o", color="tab:orange", mec="black", mew=0.6,
                      label="on the front"),
               Line2D([], [], ls="", marker="o", color="tab:blue", label="dominated"),
               Line2D([], [], ls="", marker="*", color="gray", ms=9, label=reference)]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_efficiency(rows: list[dict[str, Any]], out_dir: str | Path, reference: str = "medmix",
                     plot: bool = True) -> list[Path]:
    """Write ``efficiency.md``, ``efficiency.csv`` and (``plot``) ``efficiency.png``.

    Returns:
        the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "efficiency.md", out / "efficiency.csv"]
    atomic_write_text(paths[0], efficiency_markdown(rows, reference))
    atomic_write_text(paths[1], efficiency_csv(rows))
    if plot:
        paths.append(efficiency_plot(rows, out / "efficiency.png", reference))
    return paths
