"""Extraction: a dataset plugin and expert plugins -> an :class:`EmbeddingStore`.

For every expert and every modality it accepts, the expert is fitted on the *training*
split's present payloads only, then encodes every present payload in shards of
``shard_size`` rows (absent modalities get mask False). Teachers are extracted the same
way under ``teachers/``, by default for the training rows only (they are training-only).

Resumable. ``extract_state.json`` in the store folder records, per (role, modality,
encoder), a cache key (dataset identity, sample ids, splits, encoder name, version,
provenance/options, shard size, teacher rows) and the shards already finished. Re-running
with the same inputs keeps every finished shard that is still intact on disk and makes the
others, so an interrupted extraction resumes and ends with shards byte-identical to an
uninterrupted run; a run with nothing left to do returns the store untouched, and a run
over a store with a missing or damaged shard re-makes just that shard. Adding an expert to
an existing store keeps the ones already there; changing an expert's options re-extracts
that expert only. Fitted state is saved before the first shard, and every shard is encoded
by an expert restored from that saved state (``set_state``), so a fresh run, a resumed run
and every process of a distributed run encode with the same state.

Several processes. Under ``torchrun`` (:mod:`medmix_core.distributed`) every rank reads the
cohort and plans the same jobs; rank 0 alone takes the folder lock, fits (or restores) each
job's state and writes it, and the missing shards of the job are shared among the ranks.
Rank 0 records its shards in ``extract_state.json``; every other rank records its own in
``extract_state.rank<r>.json`` after each shard, so a killed run loses no finished shard:
rank 0 merges those files (on the next run too, whatever its number of processes) and
validates every record before it is kept. Rank 0 writes labels and manifest last. The
result is byte-identical to a one-process extraction. A failure on one rank stops every
rank at the next sync point with a message naming the rank, instead of leaving the others
waiting.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.numpy import load_file

from medmix_core.config import parse_names
from medmix_core.datasets import missing_rates
from medmix_core.distributed import Dist, context
from medmix_core.errors import DataError, MedmixError, StoreError, UnknownPluginError
from medmix_core.experts import ExpertEncoder
from medmix_core.files import cached_sha256, jsonable, sha256_file
from medmix_core.lock import FolderLock
from medmix_core.plugins import get_dataset, get_expert, get_teacher, registry
from medmix_core.store import (
    EmbeddingStore,
    EncoderEntry,
    StoreWriter,
    atomic_write_text,
)
from medmix_core.types import ModalitySpec, Sample, TaskSpec

STATE_FILE = "extract_state.json"
STATE_FORMAT = "medmix-extract-state"
STATE_VERSION = 1
#: the shard records of rank r > 0 of a distributed run, merged by rank 0
PART_GLOB = "extract_state.rank*.json"
#: looks, 0.25 s apart, of a rank > 0 for the state rank 0 wrote (a network file system
#: may show a new file late)
_SEE_TRIES = 20
#: what extraction may delete in ``out`` (never anything else)
_OWNED = ("manifest.json", "labels.safetensors", "shards", "teachers", "state", STATE_FILE)


class ExtractError(MedmixError):
    """An extraction that cannot run as asked (experts that fit no modality, a foreign
    store folder, an expert that returns the wrong shape)."""


# ---------------------------------------------------------------------- small helpers
#: one owner: :func:`medmix_core.files.jsonable`
_jsonable = jsonable


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(_jsonable(obj), sort_keys=True).encode()).hexdigest()


#: the one owner is :func:`medmix_core.datasets.missing_rates`; kept under this name
modality_missing_rates = missing_rates


def label_arrays(samples: Sequence[Sample], tasks: Sequence[TaskSpec]) -> dict[str, np.ndarray]:
    """Labels per task: binary/multiclass [N] float, multilabel [N, C]; NaN = unknown.

    Raises:
        DataError: a binary label other than 0/1/NaN, a multi-label row of the wrong
            length, or a class index outside [0, C).
    """
    out: dict[str, np.ndarray] = {}
    for task in tasks:
        if task.type == "multilabel":
            c = len(task.classes)
            y = np.full((len(samples), c), np.nan, dtype=np.float32)
            for i, s in enumerate(samples):
                lab = s.labels.get(task.name)
                if lab is None:
                    continue
                row = np.asarray(lab, dtype=np.float32).ravel()
                if row.shape != (c,):
                    raise DataError(f"Sample {s.id!r}, task {task.name!r}: expected {c} "
                                    f"labels ({task.classes}), found {row.shape[0]}.")
                y[i] = row
        else:
            y = np.array([np.nan if s.labels.get(task.name) is None else
                          float(np.asarray(s.labels[task.name], dtype=np.float64).ravel()[0])
                          for s in samples], dtype=np.float32)
            known = y[~np.isnan(y)]
            if task.type == "binary" and not np.isin(known, (0.0, 1.0)).all():
                raise DataError(f"Task {task.name!r} is binary but has labels "
                                f"{sorted(set(known.tolist()) - {0.0, 1.0})[:5]}; expected 0, 1 "
                                f"or NaN (unknown).")
            if task.type == "multiclass" and not (
                    (known == np.round(known)) & (known >= 0) & (known < len(task.classes))).all():
                raise DataError(f"Task {task.name!r} is multi-class with {len(task.classes)} "
                                f"classes; labels must be class indices in [0, "
                                f"{len(task.classes)}) or NaN.")
        out[task.name] = y
    return out


def sample_attributes(samples: Sequence[Sample], ds_cls: type) -> dict[str, list[str | None]]:
    """The dataset's declared ``attributes`` of every sample, as strings (None = unknown)."""
    def value(v: Any) -> str | None:
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return None
        return str(v)

    return {k: [value(s.meta.get(k)) for s in samples]
            for k in getattr(ds_cls, "attributes", ()) or ()}


