"""Quality of the committee: MedMIX variants over seeds, validation and test metrics.

Each variant is one ``medmix run`` with extra arguments, trained for every seed in its own
process (``--workers`` at a time; on a GPU several small runs share the device). Prints a
markdown table of validation and test AUROC / AUPRC (mean ± std over seeds) and, with
``--json``, writes every per-seed figure.

Variant sets:
    families   the full committee, ``stats`` alone, and the committee without each expert
               family (general, domain, rag) and without distillation.
    regularise regularisation choices to select on validation: expert and modality
               dropout, dropout, shared d, weight decay, learning rate, distillation. Each
               variant sets the dropouts explicitly, since the CLI otherwise applies the
               dataset's ``run_defaults`` (expert 0.3, modality 0.2 for physionet2012).

Example::

    .venv/bin/python benchmarks/bench_committee.py --store stores/p12-full --set families \\
        --seeds 0,1,2,3,4 --workers 2 --json runs/families.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from _common import add_common_args, setup

FAMILIES = {
    "full committee": "",
    "stats alone": "--experts stats",
    "without general (minilm, fracast)": "--drop-experts general",
    "without domain (stats, grid, seqssl)": "--drop-experts domain",
    "without rag": "--drop-experts rag",
    "without distillation": "--no-distill",
}

_PAPER = "--expert-dropout 0 --modality-dropout 0"  # below the dataset's run_defaults
_STRONG = "--dropout 0.3 --d 64 --weight-decay 0.05 --lr 3e-4"
REGULARISE = {
    "paper defaults": _PAPER,
    "expert dropout 0.3": "--expert-dropout 0.3 --modality-dropout 0",
    "modality dropout 0.2": "--expert-dropout 0 --modality-dropout 0.2",
    "expert 0.3 + modality 0.2": "--expert-dropout 0.3 --modality-dropout 0.2",
    "paper defaults + dropout 0.3, d 64, wd 0.05, lr 3e-4": f"{_PAPER} {_STRONG}",
    "expert 0.3 + modality 0.2 + the same": ("--expert-dropout 0.3 --modality-dropout 0.2 "
                                             + _STRONG),
    "expert 0.3 + modality 0.2, no distillation": ("--expert-dropout 0.3 --modality-dropout 0.2 "
                                                    "--no-distill"),
    "stats alone, paper defaults": f"--experts stats {_PAPER}",
    "stats alone, expert 0.3 + modality 0.2": "--experts stats --expert-dropout 0.3 "
                                              "--modality-dropout 0.2",
}

SETS = {"families": FAMILIES, "regularise": REGULARISE}


_RUNNING: set[int] = set()  # process groups of the runs in flight


def _stop_all(signum, frame) -> None:
    """On SIGTERM/SIGINT (e.g. from `timeout`), stop every run in flight, then exit."""
    for pid in list(_RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def run_one(store: str, extra: str, seed: int, device: str, common: str) -> dict:
    """One ``medmix run`` for one seed; returns its validation and test metrics."""
    with tempfile.TemporaryDirectory(prefix="medmix-bench-") as tmp:
        config = Path(tmp) / "seed.json"  # --seeds N counts seeds; one given seed needs a list
        config.write_text(json.dumps({"seeds": [seed]}))
        cmd = [sys.executable, "-m", "medmix_core.cli", "run", "--store", store,
               "--config", str(config), "--device", device, "--out", str(Path(tmp) / "run"),
               "--bootstrap", "0", *shlex.split(common), *shlex.split(extra)]
        t0 = time.perf_counter()
        # its own process group, so stopping the sweep stops every run it started
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        _RUNNING.add(proc.pid)
        try:
            _, err = proc.communicate()
        finally:
            _RUNNING.discard(proc.pid)
        if proc.returncode:
            raise RuntimeError(f"{shlex.join(cmd)} failed:\n{err[-2000:]}")
        m = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    info = m["seed_info"][0]
    return {"seed": seed, "seconds": time.perf_counter() - t0, "best_epoch": info["best_epoch"],
            "val_auroc": info["val"]["auroc"], "val_auprc": info["val"]["auprc"],
            "test_auroc": m["per_seed"][0]["auroc"], "test_auprc": m["per_seed"][0]["auprc"],
            "experts": m["experts"], "teacher": m["teacher"], "distill": m["distill"]}


def _ms(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--set", choices=sorted(SETS), default="families")
    p.add_argument("--only", default="", help="comma-separated variant names to keep")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--common", default="", help="arguments added to every run")
    add_common_args(p)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, _stop_all)
    signal.signal(signal.SIGINT, _stop_all)
    setup(args, f"committee quality: {args.set} on {args.store} ({args.device})")
    variants = dict(SETS[args.set])
    if args.only:
        keep = [v.strip() for v in args.only.split(",")]
        variants = {k: v for k, v in variants.items() if k in keep}
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(name, extra, s) for name, extra in variants.items() for s in seeds]
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {name: [] for name in variants}

    def save(wall: float) -> None:
        if args.json:  # after every run, so a stopped sweep keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"store": args.store, "set": args.set,
                                             "device": args.device, "common": args.common,
                                             "wall_s": wall, "results": results}, indent=1))

    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = {pool.submit(run_one, args.store, extra, seed, args.device, args.common):
                   name for name, extra, seed in jobs}
        for fut in as_completed(futures):
            r = fut.result()
            results[futures[fut]].append(r)
            print(f"{futures[fut]} seed {r['seed']}: val {r['val_auroc']:.3f} test "
                  f"{r['test_auroc']:.3f} ({r['seconds']:.0f} s)")
            save(time.perf_counter() - t0)
    wall = time.perf_counter() - t0

    print(f"\n{len(jobs)} runs in {wall:.0f} s ({args.workers} at a time)\n")
    print("| variant | val AUROC | test AUROC | test AUPRC | best epoch | s/run |")
    print("|---|---|---|---|---|---|")
    for name, rs in results.items():
        print(f"| {name} | {_ms([r['val_auroc'] for r in rs])} | "
              f"{_ms([r['test_auroc'] for r in rs])} | {_ms([r['test_auprc'] for r in rs])} | "
              f"{statistics.mean(r['best_epoch'] for r in rs):.1f} | "
              f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    save(wall)


if __name__ == "__main__":
    main()
