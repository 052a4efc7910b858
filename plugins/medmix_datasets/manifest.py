"""``manifest``: your own cohort from a table (one row per sample) and a small spec.

The spec (YAML or JSON) maps table columns to modalities, tasks and splits::

    manifest: cohort.csv            # .csv always; .parquet when pyarrow is installed
    id: patient_id
    modalities:
      cxr:    {kind: image, columns: [frontal_path, lateral_path]}   # views
      ct:     {kind: volume, column: ct_path, n_slices: 16, hu_window: [-1000, 400]}
      note:   {kind: text, column: note}                  # the text itself
      report: {kind: text, column: report_path, from_file: true}      # a .txt per row
      labs:   {kind: tabular, columns: [age, creatinine, lactate]}
      vitals: {kind: timeseries, column: vitals_path}     # CSV: time,variable,value
    tasks:
      - {name: mortality, type: binary, column: died}
      - {name: dx, type: multiclass, column: diagnosis, classes: [a, b, c]}
      - {name: findings, type: multilabel, columns: [edema, effusion]}
    splits: {column: split}         # optional; else a seeded split stratified on task 0

Construct with ``ManifestDataset(source="spec.yaml")`` (or ``spec=`` a path or a dict;
with a dict, relative paths are resolved against the ``base_dir`` option, default the
current folder). Paths in the table are relative to the manifest table's folder unless
absolute.

Missing data. An empty cell is a missing modality (an image modality is missing when none
of its view cells is usable). A path whose file does not exist is also a missing modality
(or a missing view); such files are counted per modality and listed in :meth:`report`,
never a crash. Tabular cells that are empty, ``NA``, ``NaN`` or ``null`` are NaN; a row whose
tabular columns are all NaN has the modality missing. A time-series file with no row is a
missing modality. Labels: an empty cell is an unknown label (NaN).

Errors (:class:`DataError`, saying what was expected and what was found): a spec that does
not validate (unknown keys, unknown kinds, a column named twice in one modality, volume
options on another kind), columns absent from the table, duplicate or empty ids, labels
that do not parse, split values other than train/val/test, unreadable time-series files.

Volume modalities pass their ``n_slices`` / ``hu_window`` on each payload (a
:class:`ManifestVolume`); image experts use them unless given the option explicitly.
Time-series files: header ``time,variable,value`` (time in hours since the window start);
the modality's variables are those listed in ``variables`` or else every variable seen, in
sorted order; ``horizon`` defaults to the largest time seen in the cohort.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medmix_core import (
    Dataset,
    ImageData,
    ModalitySpec,
    Sample,
    TabularData,
    TaskSpec,
    TextData,
    TimeSeriesData,
    VolumeData,
    hookimpl,
)
from medmix_core.errors import DataError
from medmix_core.store import sha256_file

KINDS = ("image", "volume", "text", "tabular", "timeseries")
_NA = {"", "na", "n/a", "nan", "null", "none"}
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                "validation": "val", "dev": "val", "test": "test", "testing": "test"}
_TRUE = {"1", "1.0", "true", "yes", "y", "t"}
_FALSE = {"0", "0.0", "false", "no", "n", "f"}


@dataclass
class ManifestVolume(VolumeData):
    """A CT volume with the manifest's 2.5D settings for the image experts."""

    n_slices: int | None = None
    hu_window: tuple[float, float] | None = None


# -- the spec ----------------------------------------------------------------------------

class _Columns(BaseModel):
    """A spec entry that reads one ``column`` or several ``columns`` of the table."""

    model_config = ConfigDict(extra="forbid")

    column: str | None = None
    columns: list[str] | None = None

    def cols(self) -> list[str]:
        return list(self.columns) if self.columns is not None else [str(self.column)]


