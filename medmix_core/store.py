"""EmbeddingStore: the on-disk cache of expert embeddings, masks, labels and splits.

Layout of a store directory::

    manifest.json                          what is in the store (validated on open)
    labels.safetensors                     one tensor per task, NaN = unknown label
    shards/<modality>/<expert>/00000.safetensors   "emb" [n, d] float32, "mask" [n] uint8
    teachers/<modality>/<teacher>/00000.safetensors  same, training-only embeddings
    state/<modality>/<expert>.safetensors  fitted expert state (normalisation, indexes)

Every file is written to a temporary name and renamed, so a crash never leaves a
half-written file under a real name. Opening reads the manifest and the shard headers
only (tensors are memory-mapped and read on demand), so a store larger than RAM opens.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medmix_core.errors import StoreError
from medmix_core.files import cached_sha256, sha256_file
from medmix_core.types import ModalitySpec, TaskSpec

FORMAT = "medmix-store"
FORMAT_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str, path: Path) -> None:
    """Give the temp file normal permissions (mkstemp makes it 0600), then rename it."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata=None) -> None:
    """safetensors ``save_file`` through a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise




@dataclass
class EncoderEntry:
    """One expert (or teacher) of one modality in a store."""

    modality: str
    name: str
    dim: int
    role: str  # "expert" | "teacher"
    family: str
    provenance: dict[str, Any]
    shards: list[dict[str, Any]]  # {"file", "start", "stop", "bytes", "sha256"}
    state_file: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in
                ("name", "dim", "role", "family", "provenance", "shards", "state_file")}


_ENTRY_KEYS = {"name": str, "dim": int, "role": str, "family": str, "provenance": dict,
               "shards": list}
_SHARD_KEYS = {"file": str, "start": int, "stop": int, "bytes": int}


def _entries(path: Path, manifest: dict[str, Any], key: str) -> dict[str, list[EncoderEntry]]:
    """The manifest's expert or teacher entries, each checked for its keys and types."""
    where = Path(path) / "manifest.json"
    table = manifest.get(key, {})
    if not isinstance(table, dict):
        raise StoreError(f"{where}: {key!r} must map modality names to lists of entries, found "
                         f"{type(table).__name__}. The store is corrupt; re-run `medmix extract`.")
    out: dict[str, list[EncoderEntry]] = {}
    for m, entries in table.items():
        if not isinstance(entries, list):
            raise StoreError(f"{where}: {key}[{m!r}] must be a list of entries, found "
                             f"{type(entries).__name__}; re-run `medmix extract`.")
        out[m] = []
        for i, e in enumerate(entries):
            bad = [f"{k} ({t.__name__})" for k, t in _ENTRY_KEYS.items()
                   if not isinstance(e, dict) or not isinstance(e.get(k), t)
                   or isinstance(e.get(k), bool)]
            if bad:
                raise StoreError(f"{where}: {key}[{m!r}][{i}] lacks or mistypes {bad}; every "
                                 f"entry needs name, dim, role, family, provenance and shards. "
                                 f"The store is corrupt; re-run `medmix extract` into a new "
                                 f"--out.")
            if e["dim"] < 1:
                raise StoreError(f"{where}: {key}[{m!r}][{i}] ({e['name']!r}) has dim "
                                 f"{e['dim']}; expected a positive width.")
            for j, sh in enumerate(e["shards"]):
                sbad = [k for k, t in _SHARD_KEYS.items()
                        if not isinstance(sh, dict) or not isinstance(sh.get(k), t)]
                if sbad:
                    raise StoreError(f"{where}: shard {j} of {key}[{m!r}][{e['name']!r}] lacks "
                                     f"or mistypes {sbad}; re-run `medmix extract`.")
            known = {k: e[k] for k in ("name", "dim", "role", "family", "provenance", "shards")}
            out[m].append(EncoderEntry(modality=m, state_file=e.get("state_file"), **known))
    return out


