"""Seeds trained together (one vectorised model) against seed after seed, side by side.

For each fuser (default medmix and concat) on the bundled store, with the run's defaults
(the dataset's ``run_defaults`` over RunConfig's: up to 200 epochs, patience 20, batch 256):
  * sequential: ``train_seed`` for each seed in turn (what ``--sequential`` runs);
  * together: ``medmix_core.together.train_seeds_together`` on all seeds at once;
  * agreement: best epochs equal, largest history difference;
  * what one more stacked seed costs: together on 1 seed and on all seeds, (T_S - T_1)/(S-1),
    against a sequential seed's time: the speed-up stacking could give if its fixed costs
    were nothing is seq_per_seed / marginal;
  * the matrix products' share: one epoch of the together run under ``torch.profiler``,
    self time of aten::mm/addmm/bmm/baddbmm; their rate on the training work bounds the
    whole run's rate (``--no-profile`` leaves it out);
  * achieved rate of the training work: (3 x inference MACs/sample x trained samples +
    inference MACs/sample x validated samples) / wall time, as a fraction of this machine's
    ``torch.mm`` rate on 2048 x 2048 fp32 matrices at the same thread count (measured in the
    same run; the helper of bench_train.py).

With ``--cli``, also the whole ``medmix run`` at each thread count T, in a fresh folder each:
``--sequential --threads T``, ``--threads T`` (together) and, for T > 1, ``--nproc T --threads
1`` (the seeds shared over T processes, each rank's seeds together), with each mode's test
metrics compared to the sequential run's.

Usage:
    python benchmarks/bench_together.py [STORE] [--seeds 5] [--fusers medmix,concat|all]
        [--thread-counts 1,2] [--epochs N] [--cli] [--device cpu|cuda] [--json out.json]

``--fusers all`` takes every registered fuser (those that cannot be vectorised say so and
are skipped); ``--device cuda`` times on the GPU, with the ``torch.mm`` rate measured there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BUNDLED_STORE, add_common_args, setup, store_or_hint, write_json
from bench_train import matmul_rate

from medmix_core.batch import StoreTensors
from medmix_core.config import make_config
from medmix_core.flops import count_macs
from medmix_core.plugins import get_dataset, registry
from medmix_core.store import EmbeddingStore
from medmix_core.together import together_blocker, train_seeds_together
from medmix_core.training import build_fuser, make_spec, resolve_distill, train_seed


def mm_rate(device: str) -> dict:
    """The ``torch.mm`` rate on ``device``: bench_train's CPU helper, or the same on CUDA."""
    if not device.startswith("cuda"):
        return matmul_rate()
    a = torch.randn(8192, 8192, device=device)
    torch.mm(a, a)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    macs = 8192.0 ** 3
    return {"size": 8192, "best_s": best, "macs_per_s": macs / best,
            "gflops": 2 * macs / best / 1e9}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_defaults(store: EmbeddingStore) -> dict:
    """The dataset's recommended training settings, as ``medmix run`` applies them."""
    name = (store.manifest.get("dataset") or {}).get("name")
    try:
        return dict(getattr(get_dataset(name), "run_defaults", {}) or {})
    except Exception:  # noqa: BLE001 - a store of an unregistered dataset: no defaults
        return {}


def work_macs(macs: float, results, n_train: int, n_val: int) -> float:
    """MACs of the training work of ``results``: 3x inference per trained sample (forward
    and backward), 1x per validated sample."""
    epochs = sum(r.epochs_run for r in results)
    return epochs * (3 * macs * n_train + macs * n_val)


