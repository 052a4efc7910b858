"""Read a results folder written by ``medmix run``: metrics, predictions, a saved model.

Run from the repository root, on any run folder::

    python examples/read_results.py runs/quickstart/run
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from medmix_core.runner import load_model


def main(run_dir: Path) -> dict:
    config = json.loads((run_dir / "config.json").read_text())  # the resolved RunConfig
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"fuser {config['fuser']} on {config['store']}, seeds {metrics['seeds']}, "
          f"task {metrics['task']} ({metrics['task_type']}), {metrics['n_test']} test samples")

    # mean ± std over seeds; per_seed holds every seed's own values
    for name, ms in metrics["test"].items():
        value = "undefined" if ms["mean"] is None else f"{ms['mean']:.3f} ± {ms['std']:.3f}"
        print(f"  {name:<9} {value}")

    # predictions.csv: one row per test sample, the seed-mean probability, every seed's
    # probability, and the mean inter-modality weights (0 where a modality is missing)
    with open(run_dir / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    weight_cols = [c for c in rows[0] if c.startswith("weight_")]
    riskiest = sorted(rows, key=lambda r: float(r["prob"]), reverse=True)[:3]
    print("highest predicted risk:")
    for r in riskiest:
        weights = ", ".join(f"{c[7:]}={float(r[c]):.2f}" for c in weight_cols)
        print(f"  {r['sample_id']}  p={float(r['prob']):.3f}  label={r['label']}  {weights}")

    # every seed's deployed model: fuser weights only, no teacher parameter
    model, meta = load_model(run_dir / f"seed_{metrics['seeds'][0]}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"seed {meta['seed']}: {type(model).__name__} with {n_params:,} parameters, "
          f"best epoch {meta['best_epoch']}, threshold {meta['threshold']}")
    return {"config": config, "metrics": metrics, "rows": rows, "n_params": n_params}


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart/run"))
