"""``medmix run``: from a store (extracted on demand) to trained models, metrics and files.

The results folder's format and rules (one run per folder, locked while written, a
failed run removed) are owned by :mod:`medmix_core.runs`. Everything that can be checked
is checked before its first file is written: the fuser and its options, the device, the
experts, the store's labels and splits, the external cohort.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from medmix_core import distributed
from medmix_core.batch import StoreTensors
from medmix_core.config import RunConfig
from medmix_core.errors import MedmixError
from medmix_core.fusion import Fuser, FusionSpec
from medmix_core.metrics import METRICS, bootstrap_ci, compute_metrics, mean_std
from medmix_core.runs import RunFolder, RunFolderError, request_of
from medmix_core.store import EmbeddingStore, atomic_save_tensors, atomic_write_text, is_store
from medmix_core.training import (
    SeedResult,
    build_fuser,
    check_fuser_options,
    check_trainable,
    make_spec,
    predict_rows,
    refit_seed,
    resolve_device,
    resolve_distill,
    train_seed,
)


def default_store_path(cfg: RunConfig) -> Path:
    if cfg.store:
        return Path(cfg.store)
    name = cfg.dataset
    if cfg.source or cfg.dataset_options:
        import hashlib

        key = json.dumps([str(Path(cfg.source).resolve()) if cfg.source else None,
                          cfg.dataset_options], sort_keys=True, default=str)
        name += "-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    return Path("stores") / name


def existing_store(cfg: RunConfig) -> EmbeddingStore | None:
    """The configured store when it already exists (opened and validated once), else None."""
    path = default_store_path(cfg)
    return EmbeddingStore.open(path) if is_store(path) else None


def choose_experts(cfg: RunConfig, factory: Any, existing: EmbeddingStore | None = None,
                   log=print) -> RunConfig:
    """The one rule for "no --experts given", in this order:

    1. ``--experts`` given: those (``--drop-experts`` is applied later, by name or family);
    2. ``--store`` given and present: every expert it holds (left as None here);
    3. no ``--store``, and the dataset declares a committee (and the data is its bundled
       default): the part of it that fits the first-run time budget on this device
       (:func:`default_committee`);
    4. else the dataset's ``default_experts``; a dataset with none needs ``--experts``.
    """
    from medmix_core.plugins import get_dataset

    if cfg.experts:
        return cfg
    if cfg.store and existing is not None:
        return cfg
    if not cfg.store:
        planned = default_committee(cfg, factory, log, existing)
        if planned.experts:
            return planned
    ds_cls = get_dataset(cfg.dataset)
    wanted = list(getattr(ds_cls, "default_experts", ()))
    if not wanted:
        raise MedmixError(f"No store at {default_store_path(cfg)} and no --experts given for "
                          f"dataset {cfg.dataset!r}, which declares no default experts. Pass "
                          f"--experts a,b (see `medmix plugins`).")
    return cfg.model_copy(update={"experts": wanted})


def ensure_store(cfg: RunConfig, log=print,
                 existing: EmbeddingStore | None = None) -> EmbeddingStore:
    """Open the configured store; extract the missing experts/teacher into it first.

    ``existing`` is the store already opened by the caller (its manifest is not read
    again). Without ``cfg.experts`` and without a store, :func:`choose_experts` decides.
    """
    path = default_store_path(cfg)
    if existing is None and is_store(path):
        existing = EmbeddingStore.open(path)
    if not cfg.experts and existing is None:
        from medmix_core.plugins import get_fuser

        cfg = choose_experts(cfg, get_fuser(cfg.fuser), None, log)
    wanted = list(cfg.experts) if cfg.experts else None
    teachers = [cfg.teacher] if cfg.teacher else []
    if existing is not None:
        store = existing
        have = set(store.expert_names())
        have_t = set(store.teacher_names())
        if (wanted is None or set(wanted) <= have) and set(teachers) <= have_t:
            return store
        # only what is missing: entries already there stay as they are (extract keeps them
        # in the manifest), even if this device or version would key them differently
        wanted = sorted(set(wanted or []) - have)
        teachers = [t for t in teachers if t not in have_t]
    from medmix_core.plugins import get_any_encoder, get_expert

    for name in wanted or []:  # typos fail before anything is printed
        get_expert(name)
    for name in teachers:
        get_any_encoder(name)
    wanted = wanted or []
    from medmix_core.extract import extract  # heavy imports only when extracting

    what = ", ".join(wanted + [f"teacher {t}" for t in teachers])
    log(f"Extracting {what} from {cfg.dataset} into {path} (cached for later runs)")
    opts = {k: v for k, v in cfg.expert_options.items() if k in set(wanted) | set(teachers)}
    return extract(cfg.dataset, path, wanted, teachers, source=cfg.source,
                   device=str(resolve_device(cfg.device)),
                   dataset_options=cfg.dataset_options or None, progress=cfg.progress,
                   expert_options=opts or None)


def default_committee(cfg: RunConfig, factory: Any, log=print,
                      existing: EmbeddingStore | None = None) -> RunConfig:
    """``cfg`` with the experts (and teacher) of the dataset's default committee for this
    device (:func:`medmix_core.plan.plan_committee`); unchanged for a dataset without one,
    or for ``--source`` data and ``--dataset-options`` (the costs describe the bundled data).
    """
    from medmix_core.plan import device_kind, plan_committee
    from medmix_core.plugins import get_any_encoder, get_dataset

    ds_cls = get_dataset(cfg.dataset)
    if not getattr(ds_cls, "committee", ()) or cfg.source or cfg.dataset_options:
        return cfg
    reads_teacher = factory.reads_teacher
    if reads_teacher and not cfg.teacher:
        # its teacher must cover every row, which is a deliberate extraction
        raise MedmixError(f"Fuser {cfg.fuser!r} reads teacher embeddings at inference; name "
                          f"the experts and the teacher extracted for every row, e.g. "
                          f"`medmix extract --dataset {cfg.dataset} --experts stats --teacher "
                          f"{ds_cls.committee_teacher or 'NAME'} --teacher-rows all --out S` "
                          f"then `medmix run --store S --fuser {cfg.fuser}`.")
    have: set[str] = set()
    have_t: set[str] = set()
    if existing is None and is_store(default_store_path(cfg)):
        existing = EmbeddingStore.open(default_store_path(cfg))
    if existing is not None:
        have, have_t = set(existing.expert_names()), set(existing.teacher_names())
    teacher: str | bool | None = cfg.teacher or (cfg.distill is not False)
    plan = plan_committee(ds_cls, have, have_t, device_kind(cfg.device), get_any_encoder,
                          options=cfg.expert_options, teacher=teacher)
    plan.distill = cfg.distill is not False
    if cfg.dataset != RunConfig.model_fields["dataset"].default:
        plan.flags = f"--dataset {cfg.dataset}"
    log(plan.describe())
    return cfg.model_copy(update={"experts": plan.experts, "teacher": plan.teacher})


def select_experts(cfg: RunConfig, store: EmbeddingStore) -> list[str]:
    """Chosen experts: --experts (default: all in the store) minus --drop-experts (by name
    or by family, e.g. ``rag``)."""
    names = list(cfg.experts) if cfg.experts else store.expert_names()
    drop = set(cfg.drop_experts)
    fam = {e.name: e.family for es in store.experts.values() for e in es}
    kept = [n for n in names if n not in drop and fam.get(n) not in drop]
    if not kept:
        raise MedmixError(f"--drop-experts {sorted(drop)} leaves no expert out of {names}.")
    return kept


def _filter_modalities(tensors: StoreTensors, keep: list[str] | None) -> StoreTensors:
    if not keep:
        return tensors
    unknown = [m for m in keep if m not in tensors.modalities]
    if unknown:
        raise MedmixError(f"--keep-modalities {unknown}: not among the modalities "
                          f"{tensors.modalities}.")
    tensors.modalities = [m for m in tensors.modalities if m in keep]
    if tensors.teacher is not None:
        cols = [i for i, m in enumerate(tensors.experts) if m in keep]
        tensors.teacher = {m: x for m, x in tensors.teacher.items() if m in keep}
        tensors.teacher_mask = tensors.teacher_mask[:, cols]
    for d in (tensors.experts, tensors.emb, tensors.mask):
        for m in list(d):
            if m not in keep:
                del d[m]
    return tensors


def load_tensors(cfg: RunConfig, store: EmbeddingStore, teacher_needed: bool) -> StoreTensors:
    experts = select_experts(cfg, store)
    teacher = cfg.teacher if (cfg.teacher and teacher_needed) else None
    from medmix_core.stream import should_stream

    # a store larger than memory is read batch by batch (the same batches, bit for bit)
    stream = should_stream(store, experts, teacher) if cfg.stream is None else cfg.stream
    tensors = StoreTensors.from_store(store, cfg.task, experts, teacher, stream=stream)
    return _filter_modalities(tensors, cfg.keep_modalities)


def families(store: EmbeddingStore, tensors: StoreTensors) -> dict[str, list[str]]:
    fam = {(m, e.name): e.family for m, es in store.experts.items() for e in es}
    return {m: [fam[(m, n)] for n in tensors.experts[m]] for m in tensors.modalities}


def _protocol_masks(cfg: RunConfig, tensors: StoreTensors, store: EmbeddingStore, seed: int):
    """(train_mask, eval_mask) after the configured missingness protocol, or (None, None)."""
    if not cfg.protocol:
        return None, None
    from medmix_core.protocols import Protocol, apply_protocol

    proto = Protocol(**cfg.protocol)
    if proto.phase == "none":
        return None, None
    labels = tensors.labels.reshape(tensors.n, -1)[:, 0] if tensors.task_type != "multiclass" \
        else None
    kw = {"labels": labels}
    rows = {"train": torch.as_tensor(store.splits["train"]),
            "test": torch.as_tensor(store.splits["test"] + store.splits.get("val", [])),
            "both": torch.arange(tensors.n)}[proto.phase]
    if proto.name == "mnar":
        rows = rows[tensors.label_mask[rows]]
    mask = apply_protocol(tensors.mask, tensors.modalities, proto, seed, rows=rows, **kw)
    if proto.phase == "train":
        return mask, None
    if proto.phase == "test":
        return None, mask
    return mask, mask


def save_model(result: SeedResult, spec: FusionSpec, cfg: RunConfig, folder: Path) -> None:
    """The deployed model: fuser weights only (teacher heads live outside the fuser)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    atomic_save_tensors(folder / "model.safetensors", state)
    meta = {"fuser": cfg.fuser, "fuser_options": {"d": cfg.d, "dropout": cfg.dropout,
                                                  **cfg.fuser_options},
            "spec": vars(spec), "seed": result.seed, "threshold": result.threshold,
            "best_epoch": result.best_epoch, "task": cfg.task}
    atomic_write_text(folder / "model.json", json.dumps(meta, indent=1))


