"""Wall time of the paper's protocol on the bundled data: 5 seeds of MedMIX, each trained
to early stopping (patience 20, up to 200 epochs), evaluated on the test split.

Usage:
    python benchmarks/bench_protocol.py [STORE] [--seeds 5] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BUNDLED_STORE, add_common_args, setup, store_or_hint, write_json

from medmix_core.config import make_config
from medmix_core.runner import run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", nargs="?", default=BUNDLED_STORE)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--fuser", default="medmix")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: a temporary one, removed afterwards)")
    add_common_args(p)
    args = p.parse_args(argv)
    info = setup(args, f"bench_protocol: {args.seeds} seeds of {args.fuser} to early stopping")
    path = store_or_hint(args.store)
    if path is None:
        return {}
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="medmix-protocol-")
        out = Path(tmp.name) / "run"
    cfg = make_config(store=str(path), fuser=args.fuser, seeds=args.seeds, device="cpu",
                      out=str(out), progress=False)
    t0 = time.perf_counter()
    metrics = run(cfg, log=lambda msg: print("  " + msg))
    total = time.perf_counter() - t0
    seeds = [{"seed": s["seed"], "seconds": s["seconds"], "epochs_run": s["epochs_run"],
              "best_epoch": s["best_epoch"]} for s in metrics["seed_info"]]
    train_total = sum(s["seconds"] for s in seeds)
    for s in seeds:
        print(f"seed {s['seed']}: {s['seconds']:.1f}s, {s['epochs_run']} epochs "
              f"(best {s['best_epoch']}), {s['seconds'] / max(1, s['epochs_run']):.2f} s/epoch")
    test = metrics["test"]
    print(f"total wall {total:.1f}s for {args.seeds} seeds ({train_total:.1f}s training, "
          f"{total / args.seeds:.1f}s per seed overall); test AUROC "
          f"{test['auroc']['mean']:.4f} +- {test['auroc']['std']:.4f}")
    result = {"machine": info, "store": str(path), "fuser": args.fuser, "seeds": seeds,
              "total_seconds": total, "train_seconds": train_total,
              "seconds_per_seed": total / args.seeds, "test": test}
    write_json(args.json, result)
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