def bench_fuser(fuser: str, store: EmbeddingStore, tensors: StoreTensors, threads: int,
                args: argparse.Namespace, mm: dict) -> dict:
    extra = {"epochs": args.epochs} if args.epochs else {}
    if args.patience:
        extra["patience"] = args.patience
    cfg = resolve_distill(make_config(fuser=fuser, store=str(store.path), device=args.device,
                                      progress=False, threads=threads,
                                      **{**run_defaults(store), **extra}))
    spec = make_spec(tensors)
    seeds = list(range(args.seeds))
    reason = together_blocker(cfg, tensors, spec)
    if reason is not None:
        print(f"[{fuser}] falls back to sequential training: {reason}")
        return {"fuser": fuser, "threads": threads, "blocker": reason}
    torch.manual_seed(0)
    model = build_fuser(cfg, spec)
    macs = count_macs(model, tensors.batch(torch.arange(min(256, tensors.n))))["per_sample"]
    n_train, n_val = len(store.splits["train"]), len(store.splits["val"])

    _sync(args.device)
    t0 = time.perf_counter()
    seq = [train_seed(cfg, tensors, spec, store.splits, s) for s in seeds]
    _sync(args.device)
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    tog = train_seeds_together(cfg, tensors, spec, store.splits, seeds)
    _sync(args.device)
    t_tog = time.perf_counter() - t0
    t0 = time.perf_counter()
    one = train_seeds_together(cfg, tensors, spec, store.splits, seeds[:1])
    _sync(args.device)
    t_one = time.perf_counter() - t0
    # per-seed times scaled by epochs run, so seeds that stop early do not bias them
    ep_seq = sum(r.epochs_run for r in seq)
    seq_per_epoch = t_seq / ep_seq
    marginal = ((t_tog / ep_seq) * len(seeds) - t_one / one[0].epochs_run) / max(1, len(seeds) - 1)
    products = (None if args.no_profile or args.device != "cpu"
                else matmul_share(cfg, tensors, spec, store, seeds))

    same_best = all(a.best_epoch == b.best_epoch for a, b in zip(seq, tog))
    hist = max(abs(x[k] - y[k]) for a, b in zip(seq, tog)
               for x, y in zip(a.history, b.history) for k in x)
    work = work_macs(macs, seq, n_train, n_val)
    out = {
        "fuser": fuser, "threads": threads, "seeds": len(seeds),
        "epochs_run": [r.epochs_run for r in seq], "best_epochs": [r.best_epoch for r in seq],
        "best_epochs_equal": same_best, "max_history_difference": hist,
        "inference_macs_per_sample": macs, "work_macs": work,
        "sequential_s": t_seq, "together_s": t_tog, "speedup": t_seq / t_tog,
        "sequential_fraction_of_matmul": work / t_seq / mm["macs_per_s"],
        "together_fraction_of_matmul": work / t_tog / mm["macs_per_s"],
        "together_one_seed_s": t_one, "sequential_s_per_seed_epoch": seq_per_epoch,
        "marginal_s_per_seed_epoch": marginal,
        "stacking_ceiling_speedup": seq_per_epoch / marginal if marginal > 0 else None,
        "matrix_products": products,
    }
    print(f"[{fuser}, {threads} thread(s)] {len(seeds)} seeds, epochs run "
          f"{out['epochs_run']}, {macs / 1e6:.3f} MMACs/sample")
    print(f"  sequential {t_seq:.1f}s ({100 * out['sequential_fraction_of_matmul']:.1f}% of "
          f"torch.mm), together {t_tog:.1f}s ({100 * out['together_fraction_of_matmul']:.1f}% "
          f"of torch.mm): {out['speedup']:.2f}x")
    print(f"  best epochs equal: {same_best}; largest history difference {hist:.2e}")
    print(f"  one seed-epoch: sequential {seq_per_epoch:.3f}s, one more stacked seed "
          f"{marginal:.3f}s: stacking with no fixed cost at all would give at most "
          f"{seq_per_epoch / marginal:.2f}x")
    if products:
        print(f"  matrix products: {100 * products['share_of_time']:.0f}% of a together epoch "
              f"under the profiler, at {100 * products['fraction_of_matmul']:.0f}% of the "
              f"torch.mm rate on the training work: no run of this work can exceed that")
    return out


def matmul_share(cfg, tensors: StoreTensors, spec, store: EmbeddingStore,
                 seeds: list[int]) -> dict:
    """One epoch of the together run under torch.profiler: the self time of the matrix
    products, their share of the profiled time and their rate on that epoch's work."""
    from torch.profiler import ProfilerActivity, profile

    one = cfg.model_copy(update={"epochs": 1})
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        res = train_seeds_together(one, tensors, spec, store.splits, seeds)
        wall = time.perf_counter() - t0
    names = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
    us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in names)
    model = build_fuser(cfg, spec)
    macs = count_macs(model, tensors.batch(torch.arange(min(256, tensors.n))))["per_sample"]
    work = work_macs(macs, res, len(store.splits["train"]), len(store.splits["val"]))
    mm = matmul_rate()
    return {"seconds": us / 1e6, "profiled_wall_s": wall, "share_of_time": us / 1e6 / wall,
            "fraction_of_matmul": work / (us / 1e6) / mm["macs_per_s"]}