def load_model(folder: Path) -> tuple[Fuser, dict[str, Any]]:
    """Rebuild a saved fuser from model.json + model.safetensors."""
    from medmix_core.plugins import get_fuser

    meta_path = Path(folder) / "model.json"
    if not meta_path.is_file():
        raise MedmixError(f"{meta_path} is missing: {folder} is not a saved medmix model "
                          f"(expected model.json and model.safetensors from `medmix run`).")
    meta = json.loads(meta_path.read_text())
    spec = FusionSpec(**meta["spec"])
    model = get_fuser(meta["fuser"])(spec, **meta["fuser_options"])
    state = load_file(str(Path(folder) / "model.safetensors"))
    model.load_state_dict(state)
    return model.eval(), meta


def _copy_encoders(store: EmbeddingStore, tensors: StoreTensors, out: Path) -> None:
    """Experts used, their dims, provenance and fitted state: what predict needs."""
    entries = []
    for m in tensors.modalities:
        for name in tensors.experts[m]:
            e = store.entry(m, name)
            rec = {"modality": m, "name": name, "dim": e.dim, "family": e.family,
                   "provenance": e.provenance, "state_file": None}
            if e.state_file:
                dst = out / e.state_file
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(store.path / e.state_file, dst)
                rec["state_file"] = e.state_file
            entries.append(rec)
    info = {"dataset": store.manifest.get("dataset", {}), "store": str(store.path),
            "modalities": [vars(m) for m in store.modalities], "encoders": entries}
    atomic_write_text(out / "encoders.json", json.dumps(info, indent=1))


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {k: mean_std([m[k] for m in per_seed]) for k in METRICS}