def _validate_dataset(name: str, samples: list[Sample], mods: list[ModalitySpec],
                      splits: dict[str, list[int]], need_train: bool = True) -> None:
    if not samples:
        raise DataError(f"Dataset {name!r} yielded no samples; nothing to extract.")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise DataError(f"Dataset {name!r}: sample ids must be unique; repeated: {dup}.")
    kinds = {m.name: m.kind for m in mods}
    for s in samples:
        for m, payload in s.modalities.items():
            if m not in kinds:
                raise DataError(f"Dataset {name!r}: sample {s.id!r} has modality {m!r}, which is "
                                f"not among its modalities {list(kinds)}.")
            if payload is not None and getattr(payload, "kind", None) != kinds[m]:
                raise DataError(f"Dataset {name!r}: sample {s.id!r}, modality {m!r} is declared "
                                f"{kinds[m]!r} but holds {type(payload).__name__}.")
    n = len(samples)
    if need_train and not splits.get("train"):
        sizes = {k: len(v) for k, v in splits.items()}
        raise DataError(f"Dataset {name!r}: the splits have no training rows ({sizes}); "
                        f"experts are fitted on the training split.")
    for k, rows in splits.items():
        if rows and (min(rows) < 0 or max(rows) >= n):
            raise DataError(f"Dataset {name!r}: split {k!r} has rows outside [0, {n}).")


def _resolve(names: Sequence[str], role: str) -> list[tuple[str, type]]:
    out, seen = [], set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        if role == "expert":
            cls = get_expert(name)
        else:
            try:
                cls = get_teacher(name)
            except UnknownPluginError:
                try:
                    cls = get_expert(name)  # any expert can serve as a teacher
                except UnknownPluginError as exc:
                    raise UnknownPluginError(
                        f"Unknown teacher {name!r}: it is neither a registered teacher "
                        f"({', '.join(registry().names('teachers')) or 'none'}) nor an expert "
                        f"({', '.join(registry().names('experts')) or 'none'}). Install the "
                        f"plugin that provides it (`medmix plugins` lists the known names)."
                    ) from exc
        out.append((name, cls))
    return out


def _who_fits(mods: list[ModalitySpec]) -> str:
    reg = registry()
    parts = []
    for kind in sorted({m.kind for m in mods}):
        names = [n for n in reg.names("experts")
                 if kind in getattr(reg.get("experts", n), "kinds", ())]
        parts.append(f"{kind}: {', '.join(names) or '(no installed expert)'}")
    return "; ".join(parts)


def _clean_out(out: Path) -> None:
    for rel in _OWNED:
        p = out / rel
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for p in out.glob(PART_GLOB):
        p.unlink()


# ---------------------------------------------------------------------- the extraction
@dataclass
class Request:
    """What the caller asked for, checked before anything is read or written."""

    dataset: str
    out: Path
    experts: list[str]
    teachers: list[str]
    source: str | None = None
    device: str = "cpu"
    shard_size: int = 1024
    dataset_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    expert_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    teacher_rows: str = "train"
    overwrite: bool = False
    fit_from: Path | None = None
    all_rows_split: str | None = None

    def check(self) -> None:
        """Raises ExtractError (or RunFolderError for --out) naming the bad argument."""
        from medmix_core.runs import check_writable

        if not self.experts and not self.teachers:
            raise ExtractError("No experts given; name at least one (e.g. experts=['stats']).")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ExtractError(f"shard_size must be a positive integer, got "
                               f"{self.shard_size!r}.")
        if self.teacher_rows not in ("train", "all"):
            raise ExtractError(f"teacher_rows must be 'train' or 'all', got "
                               f"{self.teacher_rows!r}.")
        if self.all_rows_split not in (None, "train", "val", "test"):
            raise ExtractError(f"all_rows_split must be None, 'train', 'val' or 'test', got "
                               f"{self.all_rows_split!r}.")
        if self.fit_from is not None and self.teachers:
            raise ExtractError(f"Teachers {self.teachers} are training-only; an extraction "
                               f"that reuses fitted state (fit_from={str(self.fit_from)!r}) "
                               f"encodes a cohort for evaluation and takes no teacher.")
        check_writable(self.out, "--out")
        if self.fit_from is not None and self.fit_from.resolve() == self.out.resolve():
            raise ExtractError(f"--fit-from and --out are the same folder ({self.out}); the "
                               f"cohort encoded with reused state needs a store of its own.")
        unused = sorted(set(self.expert_options) - set(self.experts) - set(self.teachers))
        if unused:
            raise ExtractError(f"expert_options names {unused}, which are not among the "
                               f"experts {self.experts} or teachers {self.teachers}.")


@dataclass
class Encoder:
    """One constructed encoder and the dataset modalities it accepts."""

    role: str  # "expert" | "teacher"
    name: str
    model: ExpertEncoder
    modalities: list[ModalitySpec]