class ModalityConfig(_Columns):
    """One modality: its kind and the column(s) holding it."""

    kind: str
    n_slices: int | None = Field(None, ge=1)
    hu_window: tuple[float, float] | None = None
    from_file: bool = False
    variables: list[str] | None = None
    horizon: float | None = Field(None, gt=0)
    units: dict[str, str] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in KINDS:
            close = difflib.get_close_matches(v, KINDS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown kind {v!r}; expected one of {', '.join(KINDS)}.{hint}")
        return v

    @model_validator(mode="after")
    def _shape(self) -> ModalityConfig:
        if (self.column is None) == (self.columns is None):
            raise ValueError("give exactly one of 'column' or 'columns'")
        cols = self.cols()
        if not cols:
            raise ValueError("'columns' is empty")
        if len(set(cols)) != len(cols):
            raise ValueError(f"a column is named twice: {cols}")
        if self.kind in ("volume", "text", "timeseries") and len(cols) != 1:
            raise ValueError(f"a {self.kind} modality reads one column, got {cols}")
        if self.kind != "volume" and (self.n_slices is not None or self.hu_window is not None):
            raise ValueError("n_slices / hu_window apply to kind 'volume' only")
        if self.hu_window is not None and not self.hu_window[0] < self.hu_window[1]:
            raise ValueError(f"hu_window {list(self.hu_window)} needs low < high")
        if self.from_file and self.kind != "text":
            raise ValueError("from_file applies to kind 'text' only")
        if self.kind != "timeseries" and (self.variables is not None or self.horizon is not None):
            raise ValueError("variables / horizon apply to kind 'timeseries' only")
        return self



class TaskConfig(_Columns):
    """One task: binary/multiclass from a column, multilabel from 0/1 columns."""

    name: str
    type: str
    classes: list[str] | None = None

    @model_validator(mode="after")
    def _shape(self) -> TaskConfig:
        if self.type not in ("binary", "multiclass", "multilabel"):
            raise ValueError(f"unknown task type {self.type!r}; expected binary, multiclass or "
                             f"multilabel")
        if self.type == "multilabel":
            if self.columns is None or self.column is not None:
                raise ValueError("a multilabel task reads 'columns' (one 0/1 column per class)")
            if self.classes is not None and len(self.classes) != len(self.columns):
                raise ValueError("'classes' must name each of 'columns'")
        else:
            if self.column is None or self.columns is not None:
                raise ValueError(f"a {self.type} task reads one 'column'")
            if self.type == "binary" and self.classes is not None:
                raise ValueError("a binary task has no 'classes'")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes repeat: {self.classes}")
        return self



class SplitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    column: str


class ManifestSpec(BaseModel):
    """The whole spec file."""

    model_config = ConfigDict(extra="forbid")

    manifest: str
    id: str
    modalities: dict[str, ModalityConfig]
    tasks: list[TaskConfig]
    splits: SplitConfig | None = None

    @model_validator(mode="after")
    def _non_empty(self) -> ManifestSpec:
        if not self.modalities:
            raise ValueError("'modalities' is empty; name at least one")
        if not self.tasks:
            raise ValueError("'tasks' is empty; name at least one")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names repeat: {names}")
        return self


def _format_validation(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not allowed here)"
        lines.append(f"  - {loc}: {msg}")
    return (f"The manifest spec {where} is invalid:\n" + "\n".join(lines)
            + "\nSee the medmix_datasets.manifest docs for the spec format.")


def load_spec(spec: Any, base_dir: str | Path | None = None) -> tuple[ManifestSpec, Path, str]:
    """Read and validate a spec.

    Args:
        spec: path to a .yaml/.yml/.json file, or a dict.
        base_dir: folder relative paths of a dict spec are resolved against (default cwd).
    Returns:
        (validated spec, folder the spec's relative paths refer to, text naming the spec).
    Raises:
        DataError: unreadable or invalid spec.
    """
    if isinstance(spec, dict):
        data, folder, where = spec, Path(base_dir or ".").resolve(), "(given as a dict)"
    else:
        path = Path(spec).expanduser()
        where = str(path)
        if not path.is_file():
            raise DataError(f"Manifest spec {path} does not exist. Pass source= the path of "
                            f"a YAML/JSON spec (see medmix_datasets.manifest).")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:
            raise DataError(f"Could not parse the manifest spec {path}: {exc}") from exc
        folder = path.resolve().parent
        if not isinstance(data, dict):
            raise DataError(f"The manifest spec {path} holds a {type(data).__name__}; expected "
                            f"a mapping with keys manifest, id, modalities, tasks.")
    try:
        parsed = ManifestSpec.model_validate(data)
    except ValidationError as exc:
        raise DataError(_format_validation(exc, where)) from None
    return parsed, folder, where


# -- reading the table ---------------------------------------------------------------------

def _read_table(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows) of a CSV or Parquet manifest table."""
    if not path.is_file():
        raise DataError(f"Manifest table {path} does not exist (the spec's 'manifest' is "
                        f"relative to the spec's folder).")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataError(
                f"Reading {path} needs the optional package pyarrow, which is not "
                f"installed: pip install pyarrow (or save the manifest as CSV)."
            ) from exc
        table = pq.read_table(path)
        return list(table.column_names), table.to_pylist()
    if suffix not in (".csv", ".tsv", ".txt"):
        raise DataError(f"Manifest table {path} has an unsupported type; expected .csv, .tsv or "
                        f".parquet.")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ",")
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"Manifest table {path} is empty; expected a header row.") from None
        header = [h.strip() for h in header]
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise DataError(f"Manifest table {path} repeats columns {dup}; names must be unique.")
        rows = []
        for lineno, rec in enumerate(reader, start=2):
            if not any(c.strip() for c in rec):
                continue  # blank line
            if len(rec) != len(header):
                raise DataError(f"{path} line {lineno} has {len(rec)} cells, the header has "
                                f"{len(header)}. Quote cells that contain commas.")
            rows.append(dict(zip(header, rec)))
    return header, rows


def _empty(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()


def _number(v: Any) -> float:
    """A cell as float; NaN for empty/NA; ValueError when not a number."""
    if v is None or isinstance(v, bool):
        return float("nan") if v is None else float(v)
    if isinstance(v, (int, float)):
        return float(v)
    s = str(v).strip()
    if s.lower() in _NA:
        return float("nan")
    return float(s)


# -- the dataset -----------------------------------------------------------------------------

class ManifestDataset(Dataset):
    """A user's cohort described by a manifest table and a spec (see the module docs).

    Options:
        spec: the spec (path or dict) when ``source`` is not given.
        base_dir: folder for relative paths of a dict spec (default: current folder).
        split_seed: seed of the stratified split when the spec has no ``splits``.
    """

    name = "manifest"

    def __init__(self, source: str | None = None, **options: Any) -> None:
        super().__init__(source=source, **options)
        unknown = sorted(set(options) - {"spec", "base_dir", "split_seed"})
        if unknown:
            raise DataError(f"Unknown option(s) {unknown} for dataset 'manifest'; known: "
                            f"spec, base_dir, split_seed.")
        spec = options.get("spec", source)
        if spec is None:
            raise DataError("The manifest dataset needs a spec: pass source='cohort.yaml' "
                            "(`--source cohort.yaml`) or spec=<path or dict>.")
        if source is not None and "spec" in options:
            raise DataError("Give the manifest spec once: either source= or spec=, not both.")
        self.spec, self.folder, self.where = load_spec(spec, options.get("base_dir"))
        self.table_path = (self.folder / self.spec.manifest).resolve()
        self._samples: list[Sample] | None = None
        self._mods: list[ModalitySpec] | None = None
        self._tasks: list[TaskSpec] | None = None
        self._splits: dict[str, str] = {}
        self._report: dict[str, Any] = {}

    # -- public API ----------------------------------------------------------------------
    def modalities(self) -> list[ModalitySpec]:
        self._load()
        return list(self._mods or [])

    def tasks(self) -> list[TaskSpec]:
        self._load()
        return list(self._tasks or [])

    def samples(self) -> list[Sample]:
        self._load()
        return list(self._samples or [])

    def splits(self, samples: list[Sample]) -> dict[str, list[int]]:
        """From the spec's split column when given, else the seeded stratified split."""
        self._load()
        if self.spec.splits is None:
            return super().splits(samples)
        out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for i, s in enumerate(samples):
            if s.id not in self._splits:
                raise DataError(f"Sample {s.id!r} is not in the manifest {self.table_path}.")
            out[self._splits[s.id]].append(i)
        return out

    def identity(self) -> dict[str, Any]:
        spec_hash = hashlib.sha256(
            json.dumps(self.spec.model_dump(), sort_keys=True).encode()).hexdigest()
        return {"name": self.name, "source": self.where, "spec_sha256": spec_hash,
                "manifest": str(self.table_path),
                "manifest_sha256": (
                    sha256_file(self.table_path) if self.table_path.is_file() else None
                ),
                "options": {"split_seed": int(self.options.get("split_seed", 0))}}

    def report(self) -> dict[str, Any]:
        """Per modality: present, empty cells, missing files (count and examples)."""
        self._load()
        return json.loads(json.dumps(self._report))

    # -- loading -------------------------------------------------------------------------
    def _resolve_path(self, cell: Any) -> Path:
        p = Path(str(cell).strip()).expanduser()
        return p if p.is_absolute() else (self.table_path.parent / p)

    def _load(self) -> None:
        if self._samples is not None:
            return
        spec = self.spec
        header, rows = _read_table(self.table_path)
        where = str(self.table_path)
        self._check_columns(header, where)
        if not rows:
            raise DataError(f"Manifest table {where} has a header but no rows.")

        ids: list[str] = []
        for r, row in enumerate(rows, start=2):
            v = row.get(spec.id)
            if _empty(v):
                raise DataError(f"{where} row {r}: the id column {spec.id!r} is empty; every "
                                f"sample needs an id.")
            ids.append(str(v).strip() if not isinstance(v, float) or not v.is_integer()
                       else str(int(v)))
        seen: dict[str, int] = {}
        dups = []
        for i, sid in enumerate(ids):
            if sid in seen:
                dups.append(f"{sid!r} (rows {seen[sid] + 2} and {i + 2})")
            seen.setdefault(sid, i)
        if dups:
            raise DataError(f"{where}: duplicate ids in column {spec.id!r}: {', '.join(dups[:5])}"
                            f"{' ...' if len(dups) > 5 else ''}. Ids must be unique, one row per "
                            f"sample.")

        rep: dict[str, Any] = {"n_samples": len(rows), "modalities": {}}
        payloads: dict[str, list[Any]] = {}
        mods: list[ModalitySpec] = []
        for name, cfg in spec.modalities.items():
            stats = {"present": 0, "empty": 0, "missing_files": 0, "missing_file_examples": []}
            if cfg.kind == "image":
                col = self._images(cfg, rows, stats)
                mods.append(ModalitySpec(name, "image"))
            elif cfg.kind == "volume":
                col = self._volumes(cfg, rows, stats)
                mods.append(ModalitySpec(name, "volume"))
            elif cfg.kind == "text":
                col = self._texts(cfg, rows, stats)
                mods.append(ModalitySpec(name, "text"))
            elif cfg.kind == "tabular":
                col = self._tabular(cfg, rows, stats, ids, where)
                mods.append(ModalitySpec(name, "tabular", variables=cfg.cols(),
                                         units=dict(cfg.units)))
            else:
                col, variables = self._timeseries(cfg, rows, stats)
                mods.append(ModalitySpec(name, "timeseries", variables=variables,
                                         units=dict(cfg.units)))
            stats["present"] = sum(p is not None for p in col)
            stats["missing_rate"] = 1.0 - stats["present"] / len(rows)
            rep["modalities"][name] = stats
            payloads[name] = col

        tasks, labels = self._labels(rows, ids, where)
        if spec.splits is not None:
            col = spec.splits.column
            for sid, row, r in zip(ids, rows, range(2, len(rows) + 2)):
                v = row.get(col)
                key = "" if _empty(v) else str(v).strip().lower()
                if key not in _SPLIT_NAMES:
                    raise DataError(
                        f"{where} row {r} (id {sid!r}): split column {col!r} holds {v!r}; "
                        f"expected train, val or test (also: training, valid, validation, dev, "
                        f"testing).")
                self._splits[sid] = _SPLIT_NAMES[key]
        self._samples = [
            Sample(id=sid, modalities={m.name: payloads[m.name][i] for m in mods},
                   labels={t.name: labels[t.name][i] for t in tasks}, meta={"row": i + 2})
            for i, sid in enumerate(ids)]
        self._mods, self._tasks, self._report = mods, tasks, rep

    def _check_columns(self, header: list[str], where: str) -> None:
        spec = self.spec
        wanted = [("id", spec.id)]
        for name, cfg in spec.modalities.items():
            wanted += [(f"modality {name!r}", c) for c in cfg.cols()]
        for t in spec.tasks:
            wanted += [(f"task {t.name!r}", c) for c in t.cols()]
        if spec.splits is not None:
            wanted.append(("splits", spec.splits.column))
        absent = []
        for role, c in wanted:
            if c not in header:
                close = difflib.get_close_matches(c, header, n=1)
                absent.append(f"{c!r} ({role}{f'; did you mean {close[0]!r}?' if close else ''})")
        if absent:
            raise DataError(f"The spec {self.where} names columns that {where} lacks: "
                            f"{', '.join(absent)}. The table's columns are: {', '.join(header)}.")

    def _file(self, cell: Any, stats: dict) -> Path | None:
        """The resolved path of a cell, or None (counted) when the file does not exist."""
        p = self._resolve_path(cell)
        if p.is_file():
            return p
        stats["missing_files"] += 1
        if len(stats["missing_file_examples"]) < 5:
            stats["missing_file_examples"].append(str(p))
        return None

    def _images(self, cfg: ModalityConfig, rows, stats) -> list[Any]:
        out = []
        for row in rows:
            views = []
            for c in cfg.cols():
                v = row.get(c)
                if _empty(v):
                    continue
                p = self._file(v, stats)
                if p is not None:
                    views.append(str(p))
            if not any(not _empty(row.get(c)) for c in cfg.cols()):
                stats["empty"] += 1
            out.append(ImageData(views=views) if views else None)
        return out

    def _volumes(self, cfg: ModalityConfig, rows, stats) -> list[Any]:
        out = []
        for row in rows:
            v = row.get(cfg.cols()[0])
            if _empty(v):
                stats["empty"] += 1
                out.append(None)
                continue
            p = self._file(v, stats)
            out.append(None if p is None else ManifestVolume(
                volume=str(p), n_slices=cfg.n_slices,
                hu_window=None if cfg.hu_window is None else tuple(cfg.hu_window)))
        return out

    def _texts(self, cfg: ModalityConfig, rows, stats) -> list[Any]:
        out = []
        for row in rows:
            v = row.get(cfg.cols()[0])
            if _empty(v):
                stats["empty"] += 1
                out.append(None)
                continue
            if not cfg.from_file:
                out.append(TextData(text=str(v)))
                continue
            p = self._file(v, stats)
            text = None if p is None else p.read_text(encoding="utf-8", errors="replace")
            if text is not None and not text.strip():
                stats["empty"] += 1
                text = None
            out.append(None if text is None else TextData(text=text))
        return out

    def _tabular(self, cfg: ModalityConfig, rows, stats, ids, where) -> list[Any]:
        cols = cfg.cols()
        out = []
        for i, row in enumerate(rows):
            vals = np.empty(len(cols), dtype=np.float64)
            for j, c in enumerate(cols):
                try:
                    vals[j] = _number(row.get(c))
                except (TypeError, ValueError):
                    raise DataError(
                        f"{where} row {i + 2} (id {ids[i]!r}): column {c!r} holds "
                        f"{row.get(c)!r}; expected a number (empty, NA or NaN for unmeasured)."
                    ) from None
            if not np.isfinite(vals[~np.isnan(vals)]).all():
                raise DataError(f"{where} row {i + 2} (id {ids[i]!r}): infinite value in {cols}.")
            if np.isnan(vals).all():
                stats["empty"] += 1
                out.append(None)
            else:
                out.append(TabularData(variables=list(cols), values=vals))
        return out

    def _timeseries(self, cfg: ModalityConfig, rows, stats) -> tuple[list[Any], list[str]]:
        parsed: list[dict[str, tuple[list[float], list[float]]] | None] = []
        seen: set[str] = set()
        t_max = 0.0
        ignored = 0
        for row in rows:
            v = row.get(cfg.cols()[0])
            if _empty(v):
                stats["empty"] += 1
                parsed.append(None)
                continue
            p = self._file(v, stats)
            if p is None:
                parsed.append(None)
                continue
            series = _read_series(p)
            if cfg.variables is not None:
                keep = {k: s for k, s in series.items() if k in cfg.variables}
                ignored += sum(len(s[0]) for k, s in series.items() if k not in keep)
                series = keep
            if not series:
                stats["empty"] += 1
                parsed.append(None)
                continue
            seen.update(series)
            t_max = max(t_max, max(max(t) for t, _ in series.values()))
            parsed.append(series)
        variables = list(cfg.variables) if cfg.variables is not None else sorted(seen)
        horizon = float(cfg.horizon) if cfg.horizon is not None else max(t_max, 1e-9)
        if cfg.variables is not None:
            stats["rows_of_other_variables"] = ignored
        out = []
        for series in parsed:
            if series is None:
                out.append(None)
                continue
            out.append(TimeSeriesData(
                variables=list(variables),
                times=[
                    np.asarray(series.get(k, ([], []))[0], dtype=np.float64) for k in variables
                ],
                values=[
                    np.asarray(series.get(k, ([], []))[1], dtype=np.float64) for k in variables
                ],
                horizon=horizon))
        return out, variables

    def _labels(self, rows, ids, where) -> tuple[list[TaskSpec], dict[str, list[Any]]]:
        tasks, labels = [], {}
        for t in self.spec.tasks:
            if t.type == "binary":
                ys = []
                for i, row in enumerate(rows):
                    ys.append(_binary(row.get(t.column), where, i, ids[i], t.column))
                tasks.append(TaskSpec(t.name, "binary"))
            elif t.type == "multiclass":
                cells = [None if _empty(row.get(t.column)) else str(row.get(t.column)).strip()
                         for row in rows]
                classes = list(t.classes) if t.classes is not None else sorted(
                    {c for c in cells if c is not None})
                index = {c: k for k, c in enumerate(classes)}
                ys = []
                for i, c in enumerate(cells):
                    if c is None:
                        ys.append(float("nan"))
                    elif c in index:
                        ys.append(float(index[c]))
                    else:
                        raise DataError(f"{where} row {i + 2} (id {ids[i]!r}): task {t.name!r} "
                                        f"has class {c!r}, not among {classes}. Add it to the "
                                        f"task's 'classes' or fix the cell.")
                if len(classes) < 2:
                    raise DataError(f"Task {t.name!r} has {len(classes)} class(es) {classes}; a "
                                    f"multiclass task needs at least two.")
                tasks.append(TaskSpec(t.name, "multiclass", classes=classes))
            else:
                cols = t.cols()
                ys = []
                for i, row in enumerate(rows):
                    ys.append([_binary(row.get(c), where, i, ids[i], c) for c in cols])
                tasks.append(TaskSpec(t.name, "multilabel", classes=list(t.classes or cols)))
            labels[t.name] = ys
        return tasks, labels


def _binary(v: Any, where: str, i: int, sid: str, col: str) -> float:
    if _empty(v):
        return float("nan")
    s = str(v).strip().lower()
    if isinstance(v, bool):
        return float(v)
    if s in _TRUE:
        return 1.0
    if s in _FALSE:
        return 0.0
    if s in _NA:
        return float("nan")
    raise DataError(f"{where} row {i + 2} (id {sid!r}): column {col!r} holds {v!r}; expected a "
                    f"binary label 0/1 (or true/false, yes/no; empty = unknown).")


def _read_series(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """A ``time,variable,value`` CSV -> {variable: (times, values)}; empty values skipped."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        if header[:3] != ["time", "variable", "value"]:
            raise DataError(f"Time-series file {path} has header {header}; expected "
                            f"time,variable,value (time in hours).")
        for lineno, rec in enumerate(reader, start=2):
            if not any(c.strip() for c in rec):
                continue
            if len(rec) < 3:
                raise DataError(f"{path} line {lineno}: expected time,variable,value, got {rec}.")
            t, var, val = rec[0].strip(), rec[1].strip(), rec[2].strip()
            if val.lower() in _NA:
                continue
            try:
                tf, vf = float(t), float(val)
            except ValueError:
                raise DataError(f"{path} line {lineno}: time {t!r} and value {val!r} must be "
                                f"numbers (time in hours since the window start).") from None
            if not (math.isfinite(tf) and math.isfinite(vf)) or tf < 0 or not var:
                raise DataError(f"{path} line {lineno}: need a finite time >= 0, a variable "
                                f"name and a finite value; got {rec[:3]}.")
            ts, vs = out.setdefault(var, ([], []))
            ts.append(tf)
            vs.append(vf)
    return out


@hookimpl
def register_datasets(register):
    register("manifest", ManifestDataset)