def fmt(ms: dict[str, float]) -> str:
    if ms["mean"] is None or math.isnan(ms["mean"]):
        return "undefined"
    return f"{ms['mean']:.3f} ± {ms['std']:.3f}"


def open_external(cfg: RunConfig, store: EmbeddingStore, log=print) -> EmbeddingStore:
    """The external cohort's store: a store path as is, or a source (of the run's dataset,
    or of ``external_dataset``) extracted with the training store's fitted expert state."""
    src = cfg.external_test
    if is_store(src):
        return EmbeddingStore.open(src)
    if not Path(src).exists():
        raise MedmixError(f"--external-test {src!r} does not exist. Pass a store folder (from "
                          f"`medmix extract`) or raw data of the dataset "
                          f"{cfg.external_dataset or cfg.dataset!r}.")
    from medmix_core.extract import extract

    dataset = cfg.external_dataset or cfg.dataset
    # beside the training store, keyed by the external dataset and source
    key = default_store_path(cfg.model_copy(update={"source": src, "store": None,
                                                    "dataset": dataset})).name
    path = store.path.parent / f"{store.path.name}-external-{key.rsplit('-', 1)[-1]}"
    if dataset != cfg.dataset:
        path = path.with_name(f"{path.name}-{dataset}")
    log(f"Encoding external cohort {src} with the training store's fitted experts -> {path}")
    return extract(dataset, path, store.expert_order(), [], source=src, fit_from=store.path,
                   progress=cfg.progress, all_rows_split="test",
                   device=str(resolve_device(cfg.device)),
                   dataset_options=(cfg.dataset_options or None) if dataset == cfg.dataset
                   else None)


def cohort_tensors(store: EmbeddingStore, spec: FusionSpec, task: str | None,
                   teacher: str | None = None) -> StoreTensors:
    """A cohort laid out as a trained model expects it: the spec's modalities and experts,
    matched by name; a modality the cohort lacks is absent for every row."""
    return StoreTensors.from_store(store, task, teacher=teacher, layout=spec.experts,
                                   dims=spec.dims)


def check_compatible(spec: FusionSpec, tensors: StoreTensors, what: str) -> None:
    """A cohort must have the run's modalities, experts (by name) and dims."""
    for m in spec.modalities:
        if m not in tensors.modalities:
            raise MedmixError(f"{what} has no modality {m!r} (it has {tensors.modalities}); the "
                              f"run was trained on {spec.modalities}.")
        got = dict(zip(tensors.experts[m], tensors.dims()[m]))
        want = dict(zip(spec.experts[m], spec.dims[m]))
        if got != want:
            raise MedmixError(f"{what}: modality {m!r} has experts/dims {sorted(got.items())}, "
                              f"the run expects {sorted(want.items())}. Encode the cohort with "
                              f"the run's experts (`medmix predict` does this from a raw "
                              f"source).")
        if tensors.experts[m] != spec.experts[m]:
            raise MedmixError(f"{what}: modality {m!r} lists experts {tensors.experts[m]}, the "
                              f"model reads them as {spec.experts[m]}; load the cohort with "
                              f"medmix_core.runner.cohort_tensors, which matches them by name.")