@dataclass
class Cohort:
    """The dataset as read: samples, tasks, modalities, splits and what identifies them."""

    dataset: Any
    samples: list[Sample]
    tasks: list[TaskSpec]
    modalities: list[ModalitySpec]
    splits: dict[str, list[int]]
    key: dict[str, Any]

    @property
    def hash(self) -> str:
        return _hash(self.key)

    @property
    def train(self) -> np.ndarray:
        t = np.zeros(len(self.samples), dtype=bool)  # [N]
        t[self.splits["train"]] = True
        return t


@dataclass
class Job:
    """One (role, modality, encoder) to have in the store, with its cache key."""

    encoder: Encoder
    modality: ModalitySpec
    key: str
    given: dict[str, Any] | None  # fitted state reused from fit_from, or None

    @property
    def label(self) -> str:  # the key of the extraction state (format kept)
        return f"{self.encoder.role}:{self.modality.name}:{self.encoder.name}"


def extract(
    dataset: str,
    out: str | Path,
    experts: Sequence[str],
    teachers: Sequence[str] = (),
    source: str | None = None,
    device: str = "cpu",
    shard_size: int = 1024,
    dataset_options: dict[str, Any] | None = None,
    progress: bool = True,
    expert_options: dict[str, dict[str, Any]] | None = None,
    teacher_rows: str = "train",
    overwrite: bool = False,
    fit_from: str | Path | None = None,
    all_rows_split: str | None = None,
) -> EmbeddingStore:
    """Extract expert (and teacher) embeddings of a dataset into an EmbeddingStore.

    Args:
        dataset: registered dataset name (e.g. ``"physionet2012"``).
        out: store folder; created if needed, resumed if it holds an extraction.
        experts: expert names; each must accept at least one modality of the dataset.
        teachers: teacher names (a registered teacher, or any expert used as one).
        source: the dataset's source (folder, archive, manifest); None = its default.
        device: where encoders run (``"cpu"``, ``"cuda"``, ...); under torchrun ``"cuda"``
            is ``cuda:<local rank>`` for each process.
        shard_size: rows per shard file.
        dataset_options: keyword options for the dataset class (e.g. ``split_seed``).
        progress: show a progress bar per encoder (rich, on stderr).
        expert_options: per encoder name, keyword options for its constructor.
        teacher_rows: ``"train"`` (default: teachers see the training rows only, other rows
            masked) or ``"all"``.
        overwrite: replace a store in ``out`` made from other data (different dataset,
            source, options or splits), or a store not written by ``extract``.
        fit_from: a store, or a ``medmix run`` results folder (``encoders.json`` +
            ``state/``), whose fitted expert state is restored with ``set_state`` instead of
            fitting: an external cohort is then encoded with the training statistics. Only
            the (modality, expert) pairs it holds are encoded; teachers are not allowed.
        all_rows_split: put every row in this split (``"train"``, ``"val"`` or ``"test"``)
            instead of the dataset's splits, e.g. ``"test"`` for a cohort that is only
            predicted on. Without ``fit_from`` the split must leave training rows to fit on.
    Under ``torchrun`` (several processes, see :mod:`medmix_core.distributed`) every
    process calls it with the same arguments: rank 0 takes the lock and fits, the missing
    shards are shared, rank 0 writes the manifest, and every process returns the store.

    Returns:
        The opened, validated store.
    Raises:
        UnknownPluginError: an unknown dataset, expert or teacher name.
        ExtractError: an encoder that accepts no modality of the dataset, an existing
            store of other data without ``overwrite``, an encoder output of the wrong shape.
        DataError: invalid dataset content (duplicate ids, wrong payload kinds, labels).
        ExtractError: (several processes) another process failed; its rank and message
            are named, and the shards finished so far are kept for the next run.
    """
    dist = context()
    err = None
    try:  # every rank reads the same cohort and plans the same jobs (deterministic)
        req = Request(dataset, Path(out), parse_names(experts) or [],
                      parse_names(teachers) or [], source, device, shard_size,
                      dict(dataset_options or {}), progress, dict(expert_options or {}),
                      teacher_rows, overwrite, None if fit_from is None else Path(fit_from),
                      all_rows_split)
        req.check()
        req.device = dist.device(req.device)  # cuda -> cuda:<local_rank> under torchrun
        fitted = None if req.fit_from is None else _fitted_states(req.fit_from)
        ds_cls = get_dataset(req.dataset)
        ds = ds_cls(source=req.source, **req.dataset_options)
        encoders = resolve_encoders(req, ds_cls, ds.modalities(), fitted)
        cohort = read_cohort(req, ds, fitted is not None)
        jobs = plan_jobs(req, cohort, encoders, fitted)
    except Exception as exc:  # noqa: BLE001 - raised on every rank just below
        err = exc
    _all_passed(dist, err, "before the store was opened")

    lock = FolderLock(req.out, "store")
    state: dict[str, Any] = {}
    done: dict[str, EmbeddingStore] = {}

    def begin() -> bool:  # rank 0: the lock first, then nobody writes before the barrier
        lock.acquire()
        state.update(_open_state(req.out, cohort.hash, cohort.key, req.overwrite))
        _sweep_temps(req.out)
        _merge_parts(req.out, state)
        store = _up_to_date(req.out, state, jobs)
        if store is not None:
            done["store"] = store
        return store is not None

    def finish() -> None:
        for part in req.out.glob(PART_GLOB):  # merged into the state job by job
            part.unlink()
        done["store"] = write_manifest(req, cohort, ds_cls, state)

    try:
        up_to_date = _on_main(dist, "while opening the store", begin)
        if dist.active:
            err = None
            try:
                _see_store(req.out, dist)
            except ExtractError as exc:
                err = exc
            _all_passed(dist, err, "while opening the store")
        if not up_to_date:
            run_jobs(req, cohort, jobs, state, dist)
            _on_main(dist, "while writing the manifest", finish)
        return done["store"] if dist.is_main else EmbeddingStore.open(req.out)
    except OSError as exc:
        raise ExtractError(f"Cannot write the store {req.out}: {exc}. Pass a writable --out "
                           f"(nothing was changed in {req.out} beyond what was finished)."
                           ) from exc
    finally:
        lock.release()


