"""Seeds trained together (one vectorised model) against seed after seed, side by side.

For each fuser (default medmix and concat) on the bundled store, with the run's defaults
(the dataset's ``run_defaults`` over RunConfig's: up to 200 epochs, patience 20, batch 256):
  * sequential: ``train_seed`` for each seed in turn (what ``--sequential`` runs);
  * together: ``medmix_core.together.train_seeds_together`` on all seeds at once;
  * agreement: best epochs equal, largest history difference;
  * achieved rate of the training work: (3 x inference MACs/sample x trained samples +
    inference MACs/sample x validated samples) / wall time, as a fraction of this machine's
    ``torch.mm`` rate on 2048 x 2048 fp32 matrices at the same thread count (measured in the
    same run; the helper of bench_train.py).

Usage:
    python benchmarks/bench_together.py [STORE] [--seeds 5] [--fusers medmix,concat]
        [--thread-counts 1,2] [--epochs N] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BUNDLED_STORE, add_common_args, setup, store_or_hint, write_json
from bench_train import matmul_rate

from medmix_core.batch import StoreTensors
from medmix_core.config import make_config
from medmix_core.flops import count_macs
from medmix_core.plugins import get_dataset
from medmix_core.store import EmbeddingStore
from medmix_core.together import together_blocker, train_seeds_together
from medmix_core.training import build_fuser, make_spec, resolve_distill, train_seed


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
    cfg = resolve_distill(make_config(fuser=fuser, store=str(store.path), device="cpu",
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

    t0 = time.perf_counter()
    seq = [train_seed(cfg, tensors, spec, store.splits, s) for s in seeds]
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    tog = train_seeds_together(cfg, tensors, spec, store.splits, seeds)
    t_tog = time.perf_counter() - t0

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
    }
    print(f"[{fuser}, {threads} thread(s)] {len(seeds)} seeds, epochs run "
          f"{out['epochs_run']}, {macs / 1e6:.3f} MMACs/sample")
    print(f"  sequential {t_seq:.1f}s ({100 * out['sequential_fraction_of_matmul']:.1f}% of "
          f"torch.mm), together {t_tog:.1f}s ({100 * out['together_fraction_of_matmul']:.1f}% "
          f"of torch.mm): {out['speedup']:.2f}x")
    print(f"  best epochs equal: {same_best}; largest history difference {hist:.2e}")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", nargs="?", default=BUNDLED_STORE, help="store path")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--fusers", default="medmix,concat")
    p.add_argument("--thread-counts", default=None,
                   help="comma-separated thread counts measured in turn (default: --threads, "
                        "else 1)")
    p.add_argument("--epochs", type=int, default=None, help="cap on epochs (default: the run's)")
    p.add_argument("--patience", type=int, default=None, help="default: the run's")
    add_common_args(p)
    args = p.parse_args(argv)
    info = setup(args, "bench_together: seeds trained together vs one after another")
    path = store_or_hint(args.store)
    results = {"machine": info, "runs": [], "matmul": {}}
    if path is None:
        return results
    store = EmbeddingStore.open(path)
    tensors = StoreTensors.from_store(store)
    counts = ([int(x) for x in args.thread_counts.split(",")] if args.thread_counts
              else [args.threads or 1])
    for threads in counts:
        torch.set_num_threads(threads)
        mm = matmul_rate()
        results["matmul"][threads] = mm
        print(f"torch.mm 2048x2048 fp32 at {threads} thread(s): {mm['gflops']:.1f} GFLOP/s")
        for fuser in args.fusers.split(","):
            results["runs"].append(bench_fuser(fuser.strip(), store, tensors, threads, args,
                                               mm))
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