def select_on_validation(cfg: RunConfig, tensors: StoreTensors, spec: FusionSpec,
                         store: EmbeddingStore, options: list[dict[str, Any]], log=print):
    """Train each candidate option set with the first seed; keep the lowest validation loss.

    Returns:
        (the config with the chosen fuser_options, a record of every candidate's loss).
    """
    tried = []
    for opts in options:
        trial = cfg.model_copy(update={"fuser_options": opts})
        res = train_seed(trial, tensors, spec, store.splits, cfg.seeds[0])
        loss = min(h["val_loss"] for h in res.history)
        tried.append({"options": opts, "val_loss": loss})
        log(f"candidate {opts}: best validation loss {loss:.4f}")
    best = min(tried, key=lambda t: t["val_loss"])
    log(f"selected on validation: {best['options']}")
    return cfg.model_copy(update={"fuser_options": best["options"]}), {
        "chosen": best["options"], "candidates": tried}


def default_out(cfg: RunConfig, label: str | None = None) -> Path:
    """``runs/<timestamp>-<fuser>`` (or ``-<label>``) when no --out is given."""
    return Path("runs") / (dt.datetime.now().strftime("%Y%m%d-%H%M%S")
                           + f"-{label or cfg.fuser}")


def _check_experts_known(cfg: RunConfig, existing: EmbeddingStore | None) -> None:
    """Named experts must be registered (or already in the store)."""
    from medmix_core.plugins import get_expert

    if not cfg.experts:
        return
    have = set(existing.expert_names()) if existing is not None else set()
    for name in list(cfg.experts) + list(cfg.drop_experts):
        if name in have or name in ("general", "domain", "rag"):
            continue
        get_expert(name)  # UnknownPluginError: "Unknown expert ..." with close matches


def _check_out_vs_store(out: Path, store_path: Path) -> None:
    o, st = out.resolve(), store_path.resolve()
    if o == st or st in o.parents or o in st.parents:
        raise RunFolderError(f"--out {str(out)!r} and the store {str(store_path)!r} overlap; "
                             f"a results folder and a store must be separate folders.")


def prepare_folder(out: Path, kind: str, overwrite: bool, resume: bool,
                   request: dict[str, Any] | None) -> RunFolder:
    """:meth:`RunFolder.prepare` on rank 0; every rank of a torchrun command gets the same
    answer (or the same error), so no rank waits for one that gave up."""
    dist = distributed.context()
    folder, error = None, None
    if dist.is_main:
        try:
            folder = RunFolder.prepare(out, kind, overwrite, resume=resume, request=request)
        except MedmixError as exc:
            error = str(exc)
    answer = dist.broadcast(error if error is not None else
                            None if folder is None else (folder.resuming, folder.done))
    if isinstance(answer, str):
        raise RunFolderError(answer)
    if folder is None:  # another rank: the same view of the folder, no lock, no writes
        folder = RunFolder(out, kind)
        folder.resuming, folder.done = answer
    return folder


