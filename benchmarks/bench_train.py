"""Training throughput of MedMIX and the achieved MAC rate against this machine's matmul.

Measures, on the bundled store (if present) and on a larger synthetic store:
  * step throughput: samples/s of one training step (forward + backward + AdamW) on
    pre-built batches (medmix_core.profile.profile_fuser);
  * epoch throughput: samples/s of real epochs of medmix_core.training.train_seed
    (batch assembly, mask handling and the per-epoch validation pass included);
  * achieved rate: training MACs/sample ~ 3 x inference MACs/sample (forward, plus about
    twice that for the backward) x step samples/s, as a fraction of the dense fp32 matmul
    rate of torch.mm on 2048 x 2048 matrices measured in the same run (best of several).

Usage:
    python benchmarks/bench_train.py [STORE] [--n 100000] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BUNDLED_STORE, add_common_args, setup, store_or_hint, write_json

from medmix_core.batch import StoreTensors
from medmix_core.config import make_config
from medmix_core.profile import profile_fuser
from medmix_core.store import EmbeddingStore
from medmix_core.training import make_spec, train_seed

SYN_DIMS = (64, 128, 256, 384, 512, 768, 1024)


def matmul_rate(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` dense fp32 torch.mm rate, in MAC/s (1 MAC = 2 FLOPs)."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    macs = float(size) ** 3
    return {"size": size, "best_s": best, "macs_per_s": macs / best,
            "gflops": 2 * macs / best / 1e9}


def bench_store(label: str, store: EmbeddingStore, args: argparse.Namespace,
                mm: dict[str, float]) -> dict:
    tensors = StoreTensors.from_store(store)
    cfg = make_config(fuser="medmix", store=str(store.path), epochs=args.epochs,
                      patience=args.epochs + 1, batch_size=args.batch_size, device="cpu",
                      progress=False)
    prof = profile_fuser("medmix", tensors, cfg, device="cpu", batch_size=args.batch_size,
                         repeats=args.repeats, warmup=args.warmup)
    step = prof["latency"]["train_step"]
    macs = prof["macs"]["per_sample"]
    achieved = 3 * macs * step["samples_per_s"]
    t0 = time.perf_counter()
    res = train_seed(cfg, tensors, make_spec(tensors), store.splits, seed=0)
    secs = time.perf_counter() - t0
    n_train = len(store.splits["train"])
    epoch_sps = res.epochs_run * n_train / secs
    out = {
        "store": str(store.path), "label": label, "n_samples": tensors.n, "n_train": n_train,
        "modalities": len(tensors.modalities),
        "experts": sum(len(v) for v in tensors.experts.values()),
        "dims": tensors.dims(), "batch_size": prof["batch_size"],
        "params_deployed": prof["params"]["deployed"],
        "inference_macs_per_sample": macs, "train_macs_per_sample_approx": 3 * macs,
        "step_ms_median": step["median_ms"], "step_ms_p90": step["p90_ms"],
        "step_samples_per_s": step["samples_per_s"],
        "inference_samples_per_s": prof["latency"]["inference"]["samples_per_s"],
        "epochs": res.epochs_run, "epoch_seconds_total": secs,
        "epoch_samples_per_s": epoch_sps,
        "achieved_macs_per_s": achieved,
        "achieved_gflops": 2 * achieved / 1e9,
        "fraction_of_matmul": achieved / mm["macs_per_s"],
        "peak_train_memory_bytes": prof["memory"]["train_step"]["peak_bytes"],
    }
    print(f"[{label}] {tensors.n} samples ({n_train} train), {out['modalities']} modalities, "
          f"{out['experts']} experts, {out['params_deployed']:,} parameters")
    print(f"  inference: {macs / 1e6:.3f} MMACs/sample, "
          f"{out['inference_samples_per_s']:,.0f} samples/s")
    print(f"  training step (batch {prof['batch_size']}): median {step['median_ms']:.1f} ms, "
          f"p90 {step['p90_ms']:.1f} ms -> {step['samples_per_s']:,.0f} samples/s")
    print(f"  training epochs (train_seed, {res.epochs_run} epochs incl. validation): "
          f"{epoch_sps:,.0f} samples/s")
    print(f"  achieved ~{out['achieved_gflops']:.2f} GFLOP/s (3 x inference MACs x step "
          f"samples/s, x2 FLOP/MAC) = {100 * out['fraction_of_matmul']:.1f}% of torch.mm "
          f"({mm['gflops']:.1f} GFLOP/s)")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", nargs="?", default=BUNDLED_STORE, help="bundled store path")
    p.add_argument("--n", type=int, default=100000, help="synthetic store size (0 = skip)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--epochs", type=int, default=2, help="epochs timed with train_seed")
    p.add_argument("--synthetic-dir", type=Path, default=None,
                   help="where to write the synthetic store (default: a temporary folder)")
    add_common_args(p)
    args = p.parse_args(argv)
    info = setup(args, "bench_train: MedMIX training throughput")
    mm = matmul_rate()
    print(f"torch.mm 2048x2048 fp32: best {mm['best_s'] * 1e3:.1f} ms = "
          f"{mm['gflops']:.1f} GFLOP/s ({mm['macs_per_s'] / 1e9:.1f} GMAC/s)")
    results = {"machine": info, "matmul": mm, "stores": []}

    path = store_or_hint(args.store)
    if path is not None:
        results["stores"].append(bench_store("bundled", EmbeddingStore.open(path), args, mm))
    if args.n > 0:
        from medmix_datasets.synthetic import write_synthetic_store

        tmp = None
        folder = args.synthetic_dir
        if folder is None:
            tmp = tempfile.TemporaryDirectory(prefix="medmix-bench-")
            folder = Path(tmp.name) / "store"
        t0 = time.perf_counter()
        store = write_synthetic_store(folder, n=args.n, n_modalities=6, experts_per_modality=3,
                                      dims=SYN_DIMS, teacher_dim=None, seed=0)
        print(f"wrote a synthetic store of {args.n} samples (6 modalities x 3 experts, dims "
              f"{SYN_DIMS} cycled) in {time.perf_counter() - t0:.1f}s")
        results["stores"].append(bench_store(f"synthetic n={args.n}", store, args, mm))
        if tmp is not None:
            tmp.cleanup()
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