def bench_cli(fuser: str, store: Path, threads: int, args: argparse.Namespace) -> list[dict]:
    """``medmix run`` end to end: sequential, together, and together over processes."""
    modes = [("sequential", ["--sequential", "--threads", str(threads)], threads),
             ("together", ["--threads", str(threads)], threads)]
    if threads > 1:
        modes.append((f"together, {threads} processes x 1 thread",
                      ["--nproc", str(threads), "--threads", "1"], 1))
    extra = ["--epochs", str(args.epochs)] if args.epochs else []
    if args.patience:
        extra += ["--patience", str(args.patience)]
    rows, ref = [], None
    for label, flags, omp in modes:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "medmix_core.cli", "run", "--store", str(store),
                   "--fuser", fuser, "--seeds", str(args.seeds), "--device", args.device,
                   "--out", str(Path(tmp) / "run"), *extra, *flags]
            env = {**os.environ, "OMP_NUM_THREADS": str(omp)}
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                print(f"  [{label}] failed:\n{proc.stderr[-2000:]}")
                rows.append({"fuser": fuser, "threads": threads, "mode": label, "failed": True})
                continue
            per_seed = json.loads((Path(tmp) / "run" / "metrics.json").read_text())["per_seed"]
        diff = None
        if ref is None:
            ref = per_seed
        else:
            diff = max(abs(a[k] - b[k]) for a, b in zip(ref, per_seed) for k in a
                       if isinstance(a.get(k), float) and isinstance(b.get(k), float))
        rows.append({"fuser": fuser, "threads": threads, "mode": label, "wall_s": wall,
                     "max_metric_difference": diff})
        print(f"  [{fuser}, medmix run, {label}] {wall:.1f}s"
              + ("" if diff is None else f", test metrics within {diff:.1e} of sequential"))
    seq = rows[0].get("wall_s")
    for r in rows[1:]:
        if seq and r.get("wall_s"):
            r["speedup"] = seq / r["wall_s"]
            print(f"  {r['mode']}: {r['speedup']:.2f}x against sequential")
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", nargs="?", default=BUNDLED_STORE, help="store path")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--fusers", default="medmix,concat",
                   help="comma-separated fusers, or all (every registered one)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--thread-counts", default=None,
                   help="comma-separated thread counts measured in turn (default: --threads, "
                        "else 1)")
    p.add_argument("--epochs", type=int, default=None, help="cap on epochs (default: the run's)")
    p.add_argument("--patience", type=int, default=None, help="default: the run's")
    p.add_argument("--no-profile", action="store_true",
                   help="leave out the profiled epoch (matrix products' share)")
    p.add_argument("--cli", action="store_true",
                   help="also time `medmix run` end to end (sequential, together, processes)")
    add_common_args(p)
    args = p.parse_args(argv)
    info = setup(args, "bench_together: seeds trained together vs one after another")
    if args.device != "cpu":
        from medmix_core.machine import machine_info

        info["device"] = machine_info(args.device)
    path = store_or_hint(args.store)
    results = {"machine": info, "runs": [], "matmul": {}, "cli": []}
    if path is None:
        return results
    store = EmbeddingStore.open(path)
    tensors = StoreTensors.from_store(store)
    fusers = (registry().names("fusers") if args.fusers == "all"
              else [f.strip() for f in args.fusers.split(",")])
    counts = ([int(x) for x in args.thread_counts.split(",")] if args.thread_counts
              else [args.threads or 1])
    for threads in counts:
        torch.set_num_threads(threads)
        mm = mm_rate(args.device)
        results["matmul"][threads] = mm
        print(f"torch.mm {mm['size']}x{mm['size']} fp32 on {args.device} at {threads} "
              f"thread(s): {mm['gflops']:.1f} GFLOP/s")
        for fuser in fusers:
            results["runs"].append(bench_fuser(fuser.strip(), store, tensors, threads, args,
                                               mm))
            if args.cli and "blocker" not in results["runs"][-1]:
                results["cli"] += bench_cli(fuser.strip(), path, threads, args)
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