def run(cfg: RunConfig, log=print, overwrite: bool = False, tracker=None,
        check_only: bool = False, resume: bool = False) -> dict[str, Any] | None:
    """Train and evaluate ``cfg.fuser`` for every seed; write the results folder.

    Under ``torchrun`` the seeds are shared out over the processes (each trains its own,
    into its own ``seed_<s>/``); rank 0 writes ``run.json``, the metrics and predictions.

    Args:
        cfg: the run configuration.
        log: where progress lines go.
        overwrite: replace a run already in ``cfg.out`` (cleared first); without it an
            occupied folder is refused.
        tracker: a :class:`medmix_core.tracking.Tracker` that receives the config, every
            epoch's record, the final metrics and the run's files; None logs nowhere.
        check_only: run every check (and the extractions they need), write no results
            folder, return None: what :func:`compare` does for every fuser first.
        resume: continue the run in ``cfg.out`` if it was started with the same
            configuration (finished seeds are kept, a seed in training continues from its
            last epoch checkpoint); return its metrics if it is complete; start when the
            folder is empty. Another configuration there is refused.
    Returns:
        the metrics dict written to metrics.json (with "out").
    """
    from medmix_core.plugins import get_fuser

    factory = get_fuser(cfg.fuser)  # unknown names fail before any extraction
    check_fuser_options(cfg.fuser, cfg.fuser_options)
    if cfg.data_parallel and not distributed.launched():
        raise MedmixError("--data-parallel shares every batch over the processes of a "
                          "torchrun command, and this is one process. Add --nproc N (or start "
                          "it with `torchrun --nproc-per-node N --no-python medmix -- run "
                          "...`), or drop --data-parallel.")
    device = resolve_device(distributed.context().device(cfg.device))
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    if cfg.store:
        _check_out_vs_store(out, Path(cfg.store))
    folder = prepare_folder(out, "run", overwrite, resume, request_of(cfg))
    if folder.done:
        if check_only:
            return None
        log(f"{out} holds this run, complete: nothing to train.")
        metrics = folder.metrics()
        metrics["out"] = str(out)
        return metrics
    if folder.resuming and not cfg.experts:
        # the committee the run was planned with, not one planned again from a store that
        # the first attempt may have grown
        stored = folder.config()
        cfg = cfg.model_copy(update={"experts": stored.get("experts"),
                                     "teacher": stored.get("teacher"),
                                     "store": cfg.store or stored.get("store")})
    existing = existing_store(cfg)  # the manifest is read once before training
    _check_experts_known(cfg, existing)
    cfg = choose_experts(cfg, factory, existing, log)
    store = ensure_store(cfg, log, existing)
    _check_out_vs_store(out, store.path)
    fuser_cls_needs_teacher = factory.reads_teacher
    cfg = resolve_distill(cfg)  # a teacher read at inference is an input, not a target
    teacher_needed = cfg.distill_on or fuser_cls_needs_teacher
    if fuser_cls_needs_teacher and not cfg.teacher:
        if store.default_teacher() is None:
            raise MedmixError(f"Fuser {cfg.fuser!r} reads teacher-class embeddings at inference,"
                              f" but store {store.path} has none. Extract one with --teacher.")
        cfg = cfg.model_copy(update={"teacher": store.default_teacher()})
    tensors = load_tensors(cfg, store, teacher_needed)
    check_trainable(tensors, store.splits)
    test_rows = torch.as_tensor(store.splits.get("test", []), dtype=torch.long)
    if not bool(tensors.label_mask[test_rows].any()) if len(test_rows) else True:
        raise MedmixError(f"Store {store.path}: the test split has {len(test_rows)} rows and "
                          f"no known label of task {tensors_task(cfg, store)!r}; there is "
                          f"nothing to evaluate. Check the store's splits and labels.")
    if fuser_cls_needs_teacher:
        if not bool(tensors.teacher_mask[test_rows].any()):
            raise MedmixError(
                f"Fuser {cfg.fuser!r} reads teacher embeddings at inference, but teacher "
                f"{cfg.teacher!r} in store {store.path} covers no test row (teachers are "
                f"extracted for the training split by default). Re-extract it for every row: "
                f"`medmix extract ... --teacher {cfg.teacher} --teacher-rows all --out "
                f"{store.path}`.")
    spec = make_spec(tensors, families(store, tensors))
    probe = build_fuser(cfg, spec)  # options and distillability, before any training
    if cfg.distill_on and not probe.rep_dim:
        raise MedmixError(f"Fuser {cfg.fuser!r} exposes no modality representations, so it "
                          f"cannot be distilled from teacher {cfg.teacher!r}. Run it with "
                          f"--no-distill (or without --teacher).")
    used = []
    for m in spec.modalities:
        used += [n for n in spec.experts[m] if n not in used]
    # absolute, so report, predict and export find the store from any folder
    resolved = cfg.model_copy(update={"store": str(store.path.resolve()), "experts": used,
                                      "out": str(out)})
    test_labels = tensors.labels[test_rows]
    ext_store = ext_tensors = None
    if cfg.external_test:  # encoded and checked before the results folder is started
        ext_store = open_external(cfg, store, log)
        ext_tensors = cohort_tensors(ext_store, spec, tensors_task(cfg, store),
                                     cfg.teacher if fuser_cls_needs_teacher else None)
        check_compatible(spec, ext_tensors, f"External cohort {cfg.external_test}")
    if check_only:
        return None

    dist = distributed.context()
    error = None
    if dist.is_main:  # outside the try: a folder another process locked is never cleared
        try:
            folder.start(seeds=list(cfg.seeds), fuser=cfg.fuser)
        except MedmixError as exc:
            error = str(exc)
    if dist.broadcast(error) is not None:
        raise RunFolderError(error or "The results folder could not be started by rank 0; "
                                      "its error is in its own output.")
    try:
        if dist.is_main:
            folder.write_text("config.json", resolved.model_dump_json(indent=1))
            _copy_encoders(store, tensors, out)
            if tracker is not None:
                tracker.open(out, json.loads(resolved.model_dump_json()))
        dist.barrier()  # the folder exists and is locked before any rank writes a seed
        metrics = _train_and_evaluate(cfg, factory, store, tensors, spec, folder, device,
                                      test_rows, test_labels, ext_store, ext_tensors,
                                      resolved, teacher_needed, log, tracker)
        if dist.is_main:
            if tracker is not None:
                from medmix_core.tracking import run_files

                tracker.log_final(metrics, run_files(out))
                tracker.close()
            folder.finish()
    except BaseException as exc:
        if dist.is_main:
            if tracker is not None:
                tracker.close("FAILED")
            folder.abort(exc)
        raise
    metrics["out"] = str(out)
    return metrics


