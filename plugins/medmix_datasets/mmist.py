"""``mmist``: MMIST-ccRCC (clear-cell renal cell carcinoma; CT, whole-slide pathology, clinical
data; 12-month vital status; the official split).

MMIST-ccRCC (Mota et al., CVPR Workshops 2024, arXiv:2405.01658) gathers 618 ccRCC patients
of TCGA-KIRC (ids ``TCGA-XX-XXXX``) and CPTAC-CCRCC (ids ``C3L-XXXXX`` / ``C3N-XXXXX``) with
CT, MRI, whole-slide images (WSI), genomics and clinical data, and the binary label
``vital_status_12``. The layout read here (file and folder names are options; see
``docs/data/mmist.md`` for what was confirmed and what was not)::

    <source>/
      clinical.csv             one row per patient: the id column, vital_status_12, variables
      CT/{train,val,test}/     one entry per CT series: a NIfTI / .npy / .npz volume file, or a
                               DICOM series folder; named <Series Instance UID>[_Gr...] or by
                               the patient id
      WSI/{train,val,test}/    slide files (.svs, .tif, ...), named by the slide barcode
                               (TCGA-XX-XXXX-01Z-00-DX1..., C3L-XXXXX-21, ...)
      Clinical/{train,val,test}/  optional: one file per patient named by its id (the
                               release's split of the clinical modality)
      TCGA.csv, CPTAC.csv      the TCIA series tables: Series Instance UID -> Patient ID
      notes.csv                optional: id, text (a ``notes`` text modality)

The **split** is the official one: the ``train`` / ``val`` / ``test`` folder a patient's files
sit in (or the ``split_file`` option: a CSV of id and split). A patient whose files sit in
two different splits is an error; a patient with no split is left out and counted. Only when
no split is recorded anywhere is the seeded stratified 70/15/15 split used (reported).

**Patients**: every row of the clinical table. Files are matched to patients by the series
tables (CT names) or by the longest dash-separated prefix of the file name that is a patient
id (slides, CT files named by patient). A file matched to no patient is counted, not read.

**Modalities** (a patient lacking one has ``None``): ``ct`` (volume: the 2.5D pipeline of the
image experts, with this dataset's ``n_slices`` and abdominal HU window, see options),
``wsi`` (slide: ``SlideData`` of the patient's slide paths, for the ``wsi`` expert),
``clinical`` (tabular), and ``notes`` (text) when ``notes.csv`` exists. A file that does not
exist, is empty, or does not start like its format (TIFF magic for slides, NIfTI/gzip/NumPy
magic for volumes, ``DICM`` for DICOM) is unreadable: counted per modality and left out.

**Clinical variables**: every column but the id, the split, ``vital_status*`` and anything
that would leak the outcome (``days_to*``, ``*survival*``, ``*death*``, ``*follow*``,
``os``/``pfs``/``dfs`` columns). Numeric columns are variables as they are (empty, ``NA``,
``NaN`` -> NaN); a text column with at most ``max_categories`` values becomes one 0/1
indicator per value (``column=value``, NaN when the cell is empty); other text columns are
ignored and listed in the report. ``clinical_columns`` chooses the columns explicitly.

**Label** ``vital_status_12`` (binary): 0/1 as published (``alive`` -> 1, ``dead`` -> 0 as
text); an empty cell is an unknown label (NaN), any other value too, and both are counted in
:meth:`MMIST.report` with examples.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medmix_core import (
    Dataset,
    ModalitySpec,
    Sample,
    SlideData,
    TabularData,
    TaskSpec,
    TextData,
    VolumeData,
    hookimpl,
)
from medmix_core.errors import DataError
from medmix_core.store import sha256_file

#: bumps whenever parsing rules change the samples (part of the cache key)
PARSER_VERSION = "1"
SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val",
          "validation": "val", "test": "test", "testing": "test"}
ID_COLUMNS = ("case_id", "Subject ID", "subject_id", "patient_id", "Patient ID",
              "case_submitter_id", "submitter_id")
LABEL = "vital_status_12"
SLIDE_EXT = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".mrxs", ".vms", ".svslide")
VOLUME_EXT = (".nii.gz", ".nii", ".npy", ".npz")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_NA = {"", "na", "n/a", "nan", "null", "none", "--", "'--", "not reported", "unknown"}
_LEAK = re.compile(r"(^vital_status|days_to|surviv|death|follow|^(os|pfs|dfs)(_|$)|^split$)",
                   re.IGNORECASE)
_GRADE_SUFFIX = re.compile(r"_Gr.*$")

DEFAULTS: dict[str, Any] = {
    "clinical_file": "clinical.csv",
    "id_column": None,
    "label_column": LABEL,
    "ct_dir": "CT",
    "wsi_dir": "WSI",
    "clinical_dir": "Clinical",
    "series_maps": ["TCGA.csv", "CPTAC.csv"],
    "notes_file": "notes.csv",
    "split_file": None,
    "clinical_columns": None,
    "max_categories": 20,
    "n_slices": 16,
    # abdominal soft-tissue window (W 400, L 40): kidney and tumour, not lung
    "hu_window": [-160.0, 240.0],
    "dicom_cache": None,
    "split_seed": 0,
}
_LAYOUT = ("the MMIST-ccRCC layout: clinical.csv (id, vital_status_12, variables), "
           "CT/{train,val,test}/, WSI/{train,val,test}/, TCGA.csv / CPTAC.csv "
           "(see docs/data/mmist.md)")


@dataclass
class CTVolume(VolumeData):
    """A CT volume with this dataset's 2.5D settings for the image experts."""

    n_slices: int | None = None
    hu_window: tuple[float, float] | None = None


