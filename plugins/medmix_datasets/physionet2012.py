"""PhysioNet/Computing in Cardiology Challenge 2012 (set A bundled): ICU stays as modalities.

The bundled ``data/set-a.tar.gz`` holds 4,000 adult ICU stays (Silva et al., CinC 2012;
ODC-By 1.0, see ``data/PROVENANCE.md``). Each stay is a file of up to 48 hours of
irregularly sampled measurements (``Time,Parameter,Value``, time ``hh:mm`` since ICU
admission); ``Outcomes-a.txt`` holds the outcomes. Any directory or tarball in the same
layout (``set-*/<RecordID>.txt`` plus ``Outcomes-*.txt``, e.g. sets B and C) can be given
as ``source``.

Modalities (the groups are measured, or not, as a whole, which makes a natural
missing-modality pattern):

=========  ===========  ==================================================================
name       kind         variables
=========  ===========  ==================================================================
static     tabular      Age, Gender, Height, ICUType, Weight (descriptors at 00:00)
vitals     timeseries   HR, NISysABP, NIDiasABP, NIMAP, RespRate, Temp, GCS, Urine, Weight
labs       timeseries   BUN, Creatinine, Glucose, HCO3, HCT, K, Mg, Na, Platelets, WBC
arterial   timeseries   SysABP, DiasABP, MAP (invasive arterial line)
bloodgas   timeseries   PaO2, PaCO2, pH, FiO2, SaO2, MechVent, Lactate (ABG / ventilation)
hepatic    timeseries   ALT, AST, ALP, Bilirubin, Albumin (liver panel)
cardiac    timeseries   TroponinI, TroponinT, Cholesterol (cardiac markers)
=========  ===========  ==================================================================

Together the time-series groups cover all 36 time-series variables of the challenge plus
the repeated Weight measurements (the first Weight at 00:00 is the static descriptor; later
Weight rows are a vitals series). Lactate sits with the blood gases because it is measured
on the same analyser; Cholesterol with the troponins because both are ordered in the
coronary care setting.

Missing values. A value of -1, a non-numeric value, and a value outside the plausible
range of its variable (:data:`PLAUSIBLE`) are treated as not measured: they are dropped
from the series (NaN for static descriptors) and counted per variable in :meth:`report`.
A modality is ``None`` for a stay when none of its variables has a valid observation.
Times are hours since admission; observations after the 48-hour horizon are dropped and
counted.

Tasks: ``mortality`` (In-hospital_death) and ``los7`` (Length_of_stay > 7 days; an
unknown length of stay, -1, gives a NaN label).

Parsing reads the archive in one pass and parses every regular ``hh:mm,Name,number`` line
with numpy over the joined bytes (a file with any irregular line is parsed line by line),
so the 4,000 stays load in a few seconds. :func:`write_subset` writes a few stays in the
same layout, for demos and tests.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from medmix_core import (
    Dataset,
    ModalitySpec,
    Sample,
    TabularData,
    TaskSpec,
    TimeSeriesData,
    hookimpl,
)
from medmix_core.datasets import missing_rates
from medmix_core.errors import DataError
from medmix_core.plugin_utils import sha256_file

#: bumps whenever parsing or cleaning rules change the samples (part of the cache key)
PARSER_VERSION = "1"
HORIZON = 48.0
BUNDLED = Path(__file__).parent / "data" / "set-a.tar.gz"

STATIC = ["Age", "Gender", "Height", "ICUType", "Weight"]

GROUPS: dict[str, list[str]] = {
    "vitals": ["HR", "NISysABP", "NIDiasABP", "NIMAP", "RespRate", "Temp", "GCS", "Urine",
               "Weight"],
    "labs": ["BUN", "Creatinine", "Glucose", "HCO3", "HCT", "K", "Mg", "Na", "Platelets", "WBC"],
    "arterial": ["SysABP", "DiasABP", "MAP"],
    "bloodgas": ["PaO2", "PaCO2", "pH", "FiO2", "SaO2", "MechVent", "Lactate"],
    "hepatic": ["ALT", "AST", "ALP", "Bilirubin", "Albumin"],
    "cardiac": ["TroponinI", "TroponinT", "Cholesterol"],
}

UNITS: dict[str, str] = {
    "Age": "years", "Gender": "0 = female, 1 = male", "Height": "cm",
    "ICUType": "1 coronary care, 2 cardiac surgery recovery, 3 medical, 4 surgical",
    "Weight": "kg", "HR": "bpm", "NISysABP": "mmHg", "NIDiasABP": "mmHg", "NIMAP": "mmHg",
    "RespRate": "breaths/min", "Temp": "degC", "GCS": "points (3-15)", "Urine": "mL",
    "BUN": "mg/dL", "Creatinine": "mg/dL", "Glucose": "mg/dL", "HCO3": "mmol/L", "HCT": "%",
    "K": "mEq/L", "Mg": "mmol/L", "Na": "mEq/L", "Platelets": "cells/nL", "WBC": "cells/nL",
    "SysABP": "mmHg", "DiasABP": "mmHg", "MAP": "mmHg", "PaO2": "mmHg", "PaCO2": "mmHg",
    "pH": "pH units", "FiO2": "fraction (0.21-1)", "SaO2": "%", "MechVent": "1 = ventilated",
    "Lactate": "mmol/L", "ALT": "IU/L", "AST": "IU/L", "ALP": "IU/L", "Bilirubin": "mg/dL",
    "Albumin": "g/dL", "TroponinI": "ug/L", "TroponinT": "ug/L", "Cholesterol": "mg/dL",
}

#: inclusive plausible range per variable; values outside are data errors (not measured).
#: Zero pressures / heart rates are transducer or charting artefacts; pH above 8 are
#: pH x 100 typing errors; heights above 250 cm or weights under 20 kg are unit errors.
PLAUSIBLE: dict[str, tuple[float, float]] = {
    "Age": (15, 120), "Gender": (0, 1), "Height": (100, 250), "ICUType": (1, 4),
    "Weight": (20, 350), "HR": (10, 300), "NISysABP": (20, 300), "NIDiasABP": (5, 250),
    "NIMAP": (10, 280), "RespRate": (1, 100), "Temp": (25, 45), "GCS": (3, 15),
    "Urine": (0, 15000), "BUN": (1, 300), "Creatinine": (0.1, 30), "Glucose": (10, 2500),
    "HCO3": (2, 60), "HCT": (5, 75), "K": (1, 15), "Mg": (0.2, 10), "Na": (90, 200),
    "Platelets": (1, 2500), "WBC": (0.05, 500), "SysABP": (20, 300), "DiasABP": (5, 250),
    "MAP": (10, 280), "PaO2": (15, 800), "PaCO2": (5, 200), "pH": (6.5, 8.0),
    "FiO2": (0.21, 1.0), "SaO2": (20, 100), "MechVent": (0, 1), "Lactate": (0.1, 40),
    "ALT": (1, 20000), "AST": (1, 30000), "ALP": (1, 5000), "Bilirubin": (0.05, 80),
    "Albumin": (0.5, 7), "TroponinI": (0, 200), "TroponinT": (0, 50),
    "Cholesterol": (20, 1000),
}

#: variables whose values are codes or scores: a fractional value is a data error
_INTEGER = {"Gender", "ICUType", "GCS", "MechVent"}
_DESCRIPTOR_ONLY = {"Age", "Gender", "Height", "ICUType"}
_TS_VARS = [v for vs in GROUPS.values() for v in vs]
#: parameter codes: RecordID, the static descriptors, then the remaining series variables
_PARAMS = ["RecordID"] + STATIC + [v for v in _TS_VARS if v not in STATIC]
_CODE = {p: i for i, p in enumerate(_PARAMS)}
_P = len(_PARAMS)
_LO = np.array([PLAUSIBLE.get(p, (-np.inf, np.inf))[0] for p in _PARAMS])
_HI = np.array([PLAUSIBLE.get(p, (-np.inf, np.inf))[1] for p in _PARAMS])
_IS_INT = np.array([p in _INTEGER for p in _PARAMS])
_RECORD_RE = re.compile(r"(?:^|/)(set-[^/]+)/(\d+)\.txt$")
_OUTCOME_RE = re.compile(r"(?:^|/)Outcomes-[^/]+\.txt$")
_OUTCOME_COLS = ("RecordID", "Length_of_stay", "In-hospital_death")
_HEADER = b"Time,Parameter,Value"
_LAYOUT = ("the PhysioNet 2012 challenge layout: set-a/132539.txt, ... (one "
           "'Time,Parameter,Value' file per stay) and Outcomes-a.txt")


def _param_key(length, b0, b1, last):
    return ((length * 256 + b0) * 256 + b1) * 256 + last


#: byte -> 0 digit, 1 '.', 2 '-', 3 anything else (to check number fields)
_BYTE_CLASS = np.full(256, 3, dtype=np.uint8)
_BYTE_CLASS[48:58], _BYTE_CLASS[46], _BYTE_CLASS[45] = 0, 1, 2
_KEYS = np.array([_param_key(len(p), ord(p[0]), ord(p[1 % len(p)]), ord(p[-1])) for p in _PARAMS])
assert len(set(_KEYS.tolist())) == _P  # the key tells known parameters apart
_KEY_ORDER = np.argsort(_KEYS)


class _Counts:
    """Per-variable counts of dropped values, for :meth:`PhysioNet2012.report`."""

    def __init__(self) -> None:
        self.missing_code = np.zeros(_P, dtype=np.int64)
        self.implausible = np.zeros(_P, dtype=np.int64)
        self.non_numeric = np.zeros(_P, dtype=np.int64)
        self.after_horizon = np.zeros(_P, dtype=np.int64)
        self.repeated_descriptor = np.zeros(_P, dtype=np.int64)
        self.unknown_parameters: dict[str, int] = {}
        self.malformed_lines = 0


def _clean(codes: np.ndarray, values: np.ndarray, counts: _Counts) -> np.ndarray:
    """[R] bool: valid values (not -1, numeric, inside the plausible range of their code)."""
    finite = np.isfinite(values)
    code = finite & (values == -1.0)
    ok = finite & ~code & (values >= _LO[codes]) & (values <= _HI[codes])
    ok &= ~_IS_INT[codes] | (values == np.round(values))
    counts.missing_code += np.bincount(codes[code], minlength=_P)
    counts.non_numeric += np.bincount(codes[~finite], minlength=_P)
    counts.implausible += np.bincount(codes[finite & ~code & ~ok], minlength=_P)
    return ok


def _slow_rows(name: str, body: bytes, counts: _Counts):
    """Line-by-line parse of one irregular file: (line, time, code, value) lists."""
    lines_, times, codes, values = [], [], [], []
    for i, raw in enumerate(body.decode("utf-8", errors="replace").split("\n")):
        line = raw.strip()
        if not line:
            continue
        parts = [x.strip() for x in line.split(",")]
        hh, sep, mm = parts[0].partition(":") if len(parts) == 3 else ("", "", "")
        if not sep or not hh.isdigit() or not mm.isdigit() or int(mm) >= 60:
            counts.malformed_lines += 1
            continue
        code = _CODE.get(parts[1])
        if code is None:
            counts.unknown_parameters[parts[1]] = counts.unknown_parameters.get(parts[1], 0) + 1
            continue
        try:
            v = float(parts[2])
        except ValueError:
            v = float("nan")
        lines_.append(i)
        times.append(int(hh) + int(mm) / 60.0)
        codes.append(code)
        values.append(v)
    return lines_, times, codes, values


def _parse_stays(files: list[tuple[str, bytes]], counts: _Counts,
                 chunk: int = 500) -> dict[str, np.ndarray]:
    """Parse stay files into flat row arrays, vectorised over ``chunk`` files at a time.

    Lines in the regular ``hh:mm,Name,number`` form are parsed with numpy over the joined
    bytes of the files; a file with any other line goes through :func:`_slow_rows`.
    Chunks keep peak memory near 100 MB whatever the cohort size.

    Args:
        files: (name for messages, file bytes) per stay, in stay order.
        counts: receives the malformed lines and unknown parameter names.
        chunk: files per vectorised pass.
    Returns:
        "stay", "line", "code" int64 and "time", "value" float64 arrays, one row per
        parsed line (value NaN when not a number), ordered by stay then line.
    """
    parts = []
    for lo in range(0, len(files), chunk):
        part = _parse_chunk(files[lo:lo + chunk], counts)
        part["stay"] += lo
        parts.append(part)
    if not parts:
        return _parse_chunk([], counts)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _parse_chunk(files: list[tuple[str, bytes]], counts: _Counts) -> dict[str, np.ndarray]:
    """:func:`_parse_stays` on one chunk of files (stay indices local to the chunk)."""
    bodies = []
    for name, data in files:
        data = data.replace(b"\r", b"")
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        head, _, body = data.partition(b"\n")
        if head.strip() != _HEADER:
            raise DataError(f"{name}: expected the header 'Time,Parameter,Value', found "
                            f"{head[:60].decode('utf-8', 'replace')!r}. Expected {_LAYOUT}.")
        bodies.append(body if body.endswith(b"\n") or not body else body + b"\n")
    lens = np.array([len(b) for b in bodies], dtype=np.int64)
    file_start = np.concatenate([[0], np.cumsum(lens)])  # [F + 1]
    buf = np.frombuffer(b"".join(bodies) + b"\n", dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    starts = np.concatenate([[0], nl[:-1] + 1])
    ends = nl
    keep = ends > starts  # blank lines
    starts, ends = starts[keep], ends[keep]
    stay = np.searchsorted(file_start, starts, side="right") - 1  # [R]
    stay = np.minimum(stay, len(files) - 1)
    line = np.arange(len(starts)) - np.searchsorted(starts, file_start[stay])

    # ---- shape of a regular line: hh:mm,Name,number
    last = len(buf) - 1
    cpos = np.flatnonzero(buf == 44)
    i0 = np.searchsorted(cpos, starts)
    i1 = np.searchsorted(cpos, ends)
    reg = (i1 - i0) == 2
    cpos_ext = np.concatenate([cpos, [last, last]])
    c1, c2 = cpos_ext[i0], cpos_ext[i0 + 1]
    c1 = np.where(reg, c1, starts)
    c2 = np.where(reg, c2, starts)
    reg &= (c1 - starts) == 5

    def at(k):
        return buf[np.minimum(starts + k, last)].astype(np.int64) - 48

    d0, d1, d3, d4 = at(0), at(1), at(3), at(4)
    reg &= (at(2) == ord(":") - 48)
    for d in (d0, d1, d3, d4):
        reg &= (d >= 0) & (d <= 9)
    reg &= d3 < 6
    hours = (d0 * 10 + d1) + (d3 * 10 + d4) / 60.0

    # per value field: counts of digits, dots, minus signs and anything else
    vs, ve = c2 + 1, ends
    bounds2 = np.empty(2 * len(ve), dtype=np.int64)
    bounds2[0::2], bounds2[1::2] = np.minimum(vs, ve), ve  # non-decreasing, all < len(buf)
    cls = _BYTE_CLASS[buf]

    def n_in(k):
        if not len(ve):
            return np.zeros(0, dtype=np.int64)
        return np.add.reduceat((cls == k).view(np.uint8), bounds2, dtype=np.int64)[0::2]

    reg &= (n_in(0) >= 1) & (n_in(3) == 0) & (n_in(1) <= 1) & (ve > vs)
    nminus = n_in(2)
    reg &= (nminus == 0) | ((nminus == 1) & (buf[np.minimum(vs, last)] == 45))

    # ---- parameter names: a cheap key, then a byte-wise check of every keyed row
    ps, pe = c1 + 1, c2
    plen = pe - ps
    b0 = buf[np.minimum(ps, last)].astype(np.int64)
    b1 = buf[np.minimum(ps + 1, last)].astype(np.int64)
    bl = buf[np.maximum(pe - 1, 0)].astype(np.int64)
    b1 = np.where(plen == 1, b0, b1)
    key = _param_key(plen, b0, b1, bl)
    pos = np.minimum(np.searchsorted(_KEYS[_KEY_ORDER], key), _P - 1)
    code = np.where(_KEYS[_KEY_ORDER][pos] == key, _KEY_ORDER[pos], -1)
    code[~reg] = -1
    order = np.argsort(code, kind="stable")
    bounds = np.searchsorted(code[order], np.arange(-1, _P + 1))
    for c, p in enumerate(_PARAMS):
        rows = order[bounds[c + 1]:bounds[c + 2]]
        if len(rows) == 0:
            continue
        name = np.frombuffer(p.encode(), dtype=np.uint8)
        same = (buf[ps[rows, None] + np.arange(len(name))] == name).all(axis=1)
        code[rows[~same]] = -1
    unknown = reg & (code < 0)

    # ---- values: blank everything but the value fields of regular lines, parse in one call
    good = reg & ~unknown
    stop = np.where(good, vs, ends)
    delta = np.zeros(len(buf) + 1, dtype=np.int8)  # +1 at each start, -1 at each stop
    delta[starts] = 1
    delta[stop] -= 1
    text = buf.copy()
    text[np.cumsum(delta, dtype=np.int8)[:-1] > 0] = 32
    values = np.fromstring(text.tobytes(), dtype=np.float64, sep=" ")
    if len(values) != int(good.sum()):  # cannot happen after the checks above; be safe
        reg[:] = False
        good[:] = False
        values = np.zeros(0)

    # ---- irregular files go line by line
    bad_files = np.unique(stay[~reg])
    in_fast_file = ~np.isin(stay, bad_files)
    fast = good & in_fast_file
    for r in np.flatnonzero(unknown & in_fast_file):  # irregular files count their own
        nm = bytes(buf[ps[r]:pe[r]]).decode("utf-8", "replace")
        counts.unknown_parameters[nm] = counts.unknown_parameters.get(nm, 0) + 1
    keep_val = fast[good]
    out = {"stay": stay[fast], "line": line[fast], "code": code[fast],
           "time": hours[fast], "value": values[keep_val]}
    if len(bad_files):
        extra: dict[str, list] = {k: [] for k in out}
        for f in bad_files:
            ln, tm, cd, vl = _slow_rows(files[f][0], bodies[f], counts)
            extra["stay"] += [f] * len(ln)
            extra["line"] += ln
            extra["time"] += tm
            extra["code"] += cd
            extra["value"] += vl
        out = {k: np.concatenate([v, np.asarray(extra[k], dtype=v.dtype)])
               for k, v in out.items()}
        o = np.lexsort((out["line"], out["stay"]))
        out = {k: v[o] for k, v in out.items()}
    return out


def _parse_outcomes(name: str, text: str) -> dict[int, dict[str, float]]:
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if not lines:
        raise DataError(f"{name}: the outcomes file is empty; expected a header with "
                        f"{list(_OUTCOME_COLS)} and one row per stay.")
    header = [h.strip() for h in lines[0].lstrip("\ufeff").split(",")]
    lacking = [c for c in _OUTCOME_COLS if c not in header]
    if lacking:
        raise DataError(f"{name}: outcomes header lacks {lacking}; found {header}. Expected "
                        f"'RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death'.")
    out: dict[int, dict[str, float]] = {}
    for i, line in enumerate(lines[1:], start=2):
        parts = line.split(",")
        if len(parts) != len(header):
            raise DataError(f"{name}, line {i}: expected {len(header)} comma-separated fields, "
                            f"found {len(parts)}: {line[:80]!r}.")
        row = {}
        for col, val in zip(header, parts):
            try:
                row[col] = float(val)
            except ValueError:
                row[col] = float("nan")
        rid = row["RecordID"]
        if not np.isfinite(rid):
            raise DataError(f"{name}, line {i}: RecordID {parts[header.index('RecordID')]!r} "
                            f"is not a number.")
        if int(rid) in out:
            raise DataError(f"{name}, line {i}: RecordID {int(rid)} appears twice.")
        out[int(rid)] = row
    return out


def _iter_source(path: Path):
    """Yield (name, bytes) of every .txt file of a tarball or a directory tree, in one pass."""
    if path.is_dir():
        for p in sorted(path.rglob("*.txt")):
            if p.is_file():
                yield p.relative_to(path).as_posix(), p.read_bytes()
        return
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                if member.isfile() and member.name.endswith(".txt"):
                    fh = tf.extractfile(member)
                    if fh is not None:
                        yield member.name, fh.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable tar archive ({exc}). Expected a directory or "
                        f"a .tar.gz in {_LAYOUT}.") from exc


AGE_BANDS = ((18, "18-44"), (45, "45-64"), (65, "65-79"), (80, "80+"))
ICU_TYPES = {1: "coronary care", 2: "cardiac surgery recovery", 3: "medical", 4: "surgical"}


def _attributes(static: np.ndarray) -> dict[str, str | None]:
    """Subgroup attributes of a stay from its static descriptors; None where unrecorded."""
    age, sex, icu = (static[STATIC.index(k)] for k in ("Age", "Gender", "ICUType"))
    band = None
    if np.isfinite(age):
        for lo, label in AGE_BANDS:
            if age >= lo:
                band = label
        band = band or "under 18"
    return {"sex": {0.0: "female", 1.0: "male"}.get(float(sex)),
            "age_band": band,
            "icu_type": ICU_TYPES.get(int(icu)) if np.isfinite(icu) else None}


class PhysioNet2012(Dataset):
    """The PhysioNet 2012 challenge cohort (bundled set A by default).

    Args:
        source: a directory or tarball in the challenge layout; None = bundled set A.
        options: ``split_seed`` (int, default 0) for the stratified 70/15/15 split.
    """

    name = "physionet2012"
    default_experts = ("stats", "grid")
    attributes = ("sex", "age_band", "icu_type")
    # Fracast costs the same per series however short (a fixed 2,048-step context), so it
    # sees the four vital signs present in the most training stays (its fit picks them):
    # 4,000 stays x 4 series instead of x 24 over every group.
    default_expert_options = {"fracast": {"modalities": ["vitals"]}}
    committee = ("stats", "grid", "seqssl", "minilm", "rag", "fracast")
    committee_teacher = "mpnet"
    # Measured on the bundled 4,000 stays (docs/performance.md): "cpu" on 2 cores of an
    # AMD EPYC, "cuda" on one H100 (seqssl fits on one CPU thread there too). rag reuses
    # minilm's text embeddings of the same run.
    extract_seconds = {
        "cpu": {"stats": 20, "grid": 5, "seqssl": 90, "minilm": 190, "rag": 30,
                "fracast": 920, "mpnet": 1140},
        "cuda": {"stats": 5, "grid": 5, "seqssl": 80, "minilm": 20, "rag": 15, "fracast": 30,
                 "mpnet": 30},
    }
    train_seconds = {"cpu": 100, "cuda": 40}
    # Chosen on the validation split (docs/results.md): the dropouts with the committee
    # (without them it overfits in 2-3 epochs on 2,800 stays); no positive-class weighting
    # from the stability study (2026-12-01, `stats`: validation AUROC 0.821 vs 0.813 and
    # AUPRC 0.412 vs 0.393 over 3 seeds, 0.818 vs 0.810 AUROC over 5, a smaller spread over
    # seeds, probabilities not shifted upwards). `preset: paper` drops them all.
    run_defaults = {"expert_dropout": 0.3, "modality_dropout": 0.2, "pos_weight": False}

    def __init__(self, source: str | None = None, **options: Any) -> None:
        unknown = sorted(set(options) - {"split_seed"})
        if unknown:
            raise DataError(f"physionet2012: unknown option(s) {unknown}; the only option is "
                            f"'split_seed' (int).")
        super().__init__(source, **options)
        self.path = BUNDLED if source is None else Path(source).expanduser()
        self._samples: list[Sample] | None = None
        self._counts = _Counts()
        self._sha: str | None = None

    # ------------------------------------------------------------------ specs
    def modalities(self) -> list[ModalitySpec]:
        specs = [ModalitySpec("static", "tabular", list(STATIC), {v: UNITS[v] for v in STATIC})]
        for name, variables in GROUPS.items():
            specs.append(ModalitySpec(name, "timeseries", list(variables),
                                      {v: UNITS[v] for v in variables}))
        return specs

    def tasks(self) -> list[TaskSpec]:
        return [TaskSpec("mortality", "binary"), TaskSpec("los7", "binary")]

    # ------------------------------------------------------------------ loading
    def samples(self) -> list[Sample]:
        """All stays, ordered by RecordID (parsed once, then cached)."""
        if self._samples is None:
            self._samples = self._load()
        return self._samples

    def _read(self) -> tuple[dict[int, tuple[str, str, bytes]], dict[int, dict[str, float]]]:
        """Stay files {RecordID: (set, name, bytes)} and outcomes {RecordID: row}."""
        if not self.path.exists():
            hint = (" The bundled archive is missing from the installed package; reinstall "
                    "medmix." if self.source is None else "")
            raise DataError(f"physionet2012: {str(self.path)!r} does not exist. Expected a "
                            f"directory or tarball in {_LAYOUT}.{hint}")
        records: dict[int, tuple[str, str, bytes]] = {}
        outcomes: dict[int, dict[str, float]] = {}
        digest = hashlib.sha256()
        for name, data in _iter_source(self.path):
            if self.path.is_dir():  # a directory is hashed by its files, in name order
                digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
            m = _RECORD_RE.search(name)
            if m:
                rid = int(m.group(2))
                if rid in records:
                    raise DataError(f"{self.path}: RecordID {rid} appears twice ({records[rid][1]} "
                                    f"and {name}); each stay must have one file.")
                records[rid] = (m.group(1), name, data)
            elif _OUTCOME_RE.search(name):
                rows = _parse_outcomes(f"{self.path}:{name}", data.decode("utf-8", "replace"))
                dup = sorted(set(rows) & set(outcomes))
                if dup:
                    raise DataError(f"{self.path}:{name}: RecordIDs {dup[:5]} also appear in "
                                    f"another outcomes file.")
                outcomes.update(rows)
        if self.path.is_dir():
            self._sha = digest.hexdigest()
        if not records:
            raise DataError(f"{self.path}: found no stay files; expected {_LAYOUT}.")
        self._has_outcomes = bool(outcomes)
        if not outcomes:
            # new patients: no outcomes yet (no file, or a header-only one); every label is
            # unknown, which training refuses and prediction does not need
            return records, outcomes
        only_rec = sorted(set(records) - set(outcomes))
        only_out = sorted(set(outcomes) - set(records))
        if only_rec or only_out:
            raise DataError(
                f"{self.path}: stay files and outcomes do not match: {len(only_rec)} stays have "
                f"no outcome (e.g. {only_rec[:5]}), {len(only_out)} outcomes have no stay file "
                f"(e.g. {only_out[:5]}). Give the set-* folders together with their own "
                f"Outcomes-*.txt.")
        return records, outcomes

    def _load(self) -> list[Sample]:
        records, outcomes = self._read()
        rids = sorted(records)
        counts = self._counts = _Counts()
        rows = _parse_stays([(f"{self.path}:{records[r][1]}", records[r][2]) for r in rids],
                            counts)
        stay, code, t, v = rows["stay"], rows["code"], rows["time"], rows["value"]
        n = len(rids)

        # the file's own RecordID line must agree with its name
        rid_rows = code == _CODE["RecordID"]
        wrong = rid_rows & (v != np.asarray(rids, dtype=np.float64)[stay])
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise DataError(f"{self.path}:{records[rids[stay[i]]][1]}: the file says RecordID "
                            f"{v[i]:g} but its name says {rids[stay[i]]}; they must agree.")

        # static descriptors: the first 00:00 row of each; later Weight rows are a series
        is_desc = (code >= 1) & (code <= len(STATIC)) & (t == 0.0)
        desc_rows = np.flatnonzero(is_desc)
        _, first = np.unique(stay[desc_rows] * _P + code[desc_rows], return_index=True)
        static_rows = desc_rows[first]
        static = np.full((n, len(STATIC)), np.nan)  # [N, 5]
        ok = _clean(code[static_rows], v[static_rows], counts)
        static[stay[static_rows[ok]], code[static_rows[ok]] - 1] = v[static_rows[ok]]

        series = ~rid_rows
        series[static_rows] = False
        repeated = series & np.isin(code, [_CODE[p] for p in _DESCRIPTOR_ONLY])
        counts.repeated_descriptor += np.bincount(code[repeated], minlength=_P)
        series &= ~repeated
        s_rows = np.flatnonzero(series)
        ok = _clean(code[s_rows], v[s_rows], counts)
        s_rows = s_rows[ok]
        late = (t[s_rows] > HORIZON) | (t[s_rows] < 0)
        counts.after_horizon += np.bincount(code[s_rows[late]], minlength=_P)
        s_rows = s_rows[~late]
        # sort by stay, variable, time (file order breaks ties)
        o = s_rows[np.lexsort((rows["line"][s_rows], t[s_rows], code[s_rows], stay[s_rows]))]
        st, ct, tt, vt = stay[o], code[o], t[o], v[o]
        bounds = np.searchsorted(st * _P + ct, np.arange(n * _P + 1))  # [N * P + 1]

        # per group: [N, V_g] first and past-the-end rows of every (stay, variable)
        first, past, present = {}, {}, {}
        for g, variables in GROUPS.items():
            idx = np.arange(n)[:, None] * _P + np.array([_CODE[x] for x in variables])
            first[g], past[g] = bounds[idx].tolist(), bounds[idx + 1].tolist()
            present[g] = (bounds[idx + 1] > bounds[idx]).any(axis=1).tolist()
        samples = []
        for i, rid in enumerate(rids):
            row = static[i]
            mods: dict[str, Any] = {
                "static": None if np.isnan(row).all() else TabularData(list(STATIC), row.copy())}
            for g, variables in GROUPS.items():
                if not present[g][i]:
                    mods[g] = None
                    continue
                spans = list(zip(first[g][i], past[g][i]))
                mods[g] = TimeSeriesData(list(variables), [tt[a:b] for a, b in spans],
                                         [vt[a:b] for a, b in spans], HORIZON)
            samples.append(self._sample(rid, records[rid][0], mods, outcomes.get(rid, {}), row))
        return samples

    @staticmethod
    def _sample(rid: int, set_name: str, mods: dict[str, Any], out: dict[str, float],
                static: np.ndarray) -> Sample:
        def num(key: str) -> float:
            return float(out.get(key, np.nan))

        death, los = num("In-hospital_death"), num("Length_of_stay")
        mortality = death if death in (0.0, 1.0) else float("nan")
        los7 = float(los > 7) if np.isfinite(los) and los >= 0 else float("nan")
        meta = {"set": set_name, "saps1": num("SAPS-I"), "sofa": num("SOFA"),
                "length_of_stay": los, "survival": num("Survival"),
                **_attributes(static)}
        return Sample(str(rid), mods, {"mortality": mortality, "los7": los7}, meta)

    # ------------------------------------------------------------------ reporting
    def identity(self) -> dict[str, Any]:
        """Name, source, sha256 of the tarball (or of a directory's files), parser version."""
        if self._sha is None:
            if self.path.is_file():
                self._sha = sha256_file(self.path)
            else:
                self.samples()
        return {"name": self.name,
                "source": "bundled:set-a.tar.gz" if self.source is None else str(self.path),
                "sha256": self._sha, "parser_version": PARSER_VERSION,
                "options": {"split_seed": int(self.options.get("split_seed", 0))}}

    def missing_rates(self) -> dict[str, float]:
        """Per modality: share of the loaded stays where it is absent."""
        return missing_rates(self.samples(), self.modalities())

    def report(self) -> dict[str, Any]:
        """Stays, labels, values dropped per variable and why, per-modality missing rates."""
        samples = self.samples()
        c = self._counts
        labels = {}
        for task in ("mortality", "los7"):
            y = np.array([s.labels[task] for s in samples], dtype=float)
            labels[task] = {"positive": int(np.nansum(y)), "unknown": int(np.isnan(y).sum())}
        dropped = {}
        for j, var in enumerate(_PARAMS[1:], start=1):
            row = {"missing_code": int(c.missing_code[j]), "implausible": int(c.implausible[j]),
                   "non_numeric": int(c.non_numeric[j]), "after_horizon": int(c.after_horizon[j]),
                   "repeated_descriptor": int(c.repeated_descriptor[j])}
            if any(row.values()):
                dropped[var] = row
        return {"n_stays": len(samples), "labels": labels,
                "outcomes": ("read" if getattr(self, "_has_outcomes", True) else
                             "none (no Outcomes-*.txt, or one with a header only): every "
                             "label is unknown"),
                "dropped_values": dropped,
                "plausible_ranges": {k: list(v) for k, v in PLAUSIBLE.items()},
                "unknown_parameters": dict(sorted(c.unknown_parameters.items())),
                "malformed_lines": c.malformed_lines,
                "missing_rates": self.missing_rates()}


def write_subset(dest: str | Path, record_ids: list[int] | int, source: str | None = None,
                 as_tar: bool = False) -> Path:
    """Write some stays of a cohort in the challenge layout (quick demos and tests).

    Args:
        dest: output folder (created), or the tarball path when ``as_tar``.
        record_ids: RecordIDs to keep, or an int n for the n smallest RecordIDs.
        source: the cohort to read (default: the bundled set A).
        as_tar: write a ``.tar.gz`` instead of a folder.
    Returns:
        ``dest``, usable as ``source`` of :class:`PhysioNet2012`.
    Raises:
        DataError: a requested RecordID that the source does not hold.
    """
    records, outcomes = PhysioNet2012(source)._read()
    ids = sorted(records)[:record_ids] if isinstance(record_ids, int) else list(record_ids)
    lacking = [i for i in ids if i not in records]
    if lacking:
        raise DataError(f"write_subset: RecordIDs {lacking[:5]} are not in the source.")
    cols = ["RecordID", "SAPS-I", "SOFA", "Length_of_stay", "Survival", "In-hospital_death"]

    def fmt(x: float) -> str:
        return str(int(x)) if np.isfinite(x) and float(x).is_integer() else repr(float(x))

    lines = [",".join(cols)] + [",".join(fmt(outcomes[i].get(c, np.nan)) for c in cols)
                                for i in sorted(ids)]
    files = {f"{records[i][0]}/{i}.txt": records[i][2] for i in sorted(ids)}
    files["Outcomes-a.txt"] = ("\n".join(lines) + "\n").encode()
    dest = Path(dest)
    if as_tar:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(dest, "w:gz") as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return dest
    for name, data in files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)
    return dest


@hookimpl
def register_datasets(register):
    register("physionet2012", PhysioNet2012)