def _train_and_evaluate(cfg, factory, store, tensors, spec, folder: RunFolder, device,
                        test_rows, test_labels, ext_store, ext_tensors, resolved,
                        teacher_needed, log, tracker=None) -> dict[str, Any]:
    """Every seed of a started run folder not finished yet: train, evaluate, save it in
    ``seed_<s>/``; then (rank 0) metrics and predictions from every seed's saved result."""
    dist = distributed.context()
    out = folder.path
    selection = None
    if factory.candidates is not None and not cfg.fuser_options:
        sel_file = out / "selection.json"
        if sel_file.is_file():
            selection = json.loads(sel_file.read_text("utf-8"))
        else:
            if dist.is_main:
                _, selection = select_on_validation(cfg, tensors, spec, store,
                                                    factory.candidates(spec), log)
                folder.write_json("selection.json", selection)
            selection = dist.broadcast(selection)
        cfg = cfg.model_copy(update={"fuser_options": selection["chosen"]})

    pending = [s for s in cfg.seeds if not folder.seed_result_done(s)]
    if folder.resuming and len(pending) < len(cfg.seeds):
        log(f"resuming {out}: seeds {[s for s in cfg.seeds if s not in pending]} finished, "
            f"training {pending}")
    # data-parallel: every process trains every seed; else the seeds are shared out
    mine = pending if cfg.data_parallel else dist.share(pending)
    masks = {s: _protocol_masks(cfg, tensors, store, s) for s in mine}
    error: BaseException | None = None
    try:
        for res in _train_seeds(cfg, tensors, spec, store, folder, mine, masks, resolved,
                                log, tracker):
            _save_seed(res, cfg, tensors, spec, folder, device, test_rows, test_labels,
                       ext_tensors, masks[res.seed][1], log)
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the ranks agree
        error = exc
    if not dist.all_ok(error is None):
        if error is not None:
            raise error
        raise MedmixError("Another process of this torchrun command failed; its error is in "
                          "its own output. Nothing of the unfinished seeds was kept.")
    metrics: dict[str, Any] = {}
    if dist.is_main:
        for s in pending:
            folder.seed_done(s)
        metrics = _aggregate_run(cfg, store, tensors, spec, folder, test_rows, test_labels,
                                 ext_store, ext_tensors, resolved, teacher_needed, selection)
    return dist.broadcast(metrics)


def _train_seeds(cfg, tensors, spec, store, folder: RunFolder, seeds: list[int], masks,
                 resolved, log, tracker):
    """Train ``seeds`` (together as one vectorised model where the fuser allows, else one
    after another), yielding each seed's :class:`SeedResult` as it is ready."""
    if not seeds:
        return
    log(f"seed(s) {seeds}: training {cfg.fuser} on {len(store.splits['train'])} samples, "
        f"{len(spec.modalities)} modalities, experts {sorted(set(resolved.experts))}")

    def on_epoch_of(seed):
        return None if tracker is None else (lambda rec: tracker.log_epoch(seed, rec))

    groups = _together_groups(cfg, tensors, spec, folder, seeds, log)
    for group in groups:
        results = _train_together(cfg, tensors, spec, store, folder, group, masks, tracker)
        for res in results:
            if not folder.seed_result_done(res.seed):
                yield _refit(cfg, tensors, spec, store, folder, res, masks, on_epoch_of)
        (folder.path / "checkpoints" / _together_name(group)).unlink(missing_ok=True)
    for seed in [s for s in seeds if not any(s in g for g in groups)]:
        train_mask, eval_mask = masks[seed]
        res = train_seed(cfg, tensors, spec, store.splits, seed, train_mask, eval_mask,
                         on_epoch=on_epoch_of(seed), checkpoint=folder.checkpoint(seed))
        yield _refit(cfg, tensors, spec, store, folder, res, masks, on_epoch_of)


def _refit(cfg, tensors, spec, store, folder, res: SeedResult, masks, on_epoch_of):
    """With ``refit``: the epoch count chosen on validation, trained on train + val."""
    if not cfg.refit:
        return res
    return refit_seed(cfg, tensors, spec, store.splits, res.seed, res.best_epoch + 1,
                      res.threshold, res.val_metrics, masks[res.seed][0],
                      on_epoch=on_epoch_of(res.seed),
                      checkpoint=folder.checkpoint(res.seed, "refit"))


def _together_name(seeds: list[int]) -> str:
    return "together_" + "-".join(str(s) for s in seeds) + ".pt"


def _together_groups(cfg, tensors, spec, folder: RunFolder, seeds: list[int],
                     log) -> list[list[int]]:
    """The groups of ``seeds`` trained together: a group whose checkpoint an earlier attempt
    left continues as it was; the rest form one group. None when the run is sequential."""
    if cfg.sequential or cfg.data_parallel or len(seeds) < 2:
        return []
    try:
        from medmix_core.together import together_blocker
    except ImportError:  # pragma: no cover - the module ships with the core
        return []
    why = together_blocker(cfg, tensors, spec)
    if why is not None:
        log(f"{cfg.fuser}: seeds trained one after another ({why})")
        return []
    groups, left = [], list(seeds)
    for ck in sorted((folder.path / "checkpoints").glob("together_*.pt")):
        try:
            group = [int(x) for x in ck.stem.split("_", 1)[1].split("-")]
        except ValueError:
            continue
        if set(group) & set(left) and set(group) <= set(cfg.seeds):
            groups.append(group)
            left = [s for s in left if s not in group]
    if len(left) > 1:
        groups.append(left)
    return groups


def _train_together(cfg, tensors, spec, store, folder: RunFolder, group: list[int], masks,
                    tracker) -> list[SeedResult]:
    from medmix_core.together import train_seeds_together

    on_epoch = None if tracker is None else (lambda seed, rec: tracker.log_epoch(seed, rec))
    return train_seeds_together(
        cfg, tensors, spec, store.splits, group,
        train_masks={s: masks.get(s, _protocol_masks(cfg, tensors, store, s))[0] for s in group},
        val_masks={s: masks.get(s, _protocol_masks(cfg, tensors, store, s))[1] for s in group},
        on_epoch=on_epoch, checkpoint=folder.path / "checkpoints" / _together_name(group))