def _see_store(out: Path, dist: Dist) -> None:
    """Ranks > 0: the state rank 0 has just written must be visible here, or the store
    folder is not shared (a node's local disk); a network file system may show a new file
    a moment late, so it is looked for a few times.

    Raises:
        ExtractError: the state file is not seen.
    """
    if dist.is_main:
        return
    for _ in range(_SEE_TRIES):
        if (out / STATE_FILE).is_file():
            return
        time.sleep(0.25)
    raise ExtractError(f"Rank {dist.rank} (host {socket.gethostname()}) does not see "
                       f"{out / STATE_FILE}, which rank 0 has written: the store folder must "
                       f"be on a file system every node of the run shares, at the same path "
                       f"(e.g. NFS or Lustre). Pass such a --out.")


def _note(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _all_passed(dist: Dist, err: BaseException | None, where: str, payload: Any = None
                ) -> list[Any]:
    """A sync point every rank reaches: every rank's ``payload`` in rank order, or, when
    any rank failed before it, an error on every rank (the failing one re-raises its own).

    Raises:
        ExtractError: another rank failed (its rank and message are named).
    """
    if not dist.active:
        if err is not None:
            raise err
        return [payload]
    got = dist.gather((None if err is None else _note(err), payload))
    if err is not None:
        raise err
    for r, (note, _) in enumerate(got):
        if note is not None:
            raise ExtractError(f"Extraction stopped {where}: rank {r} of {dist.world} failed "
                               f"({note}). Fix that and re-run the same command; the shards "
                               f"finished so far are kept.")
    return [p for _, p in got]


def _on_main(dist: Dist, where: str, fn: Any) -> Any:
    """``fn()`` on rank 0 while the other ranks wait; its (picklable) result on every rank.
    The broadcast is the barrier: no rank goes on before rank 0 has done ``fn``.

    Raises:
        ExtractError: rank 0 failed (on the other ranks; rank 0 re-raises its own error).
    """
    value, err = None, None
    if dist.is_main:
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - raised on every rank just below
            err = exc
    if not dist.active:
        if err is not None:
            raise err
        return value
    sent = dist.broadcast({"error": None if err is None else _note(err), "value": value})
    if err is not None:
        raise err
    if sent["error"] is not None:
        raise ExtractError(f"Extraction stopped {where}: rank 0 of {dist.world} failed "
                           f"({sent['error']}). Fix that and re-run the same command; the "
                           f"shards finished so far are kept.")
    return sent["value"]


def resolve_encoders(req: Request, ds_cls: type, mods: list[ModalitySpec],
                     fitted: dict | None) -> list[Encoder]:
    """Step 1: every name resolved and every encoder built (absent weights fail here,
    before the data is read), with the modalities each accepts."""
    resolved = ([("expert", n, c) for n, c in _resolve(req.experts, "expert")]
                + [("teacher", n, c) for n, c in _resolve(req.teachers, "teacher")])
    # base options: those the reused state was fitted with, else the dataset's defaults;
    # the caller's options override them key by key
    base = dict(getattr(ds_cls, "default_expert_options", {}) or {})
    for (_, name), given in (fitted or {}).items():
        if isinstance(given["provenance"].get("options"), dict):
            base[name] = given["provenance"]["options"]
    options = {name: {**base.get(name, {}), **req.expert_options.get(name, {})}
               for _, name, _ in resolved}
    out = []
    for role, name, cls in resolved:
        enc = cls(**options.get(name, {}))
        if not isinstance(enc, ExpertEncoder):
            raise ExtractError(f"The {role} {name!r} is a {type(enc).__name__}, not an "
                               f"ExpertEncoder; the plugin registered the wrong object.")
        accepted = [m for m in mods if enc.accepts(m)]
        if not accepted:
            have = ", ".join(f"{m.name} ({m.kind})" for m in mods)
            raise ExtractError(
                f"The {role} {name!r} (kinds {list(getattr(enc, 'kinds', ()))}) accepts no "
                f"modality of dataset {req.dataset!r}, whose modalities are: {have}. Experts "
                f"that fit them -> {_who_fits(mods)}.")
        out.append(Encoder(role, name, enc.to(req.device), accepted))
    return out


def read_cohort(req: Request, ds: Any, reuses_state: bool) -> Cohort:
    """The dataset's samples, tasks and splits (or every row in ``all_rows_split``),
    validated; its key identifies the data in the store's cache keys."""
    mods = ds.modalities()
    samples = ds.samples()
    if req.all_rows_split is None:
        splits = {k: sorted(int(i) for i in v) for k, v in ds.splits(samples).items()}
    else:
        splits = {k: [] for k in ("train", "val", "test")}
        splits[req.all_rows_split] = list(range(len(samples)))
    _validate_dataset(req.dataset, samples, mods, splits, need_train=not reuses_state)
    ids = [str(s.id) for s in samples]
    key = {"identity": ds.identity(), "n": len(samples), "ids": _hash(ids),
           "splits": _hash(splits)}
    return Cohort(ds, samples, ds.tasks(), mods, splits, key)


def plan_jobs(req: Request, cohort: Cohort, encoders: list[Encoder],
              fitted: dict | None) -> list[Job]:
    """Step 2: one job per (role, modality, encoder), keyed by everything that makes its
    embeddings (data, encoder class, version, provenance, modality, shard size, rows)."""
    jobs = []
    for e in encoders:
        accepted = e.modalities
        if fitted is not None:
            accepted = [m for m in accepted if (m.name, e.name) in fitted]
            if not accepted:
                have = sorted(f"{x} on {mod}" for mod, x in fitted)
                raise ExtractError(f"fit_from={str(req.fit_from)!r} holds no fitted state of "
                                   f"expert {e.name!r} for any modality of {req.dataset!r}; it "
                                   f"holds {have}.")
        for m in accepted:
            given = None if fitted is None else fitted[(m.name, e.name)]
            if given is not None:
                _check_given(given, e.model, m, e.name, req.fit_from)
            enc = e.model
            key = _hash({"data": cohort.hash, "role": e.role, "name": e.name,
                         "class": f"{type(enc).__module__}.{type(enc).__qualname__}",
                         "version": getattr(enc, "version", "1"), "provenance": enc.provenance(),
                         "modality": vars(m), "shard_size": req.shard_size,
                         "rows": req.teacher_rows if e.role == "teacher" else "all",
                         "fit_from": None if given is None else given["sha256"]})
            jobs.append(Job(e, m, key, given))
    return jobs


def _manifest_key(state: dict[str, Any]) -> str:
    return _hash(sorted((k, e["key"]) for k, e in state["encoders"].items()
                        if e.get("complete")))


def _up_to_date(out: Path, state: dict[str, Any], jobs: list[Job]) -> EmbeddingStore | None:
    """The store when every job is complete under its key and every file checks out."""
    done = all(state["encoders"].get(j.label, {}).get("key") == j.key
               and state["encoders"][j.label].get("complete") for j in jobs)
    if done and (out / "manifest.json").is_file() and state.get("manifest_key") == \
            _manifest_key(state):
        try:
            return EmbeddingStore.open(out, verify=True)  # hashes are cached per file
        except StoreError:
            return None  # a file went missing or was damaged since: every shard is checked
    return None


def run_jobs(req: Request, cohort: Cohort, jobs: list[Job], state: dict[str, Any],
             dist: Dist | None = None) -> None:
    """Step 3: fit (or restore) and encode every job's missing shards, with progress.

    Every rank runs it for the same jobs in the same order. Per job: rank 0 checks the
    finished shards and fits or restores the state (the others wait); every rank encodes
    its share of the missing shards; rank 0 merges the records and marks the job complete.
    ``state`` is read and written on rank 0 only.
    """
    dist = dist or Dist()
    writer = StoreWriter(req.out)
    n = len(cohort.samples)
    train = cohort.train
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True),
                    disable=not (req.progress and dist.is_main))
    # this rank's records, for rank 0 to merge even after a kill (ranks > 0 only)
    part: dict[str, Any] = {"format": STATE_FORMAT, "version": STATE_VERSION,
                            "rank": dist.rank, "encoders": {}}
    with bars:
        totals: dict[tuple[str, str], int] = {}
        for j in jobs:
            label = (j.encoder.role, j.encoder.name)
            totals[label] = totals.get(label, 0) + n
        bar_of = {label: bars.add_task(f"{label[0]} {label[1]}", total=total)
                  for label, total in totals.items()}
        for j in jobs:
            bar = bar_of[(j.encoder.role, j.encoder.name)]
            payload, present = _payloads(cohort.samples, train, j, req.teacher_rows)
            plan = _on_main(dist, f"while fitting {j.label}", partial(
                _prepare_job, writer, state, j, payload, present, train, n, req.shard_size,
                bars, bar))
            if plan is None:  # complete and intact
                continue
            err, mine = None, []
            try:
                mine = _encode_share(writer, state, part, j, plan, payload, present, n,
                                     req.shard_size, dist, bars, bar)
            except Exception as exc:  # noqa: BLE001 - raised on every rank just below
                err = exc
            records = _all_passed(dist, err, f"while encoding {j.label}", mine)
            _on_main(dist, f"while finishing {j.label}", partial(
                _finish_job, writer, state, j, n, req.shard_size, records, bars, bar))
            part["encoders"].clear()  # rank 0 has saved them: the file need not grow


