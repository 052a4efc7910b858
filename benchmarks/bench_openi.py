"""OpenI comparison: MedMIX and the baseline fusers on the real reports, 5 seeds each.

Extracts the OpenI store once (the ``--experts`` on the reports' notes; no image pixels
unless the source holds them, so the frontal and lateral views are then missing for every
report), trains every ``--fusers`` entry for ``--seeds`` seeds on it, and writes a JSON
file and a Markdown table (test mean ± std of macro AUROC, AUPRC, macro-F1 and accuracy
over the 15 findings, and wall times) to ``--results``.

Usage:
    python benchmarks/bench_openi.py --source /path/to/torchxrayvision-*.whl
        [--experts tfidf] [--teacher mpnet] [--fusers medmix,meanavg,...] [--seeds 5]
        [--store /tmp/stores/openi] [--runs /tmp/runs/openi] [--results docs/assets/results]
    python benchmarks/bench_openi.py --download /tmp/txrv     # fetch the wheel, then run

The data are CC BY-NC-ND 4.0: keep the store and run folders outside the repository.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, setup, write_json

from medmix_core.config import make_config
from medmix_core.extract import extract
from medmix_core.runner import run
from medmix_core.store import atomic_write_text

FUSERS = "medmix,meanavg,concat,max,attention,m3care"
METRICS = ("auroc", "auprc", "macro_f1", "accuracy")


def download_wheel(folder: Path) -> Path:
    """``pip download --no-deps torchxrayvision`` into ``folder`` (never installs it)."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "torchxrayvision",
                    "-d", str(folder)], check=True)
    wheels = sorted(folder.glob("torchxrayvision-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download left no torchxrayvision wheel in {folder}.")
    return wheels[-1]


def table(rows: list[dict], info: dict, args: argparse.Namespace) -> str:
    """The Markdown table of the comparison."""
    head = ("| fuser | AUROC | AUPRC | macro-F1 | accuracy | wall (5 seeds) |\n"
            "|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        cells = [f"{r['test'][m]['mean']:.4f} ± {r['test'][m]['std']:.4f}" for m in METRICS]
        lines.append(f"| {r['fuser']} | " + " | ".join(cells) + f" | {r['seconds']:.0f} s |")
    teacher = args.teacher or "none"
    return (f"OpenI, task `findings` (15 labels), test split ({rows[0]['n_test']} reports), "
            f"{args.seeds} seeds, experts `{args.experts}`, teacher {teacher}; modalities "
            f"with embeddings: {', '.join(rows[0]['modalities'])}. Machine: "
            f"{info['cpu_model']}, {info['usable_cores']} usable cores, "
            f"{args.threads or 1} training thread(s).\n\n" + head + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=None,
                   help="the torchxrayvision wheel, NLMCXR_reports.tgz or a folder")
    p.add_argument("--download", type=Path, default=None,
                   help="pip-download the torchxrayvision wheel into this folder and use it")
    p.add_argument("--experts", default="tfidf")
    p.add_argument("--teacher", default=None)
    p.add_argument("--fusers", default=FUSERS)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--store", type=Path, default=Path("/tmp/stores/openi"))
    p.add_argument("--runs", type=Path, default=Path("/tmp/runs/openi"))
    p.add_argument("--results", type=Path, default=Path("docs/assets/results"),
                   help="folder for openi.json and openi.md")
    p.add_argument("--reuse", action="store_true",
                   help="collect the fusers' finished run folders instead of training again")
    add_common_args(p)
    args = p.parse_args(argv)
    info = setup(args, f"bench_openi: {args.fusers} x {args.seeds} seeds on OpenI")
    source = str(download_wheel(args.download)) if args.download else args.source
    if source is None and not args.reuse:
        raise SystemExit("give --source (the torchxrayvision wheel, NLMCXR_reports.tgz or a "
                         "folder) or --download FOLDER")
    t0 = time.perf_counter()
    if not args.reuse:
        extract("openi", args.store, args.experts.split(","),
                args.teacher.split(",") if args.teacher else [], source=source,
                progress=False)
    extract_s = time.perf_counter() - t0
    rows = []
    for fuser in args.fusers.split(","):
        out = args.runs / fuser
        t1 = time.perf_counter()
        if args.reuse:
            metrics = json.loads((out / "metrics.json").read_text("utf-8"))
        else:
            cfg = make_config(store=str(args.store), fuser=fuser, seeds=args.seeds,
                              device="cpu", threads=args.threads or 1, out=str(out),
                              teacher=args.teacher, progress=False)
            metrics = run(cfg, log=lambda msg: print("  " + msg))
        seconds = (sum(s["seconds"] for s in metrics["seed_info"]) if args.reuse
                   else time.perf_counter() - t1)
        rows.append({"fuser": fuser, "test": {m: metrics["test"][m] for m in METRICS},
                     "seconds": seconds, "n_test": metrics["n_test"],
                     "modalities": metrics["modalities"], "experts": metrics["experts"],
                     "teacher": metrics.get("teacher"),
                     "per_seed_auroc": [s["auroc"] for s in metrics["per_seed"]]})
        print(f"{fuser}: AUROC {metrics['test']['auroc']['mean']:.4f} "
              f"± {metrics['test']['auroc']['std']:.4f} ({seconds:.0f} s)")
    result = {"machine": info, "source": source, "experts": args.experts,
              "teacher": args.teacher, "seeds": args.seeds, "extract_seconds": extract_s,
              "seconds_are": "seed training time summed" if args.reuse else "wall",
              "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.json or args.results / "openi.json", result)
    atomic_write_text(args.results / "openi.md", table(rows, info, args))
    print(f"wrote {args.results / 'openi.md'}")
    return result


if __name__ == "__main__":
    main()