def _save_seed(res: SeedResult, cfg, tensors, spec, folder: RunFolder, device, test_rows,
               test_labels, ext_tensors, eval_mask, log) -> None:
    """Evaluate a trained seed and write ``seed_<s>/``: model, test (and external)
    probabilities, metrics and training facts; ``result.json`` last marks it finished."""
    seed = res.seed
    if cfg.data_parallel and not distributed.context().is_main:
        return  # every process holds the same model; rank 0 saves it
    model = res.model.to(device)
    pred = predict_rows(model, tensors, test_rows, device, mask=eval_mask)
    m = compute_metrics(pred["probs"], test_labels, tensors.task_type, res.threshold)
    saved = {"probs": pred["probs"].contiguous()}
    if pred.get("modality_weights") is not None:
        saved["modality_weights"] = pred["modality_weights"].contiguous()
    ext_m = None
    if ext_tensors is not None:
        ep = predict_rows(model, ext_tensors, torch.arange(ext_tensors.n), device)
        ext_m = compute_metrics(ep["probs"], ext_tensors.labels, ext_tensors.task_type,
                                res.threshold)
        saved["external_probs"] = ep["probs"].contiguous()
    res.model = model.cpu()
    d = folder.seed_dir(seed)
    save_model(res, spec, cfg, d)
    atomic_save_tensors(d / "predictions.safetensors", saved)
    info = {"seed": seed, "best_epoch": res.best_epoch, "refit": cfg.refit,
            "epochs_run": res.epochs_run, "seconds": round(res.seconds, 2),
            "threshold": res.threshold, "val": res.val_metrics}
    atomic_write_text(d / "result.json", json.dumps(
        clean_json({"info": info, "test": m, "external": ext_m}), indent=1, default=_json_nan))
    for phase in ("train", "refit"):
        folder.checkpoint(seed, phase).unlink(missing_ok=True)
    if distributed.context().is_main:
        folder.seed_done(seed)
    log(f"seed {seed}: best epoch {res.best_epoch} of {res.epochs_run}, "
        f"{res.seconds:.1f}s, test AUROC {m['auroc']:.4f}, AUPRC {m['auprc']:.4f}")