def is_store(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a store manifest (not yet validated)."""
    return (Path(path) / "manifest.json").is_file()


class EmbeddingStore:
    """A validated, lazily loaded store. Use :meth:`open`; write with :class:`StoreWriter`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.sample_ids: list[str] = manifest["sample_ids"]
        self.modalities: list[ModalitySpec] = [ModalitySpec(**m) for m in manifest["modalities"]]
        self.tasks: list[TaskSpec] = [TaskSpec(**t) for t in manifest["tasks"]]
        self.splits: dict[str, list[int]] = manifest["splits"]
        self.experts: dict[str, list[EncoderEntry]] = _entries(path, manifest, "experts")
        self.teachers: dict[str, list[EncoderEntry]] = _entries(path, manifest, "teachers")

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = False) -> EmbeddingStore:
        """Open and validate a store.

        Args:
            path: the store directory.
            verify: also check every file's sha256 against the manifest (reads all data).
        Raises:
            StoreError: naming the file and the problem, for a missing store, a corrupt or
                inconsistent manifest, a missing, truncated or corrupt shard.
        """
        path = Path(path)
        mpath = path / "manifest.json"
        if not mpath.is_file():
            hint = (" The folder exists but has no manifest: an extraction was interrupted "
                    "before it finished; re-run `medmix extract` with the same --out to resume."
                    if path.is_dir() else "")
            raise StoreError(
                f"No embedding store at {str(path)!r}: expected {str(mpath)!r}.{hint} Create one "
                f"with `medmix extract --dataset NAME --experts a,b --out {path}`.")
        try:
            manifest = json.loads(mpath.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{mpath}: manifest is not valid JSON ({exc}). The store is "
                             f"corrupt; delete {path} and re-run `medmix extract`.") from exc
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{mpath}: expected format {FORMAT!r}, found "
                             f"{manifest.get('format')!r}. This is not a medmix store.")
        if manifest.get("version") != FORMAT_VERSION:
            raise StoreError(f"{mpath}: store format version {manifest.get('version')} but this "
                             f"medmix reads version {FORMAT_VERSION}; re-run `medmix extract`.")
        for key in ("sample_ids", "modalities", "tasks", "splits", "experts", "labels_file"):
            if key not in manifest:
                raise StoreError(f"{mpath}: manifest lacks the key {key!r}; the store is corrupt. "
                                 f"Delete {path} and re-run `medmix extract`.")
        if not isinstance(manifest.get("sample_ids"), list) or not all(
                isinstance(i, str) for i in manifest["sample_ids"]):
            raise StoreError(f"{mpath}: 'sample_ids' must be a list of strings; the store is "
                             f"corrupt. Re-run `medmix extract` into a new --out.")
        try:
            store = cls(path, manifest)
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            raise StoreError(f"{mpath}: the manifest's modalities, tasks or entries are "
                             f"malformed ({type(exc).__name__}: {exc}); the store is corrupt. "
                             f"Re-run `medmix extract` into a new --out.") from exc
        store._validate(verify)
        return store

    def _validate(self, verify: bool) -> None:
        n = len(self.sample_ids)
        if len(set(self.sample_ids)) != n:
            raise StoreError(f"{self.path / 'manifest.json'}: sample ids are not unique.")
        where = self.path / "manifest.json"
        names = [m.name for m in self.modalities]
        for m in self.modalities:
            if not isinstance(m.name, str) or not m.name or not isinstance(m.kind, str) \
                    or not isinstance(m.variables, list) or not isinstance(m.units, dict):
                raise StoreError(f"{where}: modality {m.name!r} is malformed (expected a name, "
                                 f"a kind, a list of variables and a dict of units).")
        if len(set(names)) != len(names):
            raise StoreError(f"{where}: modality names repeat: {names}.")
        for key, table in (("experts", self.experts), ("teachers", self.teachers)):
            stray = [m for m in table if m not in names]
            if stray:
                raise StoreError(f"{where}: {key} are listed for modalities {stray}, which are "
                                 f"not among the store's modalities {names}.")
        if not self.tasks:
            raise StoreError(f"{where}: the store declares no task.")
        for t in self.tasks:
            ok = (isinstance(t.name, str) and t.name and t.type in ("binary", "multilabel",
                                                                    "multiclass")
                  and isinstance(t.classes, list) and all(isinstance(c, str) for c in t.classes)
                  and (t.type == "binary" or len(t.classes) >= 2))
            if not ok:
                raise StoreError(f"{where}: task {t.name!r} is malformed (expected a name, a "
                                 f"type binary/multilabel/multiclass and, unless binary, at "
                                 f"least two class names).")
        if not isinstance(self.splits, dict) or not all(
                isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                            for i in v) for v in self.splits.values()):
            raise StoreError(f"{where}: 'splits' must map split names to lists of row indices.")
        seen: dict[int, str] = {}
        for split, rows in self.splits.items():
            if rows and (min(rows) < 0 or max(rows) >= n):
                raise StoreError(f"{where}: split {split!r} has row indices outside [0, {n}); "
                                 f"the store is inconsistent.")
            if len(set(rows)) != len(rows):
                raise StoreError(f"{where}: split {split!r} lists {len(rows) - len(set(rows))} "
                                 f"rows twice; each row belongs to one split once.")
            shared = [r for r in rows if r in seen]
            if shared:
                other = seen[shared[0]]
                raise StoreError(f"{where}: splits {other!r} and {split!r} share "
                                 f"{len(shared)} rows (e.g. {shared[:5]}); a row in both "
                                 f"would leak into evaluation. Re-extract with disjoint "
                                 f"splits.")
            seen.update(dict.fromkeys(rows, split))
        attrs = self.manifest.get("attributes") or {}
        if not isinstance(attrs, dict) or any(
                not isinstance(v, list) or len(v) != n for v in attrs.values()):
            raise StoreError(f"{self.path / 'manifest.json'}: 'attributes' must map each "
                             f"attribute to a list of {n} values (one per sample).")
        self._check_file(self.manifest["labels_file"], verify, self.manifest.get("labels_sha256"))
        with self._safe_open(self.manifest["labels_file"]) as f:
            for t in self.tasks:
                if t.name not in f.keys():
                    raise StoreError(f"{self.path / self.manifest['labels_file']}: no labels for "
                                     f"task {t.name!r} listed in the manifest.")
                shape = f.get_slice(t.name).get_shape()
                if shape[0] != n:
                    raise StoreError(f"{self.path / self.manifest['labels_file']}: labels of "
                                     f"{t.name!r} have {shape[0]} rows, expected {n} (one per id).")
        for entry in self.all_entries():
            covered = 0
            for shard in entry.shards:
                if shard["start"] != covered:
                    raise StoreError(f"{self.path / shard['file']}: shard starts at row "
                                     f"{shard['start']}, expected {covered}; shards are missing.")
                self._check_file(shard["file"], verify, shard.get("sha256"), shard.get("bytes"))
                with self._safe_open(shard["file"]) as f:
                    keys = set(f.keys())
                    if keys != {"emb", "mask"}:
                        raise StoreError(f"{self.path / shard['file']}: expected tensors "
                                         f"['emb', 'mask'], found {sorted(keys)}.")
                    rows = shard["stop"] - shard["start"]
                    es, ms = f.get_slice("emb").get_shape(), f.get_slice("mask").get_shape()
                    if list(es) != [rows, entry.dim] or list(ms) != [rows]:
                        raise StoreError(
                            f"{self.path / shard['file']}: expected emb [{rows}, {entry.dim}] "
                            f"and mask [{rows}], found emb {list(es)} and mask {list(ms)}.")
                covered = shard["stop"]
            if covered != n:
                raise StoreError(f"{entry.modality}/{entry.name} in {self.path}: shards cover "
                                 f"{covered} of {n} samples; the extraction did not finish. "
                                 f"Re-run `medmix extract` with the same --out to resume.")

    def _check_file(self, rel: str, verify: bool, sha: str | None, size: int | None = None) -> None:
        p = self.path / rel
        if not p.is_file():
            raise StoreError(f"{p}: file listed in the manifest is missing. Re-run `medmix "
                             f"extract` with the same --out to rebuild it.")
        if size is not None and p.stat().st_size != size:
            raise StoreError(f"{p}: expected {size} bytes, found {p.stat().st_size}: the file "
                             f"is truncated or was overwritten. Delete it and re-run `medmix "
                             f"extract` with the same --out.")
        if verify and sha and cached_sha256(p) != sha:
            raise StoreError(f"{p}: sha256 differs from the manifest; the file is corrupt. "
                             f"Delete it and re-run `medmix extract` with the same --out.")

    def _check_hash(self, shard: dict[str, Any]) -> None:
        """A shard's bytes must match the manifest's sha256 (hashed once per file version)."""
        if not shard.get("sha256"):
            return
        p = self.path / shard["file"]
        try:
            digest = cached_sha256(p)
        except OSError as exc:
            raise StoreError(f"{p}: cannot read the shard ({exc}). Re-run `medmix extract` "
                             f"with the same --out to re-make it.") from exc
        if digest != shard["sha256"]:
            raise StoreError(f"{p}: sha256 differs from the manifest; the shard's bytes were "
                             f"changed or damaged after extraction. Re-run `medmix extract` "
                             f"with the same --out: it re-makes the damaged shard.")

    def _safe_open(self, rel: str):
        p = self.path / rel
        try:
            return safe_open(str(p), framework="pt")
        except Exception as exc:
            raise StoreError(f"{p}: not a readable safetensors file ({exc}). Delete it and "
                             f"re-run `medmix extract` with the same --out.") from exc

    # ------------------------------------------------------------------ reading
    @property
    def n_samples(self) -> int:
        return len(self.sample_ids)

    def all_entries(self) -> Iterable[EncoderEntry]:
        for entries in self.experts.values():
            yield from entries
        for entries in self.teachers.values():
            yield from entries

    def expert_names(self) -> list[str]:
        """Every expert of the store, sorted by name."""
        return sorted({e.name for es in self.experts.values() for e in es})

    def teacher_names(self) -> list[str]:
        """Every teacher of the store, sorted by name."""
        return sorted({e.name for es in self.teachers.values() for e in es})

    def default_teacher(self) -> str | None:
        """The teacher a run uses when none is named: the store's first by name, or None."""
        names = self.teacher_names()
        return names[0] if names else None

    def expert_order(self) -> list[str]:
        """Experts in the store's order (modality by modality, first appearance)."""
        out: list[str] = []
        for m in self.modalities:
            out += [e.name for e in self.experts.get(m.name, []) if e.name not in out]
        return out

    def entry(self, modality: str, name: str, role: str = "expert") -> EncoderEntry:
        table = self.experts if role == "expert" else self.teachers
        for e in table.get(modality, []):
            if e.name == name:
                return e
        have = sorted({e.name for es in table.values() for e in es})
        raise StoreError(f"Store {self.path} has no {role} {name!r} for modality {modality!r}; "
                         f"it holds {role}s {have}. Extract it with `medmix extract ... "
                         f"--{'experts' if role == 'expert' else 'teacher'} {name}`.")

    def load(self, entry: EncoderEntry) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``[N, d]`` float32 and mask ``[N]`` bool of one entry.

        Raises StoreError if a present row holds NaN or Inf.
        """
        embs, masks = [], []
        for shard in entry.shards:
            self._check_hash(shard)
            with self._safe_open(shard["file"]) as f:
                emb, mask = f.get_tensor("emb"), f.get_tensor("mask").bool()
            present = emb[mask]
            if present.numel() and not torch.isfinite(present).all():
                bad = int((~torch.isfinite(present)).any(dim=1).sum())
                raise StoreError(f"{self.path / shard['file']}: {bad} present rows hold NaN or "
                                 f"Inf. Masked rows may hold anything, present ones must be "
                                 f"finite; re-extract this expert.")
            embs.append(emb.float())
            masks.append(mask)
        emb = torch.cat(embs) if embs else torch.zeros(0, entry.dim)
        mask = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
        return emb, mask

    def attributes(self) -> dict[str, list[str | None]]:
        """Per-sample attributes for subgroup reporting (``Dataset.attributes``): name ->
        one value per row, a string or None where unrecorded; {} when the dataset has none."""
        return {k: list(v) for k, v in (self.manifest.get("attributes") or {}).items()}

    def labels(self, task: str) -> torch.Tensor:
        """Labels of one task: [N] (binary, multiclass index) or [N, C]; NaN = unknown."""
        if task not in {t.name for t in self.tasks}:
            raise StoreError(f"Store {self.path} has no task {task!r}; it has "
                             f"{[t.name for t in self.tasks]}. Pick one with --task.")
        with self._safe_open(self.manifest["labels_file"]) as f:
            return f.get_tensor(task).float()

    def task(self, name: str | None) -> TaskSpec:
        if name is None:
            return self.tasks[0]
        for t in self.tasks:
            if t.name == name:
                return t
        raise StoreError(f"Store {self.path} has no task {name!r}; it has "
                         f"{[t.name for t in self.tasks]}. Pick one with --task.")

    def load_state(self, entry: EncoderEntry) -> dict[str, np.ndarray]:
        if not entry.state_file:
            return {}
        with self._safe_open(entry.state_file) as f:
            return {k: f.get_tensor(k).numpy() for k in f.keys()}

    def modality_missing_rates(self) -> dict[str, float]:
        """Per modality: share of samples with no expert present."""
        rates = {}
        for m in self.modalities:
            entries = self.experts.get(m.name, [])
            if not entries:
                continue
            any_present = torch.zeros(self.n_samples, dtype=torch.bool)
            for e in entries:
                any_present |= self.load(e)[1]
            rates[m.name] = float(1.0 - any_present.float().mean())
        return rates


class StoreWriter:
    """Builds a store shard by shard; the manifest is written last, atomically.

    Existing finished shards are kept and reported by :meth:`has_shard`, which is what
    makes extraction resumable.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def shard_path(self, modality: str, name: str, index: int, role: str = "expert") -> str:
        folder = "shards" if role == "expert" else "teachers"
        return f"{folder}/{modality}/{name}/{index:05d}.safetensors"

    def has_shard(self, rel: str, rows: int, dim: int) -> bool:
        """True when ``rel`` exists and is a readable shard of [rows, dim]."""
        p = self.path / rel
        if not p.is_file():
            return False
        try:
            with safe_open(str(p), framework="pt") as f:
                return (list(f.get_slice("emb").get_shape()) == [rows, dim]
                        and list(f.get_slice("mask").get_shape()) == [rows])
        except Exception:
            return False

    def write_shard(self, rel: str, emb: np.ndarray | torch.Tensor,
                    mask: np.ndarray | torch.Tensor) -> dict[str, Any]:
        """Write one shard: emb [n, d], mask [n]; masked rows are stored as zeros."""
        emb_t = torch.as_tensor(np.asarray(emb, dtype=np.float32))
        mask_t = torch.as_tensor(np.asarray(mask, dtype=bool))
        if emb_t.ndim != 2 or mask_t.ndim != 1 or emb_t.shape[0] != mask_t.shape[0]:
            raise StoreError(f"{rel}: expected emb [n, d] and mask [n], got "
                             f"{list(emb_t.shape)} and {list(mask_t.shape)}.")
        present = emb_t[mask_t]
        if present.numel() and not torch.isfinite(present).all():
            raise StoreError(f"{rel}: the expert produced NaN/Inf for present samples; "
                             f"refusing to write it. Check the expert's input handling.")
        emb_t = torch.where(mask_t[:, None], emb_t, torch.zeros_like(emb_t))
        atomic_save_tensors(self.path / rel, {"emb": emb_t, "mask": mask_t.to(torch.uint8)})
        return self.shard_record(rel)

    def shard_record(self, rel: str) -> dict[str, Any]:
        p = self.path / rel
        return {"file": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p)}

    def write_state(self, modality: str, name: str, state: dict[str, np.ndarray]) -> str | None:
        if not state:
            return None
        rel = f"state/{modality}/{name}.safetensors"
        atomic_save_tensors(self.path / rel,
                            {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in state.items()})
        return rel

    def write_labels(self, labels: dict[str, np.ndarray]) -> tuple[str, str]:
        rel = "labels.safetensors"
        atomic_save_tensors(self.path / rel, {k: torch.as_tensor(np.asarray(v, dtype=np.float32))
                                              for k, v in labels.items()})
        return rel, sha256_file(self.path / rel)

    def write_manifest(
        self, *, sample_ids: list[str], modalities: list[ModalitySpec], tasks: list[TaskSpec],
        splits: dict[str, list[int]], experts: dict[str, list[EncoderEntry]],
        teachers: dict[str, list[EncoderEntry]], labels_file: str, labels_sha256: str,
        dataset: dict[str, Any], report: dict[str, Any] | None = None,
        attributes: dict[str, list[str | None]] | None = None,
    ) -> Path:
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "dataset": dataset,
            "sample_ids": list(sample_ids),
            "modalities": [vars(m) for m in modalities],
            "tasks": [vars(t) for t in tasks],
            "splits": {k: [int(i) for i in v] for k, v in splits.items()},
            "experts": {m: [e.to_json() for e in es] for m, es in experts.items()},
            "teachers": {m: [e.to_json() for e in es] for m, es in teachers.items()},
            "labels_file": labels_file, "labels_sha256": labels_sha256,
            "report": report or {},
            "attributes": attributes or {},
        }
        atomic_write_text(self.path / "manifest.json", json.dumps(manifest, indent=1))
        return self.path / "manifest.json"