def write_manifest(req: Request, cohort: Cohort, ds_cls: type,
                   state: dict[str, Any]) -> EmbeddingStore:
    """Step 4: labels, then the manifest of every complete entry, atomically; then open."""
    writer = StoreWriter(req.out)
    labels_file, labels_sha = writer.write_labels(label_arrays(cohort.samples, cohort.tasks))
    experts_m: dict[str, list[EncoderEntry]] = {}
    teachers_m: dict[str, list[EncoderEntry]] = {}
    order = {m.name: i for i, m in enumerate(cohort.modalities)}
    for k, e in state["encoders"].items():
        if not e.get("complete"):
            continue
        role, modality, name = k.split(":", 2)
        entry = EncoderEntry(modality=modality, name=name, dim=e["dim"], role=role,
                             family=e["family"], provenance=e["provenance"],
                             shards=e["shards"], state_file=e["state_file"])
        (experts_m if role == "expert" else teachers_m).setdefault(modality, []).append(entry)
    experts_m = dict(sorted(experts_m.items(), key=lambda kv: order.get(kv[0], len(order))))
    teachers_m = dict(sorted(teachers_m.items(), key=lambda kv: order.get(kv[0], len(order))))
    samples = cohort.samples
    report = {"dataset": _jsonable(cohort.dataset.report()),
              "missing_rates": missing_rates(samples, cohort.modalities),
              "n_samples": len(samples),
              "split_sizes": {k: len(v) for k, v in cohort.splits.items()},
              "teacher_rows": req.teacher_rows,
              "fit_from": None if req.fit_from is None else str(req.fit_from)}
    writer.write_manifest(sample_ids=[str(s.id) for s in samples], modalities=cohort.modalities,
                          tasks=cohort.tasks, splits=cohort.splits, experts=experts_m,
                          teachers=teachers_m, labels_file=labels_file,
                          labels_sha256=labels_sha, dataset=_jsonable(cohort.key["identity"]),
                          report=report, attributes=sample_attributes(samples, ds_cls))
    state["manifest_key"] = _manifest_key(state)
    _save_state(req.out, state)
    return EmbeddingStore.open(req.out)


