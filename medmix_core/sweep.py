"""``medmix sweep``: missing-modality protocols over rates, fusers and seeds.

Test-time protocols (``test-*``) train each fuser once per seed (protocol ``natural``)
and evaluate the saved models under every rate's masks. Train-time and population
protocols (``train-*``, ``mar``, ``mnar``) retrain per rate. Outputs in ``--out``:
``sweep.json``, ``sweep.md`` and ``sweep.csv`` (mean ± std over seeds, shaped like the
paper's Tables 2-3) and ``sweep_<metric>.png`` (metric against rate, one line per fuser
and target modality, ±1 std bands).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import torch

from medmix_core.batch import StoreTensors
from medmix_core.config import RunConfig
from medmix_core.errors import MedmixError
from medmix_core.metrics import METRICS, compute_metrics, mean_std
from medmix_core.protocols import N_AVAILABLE, Protocol, apply_protocol, describe, parse_protocols
from medmix_core.runner import (
    choose_experts,
    clean_json,
    cohort_tensors,
    ensure_store,
    existing_store,
    is_store,
    load_model,
    load_tensors,
    run,
)
from medmix_core.runs import RunFolder
from medmix_core.store import EmbeddingStore, atomic_write_bytes, atomic_write_text
from medmix_core.training import predict_rows, resolve_device


def _eval_masks(proto: Protocol, tensors: StoreTensors, rows: torch.Tensor, seed: int):
    labels = None
    if proto.name == "mnar":
        labels = tensors.labels.reshape(tensors.n, -1)[:, 0]
        rows = rows[tensors.label_mask[rows]]
    return apply_protocol(tensors.mask, tensors.modalities, proto, seed, rows=rows, labels=labels)


def _evaluate_saved(run_dir: Path, tensors: StoreTensors, rows: torch.Tensor,
                    protos: list[Protocol], device: torch.device | None = None
                    ) -> dict[str, list[dict[str, Any]]]:
    """Per protocol label: per-seed metrics of the saved models under that protocol."""
    out: dict[str, list[dict[str, Any]]] = {describe(p): [] for p in protos}
    labels = tensors.labels[rows]
    for folder in RunFolder(run_dir).finished_seeds():
        model, meta = load_model(folder)
        device = device or torch.device("cpu")
        model = model.to(device)
        for p in protos:
            mask = _eval_masks(p, tensors, rows, int(meta["seed"]))
            pred = predict_rows(model, tensors, rows, device, mask=mask)
            out[describe(p)].append(compute_metrics(pred["probs"], labels, tensors.task_type,
                                                    meta["threshold"]))
    return out


def sweep(base: RunConfig, protocol: str, rates: list[float], fusers: list[str], out: Path,
          modality: str | None = None, strength: float = 0.0, covariate: str | None = None,
          keep_last: bool = True, log=print, overwrite: bool = False,
          resume: bool = False) -> list[dict[str, Any]]:
    """Run a protocol sweep; write tables and plots; return the result rows.

    ``out`` follows the run-folder rules (:mod:`medmix_core.runs`): an occupied folder is
    refused unless ``overwrite``, or ``resume`` for the same sweep (finished cells are
    kept, unfinished ones continue from their checkpoints); a sweep that fails is removed.
    Under torchrun each cell's seeds are shared out over the processes; rank 0 writes the
    tables.
    """
    from medmix_core import distributed
    from medmix_core.plugins import get_fuser
    from medmix_core.runner import prepare_folder
    from medmix_core.runs import request_of
    from medmix_core.training import check_fuser_options

    out = Path(out)
    for f in fusers:
        get_fuser(f)
        check_fuser_options(f, base.fuser_options)
    resolve_device(base.device)
    request = {"base": request_of(base), "protocol": protocol, "rates": list(rates),
               "fusers": list(fusers), "modality": modality, "strength": strength,
               "covariate": covariate, "keep_last": keep_last}
    if base.external_test and not is_store(base.external_test):
        raise MedmixError(f"--external-test {base.external_test!r}: a sweep evaluates an "
                          f"external cohort from a store; encode it first with `medmix "
                          f"extract ... --fit-from <the training store> --all-rows-split test`.")
    folder = prepare_folder(out, "sweep", overwrite, resume, request)
    dist = distributed.context()
    if dist.is_main:
        folder.start(protocol=protocol, rates=list(rates), fusers=list(fusers))
    try:
        rows = _sweep(base, protocol, rates, fusers, out, modality, strength, covariate,
                      keep_last, log, folder)
        if dist.is_main:
            folder.finish()
    except BaseException as exc:
        if dist.is_main:
            folder.abort(exc)
        raise
    return rows


def _sweep(base: RunConfig, protocol: str, rates: list[float], fusers: list[str], out: Path,
           modality: str | None, strength: float, covariate: str | None, keep_last: bool,
           log, folder: RunFolder) -> list[dict[str, Any]]:
    from medmix_core import distributed
    from medmix_core.plugins import get_fuser

    dist = distributed.context()
    main, resume = dist.is_main, folder.resuming
    planned = None
    if resume:  # the committee the sweep was planned with, not a new plan
        from medmix_core.runs import read_info

        planned = dist.broadcast(read_info(out).get("planned") if main else None)
    existing = existing_store(base)
    if planned is not None:
        base = base.model_copy(update=planned)
    else:  # one committee for every fuser and rate, fixed before training
        base = choose_experts(base, get_fuser(fusers[0]), existing, log)
    if main:
        folder.update(planned={"experts": base.experts, "teacher": base.teacher})
    store = ensure_store(base, log, existing)
    probe = load_tensors(base, store, teacher_needed=False)
    if protocol == "mar" and covariate is None:
        covariate = N_AVAILABLE
    protos = parse_protocols(protocol, rates, probe.modalities, modality, strength, covariate,
                             keep_last)
    rows_out: list[dict[str, Any]] = []
    for fuser in fusers:
        if protos[0].phase in ("test", "none"):
            cfg = base.model_copy(update={"fuser": fuser, "out": str(out / fuser / "natural"),
                                          "protocol": None})
            metrics = run(cfg, log, resume=resume)
            if not main:
                continue  # rank 0 evaluates the saved models and writes the tables
            needs = get_fuser(fuser).reads_teacher
            tensors = load_tensors(cfg, store, teacher_needed=needs)
            rows = torch.as_tensor(store.splits["test"], dtype=torch.long)
            rows_out.append(_row(fuser, "natural", 0.0, None, metrics["per_seed"]))
            for label, per_seed in _evaluate_saved(out / fuser / "natural", tensors, rows,
                                                   protos, resolve_device(base.device)).items():
                p = next(q for q in protos if describe(q) == label)
                rows_out.append(_row(fuser, label, p.rate, p.modality, per_seed))
            if base.external_test:
                spec = load_model(next(iter(sorted((out / fuser / "natural").glob(
                    "seed_*")))))[0].spec
                ext = cohort_tensors(EmbeddingStore.open(base.external_test), spec, base.task)
                erows = torch.arange(ext.n)
                for label, per_seed in _evaluate_saved(out / fuser / "natural", ext, erows,
                                                       protos, resolve_device(base.device)
                                                       ).items():
                    p = next(q for q in protos if describe(q) == label)
                    rows_out.append(_row(fuser, label, p.rate, p.modality, per_seed,
                                         split="external"))
        else:
            base_cfg = base.model_copy(update={"fuser": fuser, "protocol": None,
                                               "out": str(out / fuser / "natural")})
            rows_out.append(_row(fuser, "natural", 0.0, None,
                                 run(base_cfg, log, resume=resume)["per_seed"]))
            for p in protos:
                label = describe(p)
                cfg = base.model_copy(update={"fuser": fuser, "protocol": p.model_dump(),
                                              "out": str(out / fuser / _slug(label))})
                rows_out.append(_row(fuser, label, p.rate, p.modality,
                                     run(cfg, log, resume=resume)["per_seed"]))
    if main:
        write_sweep(rows_out, out, protocol)
    return rows_out


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_")


def _row(fuser: str, label: str, rate: float, modality: str | None,
         per_seed: list[dict[str, Any]], split: str = "test") -> dict[str, Any]:
    return {"fuser": fuser, "protocol": label, "rate": rate, "modality": modality,
            "split": split, "n_seeds": len(per_seed),
            **{k: mean_std([m[k] for m in per_seed]) for k in METRICS}}


def _fmt(ms: dict[str, float]) -> str:
    if ms["mean"] is None or math.isnan(ms["mean"]):
        return "undefined"
    return f"{ms['mean']:.3f} ± {ms['std']:.3f}"


def write_sweep(rows: list[dict[str, Any]], out: Path, protocol: str) -> None:
    """sweep.json, sweep.md, sweep.csv and one PNG per metric."""
    atomic_write_text(out / "sweep.json", json.dumps(clean_json(rows), indent=1))
    md = [f"# Sweep: {protocol}", "",
          "| Method | Split | Protocol | Rate | AUROC | AUPRC | macro-F1 | Accuracy |",
          "|---|---|---|---|---|---|---|---|"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["fuser", "split", "protocol", "rate", "modality", "n_seeds"]
               + [f"{k}_{s}" for k in METRICS for s in ("mean", "std")])
    for r in rows:
        md.append(f"| {r['fuser']} | {r['split']} | {r['protocol']} | {r['rate']:g} | "
                  + " | ".join(_fmt(r[k]) for k in METRICS) + " |")
        w.writerow([r["fuser"], r["split"], r["protocol"], r["rate"], r["modality"] or "",
                    r["n_seeds"]] + [r[k][s] for k in METRICS for s in ("mean", "std")])
    atomic_write_text(out / "sweep.md", "\n".join(md) + "\n")
    atomic_write_text(out / "sweep.csv", buf.getvalue())
    try:
        plot_sweep(rows, out, protocol)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'medmix[plots]').")


def atomic_savefig(fig, path: Path) -> None:
    """Save a matplotlib figure as PNG through a temp file and a rename."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def plot_sweep(rows: list[dict[str, Any]], out: Path, protocol: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for split in sorted({r["split"] for r in rows}):
        for k in METRICS:
            fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
            lines: dict[tuple, list[dict]] = {}
            natural = {r["fuser"]: r for r in rows if r["protocol"] == "natural"
                       and r["split"] == "test"}
            for r in rows:
                if r["split"] != split or r["protocol"] == "natural":
                    continue
                lines.setdefault((r["fuser"], r["modality"]), []).append(r)
            for (fuser, mod), pts in sorted(lines.items(), key=lambda x: str(x[0])):
                if split == "test" and fuser in natural:
                    pts = [natural[fuser]] + pts
                pts = sorted(pts, key=lambda r: r["rate"])
                x = [p["rate"] for p in pts]
                y = [p[k]["mean"] if p[k]["mean"] is not None else math.nan for p in pts]
                s = [p[k]["std"] if p[k]["std"] is not None else 0.0 for p in pts]
                label = fuser if mod is None else f"{fuser} – drop {mod}"
                ax.plot(x, y, marker="o", label=label)
                ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)],
                                alpha=0.15)
            ax.set_xlabel("missing rate")
            ax.set_ylabel(k.replace("_", "-").upper() if k != "macro_f1" else "macro-F1")
            ax.set_title(f"{protocol} ({split}): {k} vs rate, mean ± std over seeds")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / (f"sweep_{k}.png" if split == "test" else f"sweep_{split}_{k}.png")
            atomic_savefig(fig, path)
            plt.close(fig)
            paths.append(path)
    return paths
