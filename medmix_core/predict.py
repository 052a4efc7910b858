"""``medmix predict``: apply a trained run's deployed models to new patients."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import torch

from medmix_core.batch import StoreTensors
from medmix_core.errors import MedmixError
from medmix_core.runner import check_compatible, is_store, load_model
from medmix_core.store import EmbeddingStore, atomic_write_text
from medmix_core.training import predict_rows


def _encode(run_dir: Path, source: str) -> EmbeddingStore:
    """A store of the new cohort, encoded with the run's experts and fitted state."""
    if is_store(source):
        return EmbeddingStore.open(source)
    from medmix_core.extract import extract

    cfg = json.loads((run_dir / "config.json").read_text())
    info = json.loads((run_dir / "encoders.json").read_text())
    experts: list[str] = []  # the run's order, so the new store lists experts the same way
    for e in info["encoders"]:
        if e["name"] not in experts:
            experts.append(e["name"])
    tmp = Path(tempfile.mkdtemp(prefix="medmix-predict-"))
    return extract(cfg["dataset"], tmp / "store", experts, [], source=source,
                   fit_from=run_dir, dataset_options=cfg.get("dataset_options") or None,
                   all_rows_split="test")


def predict(run_dir: str | Path, source: str, out: str | Path | None = None) -> Path:
    """Write per-sample probabilities (mean and per seed), modality and router weights.

    Args:
        run_dir: a folder written by ``medmix run``.
        source: a store, or raw data readable by the run's dataset plugin.
        out: CSV path (default ``run_dir/predict.csv``).
    Returns:
        the CSV path.
    """
    run_dir = Path(run_dir)
    seeds = sorted(p for p in run_dir.glob("seed_*") if (p / "model.json").is_file())
    if not seeds:
        raise MedmixError(f"{run_dir} holds no trained model (expected seed_*/model.json from "
                          f"`medmix run --out {run_dir}`).")
    models = [load_model(p) for p in seeds]
    spec = models[0][0].spec
    if models[0][0].uses_teacher_at_inference:
        raise MedmixError(f"Fuser {models[0][1]['fuser']!r} needs teacher-class embeddings at "
                          f"inference; pass a store that holds them as --source.")
    store = _encode(run_dir, source)
    experts = [n for m in spec.modalities for n in spec.experts[m]]
    tensors = StoreTensors.from_store(store, None, sorted(set(experts)))
    tensors.modalities = [m for m in tensors.modalities if m in spec.modalities]
    check_compatible(spec, tensors, f"Cohort {source}")
    rows = torch.arange(tensors.n)
    preds = [predict_rows(m, tensors, rows, torch.device("cpu")) for m, _ in models]
    probs = torch.stack([p["probs"] for p in preds])  # [S, N, C]
    mean = probs.mean(0)
    mw = [p["modality_weights"] for p in preds if "modality_weights" in p]
    rw = [p["router_weights"] for p in preds if "router_weights" in p]
    buf = io.StringIO()
    w = csv.writer(buf)
    c = mean.shape[1]
    head = ["sample_id"] + (["prob"] if c == 1 else [f"prob_{i}" for i in range(c)])
    head += [f"prob_{p.name.replace('_', '')}" + ("" if c == 1 else f"_{i}")
             for p in seeds for i in range(c)]
    if mw:
        head += [f"weight_{m}" for m in spec.modalities]
    if rw:
        head += [f"router_{m}_{e}" for m in spec.modalities for e in spec.experts[m]]
    w.writerow(head)
    mwm = torch.stack(mw).mean(0) if mw else None
    rwm = torch.stack(rw).mean(0) if rw else None
    for i in range(tensors.n):
        row = [store.sample_ids[i]] + [f"{v:.6f}" for v in mean[i].tolist()]
        row += [f"{probs[s, i, j]:.6f}" for s in range(len(seeds)) for j in range(c)]
        if mwm is not None:
            row += [f"{v:.4f}" for v in mwm[i].tolist()]
        if rwm is not None:
            row += [f"{rwm[i, j, k]:.4f}" for j, m in enumerate(spec.modalities)
                    for k in range(len(spec.experts[m]))]
        w.writerow(row)
    path = Path(out) if out else run_dir / "predict.csv"
    atomic_write_text(path, buf.getvalue())
    return path
