"""Quality of the committee: MedMIX variants over seeds, validation and test metrics.

Each variant is one ``medmix run`` with extra arguments, trained for every seed in its own
process (``--workers`` at a time; on a GPU several small runs share the device). Prints a
markdown table of validation and test AUROC / AUPRC (mean ± std over seeds) and, with
``--json``, writes every per-seed figure.

Variant sets:
    cpu-default  the committee `medmix run` picks on 2 CPU cores, and ``stats`` alone.
    families     the full committee, ``stats`` alone, and the committee without each
                 expert family (general, domain, rag) and without distillation.
    regularise   regularisation choices to select on validation: expert and modality
                 dropout, dropout, shared d, weight decay, learning rate, distillation.
                 Each variant sets the dropouts explicitly, since the CLI otherwise applies
                 the dataset's ``run_defaults`` (expert 0.3, modality 0.2 for
                 physionet2012).

Seeds vary only the initialisation; on 600 test stays the test split's own sampling error
(about ±0.03 AUROC) is larger than most gaps between variants. ``--splits`` repeats the
comparison over independent stratified splits instead: ``--store`` then names one store per
split with ``{split}`` (each made by ``medmix extract --split-seed S``, so every fitted state
and the RAG index see only that split's training rows), and the table adds, for each
variant, its test AUROC minus the reference variant's on the same split and seed.

Examples::

    .venv/bin/python benchmarks/bench_committee.py --store stores/p12-full --set families \\
        --seeds 0,1,2,3,4 --workers 2 --json runs/families.json
    .venv/bin/python benchmarks/bench_committee.py --store 'stores/p12-split{split}' \\
        --splits 0,1,2,3,4 --seeds 0 --only 'full committee' --only 'stats alone' \\
        --common '--teacher mpnet' --json runs/splits.json
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

from medmix_core.store import atomic_write_text

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

# What `medmix run` picks on 2 CPU cores (no fracast, no teacher) against stats alone.
CPU_DEFAULT = {
    "cpu default committee": "--experts stats,grid,seqssl,minilm,rag --no-distill",
    "stats alone": "--experts stats --no-distill",
}

SETS = {"families": FAMILIES, "regularise": REGULARISE, "cpu-default": CPU_DEFAULT}


_RUNNING: set[int] = set()  # process groups of the runs in flight


def _stop_all(signum, frame) -> None:
    """On SIGTERM/SIGINT (e.g. from `timeout`), stop every run in flight, then exit."""
    for pid in list(_RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def run_one(store: str, extra: str, seed: int, device: str, common: str,
            split: int | None = None) -> dict:
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
    return {"seed": seed, "split": split, "seconds": time.perf_counter() - t0,
            "best_epoch": info["best_epoch"],
            "val_auroc": info["val"]["auroc"], "val_auprc": info["val"]["auprc"],
            "test_auroc": m["per_seed"][0]["auroc"], "test_auprc": m["per_seed"][0]["auprc"],
            "experts": m["experts"], "teacher": m["teacher"], "distill": m["distill"]}


def _ms(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}"


def paired_gaps(results: dict[str, list[dict]], reference: str) -> dict[str, list[float]]:
    """Per variant: test AUROC minus the reference's on the same (split, seed)."""
    ref = {(r["split"], r["seed"]): r["test_auroc"] for r in results.get(reference, [])}
    return {name: [r["test_auroc"] - ref[(r["split"], r["seed"])] for r in rs
                   if (r["split"], r["seed"]) in ref]
            for name, rs in results.items() if name != reference}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True,
                   help="store folder; with --splits, a pattern with {split}")
    p.add_argument("--splits", default="",
                   help="comma-separated split seeds, one store each (see --store)")
    p.add_argument("--reference", default="stats alone",
                   help="variant the paired test-AUROC gaps are taken against")
    p.add_argument("--set", choices=sorted(SETS), default="families")
    p.add_argument("--only", action="append", default=[],
                   help="a variant name to keep (repeat for several; names contain commas)")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--common", default="", help="arguments added to every run")
    add_common_args(p)
    args = p.parse_args()
    setup(args, f"committee quality: {args.set} on {args.store} ({args.device})")
    variants = dict(SETS[args.set])
    if args.only:
        unknown = sorted(set(args.only) - set(variants))
        if unknown:
            p.error(f"unknown variant(s) {unknown} in set {args.set!r}; "
                    f"its variants are {sorted(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.only}
    seeds = [int(s) for s in args.seeds.split(",")]
    splits: list[int | None] = [int(s) for s in args.splits.split(",")] if args.splits else [None]
    if args.splits and "{split}" not in args.store:
        p.error("--splits needs a --store pattern with {split}, e.g. stores/p12-split{split}")
    for sp in splits:
        store = args.store.format(split=sp) if sp is not None else args.store
        if not (Path(store) / "manifest.json").is_file():
            p.error(f"no store at {store}; make it with `medmix extract --split-seed {sp} "
                    f"--out {store} ...` first" if sp is not None else f"no store at {store}")
    jobs = [(name, extra, s, sp) for name, extra in variants.items() for sp in splits
            for s in seeds]
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {name: [] for name in variants}

    def save(wall: float) -> None:
        if args.json:  # after every run, so a stopped sweep keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            record = {"store": args.store, "set": args.set, "device": args.device,
                      "common": args.common, "splits": args.splits, "seeds": args.seeds,
                      "wall_s": wall, "results": results}
            atomic_write_text(args.json, json.dumps(record, indent=1))

    signal.signal(signal.SIGTERM, _stop_all)  # from here on, runs are in flight
    signal.signal(signal.SIGINT, _stop_all)
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = {pool.submit(run_one, args.store.format(split=sp) if sp is not None
                               else args.store, extra, seed, args.device, args.common, sp):
                   name for name, extra, seed, sp in jobs}
        for fut in as_completed(futures):
            r = fut.result()
            results[futures[fut]].append(r)
            where = f"split {r['split']} " if r["split"] is not None else ""
            print(f"{futures[fut]} {where}seed {r['seed']}: val {r['val_auroc']:.3f} test "
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
    gaps = paired_gaps(results, args.reference)
    if any(gaps.values()):
        print(f"\nTest AUROC minus {args.reference!r} on the same split and seed:\n")
        print("| variant | gap (mean ± std) | runs ahead |")
        print("|---|---|---|")
        for name, g in gaps.items():
            if g:
                print(f"| {name} | {_ms(g):s} | {sum(x > 0 for x in g)}/{len(g)} |")
    save(wall)


if __name__ == "__main__":
    main()