def _fitted_states(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Fitted expert states of a store or a run folder: (modality, expert) -> record."""
    if (path / "manifest.json").is_file():
        store = EmbeddingStore.open(path)
        recs = [{"modality": e.modality, "name": e.name, "dim": e.dim,
                 "provenance": e.provenance, "state_file": e.state_file}
                for es in store.experts.values() for e in es]
    elif (path / "encoders.json").is_file():
        from medmix_core.runs import RunFolder

        try:
            recs = RunFolder(path).encoders()["encoders"]
        except (MedmixError, KeyError, TypeError) as exc:
            raise ExtractError(f"{path / 'encoders.json'} is not a valid list of encoders "
                               f"({exc}); it should be written by `medmix run`.") from exc
    else:
        raise ExtractError(f"fit_from={str(path)!r} is neither a store (manifest.json) nor a "
                           f"`medmix run` results folder (encoders.json); point it at the "
                           f"store or run whose training statistics should be reused.")
    out = {}
    for r in recs:
        state = None if not r.get("state_file") else path / r["state_file"]
        if state is not None and not state.is_file():
            raise ExtractError(f"{state}: fitted state of {r['name']!r} on {r['modality']!r} "
                               f"listed by {path} is missing; re-create {path}.")
        out[(r["modality"], r["name"])] = {
            "path": state, "dim": int(r["dim"]), "provenance": r.get("provenance") or {},
            "sha256": None if state is None else sha256_file(state)}
    return out


def _check_given(given: dict[str, Any], enc: ExpertEncoder, m: ModalitySpec, name: str,
                 fit_from: Any) -> None:
    """A reused state must come from the same expert version and options, with its dim."""
    mine = _jsonable(enc.provenance())
    theirs = given["provenance"]
    for k in ("version", "options"):
        if k in mine and k in theirs and mine[k] != theirs[k]:
            raise ExtractError(f"Expert {name!r} on {m.name!r}: fit_from={str(fit_from)!r} was "
                               f"fitted with {k} {theirs[k]!r}, this extraction uses "
                               f"{mine[k]!r}; use the same expert options as the training store.")
    if int(enc.dim(m)) != given["dim"]:
        raise ExtractError(f"Expert {name!r} on {m.name!r}: dim {enc.dim(m)} here but "
                           f"{given['dim']} in fit_from={str(fit_from)!r}; the modality's "
                           f"variables or the expert's options differ.")


def _open_state(out: Path, data_hash: str, data_key: dict, overwrite: bool) -> dict[str, Any]:
    """The extraction state of ``out``, or a fresh one (clearing ``out`` when allowed)."""
    path = out / STATE_FILE
    fresh = {"format": STATE_FORMAT, "version": STATE_VERSION, "data_hash": data_hash,
             "data": _jsonable(data_key), "encoders": {}}
    state = None
    if path.is_file():
        try:
            state = json.loads(path.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            state = None  # a state we cannot read is rebuilt; shards are re-made
        if state is not None and (state.get("format") != STATE_FORMAT
                                  or state.get("version") != STATE_VERSION):
            state = None
    if state is not None and state.get("data_hash") == data_hash:
        return state
    foreign = state is not None or (out / "manifest.json").exists()
    if foreign and not overwrite:
        what = (f"an extraction of other data ({json.dumps(state.get('data', {}).get('identity'))})"
                if state is not None else "a store not written by `medmix extract`")
        raise ExtractError(f"{out} already holds {what}. Use another --out, or pass "
                           f"overwrite=True (`--overwrite`) to replace it.")
    _clean_out(out)
    _save_state(out, fresh)
    return fresh


def _save_state(out: Path, state: dict[str, Any]) -> None:
    atomic_write_text(out / STATE_FILE, json.dumps(_jsonable(state), indent=1))


def _payloads(samples: list[Sample], train: np.ndarray, job: Job, teacher_rows: str
              ) -> tuple[list[Any], np.ndarray]:
    """The job's payload per row (None = absent) and the rows it encodes [N] bool."""
    payload = [s.modalities.get(job.modality.name) for s in samples]
    present = np.array([p is not None for p in payload], dtype=bool)  # [N]
    if job.encoder.role == "teacher" and teacher_rows == "train":
        present &= train
    return payload, present


def _intact(writer: StoreWriter, prev: dict[str, Any] | None, job: Job, n: int,
            shard_size: int, dim: int, bars: Progress) -> dict[int, dict[str, Any]]:
    """Shard index -> record, for the recorded shards still intact on disk (any subset:
    the ranks of a killed run finish shards out of order)."""
    kept: dict[int, dict[str, Any]] = {}
    for rec in [] if prev is None else prev.get("shards", []):
        try:
            k, off = divmod(int(rec["start"]), shard_size)
            fits = (off == 0 and 0 <= rec["start"] < n and k not in kept
                    and rec["stop"] == min(n, (k + 1) * shard_size)
                    and rec["file"] == writer.shard_path(job.modality.name, job.encoder.name,
                                                         k, job.encoder.role))
        except (KeyError, TypeError, ValueError):
            continue  # a record we cannot read: its shard is re-made
        if not fits:
            continue
        p = writer.path / rec["file"]
        if (not p.is_file() or p.stat().st_size != rec.get("bytes")
                or not writer.has_shard(rec["file"], rec["stop"] - rec["start"], dim)):
            continue
        if rec.get("sha256") and cached_sha256(p) != rec["sha256"]:
            bars.console.print(f"{p}: sha256 differs from the record; re-making it.")
            continue
        kept[k] = rec
    return kept


def _prepare_job(writer: StoreWriter, state: dict[str, Any], job: Job, payload: list[Any],
                 present: np.ndarray, train: np.ndarray, n: int, shard_size: int,
                 bars: Progress, bar: Any) -> dict[str, Any] | None:
    """Rank 0: keep the job's intact shards, fit (or restore) its state and save it.

    ``job.given`` is a fitted state from ``fit_from`` (path or None, dim, provenance): it
    is restored instead of fitting.

    Returns:
        None when the job is complete and intact; else what every rank needs to encode
        the rest: ``missing`` shard indices, ``dim`` and the saved ``state_file`` (or None).
    """
    e, m, key = job.encoder, job.modality, job.key
    enc, label = e.model, job.label
    prev = state["encoders"].get(label)
    folder = writer.path / ("shards" if e.role == "expert" else "teachers") / m.name / e.name
    state_name = e.name if e.role == "expert" else f"{e.name}.teacher"
    if prev is None or prev.get("key") != key:
        if folder.exists():  # shards of other inputs; they must not be mixed in
            shutil.rmtree(folder)
        if prev and prev.get("state_file"):
            (writer.path / prev["state_file"]).unlink(missing_ok=True)
        prev = None
    dim = int(enc.dim(m))
    kept = _intact(writer, prev, job, n, shard_size, dim, bars)
    n_shards = (n + shard_size - 1) // shard_size
    if prev is not None and prev.get("complete") and len(kept) == n_shards:
        bars.advance(bar, n)
        return None

    entry = {"key": key, "dim": dim, "family": getattr(enc, "family", "domain"),
             "provenance": _jsonable(enc.provenance()),
             "shards": [kept[k] for k in sorted(kept)],
             "state_file": prev.get("state_file") if prev else None, "complete": False}
    saved = entry["state_file"] and (writer.path / entry["state_file"]).is_file()
    given = job.given
    if given is not None:
        if given["path"] is not None:
            enc.set_state(m, load_file(str(given["path"])))
            entry["state_file"] = writer.write_state(m.name, state_name, enc.get_state(m))
    elif saved:
        enc.set_state(m, load_file(str(writer.path / entry["state_file"])))
    else:
        fit_rows = np.flatnonzero(present & train)
        enc.fit(m, [payload[i] for i in fit_rows])
        entry["state_file"] = writer.write_state(m.name, state_name, enc.get_state(m))
    # what fitting learned (e.g. a self-supervised encoder's training facts) is provenance
    entry["provenance"] = _jsonable(enc.provenance())
    if not saved and entry["state_file"]:
        # encode with the state as saved, as a resumed run and the other ranks do
        enc.set_state(m, load_file(str(writer.path / entry["state_file"])))
    state["encoders"][label] = entry
    _save_state(writer.path, state)
    bars.advance(bar, sum(r["stop"] - r["start"] for r in entry["shards"]))
    return {"missing": [k for k in range(n_shards) if k not in kept], "dim": dim,
            "state_file": entry["state_file"]}


def _encode_share(writer: StoreWriter, state: dict[str, Any], part: dict[str, Any], job: Job,
                  plan: dict[str, Any], payload: list[Any], present: np.ndarray, n: int,
                  shard_size: int, dist: Dist, bars: Progress, bar: Any) -> list[dict[str, Any]]:
    """Every rank: restore the saved state (rank 0 already has it) and encode this rank's
    share of the missing shards, recording each one as soon as it is written."""
    e, m = job.encoder, job.modality
    enc = e.model
    if not dist.is_main and plan["state_file"]:
        enc.set_state(m, load_file(str(writer.path / plan["state_file"])))
    dim = plan["dim"]
    bs = max(1, int(getattr(enc, "batch_size", 256) or 256))
    mine = []
    for k in dist.share(plan["missing"]):
        start, stop = k * shard_size, min(n, (k + 1) * shard_size)
        rows = np.flatnonzero(present[start:stop]) + start
        emb = np.zeros((stop - start, dim), dtype=np.float32)  # [n, d]; masked rows stay 0
        for b in range(0, len(rows), bs):
            chunk = rows[b:b + bs]
            x = np.asarray(enc.encode(m, [payload[i] for i in chunk]), dtype=np.float32)
            if x.shape != (len(chunk), dim):
                raise ExtractError(f"The {e.role} {e.name!r} returned shape {list(x.shape)} "
                                   f"for {len(chunk)} {m.name!r} payloads; expected "
                                   f"[{len(chunk)}, {dim}] (its dim()).")
            if not np.isfinite(x).all():
                raise ExtractError(f"The {e.role} {e.name!r} produced NaN/Inf for modality "
                                   f"{m.name!r} (rows {chunk[:5].tolist()}...). Encoders must "
                                   f"return finite values for present payloads.")
            emb[chunk - start] = x
        mask = np.zeros(stop - start, dtype=bool)  # [n]
        mask[rows - start] = True
        rec = writer.write_shard(writer.shard_path(m.name, e.name, k, e.role), emb, mask)
        rec.update(start=start, stop=stop)
        mine.append(rec)
        if dist.is_main:
            state["encoders"][job.label]["shards"].append(rec)
            _save_state(writer.path, state)
        else:
            part["encoders"].setdefault(job.label, {"key": job.key, "shards": []})[
                "shards"].append(rec)
            atomic_write_text(writer.path / PART_GLOB.replace("*", str(dist.rank)),
                              json.dumps(_jsonable(part), indent=1))
        bars.advance(bar, stop - start)
    return mine


def _add_records(entry: dict[str, Any], records: Sequence[dict[str, Any]]) -> None:
    """Records into an entry, one per file (the newer wins), in shard order."""
    by_file = {r["file"]: r for r in entry["shards"]}
    by_file.update({r["file"]: r for r in records})
    entry["shards"] = sorted(by_file.values(), key=lambda r: r["start"])


def _finish_job(writer: StoreWriter, state: dict[str, Any], job: Job, n: int, shard_size: int,
                records: list[list[dict[str, Any]]], bars: Progress, bar: Any) -> None:
    """Rank 0: every rank's records of the job merged; the job marked complete."""
    entry = state["encoders"][job.label]
    have = {r["file"] for r in entry["shards"]}
    others = [r for recs in records for r in recs if r["file"] not in have]
    bars.advance(bar, sum(r["stop"] - r["start"] for r in others))
    _add_records(entry, others)
    n_shards = (n + shard_size - 1) // shard_size
    if [r["start"] for r in entry["shards"]] != [k * shard_size for k in range(n_shards)]:
        raise ExtractError(f"{job.label}: after every rank finished, the shards recorded start "
                           f"at {[r['start'] for r in entry['shards']]}, expected every "
                           f"{shard_size} rows of {n}. Re-run the same command to re-make "
                           f"the missing ones.")
    entry["complete"] = True
    _save_state(writer.path, state)


def _sweep_temps(out: Path) -> None:
    """Rank 0, holding the lock: remove the temp files of writes a kill cut short (an
    atomic write leaves ``.<name>.<random>.tmp`` behind when its process dies)."""
    temps = list(out.glob(".*.tmp"))
    for folder in ("shards", "teachers", "state"):
        if (out / folder).is_dir():
            temps += (out / folder).rglob(".*.tmp")
    for p in temps:
        p.unlink(missing_ok=True)


def _merge_parts(out: Path, state: dict[str, Any]) -> None:
    """Rank 0, before any rank writes: the shard records other ranks of an earlier run left
    (a killed or failed run) are merged into ``state`` where their job's key still holds,
    and their files removed. Each record is validated again before its shard is kept."""
    parts = sorted(out.glob(PART_GLOB))
    if not parts:
        return
    for p in parts:
        try:
            part = json.loads(p.read_text("utf-8"))
            if part.get("format") != STATE_FORMAT or part.get("version") != STATE_VERSION:
                continue
            for label, rec in part["encoders"].items():
                entry = state["encoders"].get(label)
                if entry is not None and entry.get("key") == rec["key"]:
                    _add_records(entry, [r for r in rec["shards"] if isinstance(r, dict)
                                         and "file" in r and "start" in r])
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError,
                TypeError):
            continue  # records we cannot read: their shards are re-made
    _save_state(out, state)  # merged first, then the parts go
    for p in parts:
        p.unlink(missing_ok=True)
