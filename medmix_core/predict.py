"""``medmix predict``: apply a trained run's deployed models to new patients.

New patients have no outcomes: a raw source is encoded with every row in the test split
and unknown labels, using the run's experts and fitted state; the cohort is laid out as
the models expect it, experts matched by name. Only a complete run predicts, unless the
caller accepts the seeds that finished (``allow_incomplete``).
"""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
from pathlib import Path

import torch

from medmix_core.errors import MedmixError
from medmix_core.runner import check_compatible, cohort_tensors, load_model
from medmix_core.runs import check_writable, open_run
from medmix_core.store import EmbeddingStore, atomic_write_text, is_store
from medmix_core.training import predict_rows, resolve_device


def _encode(run, source: str, device: str, workdir: Path) -> EmbeddingStore:
    """A store of the new cohort, encoded with the run's experts and fitted state."""
    if is_store(source):
        return EmbeddingStore.open(source)
    if not Path(source).exists():
        raise MedmixError(f"--source {source!r} does not exist. Pass a store folder (from "
                          f"`medmix extract`) or raw data readable by the run's dataset.")
    from medmix_core.extract import extract

    cfg = run.config()
    experts: list[str] = []  # the run's order; tensors are matched by name anyway
    for e in run.encoders()["encoders"]:
        if e["name"] not in experts:
            experts.append(e["name"])
    return extract(cfg["dataset"], workdir / "store", experts, [], source=source,
                   fit_from=run.path, dataset_options=cfg.get("dataset_options") or None,
                   all_rows_split="test", device=device, progress=False)


def predict(run_dir: str | Path, source: str, out: str | Path | None = None,
            device: str = "auto", allow_incomplete: bool = False, log=print) -> Path:
    """Write per-sample probabilities (mean and per seed), modality and router weights.

    Args:
        run_dir: a folder written by ``medmix run``.
        source: a store, or raw data readable by the run's dataset plugin (outcomes are
            not needed).
        out: CSV path (default ``run_dir/predict.csv``).
        device: where the models run (the one ``--device`` rule).
        allow_incomplete: predict with the finished seeds of a run that did not finish.
    Returns:
        the CSV path.
    """
    run = open_run(run_dir, allow_incomplete)
    seeds = run.finished_seeds()
    info = run.info()
    if info.get("status") != "complete":
        log(f"Warning: {run.path} is incomplete; predicting with seeds "
            f"{[int(p.name[5:]) for p in seeds]} of {info.get('seeds')}.")
    path = Path(out) if out else run.path / "predict.csv"
    if path.is_dir():
        raise MedmixError(f"--out {str(path)!r} is a folder; pass the CSV file to write.")
    check_writable(path.parent, "--out")
    dev = resolve_device(device)
    models = [load_model(p) for p in seeds]
    spec = models[0][0].spec
    if models[0][0].uses_teacher_at_inference:
        raise MedmixError(f"Fuser {models[0][1]['fuser']!r} needs teacher-class embeddings at "
                          f"inference; pass a store that holds them as --source.")
    workdir = Path(tempfile.mkdtemp(prefix="medmix-predict-"))
    try:
        store = _encode(run, source, str(dev), workdir)
        tensors = cohort_tensors(store, spec, None)
        check_compatible(spec, tensors, f"Cohort {source}")
        rows = torch.arange(tensors.n)
        preds = [predict_rows(m.to(dev), tensors, rows, dev) for m, _ in models]
        sample_ids = list(store.sample_ids)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    probs = torch.stack([p["probs"] for p in preds])  # [S, N, C]
    mean = probs.mean(0)  # [N, C]
    from medmix_core.clinical import apply_calibration, load_calibration

    calib = load_calibration(run.path)
    if calib is not None:  # chosen with `medmix report --recalibrate`; per-seed columns stay raw
        mean = apply_calibration(mean, calib)
        log(f"Applied the run's {calib.get('method', 'fitted')} recalibration to the prob "
            f"column.")
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
    for i in range(len(sample_ids)):
        row = [sample_ids[i]] + [f"{v:.6f}" for v in mean[i].tolist()]
        row += [f"{probs[s, i, j]:.6f}" for s in range(len(seeds)) for j in range(c)]
        if mwm is not None:
            row += [f"{v:.4f}" for v in mwm[i].tolist()]
        if rwm is not None:
            row += [f"{rwm[i, j, k]:.4f}" for j, m in enumerate(spec.modalities)
                    for k in range(len(spec.experts[m]))]
        w.writerow(row)
    atomic_write_text(path, buf.getvalue())
    return path