class DicomSeries(CTVolume):
    """A DICOM series folder, converted on first use to a ``[D, H, W]`` HU ``.npy``.

    The conversion (pydicom; slices sorted by ImagePositionPatient z, else InstanceNumber;
    RescaleSlope / RescaleIntercept applied) is cached in ``cache`` under a name derived
    from the folder's path and its files' names, sizes and times, so a changed series is
    converted again and an unchanged one never twice.
    """

    def __init__(self, folder: Path, cache: Path, n_slices: int | None,
                 hu_window: tuple[float, float] | None) -> None:
        self.folder = Path(folder)
        self.cache = Path(cache)
        self.n_slices = n_slices
        self.hu_window = hu_window

    def __repr__(self) -> str:
        return f"DicomSeries({str(self.folder)!r})"

    @property
    def volume(self) -> str:  # type: ignore[override]
        files = sorted(p for p in self.folder.iterdir() if p.is_file())
        key = hashlib.sha256(str(self.folder.resolve()).encode())
        for p in files:
            st = p.stat()
            key.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        out = self.cache / f"{key.hexdigest()[:32]}.npy"
        if not out.is_file():
            self.cache.mkdir(parents=True, exist_ok=True)
            vol = dicom_series_to_array(self.folder, files)
            tmp = out.with_suffix(".tmp.npy")
            np.save(tmp, vol)
            tmp.replace(out)  # atomic: a half-written cache file is never read
        return str(out)


