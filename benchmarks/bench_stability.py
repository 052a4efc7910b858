"""The MedMIX stability study: which training settings make one seed's model stable and good,
chosen on the validation split only.

Each candidate is a set of RunConfig overrides on top of the dataset's run defaults (or of
the paper preset, for "paper"); every seed trains with :func:`medmix_core.training.train_seed`
and reports its validation loss, AUROC and AUPRC and its best epoch. ``--test`` also reports
the test metrics per seed (mean ± std), of the seeds' ensemble (mean probability), and, with
``refit`` among a candidate's settings, of the models retrained on train + validation.
Nothing is chosen on test: run the study without ``--test``, pick on validation, then run
the finals with ``--test``.

Usage (from the repository root):
    medmix extract --dataset physionet2012 --experts stats --out /tmp/stores/p12-stats
    python benchmarks/bench_stability.py /tmp/stores/p12-stats --seeds 3 --threads 1 \
        --json /tmp/study.json
    python benchmarks/bench_stability.py /tmp/stores/p12-stats --seeds 5 --test \
        --only chosen,paper,concat --json /tmp/finals.json

Candidates are listed in CANDIDATES (name -> overrides); ``--only a,b`` runs some of them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, setup, store_or_hint, write_json

from medmix_core.batch import StoreTensors
from medmix_core.config import make_config
from medmix_core.metrics import compute_metrics
from medmix_core.plugins import get_dataset
from medmix_core.store import EmbeddingStore
from medmix_core.training import make_spec, predict_rows, refit_seed, train_seed

#: the defaults chosen on validation, as overrides of the dataset's run defaults: no
#: positive-class weighting won, and is now one of them (see docs/results.md)
CHOSEN: dict[str, Any] = {}

#: candidate name -> RunConfig overrides; "preset": "paper" drops the dataset's run defaults
CANDIDATES: dict[str, dict[str, Any]] = {
    "today": {},
    "lr 3e-4": {"lr": 3e-4},
    "lr 1e-4": {"lr": 1e-4},
    "warm-up 10 epochs": {"warmup_epochs": 10.0},
    "batch 64": {"batch_size": 64},
    "EMA 0.99": {"ema_decay": 0.99},
    "label smoothing 0.1": {"label_smoothing": 0.1},
    "no pos_weight": {"pos_weight": False},
    "with pos_weight (the default before 2026-12-01)": {"pos_weight": True},
    "val smoothing 5 + patience 40": {"val_smoothing": 5, "patience": 40},
    "gated-sum": {"fuser_options": {"inter": "gated-sum"}},
    "sum": {"fuser_options": {"inter": "sum"}},
    "chosen": dict(CHOSEN),
    "chosen + gated-sum": {**CHOSEN, "fuser_options": {"inter": "gated-sum"}},
    "chosen + refit": {**CHOSEN, "refit": True},
    "paper": {"preset": "paper"},
    "concat": {"fuser": "concat"},
    "concat + chosen": {**CHOSEN, "fuser": "concat"},
}

METRICS = ("auroc", "auprc", "macro_f1", "accuracy")


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def run_candidate(name: str, overrides: dict[str, Any], store: EmbeddingStore,
                  tensors: StoreTensors, seeds: list[int], test: bool,
                  threads: int | None) -> dict[str, Any]:
    """Train every seed of one candidate; validation figures, and test ones with ``test``."""
    values = dict(overrides)
    if values.get("preset") != "paper":
        dataset = store.manifest.get("dataset", {}).get("name", "physionet2012")
        values = {**get_dataset(dataset).run_defaults, **values}
    cfg = make_config(**{"device": "cpu", "progress": False, "threads": threads or 1,
                         **values})
    spec = make_spec(tensors)
    cpu = torch.device("cpu")
    test_rows = torch.as_tensor(store.splits["test"])
    out: dict[str, Any] = {"name": name, "overrides": overrides, "seeds": []}
    probs, refit_probs = [], []
    t0 = time.perf_counter()
    for seed in seeds:
        res = train_seed(cfg, tensors, spec, store.splits, seed)
        rec = {"seed": seed, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
               "threshold": res.threshold,
               "val_loss": min(h.get("val_criterion", h["val_loss"]) for h in res.history),
               "val": res.val_metrics, "seconds": round(res.seconds, 1)}
        if test:
            p = predict_rows(res.model, tensors, test_rows, cpu)["probs"]
            probs.append(p)
            rec["test"] = compute_metrics(p, tensors.labels[test_rows], tensors.task_type,
                                          res.threshold)
            if cfg.refit:
                ref = refit_seed(cfg, tensors, spec, store.splits, seed, res.best_epoch + 1,
                                 res.threshold, res.val_metrics)
                rp = predict_rows(ref.model, tensors, test_rows, cpu)["probs"]
                refit_probs.append(rp)
                rec["refit_test"] = compute_metrics(rp, tensors.labels[test_rows],
                                                    tensors.task_type, res.threshold)
        out["seeds"].append(rec)
        print(f"  {name} seed {seed}: best epoch {res.best_epoch}/{res.epochs_run}, val AUROC "
              f"{res.val_metrics['auroc']:.4f}, val loss {rec['val_loss']:.4f}"
              + (f", test AUROC {rec['test']['auroc']:.4f}" if test else "")
              + f" ({res.seconds:.0f} s)")
    s = out["seeds"]
    out["val_auroc"] = mean_std([r["val"]["auroc"] for r in s])
    out["val_auprc"] = mean_std([r["val"]["auprc"] for r in s])
    out["val_loss"] = mean_std([r["val_loss"] for r in s])
    out["best_epochs"] = f"{min(r['best_epoch'] for r in s)}-{max(r['best_epoch'] for r in s)}"
    out["seconds"] = round(time.perf_counter() - t0, 1)
    labels = tensors.labels[test_rows]
    if test:
        out["test"] = {k: mean_std([r["test"][k] for r in s]) for k in METRICS}
        thr = sum(r["threshold"] for r in s) / len(s)  # as the deployed ensemble's
        ens = compute_metrics(torch.stack(probs).mean(0), labels, tensors.task_type, thr)
        out["test_ensemble"] = {k: round(ens[k], 3) for k in METRICS}
        if refit_probs:
            out["refit_test"] = {k: mean_std([r["refit_test"][k] for r in s]) for k in METRICS}
            ens = compute_metrics(torch.stack(refit_probs).mean(0), labels, tensors.task_type,
                                  thr)
            out["refit_test_ensemble"] = {k: round(ens[k], 3) for k in METRICS}
    return out


def print_table(results: list[dict[str, Any]], test: bool) -> None:
    print("\n| candidate | val AUROC | val AUPRC | val loss | best epoch |"
          + (" test AUROC | test AUPRC | ensemble AUROC | ensemble AUPRC |" if test else ""))
    print("|---|---|---|---|---|" + ("---|---|---|---|" if test else ""))
    for r in results:
        line = (f"| {r['name']} | {r['val_auroc']} | {r['val_auprc']} | {r['val_loss']} | "
                f"{r['best_epochs']} |")
        if test:
            line += (f" {r['test']['auroc']} | {r['test']['auprc']} | "
                     f"{r['test_ensemble']['auroc']:.3f} | {r['test_ensemble']['auprc']:.3f} |")
        print(line)
        if test and "refit_test" in r:
            print(f"| {r['name']} (refit models) | | | | | {r['refit_test']['auroc']} | "
                  f"{r['refit_test']['auprc']} | {r['refit_test_ensemble']['auroc']:.3f} | "
                  f"{r['refit_test_ensemble']['auprc']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store", help="an embedding store (e.g. of `medmix extract --experts stats`)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated candidate names")
    p.add_argument("--test", action="store_true",
                   help="also report test metrics (for the finals only; choose on validation)")
    add_common_args(p)
    args = p.parse_args(argv)
    info = setup(args, "MedMIX stability study (validation)")
    path = store_or_hint(args.store)
    if path is None:
        return 1
    names = list(CANDIDATES) if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        print(f"unknown candidate(s) {unknown}; known: {list(CANDIDATES)}")
        return 2
    store = EmbeddingStore.open(path)
    tensors = StoreTensors.from_store(store)
    results = []
    for name in names:
        results.append(run_candidate(name, CANDIDATES[name], store, tensors,
                                     list(range(args.seeds)), args.test, args.threads))
        write_json(args.json, {"machine": info, "results": results})
    print_table(results, args.test)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