def _read_seed(folder: RunFolder, seed: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    d = folder.seed_dir(seed)
    result = json.loads((d / "result.json").read_text("utf-8"))
    return result, load_file(str(d / "predictions.safetensors"))


def _aggregate_run(cfg, store, tensors, spec, folder: RunFolder, test_rows, test_labels,
                   ext_store, ext_tensors, resolved, teacher_needed,
                   selection) -> dict[str, Any]:
    """metrics.json and predictions.csv from every seed's saved result (the same files,
    whether the seeds were trained in this process, another one, or an earlier attempt)."""
    out = folder.path
    per_seed, ext_per_seed, probs, weights, seeds_info, ext_probs = [], [], [], [], [], []
    for seed in cfg.seeds:
        result, saved = _read_seed(folder, seed)
        per_seed.append(_nan_metrics(result["test"]))
        seeds_info.append(result["info"])
        probs.append(saved["probs"])
        weights.append(saved.get("modality_weights"))
        if ext_tensors is not None:
            ext_per_seed.append(_nan_metrics(result["external"]))
            ext_probs.append(saved["external_probs"])

    n_known = int(tensors.label_mask[test_rows].sum())
    metrics: dict[str, Any] = {
        "task": tensors_task(cfg, store), "task_type": tensors.task_type, "fuser": cfg.fuser,
        "experts": resolved.experts, "experts_by_modality": spec.experts,
        "modalities": spec.modalities, "seeds": list(cfg.seeds),
        "teacher": cfg.teacher if teacher_needed else None, "distill": cfg.distill_on,
        "threshold_rule": ("chosen on validation to maximise macro-F1"
                           if cfg.threshold == "val" else f"fixed at {cfg.threshold}"),
        "test": aggregate(per_seed), "per_seed": per_seed, "seed_info": seeds_info,
        "n_test": n_known, "n_test_unknown_label": len(test_rows) - n_known,
        "store": str(store.path), "protocol": cfg.protocol,
        "selected_on_validation": selection,
    }
    # the deployed model is the seeds' ensemble (predict averages their probabilities)
    thr = sum(s["threshold"] for s in seeds_info) / len(seeds_info)
    metrics["test_ensemble"] = compute_metrics(torch.stack(probs).mean(0), test_labels,
                                               tensors.task_type, thr)
    if cfg.bootstrap:
        # CI of the seed-averaged prediction: resampling patients, seeded with 0
        known = tensors.label_mask[test_rows]
        metrics["test_ci95"] = bootstrap_ci(torch.stack(probs).mean(0)[known],
                                            test_labels[known], tensors.task_type, thr,
                                            cfg.bootstrap, 0)
        metrics["bootstrap"] = {"resamples": cfg.bootstrap, "seed": 0, "level": 0.95,
                                "of": "mean probability over seeds, percentile interval"}
    if ext_per_seed:
        metrics["external"] = aggregate(ext_per_seed)
        metrics["external_per_seed"] = ext_per_seed
        metrics["external_ensemble"] = compute_metrics(torch.stack(ext_probs).mean(0),
                                                       ext_tensors.labels,
                                                       ext_tensors.task_type, thr)
    _write_predictions(out / "predictions.csv", store, tensors, test_rows, probs, weights,
                       cfg.seeds, spec)
    if ext_probs:
        _write_predictions(out / "external_predictions.csv", ext_store, ext_tensors,
                           torch.arange(ext_tensors.n), ext_probs, [None] * len(ext_probs),
                           cfg.seeds, spec)
    # metrics last: a folder with metrics.json is a finished run
    folder.write_text("metrics.json", json.dumps(clean_json(metrics), indent=1,
                                                 default=_json_nan))
    return metrics


def _nan_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """A saved metrics dict with JSON null read back as NaN (an undefined metric)."""
    return {k: (math.nan if v is None and k in METRICS else v) for k, v in m.items()}


def compare(base: RunConfig, fusers: list[str], out: str | Path | None = None,
            overwrite: bool = False, log=print, resume: bool = False) -> list[dict[str, Any]]:
    """One run per fuser in ``out/<fuser>`` and the paper-style table in ``out``.

    The comparison folder follows the run-folder rules: refused when occupied (unless
    ``overwrite``, or ``resume`` for the same comparison: finished fusers are kept, the
    others continue), locked while written, marked complete last.
    """
    from medmix_core.plugins import get_fuser
    from medmix_core.report import write_comparison

    for f in fusers:  # every name checked before anything runs
        get_fuser(f)
    root = Path(out) if out else default_out(base, "comparison")
    request = {"base": request_of(base), "fusers": list(fusers)}
    folder = prepare_folder(root, "comparison", overwrite, resume, request)
    resolve_device(base.device)
    dist = distributed.context()
    planned = None
    if folder.resuming:  # the committee the comparison was planned with, not a new plan
        from medmix_core.runs import read_info

        planned = dist.broadcast(read_info(root).get("planned") if dist.is_main else None)
    if planned is not None:
        base = base.model_copy(update=planned)
    else:  # one committee for every fuser, planned (and said) once
        base = choose_experts(base, get_fuser(fusers[0]), existing_store(base), log)
    for f in fusers:  # every fuser's whole pre-flight (options, distillation, store) first
        run(base.model_copy(update={"fuser": f, "out": str(root / f)}), log, check_only=True,
            resume=folder.resuming)
    if dist.is_main:
        folder.start(fusers=fusers, planned={"experts": base.experts, "teacher": base.teacher})
    results = []
    try:
        for f in fusers:
            cfg = base.model_copy(update={"fuser": f, "out": str(root / f)})
            results.append(run(cfg, log, resume=folder.resuming))
        if dist.is_main:
            write_comparison(results, root)
            folder.finish()
    except BaseException as exc:
        if dist.is_main:
            if results and not isinstance(exc, KeyboardInterrupt):
                folder.update(status="failed", error=str(exc))  # finished runs are kept
                folder.release()
            else:
                folder.abort(exc)
        raise
    return results


def tensors_task(cfg: RunConfig, store: EmbeddingStore) -> str:
    return store.task(cfg.task).name


def _json_nan(o: Any) -> Any:
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def clean_json(o: Any) -> Any:
    """NaN/Inf -> None (JSON null), recursively: an undefined metric is null, not NaN."""
    if isinstance(o, float):
        return None if (math.isnan(o) or math.isinf(o)) else o
    if isinstance(o, dict):
        return {k: clean_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean_json(v) for v in o]
    return o


def _write_predictions(path: Path, store: EmbeddingStore, tensors: StoreTensors,
                       rows: torch.Tensor, probs: list[torch.Tensor],
                       weights: list[torch.Tensor | None], seeds: list[int],
                       spec: FusionSpec) -> None:
    mean = torch.stack(probs).mean(0)  # [N, C]
    c = mean.shape[1]
    labels = tensors.labels[rows]
    wts = [w for w in weights if w is not None]
    wmean = torch.stack(wts).mean(0) if wts else None
    buf = io.StringIO()
    w = csv.writer(buf)
    lab_cols = ["label"] if labels.ndim == 1 or labels.shape[1] == 1 else \
        [f"label_{i}" for i in range(labels.shape[1])]
    prob_cols = ["prob"] if c == 1 else [f"prob_{i}" for i in range(c)]
    seed_cols = [f"prob_seed{s}" + ("" if c == 1 else f"_{i}") for s in seeds for i in range(c)]
    wcols = [f"weight_{m}" for m in spec.modalities] if wmean is not None else []
    w.writerow(["sample_id"] + lab_cols + prob_cols + seed_cols + wcols)
    lab2 = labels.reshape(len(rows), -1).float()
    for i, r in enumerate(rows.tolist()):
        # an unknown label is an empty cell, never 0
        labs = ["" if (math.isnan(v) or v < 0) else int(v) for v in lab2[i].tolist()]
        row = [store.sample_ids[r]] + labs + [f"{v:.6f}" for v in mean[i].tolist()]
        row += [f"{p[i, j]:.6f}" for p in probs for j in range(c)]
        if wmean is not None:
            row += [f"{v:.4f}" for v in wmean[i].tolist()]
        w.writerow(row)
    atomic_write_text(path, buf.getvalue())