def dicom_series_to_array(folder: Path, files: list[Path] | None = None) -> np.ndarray:
    """Read a DICOM series folder into ``[D, H, W]`` float32 Hounsfield units.

    Raises:
        DataError: pydicom absent, no readable slice, slices of different sizes.
    """
    try:
        import pydicom
    except ImportError as exc:
        raise DataError(f"Reading the DICOM series {folder} needs the optional package "
                        f"pydicom: pip install 'medmix[ct]' (or convert the series to "
                        f"NIfTI).") from exc
    files = files if files is not None else sorted(p for p in Path(folder).iterdir()
                                                   if p.is_file())
    slices = []
    for p in files:
        try:
            ds = pydicom.dcmread(str(p))
            arr = ds.pixel_array.astype(np.float32)  # [H, W]
        except Exception:  # non-image files (DICOMDIR, notes) sit in series folders
            continue
        slope = float(getattr(ds, "RescaleSlope", 1.0))
        inter = float(getattr(ds, "RescaleIntercept", 0.0))
        pos = getattr(ds, "ImagePositionPatient", None)
        z = float(pos[2]) if pos is not None and len(pos) == 3 else float(
            getattr(ds, "InstanceNumber", len(slices)))
        slices.append((z, arr * slope + inter))
    if not slices:
        raise DataError(f"DICOM series {folder}: no readable image slice among {len(files)} "
                        f"files.")
    shapes = {s.shape for _, s in slices}
    if len(shapes) != 1:
        raise DataError(f"DICOM series {folder}: slices of different sizes {sorted(shapes)}; "
                        f"a series holds one volume.")
    slices.sort(key=lambda t: t[0])
    return np.stack([s for _, s in slices]).astype(np.float32)  # [D, H, W] HU


# -- small readers -------------------------------------------------------------------------

def _read_csv(path: Path, what: str) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a CSV (or TSV); blank lines skipped."""
    if not path.is_file():
        raise DataError(f"mmist: {what} {path} does not exist. Expected {_LAYOUT}.")
    delim = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=delim)
        header = [h.strip() for h in next(reader, [])]
        if not header:
            raise DataError(f"mmist: {what} {path} is empty; expected a header row.")
        rows = []
        for lineno, rec in enumerate(reader, start=2):
            if not any(c.strip() for c in rec):
                continue
            if len(rec) != len(header):
                raise DataError(f"mmist: {path} line {lineno} has {len(rec)} cells, the header "
                                f"has {len(header)}. Quote cells that contain commas.")
            rows.append({h: c.strip() for h, c in zip(header, rec)})
    return header, rows


def _is_na(v: str) -> bool:
    return v.strip().lower() in _NA


def _number(v: str) -> float | None:
    """A cell as float (NaN for NA), or None when it is not a number."""
    if _is_na(v):
        return float("nan")
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _strip_ext(name: str) -> str:
    low = name.lower()
    for ext in VOLUME_EXT + SLIDE_EXT + (".pt", ".pth", ".npy", ".csv", ".json", ".txt"):
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


def _readable(path: Path, kind: str) -> bool:
    """Cheap format check: exists, not empty, starts like its format."""
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file())
            if not files:
                return False
            with open(files[0], "rb") as fh:
                head = fh.read(132)
            return kind == "ct" and head[128:132] == b"DICM"
        if not path.is_file() or path.stat().st_size == 0:
            return False
        with open(path, "rb") as fh:
            head = fh.read(352)
    except OSError:
        return False
    name = path.name.lower()
    if kind == "wsi":
        return head[:4] in _TIFF_MAGIC if name.endswith(SLIDE_EXT[:6]) else True
    if name.endswith(".nii.gz"):
        return head[:2] == b"\x1f\x8b"
    if name.endswith(".nii"):
        return head[344:348] in (b"n+1\x00", b"ni1\x00", b"n+2\x00", b"ni2\x00")
    if name.endswith(".npy"):
        return head[:6] == b"\x93NUMPY"
    if name.endswith(".npz"):
        return head[:2] == b"PK"
    return False


# -- the dataset -----------------------------------------------------------------------------

class MMIST(Dataset):
    """MMIST-ccRCC in its published layout (see the module docs).

    Args:
        source: the dataset folder (required).
        options: ``clinical_file``, ``id_column`` (auto: case_id, Subject ID, patient_id,
            ...), ``label_column`` (vital_status_12), ``ct_dir``, ``wsi_dir``,
            ``clinical_dir``, ``series_maps``, ``notes_file``, ``split_file``,
            ``clinical_columns``, ``max_categories`` (20), ``n_slices`` (16), ``hu_window``
            ([-160, 240]), ``dicom_cache`` (default ``<source>/.medmix-dicom``),
            ``split_seed`` (0; used only when no split is recorded).
    """

    name = "mmist"
    default_experts = ("stats",)

    def __init__(self, source: str | None = None, **options: Any) -> None:
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise DataError(f"mmist: unknown option(s) {unknown}; known: "
                            f"{', '.join(sorted(DEFAULTS))}.")
        if source is None:
            raise DataError(f"mmist has no bundled data: pass source= the MMIST-ccRCC folder "
                            f"(`--source PATH`), in {_LAYOUT}.")
        super().__init__(source, **options)
        self.opts = {**DEFAULTS, **options}
        self.root = Path(source).expanduser()
        if not self.root.is_dir():
            raise DataError(f"mmist: source {str(self.root)!r} is not a folder. Expected "
                            f"{_LAYOUT}.")
        hw = self.opts["hu_window"]
        try:
            lo, hi = (float(v) for v in hw)
        except (TypeError, ValueError):
            raise DataError(f"mmist: hu_window={hw!r} must be two numbers (low, high).") from None
        if not lo < hi:
            raise DataError(f"mmist: hu_window={hw!r} needs low < high.")
        self.hu_window = (lo, hi)
        n = self.opts["n_slices"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise DataError(f"mmist: n_slices={n!r} must be a positive integer.")
        self._samples: list[Sample] | None = None
        self._splits: dict[str, str] = {}
        self._report: dict[str, Any] = {}
        self._variables: list[str] = []
        self._has_notes = (self.root / str(self.opts["notes_file"])).is_file()

    # ------------------------------------------------------------------ specs
    def modalities(self) -> list[ModalitySpec]:
        self.samples()
        mods = [ModalitySpec("ct", "volume"), ModalitySpec("wsi", "slide"),
                ModalitySpec("clinical", "tabular", list(self._variables))]
        if self._has_notes:
            mods.append(ModalitySpec("notes", "text"))
        return mods

    def tasks(self) -> list[TaskSpec]:
        return [TaskSpec(str(self.opts["label_column"]), "binary")]

    def samples(self) -> list[Sample]:
        """The patients with a split, in clinical-table order (loaded once)."""
        if self._samples is None:
            self._samples = self._load()
        return self._samples

    def splits(self, samples: list[Sample]) -> dict[str, list[int]]:
        if not self._splits:  # nothing recorded: the seeded stratified split
            return super().splits(samples)
        out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for i, s in enumerate(samples):
            if s.id not in self._splits:
                raise DataError(f"mmist: sample {s.id!r} is not in the dataset's split.")
            out[self._splits[s.id]].append(i)
        return out

    def identity(self) -> dict[str, Any]:
        self.samples()
        return {"name": self.name, "source": str(self.root.resolve()),
                "clinical_sha256": sha256_file(self.root / str(self.opts["clinical_file"])),
                "files_sha256": self._files_hash, "parser_version": PARSER_VERSION,
                "options": {k: v for k, v in self.opts.items() if k != "dicom_cache"}}

    def report(self) -> dict[str, Any]:
        """Patients, labels, split, per-modality presence and unreadable/unmatched files."""
        self.samples()
        return dict(self._report)

    # ------------------------------------------------------------------ loading
    def _load(self) -> list[Sample]:
        o = self.opts
        header, rows = _read_csv(self.root / str(o["clinical_file"]), "clinical table")
        id_col = o["id_column"] or next((c for c in ID_COLUMNS if c in header), None)
        if id_col is None or id_col not in header:
            raise DataError(f"mmist: the clinical table has no id column "
                            f"({o['id_column'] or ' / '.join(ID_COLUMNS)}); its columns are "
                            f"{header}. Set the option id_column.")
        label_col = str(o["label_column"])
        if label_col not in header:
            raise DataError(f"mmist: the clinical table lacks the label column {label_col!r}; "
                            f"its columns are {header}. Set the option label_column.")
        ids = [r[id_col] for r in rows]
        empty = [i + 2 for i, v in enumerate(ids) if not v]
        if empty:
            raise DataError(f"mmist: clinical table rows {empty[:5]} have an empty id "
                            f"({id_col!r}); every patient needs one.")
        dup = sorted({v for v in ids if ids.count(v) > 1})
        if dup:
            raise DataError(f"mmist: patient ids repeat in the clinical table: {dup[:5]}; one "
                            f"row per patient.")
        known = set(ids)
        rep: dict[str, Any] = {"n_clinical_rows": len(rows)}

        uid_map = self._series_maps(rep)
        matcher = _Matcher(known, uid_map)
        split_of: dict[str, set[str]] = {}
        listing = hashlib.sha256()
        files: dict[str, dict[str, list[Path]]] = {"ct": {}, "wsi": {}}
        unmatched: list[str] = []
        for kind, folder in (("ct", o["ct_dir"]), ("wsi", o["wsi_dir"]),
                             ("clinical", o["clinical_dir"])):
            for split, entry in _entries(self.root / str(folder)):
                listing.update(f"{entry.relative_to(self.root)}\0".encode())
                pid = matcher.match(entry.name, use_uids=(kind == "ct"))
                if pid is None:
                    unmatched.append(str(entry.relative_to(self.root)))
                    continue
                if split is not None:
                    split_of.setdefault(pid, set()).add(split)
                if kind != "clinical":
                    files[kind].setdefault(pid, []).append(entry)
        self._files_hash = listing.hexdigest()
        rep["unmatched_files"] = {"count": len(unmatched), "examples": unmatched[:5]}

        if o["split_file"] is not None:
            split_of = self._split_file(known)
        conflicts = sorted(p for p, s in split_of.items() if len(s) > 1)
        if conflicts:
            ex = ", ".join(f"{p} in {sorted(split_of[p])}" for p in conflicts[:5])
            raise DataError(f"mmist: patients sit in more than one split folder: {ex}. Each "
                            f"patient's files belong to one of train/val/test.")
        variables, table = self._clinical(header, rows, id_col, label_col, rep)
        self._variables = variables
        notes = self._notes(known, rep) if self._has_notes else {}

        labels, lab_rep = _labels([r[label_col] for r in rows], ids)
        rep["labels"] = lab_rep
        mod_rep = {m: {"present": 0, "unreadable": 0, "unreadable_examples": []}
                   for m in ("ct", "wsi", "clinical") + (("notes",) if self._has_notes else ())}
        cache = Path(o["dicom_cache"]) if o["dicom_cache"] else self.root / ".medmix-dicom"
        samples, no_split = [], []
        for i, pid in enumerate(ids):
            if split_of and pid not in split_of:
                no_split.append(pid)
                continue
            mods: dict[str, Any] = {"ct": self._ct(files["ct"].get(pid, []), cache, mod_rep),
                                    "wsi": self._wsi(files["wsi"].get(pid, []), mod_rep)}
            row = table[i]
            mods["clinical"] = None if np.isnan(row).all() else TabularData(list(variables),
                                                                          row.copy())
            if self._has_notes:
                text = notes.get(pid)
                mods["notes"] = TextData(text) if text else None
            for m, p in mods.items():
                mod_rep[m]["present"] += p is not None
            samples.append(Sample(pid, mods, {label_col: labels[i]},
                                  {"cohort": "TCGA-KIRC" if pid.startswith("TCGA-")
                                   else "CPTAC-CCRCC" if pid[:4] in ("C3L-", "C3N-")
                                   else "other"}))
        if not samples:
            raise DataError(f"mmist: none of the {len(rows)} patients has a split "
                            f"({len(no_split)} without one). Put their files in "
                            f"train/val/test folders or give split_file=.")
        if split_of:
            self._splits = {s.id: next(iter(split_of[s.id])) for s in samples}
        n = len(samples)
        for r in mod_rep.values():
            r["missing_rate"] = 1.0 - r["present"] / n
        rep.update({"n_patients": n, "modalities": mod_rep,
                    "split_source": ("split_file" if o["split_file"] is not None
                                     else "folders" if split_of else "seeded (none recorded)"),
                    "split_sizes": {k: sum(v == k for v in self._splits.values())
                                    for k in ("train", "val", "test")} if split_of else {},
                    "without_split": {"count": len(no_split), "examples": no_split[:5]},
                    "cohorts": {c: sum(s.meta["cohort"] == c for s in samples)
                                for c in ("TCGA-KIRC", "CPTAC-CCRCC", "other")}})
        self._report = rep
        return samples

    def _series_maps(self, rep: dict[str, Any]) -> dict[str, str]:
        """Series Instance UID -> patient id, from the TCIA series tables that exist."""
        out: dict[str, str] = {}
        found = []
        for name in self.opts["series_maps"] or []:
            path = self.root / str(name)
            if not path.is_file():
                continue
            header, rows = _read_csv(path, "series table")
            uid = next((c for c in header if c.lower().replace("_", " ") in
                        ("series instance uid", "seriesinstanceuid", "series uid")), None)
            pid = next((c for c in header if c.lower().replace("_", " ") in
                        ("patient id", "patientid", "subject id", "case id")), None)
            if uid is None or pid is None:
                raise DataError(f"mmist: series table {path} needs columns 'Series Instance "
                                f"UID' and 'Patient ID' (as TCIA writes them); found {header}.")
            found.append(str(name))
            for r in rows:
                if r[uid]:
                    out[r[uid]] = r[pid]
        rep["series_maps"] = found
        return out

    def _split_file(self, known: set[str]) -> dict[str, set[str]]:
        header, rows = _read_csv(self.root / str(self.opts["split_file"]), "split file")
        id_col = next((c for c in (self.opts["id_column"],) + ID_COLUMNS if c in header), None)
        col = next((c for c in header if c.lower() == "split"), None)
        if id_col is None or col is None:
            raise DataError(f"mmist: split file needs an id column and a 'split' column; found "
                            f"{header}.")
        out: dict[str, set[str]] = {}
        for r in rows:
            key = r[col].strip().lower()
            if key not in SPLITS:
                raise DataError(f"mmist: split file: patient {r[id_col]!r} has split "
                                f"{r[col]!r}; expected train, val or test.")
            if r[id_col] in known:
                out.setdefault(r[id_col], set()).add(SPLITS[key])
        return out

    def _clinical(self, header, rows, id_col, label_col, rep) -> tuple[list[str], np.ndarray]:
        """(variable names, [N, V] float table with NaN = not recorded)."""
        chosen = self.opts["clinical_columns"]
        if chosen is not None:
            absent = [c for c in chosen if c not in header]
            if absent:
                raise DataError(f"mmist: clinical_columns names {absent}, which the clinical "
                                f"table lacks; its columns are {header}.")
            cols = list(chosen)
        else:
            cols = [c for c in header if c not in (id_col, label_col) and not _LEAK.search(c)]
        rep["excluded_columns"] = [c for c in header if c not in cols
                                   and c not in (id_col, label_col)]
        names, columns, ignored = [], [], []
        for c in cols:
            cells = [r[c] for r in rows]
            nums = [_number(v) for v in cells]
            if all(x is not None for x in nums):
                names.append(c)
                columns.append(np.asarray(nums, dtype=np.float64))
                continue
            cats = sorted({v for v in cells if not _is_na(v)})
            if len(cats) > int(self.opts["max_categories"]):
                ignored.append(c)
                continue
            for cat in cats:
                names.append(f"{c}={cat}")
                columns.append(np.array([np.nan if _is_na(v) else float(v == cat)
                                         for v in cells]))
        rep["ignored_text_columns"] = ignored
        rep["clinical_variables"] = names
        if not names:
            raise DataError(f"mmist: the clinical table has no usable variable (columns "
                            f"{header}); set clinical_columns=.")
        return names, np.stack(columns, axis=1)  # [N, V]

    def _notes(self, known: set[str], rep: dict[str, Any]) -> dict[str, str]:
        header, rows = _read_csv(self.root / str(self.opts["notes_file"]), "notes file")
        id_col = next((c for c in (self.opts["id_column"],) + ID_COLUMNS if c in header), None)
        text_col = next((c for c in header if c.lower() in ("text", "note", "report")), None)
        if id_col is None or text_col is None:
            raise DataError(f"mmist: notes file needs an id column and a 'text' column; found "
                            f"{header}.")
        out: dict[str, str] = {}
        for r in rows:
            if r[id_col] in known and r[text_col].strip():
                out[r[id_col]] = (out[r[id_col]] + "\n\n" if r[id_col] in out else "") + r[text_col]
        rep["notes_without_patient"] = sum(r[id_col] not in known for r in rows)
        return out

    def _unreadable(self, stats: dict[str, Any], path: Path) -> None:
        stats["unreadable"] += 1
        if len(stats["unreadable_examples"]) < 5:
            stats["unreadable_examples"].append(str(path.relative_to(self.root)))

    def _ct(self, entries: list[Path], cache: Path, rep: dict[str, Any]) -> Any:
        """The patient's CT (the first readable series in name order), or None; every
        unreadable entry is counted."""
        found = None
        for p in sorted(entries):
            if not (p.is_dir() or p.name.lower().endswith(VOLUME_EXT)) or not _readable(p, "ct"):
                self._unreadable(rep["ct"], p)
            elif found is None and p.is_dir():
                found = DicomSeries(p, cache, self.opts["n_slices"], self.hu_window)
            elif found is None:
                found = CTVolume(str(p), self.opts["n_slices"], self.hu_window)
        return found

    def _wsi(self, entries: list[Path], rep: dict[str, Any]) -> Any:
        """SlideData of the patient's readable slides (name order), or None."""
        views = []
        for p in sorted(entries):
            if p.is_file() and p.name.lower().endswith(SLIDE_EXT) and _readable(p, "wsi"):
                views.append(str(p))
            else:
                self._unreadable(rep["wsi"], p)
        return SlideData(views) if views else None


class _Matcher:
    """File name -> patient id: series tables first (CT), then the longest id prefix."""

    def __init__(self, known: set[str], uid_map: dict[str, str]) -> None:
        self.known = known
        self.uid_map = uid_map

    def match(self, name: str, use_uids: bool) -> str | None:
        base = _strip_ext(name)
        if use_uids:
            for key in (base, _GRADE_SUFFIX.sub("", base)):
                pid = self.uid_map.get(key)
                if pid in self.known:
                    return pid
        parts = re.split(r"([-._])", base)
        for k in range(len(parts), 0, -1):
            cand = "".join(parts[:k])
            if cand in self.known:
                return cand
        return None


def _entries(folder: Path):
    """(split or None, path) of each entry of a modality folder, its split subfolders too."""
    if not folder.is_dir():
        return
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        split = SPLITS.get(p.name.lower()) if p.is_dir() else None
        if split is not None:
            for q in sorted(p.iterdir()):
                if not q.name.startswith("."):
                    yield split, q
        else:
            yield None, p


def _labels(cells: list[str], ids: list[str]) -> tuple[list[float], dict[str, Any]]:
    """12-month vital status per patient (NaN = unknown) and the counts for the report."""
    out, unknown, invalid = [], [], []
    for pid, v in zip(ids, cells):
        s = v.strip().lower()
        if s in ("1", "1.0", "alive", "living"):
            out.append(1.0)
        elif s in ("0", "0.0", "dead", "deceased"):
            out.append(0.0)
        elif _is_na(s):
            out.append(float("nan"))
            unknown.append(pid)
        else:
            out.append(float("nan"))
            invalid.append(f"{pid}: {v!r}")
    y = np.asarray(out)
    return out, {"ones": int(np.nansum(y == 1)), "zeros": int(np.nansum(y == 0)),
                 "unknown": {"count": len(unknown), "examples": unknown[:5]},
                 "invalid": {"count": len(invalid), "examples": invalid[:5]}}


@hookimpl
def register_datasets(register):
    register("mmist", MMIST)
