"""Code shared by the ``mimic4mm`` and ``mimic3`` dataset plugins.

What lives here: the 46 EHR variables (itemids of MIMIC-IV and MIMIC-III, units, unit
conversions, plausible ranges, and the public sources each was verified against),
streaming readers of the official CSV tables (plain or gzipped, standard-library ``csv`` +
``gzip``, bounded memory), the cohort rules and task labels both cohorts share, the
patient-level split, the on-disk cohort cache, and the :class:`MimicDataset` base class.
The version-specific readers are in ``mimic4mm.py`` (MIMIC-IV, MIMIC-CXR-JPG,
MIMIC-IV-Note) and ``mimic3.py`` (MIMIC-III v1.4).

Times are hours since 1970-01-01 of the (date-shifted) charted times; an EHR window
starts at the ICU ``intime``. Missing is a value throughout: an unparseable or implausible
measurement is dropped and counted, an unknown label is NaN, an absent modality is None.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
import sys
import time
import warnings
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from medmix_core import (
    Dataset,
    ImageData,
    ModalitySpec,
    Sample,
    TaskSpec,
    TextData,
    TimeSeriesData,
)
from medmix_core.errors import DataError
from medmix_core.plugin_utils import jsonable
from medmix_core.store import atomic_write_bytes, atomic_write_text

#: bumps whenever reading, cleaning or cohort rules change the samples (part of the cache key)
PARSER_VERSION = "2"
CACHE_FORMAT = "medmix-mimic-cohort"
SPLIT_FRACTIONS = (0.72, 0.13, 0.15)
TASKS = ("mortality", "los7", "readmission30")
ATTRIBUTES = ("sex", "age_band", "race", "insurance")
_EPOCH = datetime(1970, 1, 1)
_HOUR = 3600.0


# ----------------------------------------------------------------------------- variables
#: the public sources every itemid, unit and conversion was checked against (key -> where);
#: docs/data/mimic4mm.md lists them per variable ("verified against")
SOURCES: dict[str, str] = {
    "mc4-vital": "MIT-LCP/mimic-code mimic-iv/concepts/measurement/vitalsign.sql",
    "mc4-gcs": "MIT-LCP/mimic-code mimic-iv/concepts/measurement/gcs.sql",
    "mc4-bg": "MIT-LCP/mimic-code mimic-iv/concepts/measurement/bg.sql",
    "mc4-chem": "MIT-LCP/mimic-code mimic-iv/concepts/measurement/chemistry.sql",
    "mc4-cbc": "MIT-LCP/mimic-code mimic-iv/concepts/measurement/complete_blood_count.sql",
    "mc4-coag": "MIT-LCP/mimic-code mimic-iv/concepts/measurement/coagulation.sql",
    "mc4-enz": "MIT-LCP/mimic-code mimic-iv/concepts/measurement/enzyme.sql",
    "mc4-height": "MIT-LCP/mimic-code mimic-iv/concepts/measurement/height.sql",
    "mc4-weight": "MIT-LCP/mimic-code mimic-iv/concepts/demographics/weight_durations.sql",
    "mc4-dlab": "MIT-LCP/mimic-code mimic-iv/mapping/d_labitems_to_loinc.csv",
    "mc4-ditems": "MIT-LCP/mimic-code mimic-iv/mapping/meas_chartevents_main.csv",
    "mc3-vital": "MIT-LCP/mimic-code mimic-iii/concepts/pivot/pivoted_vital.sql",
    "mc3-gcs": "MIT-LCP/mimic-code mimic-iii/concepts/pivot/pivoted_gcs.sql",
    "mc3-fio2": "MIT-LCP/mimic-code mimic-iii/concepts/pivot/pivoted_fio2.sql",
    "mc3-temp": "MIT-LCP/mimic-code mimic-iii/concepts/cookbook/temp.sql",
    "mc3-height": "MIT-LCP/mimic-code mimic-iii/concepts/pivot/pivoted_height.sql",
    "mc3-weight": "MIT-LCP/mimic-code mimic-iii/concepts/durations/weight_durations.sql",
    "mc3-lab": "MIT-LCP/mimic-code mimic-iii/concepts/pivot/pivoted_lab.sql",
    "bench": "YerevaNN/mimic3-benchmarks mimic3benchmark/resources/itemid_to_variable_map.csv",
    "extract": "MLforHealth/MIMIC_Extract resources/itemid_to_variable_map.csv",
    "medfuse": ("nyuad-cai/MedFuse "
                "mimic4extract/mimic3benchmark/resources/itemid_to_variable_map.csv"),
}

#: the databases a variable is read from, and the itemid fields each of them uses
DATABASES: dict[str, tuple[str, ...]] = {
    "mimic_iv": ("chart_iv", "lab"),
    "mimic_iii_carevue": ("carevue", "lab"),
    "mimic_iii_metavision": ("chart_iv", "lab"),
}


@dataclass(frozen=True)
class Variable:
    """One EHR variable: its itemids per table and database, unit and plausible range.

    ``chart_iv`` are MIMIC-IV ``icu/chartevents`` itemids (MetaVision; MIMIC-III's
    MetaVision stays use the same ids), ``carevue`` the MIMIC-III CareVue itemids of the
    same quantity, ``lab`` the ``labevents`` itemids (shared by MIMIC-III and MIMIC-IV).
    ``verified`` names the :data:`SOURCES` the ids, unit and conversions were checked
    against; ``databases`` the :data:`DATABASES` the variable is read from.
    """

    name: str
    unit: str
    low: float
    high: float
    group: str
    chart_iv: tuple[int, ...] = ()
    carevue: tuple[int, ...] = ()
    lab: tuple[int, ...] = ()
    integer: bool = False
    verified: tuple[str, ...] = ()
    databases: tuple[str, ...] = tuple(DATABASES)


def itemids(v: Variable, database: str) -> tuple[int, ...]:
    """The itemids ``v`` is read from in ``database`` (a key of :data:`DATABASES`)."""
    return tuple(i for f in DATABASES[database] for i in getattr(v, f))


def _f_to_c(v: float) -> float:
    return (v - 32.0) * 5.0 / 9.0


def _lb_to_kg(v: float) -> float:
    return v * 0.45359237


def _inch_to_cm(v: float) -> float:
    return v * 2.54


def _percent_to_fraction(v: float) -> float:
    # FiO2 is charted as 21-100 % or as 0.21-1 (itemid 190, some 223835 rows); 1-20 % is
    # a misplaced O2 flow (mimic-code bg.sql) and falls below the range after dividing
    return v / 100.0 if v > 1.0 else v


#: itemids whose values need converting into the variable's unit, and how (units from the
#: d_items labels quoted in the "bench" and "mc4-ditems" sources)
CONVERSIONS: dict[int, tuple[str, Callable[[float], float]]] = {
    223761: ("degF -> degC", _f_to_c),  # Temperature Fahrenheit
    678: ("degF -> degC", _f_to_c),  # Temperature F
    679: ("degF -> degC", _f_to_c),  # Temperature F (calc)
    226531: ("lb -> kg", _lb_to_kg),  # Admission Weight (lbs.)
    226707: ("inch -> cm", _inch_to_cm),  # Height (Inch)
    920: ("inch -> cm", _inch_to_cm),  # Admit Ht
    1394: ("inch -> cm", _inch_to_cm),  # Height Inches
    4187: ("inch -> cm", _inch_to_cm),  # Length Calc Inches
    3486: ("inch -> cm", _inch_to_cm),  # Length in Inches
    223835: ("% -> fraction", _percent_to_fraction),  # Inspired O2 Fraction
    3420: ("% -> fraction", _percent_to_fraction),  # FIO2
    3422: ("% -> fraction", _percent_to_fraction),  # FIO2 [Meas]
    190: ("% -> fraction", _percent_to_fraction),  # FiO2 Set (charted as a fraction)
}

#: charted values that are not a score: the GCS verbal response of an intubated patient
#: cannot be tested (mimic-code gcs.sql / pivoted_gcs.sql flag these rows instead of
#: scoring them); they are dropped and counted as ``not_assessable``, never kept as 1
NOT_ASSESSABLE: dict[int, str] = {223900: "No Response-ETT", 723: "1.0 ET/Trach"}

_V = Variable
_VITAL = ("mc4-vital", "mc3-vital", "bench")
_BG = ("mc4-bg", "mc4-dlab")
#: the 46 EHR variables, in modality order: 18 charted (vital signs, GCS, ventilation,
#: anthropometry, bedside glucose) and 28 laboratory values
VARIABLES: tuple[Variable, ...] = (
    _V("heart_rate", "bpm", 10, 300, "vital", (220045,), (211,), verified=_VITAL),
    _V("sbp_ni", "mmHg", 20, 300, "vital", (220179,), (455,), verified=_VITAL),
    _V("dbp_ni", "mmHg", 5, 250, "vital", (220180,), (8441,), verified=_VITAL),
    _V("mbp_ni", "mmHg", 10, 280, "vital", (220181,), (456,), verified=_VITAL),
    # 225309-225312 "ART BP ...": a second arterial line (mc4-vital reads it with 220050-2)
    _V("sbp_art", "mmHg", 20, 300, "vital", (220050, 225309), (51, 6701),
       verified=_VITAL + ("medfuse",)),
    _V("dbp_art", "mmHg", 5, 250, "vital", (220051, 225310), (8368, 8555),
       verified=_VITAL + ("medfuse",)),
    _V("mbp_art", "mmHg", 10, 280, "vital", (220052, 225312), (52, 6702),
       verified=_VITAL + ("medfuse",)),
    _V("resp_rate", "breaths/min", 1, 100, "vital", (220210, 224690), (618, 615),
       verified=_VITAL),
    _V("spo2", "%", 20, 100, "vital", (220277,), (646,), verified=_VITAL),
    _V("temperature", "degC", 25, 45, "vital", (223762, 223761), (676, 677, 678, 679),
       verified=_VITAL + ("mc3-temp",)),
    _V("cvp", "mmHg", -5, 60, "vital", (220074,), (113,),
       verified=("mc4-ditems", "bench", "extract")),
    _V("gcs_eye", "points (1-4)", 1, 4, "gcs", (220739,), (184,), integer=True,
       verified=("mc4-gcs", "mc3-gcs", "bench")),
    _V("gcs_verbal", "points (1-5)", 1, 5, "gcs", (223900,), (723,), integer=True,
       verified=("mc4-gcs", "mc3-gcs", "bench")),
    _V("gcs_motor", "points (1-6)", 1, 6, "gcs", (223901,), (454,), integer=True,
       verified=("mc4-gcs", "mc3-gcs", "bench")),
    _V("fio2", "fraction (0.21-1)", 0.21, 1.0, "ventilation", (223835,), (3420, 3422, 190),
       verified=("mc4-bg", "mc3-fio2", "bench")),
    # not 3581 "Present Weight (lb)": the pound part of 3581 lb + 3582 oz, the same weight
    # as 3580 kg (mc3-weight)
    _V("weight", "kg", 20, 350, "anthropometry", (226512, 224639, 226531), (762, 763, 3580),
       verified=("mc4-weight", "mc4-ditems", "mc3-weight", "bench")),
    _V("height", "cm", 100, 250, "anthropometry", (226730, 226707),
       (920, 1394, 4187, 3486, 3485, 4188), verified=("mc4-height", "mc3-height", "bench")),
    _V("glucose", "mg/dL", 10, 2500, "chemistry", (220621, 225664, 226537),
       (807, 811, 1529, 3745, 3744), (50931, 50809),
       verified=("mc4-vital", "mc3-vital", "mc4-chem", "mc4-bg", "mc4-dlab")),
    _V("sodium", "mEq/L", 90, 200, "chemistry", lab=(50983, 50824),
       verified=("mc4-chem",) + _BG),
    _V("potassium", "mEq/L", 1, 15, "chemistry", lab=(50971, 50822),
       verified=("mc4-chem",) + _BG),
    _V("chloride", "mEq/L", 50, 180, "chemistry", lab=(50902, 50806),
       verified=("mc4-chem",) + _BG),
    _V("bicarbonate", "mEq/L", 2, 60, "chemistry", lab=(50882,),
       verified=("mc4-chem", "mc4-dlab")),
    # mc4-chem keeps anion gaps <= 0 (every other chemistry must be > 0)
    _V("anion_gap", "mEq/L", -20, 60, "chemistry", lab=(50868,),
       verified=("mc4-chem", "mc4-dlab")),
    _V("bun", "mg/dL", 1, 300, "chemistry", lab=(51006,), verified=("mc4-chem", "mc4-dlab")),
    _V("creatinine", "mg/dL", 0.1, 30, "chemistry", lab=(50912,),
       verified=("mc4-chem", "mc4-dlab")),
    _V("calcium", "mg/dL", 2, 20, "chemistry", lab=(50893,),
       verified=("mc4-chem", "mc4-dlab")),
    _V("magnesium", "mg/dL", 0.2, 10, "chemistry", lab=(50960,),
       verified=("mc4-dlab", "bench")),
    _V("phosphate", "mg/dL", 0.2, 25, "chemistry", lab=(50970,),
       verified=("mc4-dlab", "bench")),
    _V("hematocrit", "%", 5, 75, "hematology", lab=(51221, 50810),
       verified=("mc4-cbc",) + _BG),
    _V("hemoglobin", "g/dL", 1.5, 25, "hematology", lab=(51222, 50811),
       verified=("mc4-cbc",) + _BG),
    _V("platelets", "K/uL", 1, 2500, "hematology", lab=(51265,),
       verified=("mc4-cbc", "mc4-dlab")),
    # mc3-lab rejects WBC > 1000 only: hyperleukocytosis above 500 K/uL is real
    _V("wbc", "K/uL", 0.05, 1000, "hematology", lab=(51301, 51300),
       verified=("mc4-cbc", "mc3-lab", "mc4-dlab")),
    _V("mcv", "fL", 40, 150, "hematology", lab=(51250,), verified=("mc4-cbc", "mc4-dlab")),
    _V("pt", "sec", 5, 150, "coagulation", lab=(51274,), verified=("mc4-coag", "mc4-dlab")),
    _V("inr", "ratio", 0.5, 20, "coagulation", lab=(51237,),
       verified=("mc4-coag", "mc4-dlab")),
    _V("ptt", "sec", 10, 200, "coagulation", lab=(51275,),
       verified=("mc4-coag", "mc4-dlab")),
    _V("bilirubin_total", "mg/dL", 0.05, 80, "liver", lab=(50885,),
       verified=("mc4-enz", "mc4-dlab")),
    _V("alt", "IU/L", 1, 20000, "liver", lab=(50861,), verified=("mc4-enz", "mc4-dlab")),
    _V("ast", "IU/L", 1, 30000, "liver", lab=(50878,), verified=("mc4-enz", "mc4-dlab")),
    _V("alp", "IU/L", 1, 5000, "liver", lab=(50863,), verified=("mc4-enz", "mc4-dlab")),
    _V("albumin", "g/dL", 0.5, 7, "liver", lab=(50862,), verified=("mc4-chem", "mc4-dlab")),
    _V("lactate", "mmol/L", 0.1, 40, "blood gas", lab=(50813,), verified=_BG),
    _V("ph", "pH units", 6.3, 8.0, "blood gas", lab=(50820,),  # bench: valid low 6.3
       verified=_BG + ("bench",)),
    _V("po2", "mmHg", 15, 800, "blood gas", lab=(50821,), verified=_BG),
    _V("pco2", "mmHg", 5, 200, "blood gas", lab=(50818,), verified=_BG),
    _V("base_excess", "mEq/L", -40, 40, "blood gas", lab=(50802,), verified=_BG),
)
assert len(VARIABLES) == 46 and len({v.name for v in VARIABLES}) == 46
BY_NAME = {v.name: v for v in VARIABLES}


def select_variables(option: Any) -> list[Variable]:
    """The variables a cohort extracts: all 46 by default, or the named subset in order.

    Raises:
        DataError: an option that is not a list of known variable names.
    """
    if option is None:
        return list(VARIABLES)
    if isinstance(option, str):
        option = [x.strip() for x in option.split(",") if x.strip()]
    if not isinstance(option, (list, tuple)) or not option:
        raise DataError(f"Option 'variables' must be a non-empty list of variable names "
                        f"(or omitted for all 46); found {option!r}.")
    unknown = [v for v in option if v not in BY_NAME]
    if unknown:
        raise DataError(f"Option 'variables' names unknown variables {unknown}; known: "
                        f"{', '.join(BY_NAME)}.")
    if len(set(option)) != len(option):
        raise DataError(f"Option 'variables' repeats a name: {list(option)}.")
    return [BY_NAME[v] for v in option]


def item_map(variables: list[Variable], chart_ids: str) -> dict[str, tuple]:
    """itemid string -> (variable index, conversion or None, value that is not a score or
    None) for one event table.

    Args:
        variables: the selected variables (their index is their position).
        chart_ids: ``"iv"`` (MetaVision ids), ``"iii"`` (CareVue + MetaVision) or ``"lab"``.
    """
    out: dict[str, tuple] = {}
    for j, v in enumerate(variables):
        ids = {"iv": v.chart_iv, "iii": v.carevue + v.chart_iv, "lab": v.lab}[chart_ids]
        for i in ids:
            conv = CONVERSIONS.get(i)
            out[str(i)] = (j, None if conv is None else conv[1], NOT_ASSESSABLE.get(i))
    return out


# ----------------------------------------------------------------------------- files
def find_table(folder: Path | None, *names: str) -> Path | None:
    """The first of ``name.csv.gz`` / ``name.csv`` that exists in ``folder``, else None."""
    if folder is None:
        return None
    for name in names:
        for suffix in (".csv.gz", ".csv"):
            p = folder / f"{name}{suffix}"
            if p.is_file():
                return p
    return None


def file_identity(path: Path) -> list[Any]:
    """(path, size, mtime) of a file: what the cache key trusts instead of hashing GBs."""
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


class Table:
    """A CSV table opened for streaming: header, column lookup, rows, progress in bytes.

    Args:
        path: ``.csv`` or ``.csv.gz``.
        label: the table's name in messages and the report (e.g. ``"icu/chartevents"``).
    """

    def __init__(self, path: Path, label: str) -> None:
        self.path, self.label = path, label
        self.size = path.stat().st_size
        self._raw = open(path, "rb")  # noqa: SIM115 (closed in close())
        stream = gzip.GzipFile(fileobj=self._raw) if path.name.endswith(".gz") else self._raw
        self._text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")
        self.reader = csv.reader(self._text)
        try:
            header = next(self.reader)
        except StopIteration:
            self.close()
            raise DataError(f"{path} is empty; expected the {label} table with a header "
                            f"row.") from None
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            self.close()
            raise DataError(f"{path} cannot be read as {'gzipped ' if '.gz' in path.name else ''}"
                            f"CSV ({exc}); expected the {label} table.") from exc
        self.header = [h.strip().lstrip("\ufeff") for h in header]
        self._lower = {h.lower(): i for i, h in enumerate(self.header)}

    def col(self, *names: str, required: bool = True) -> int | None:
        """Index of the first of ``names`` in the header (case-insensitive)."""
        for n in names:
            if n.lower() in self._lower:
                return self._lower[n.lower()]
        if required:
            self.close()
            raise DataError(f"{self.path}: the {self.label} table has no column "
                            f"{' / '.join(names)}; its header is {self.header}. Expected the "
                            f"published schema of {self.label}; is this the right file?")
        return None

    def position(self) -> int:
        """Compressed bytes read so far (for the progress bar)."""
        try:
            return self._raw.tell()
        except (OSError, ValueError):
            return 0

    def rows(self) -> Iterator[list[str]]:
        try:
            yield from self.reader
        except (OSError, EOFError, gzip.BadGzipFile, csv.Error) as exc:
            raise DataError(f"{self.path}: reading the {self.label} table failed near line "
                            f"{self.reader.line_num} ({exc}); the file is truncated or "
                            f"damaged. Re-download it (check SHA256SUMS.txt).") from exc
        finally:
            self.close()

    def well_formed_rows(self, counts: TableCounts) -> Iterator[list[str]]:
        """The rows with as many fields as the header; every row is counted, a malformed one
        is counted as bad (with its line) and skipped."""
        n = len(self.header)
        for row in self.rows():
            counts.rows += 1
            if len(row) != n:
                counts.bad(self, f"{len(row)} fields, the header has {n}")
                continue
            yield row

    def close(self) -> None:
        try:
            self._text.close()
        finally:
            self._raw.close()


@dataclass
class TableCounts:
    """Rows of one table: read, malformed (skipped) with examples, seconds."""

    rows: int = 0
    malformed: int = 0
    examples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    path: str = ""

    def bad(self, table: Table, why: str) -> None:
        self.malformed += 1
        if len(self.examples) < 5:
            self.examples.append(f"line {table.reader.line_num}: {why}")

    def bad_row(self, why: str) -> None:
        self.malformed += 1
        if len(self.examples) < 5:
            self.examples.append(why)

    def check(self, table: Table) -> None:
        """Most rows malformed means the wrong file, not bad rows: stop with an error."""
        if self.rows >= 20 and self.malformed > 0.5 * self.rows:
            raise DataError(f"{table.path}: {self.malformed} of {self.rows} rows of the "
                            f"{table.label} table are malformed (e.g. {self.examples[:2]}); "
                            f"this is not the published {table.label} table.")


def add_windowed_note(c: TableCounts, table: Table, notes: Any, windows: Any, modality: str,
                      subject: str, when: str, text: str, time_column: str) -> None:
    """A note charted at ``when`` joins the stay of ``subject`` whose window holds it; a note
    outside every window is counted, an unreadable time is a bad row."""
    try:
        t = parse_time(when)
    except ValueError:
        c.bad(table, f"{time_column} {when!r} is not a date-time")
        return
    s = windows.find(subject, t)
    if s >= 0 and text.strip():
        notes.add(s, modality, t, text)
    elif s == -2:
        notes.count(modality, "outside_window")


def parse_time(s: str) -> float:
    """``YYYY-MM-DD[ HH:MM[:SS]]`` -> hours since 1970-01-01; ValueError when not a time."""
    return (datetime.fromisoformat(s) - _EPOCH).total_seconds() / _HOUR


def progress_bar(enabled: bool):
    """A rich progress bar on stderr (disabled: a no-op one)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled)


def read_small(path: Path, label: str, columns: dict[str, tuple[str, ...]],
               counts: dict[str, TableCounts], keep: Callable[[dict], bool] | None = None,
               optional: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Rows of a small table (patients, admissions, stays) as dicts of the needed columns.

    Args:
        columns: output key -> accepted column names (first found wins).
        optional: output keys whose column may be absent (value "").
        keep: row filter applied after reading.
    """
    t0 = time.perf_counter()
    table = Table(path, label)
    idx = {k: table.col(*names, required=k not in optional) for k, names in columns.items()}
    c = counts[label] = TableCounts(path=str(path))
    out = []
    for row in table.well_formed_rows(c):
        rec = {k: ("" if i is None else row[i].strip()) for k, i in idx.items()}
        if keep is None or keep(rec):
            out.append(rec)
    c.check(table)
    c.seconds = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- cohort
@dataclass
class Stay:
    """One candidate ICU stay with what the cohort rules and labels need."""

    stay_id: int
    subject_id: int
    hadm_id: int
    intime: float  # hours since 1970
    outtime: float
    age: float
    sex: str
    race: str
    insurance: str
    careunit: str
    era: str = ""
    mortality: float = math.nan
    los7: float = math.nan
    readmission30: float = math.nan
    los_days: float = math.nan


@dataclass
class Admission:
    hadm_id: int
    admittime: float
    dischtime: float
    expire_flag: float  # 0/1, NaN unknown


@dataclass
class Options:
    """Cohort options shared by both plugins (validated in :meth:`MimicDataset.__init__`)."""

    window_hours: float = 48.0
    min_los_hours: float | None = None  # None = window_hours
    min_age: float = 18.0
    stays: str = "first_per_admission"
    readmission_days: float = 30.0
    split_seed: int = 0

    @property
    def min_los(self) -> float:
        return self.window_hours if self.min_los_hours is None else self.min_los_hours


def to_float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        return math.nan


def to_int(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        try:
            f = float(s)
        except ValueError:
            return None
        return int(f) if f.is_integer() else None


def age_band(age: float) -> str:
    if not math.isfinite(age):
        return "unknown"
    if age < 40:
        return "18-39"
    if age < 60:
        return "40-59"
    if age < 80:
        return "60-79"
    return "80+"


def race_group(s: str) -> str:
    """MIMIC's race / ethnicity strings -> white, black, hispanic, asian, other, unknown."""
    u = s.upper()
    if not u or any(w in u for w in ("UNKNOWN", "UNABLE", "DECLINED", "NOT SPECIFIED")):
        return "unknown"
    if "HISPANIC" in u or "LATINO" in u or "SOUTH AMERICAN" in u:
        return "hispanic"
    if "WHITE" in u or "PORTUGUESE" in u:
        return "white"
    if "BLACK" in u or "AFRICAN" in u:
        return "black"
    if "ASIAN" in u:
        return "asian"
    return "other"


def sex_name(s: str) -> str:
    return {"F": "female", "M": "male"}.get(s.strip().upper(), "unknown")


def apply_cohort_rules(stays: list[Stay], admissions: dict[int, Admission],
                       by_subject: dict[int, list[Admission]], opts: Options,
                       excluded: dict[str, int]) -> list[Stay]:
    """Inclusion rules and labels (see the docs pages). Counts exclusions in ``excluded``.

    Order: a known admission; adult (``age >= min_age``); one stay per admission (the
    first by ``intime``) unless ``stays="all"``; ICU length ``>= min_los_hours``.
    """
    for k in ("no_admission", "under_age", "not_first_in_admission", "short_stay"):
        excluded.setdefault(k, 0)
    kept = []
    for s in stays:
        if s.hadm_id not in admissions:
            excluded["no_admission"] += 1
        elif not s.age >= opts.min_age:  # NaN age fails too: adulthood unknown
            excluded["under_age"] += 1
        else:
            kept.append(s)
    if opts.stays == "first_per_admission":
        first: dict[int, Stay] = {}
        for s in sorted(kept, key=lambda s: (s.intime, s.stay_id)):
            first.setdefault(s.hadm_id, s)
        excluded["not_first_in_admission"] += len(kept) - len(first)
        kept = list(first.values())
    out = []
    for s in kept:
        if (s.outtime - s.intime) < opts.min_los:
            excluded["short_stay"] += 1
            continue
        adm = admissions[s.hadm_id]
        s.los_days = (s.outtime - s.intime) / 24.0
        s.mortality = adm.expire_flag
        s.los7 = float(s.los_days > 7.0)
        s.readmission30 = readmission(adm, by_subject.get(s.subject_id, []),
                                      opts.readmission_days)
        out.append(s)
    return sorted(out, key=lambda s: s.stay_id)


def readmission(adm: Admission, others: list[Admission], days: float) -> float:
    """1 when another hospital admission starts within ``days`` after this discharge, 0 when
    none does; NaN when the patient died in hospital (no readmission possible) or the
    discharge time is unknown."""
    if adm.expire_flag != 0.0 or not math.isfinite(adm.dischtime):
        return math.nan
    end = adm.dischtime + days * 24.0
    for o in others:
        if o.hadm_id != adm.hadm_id and adm.dischtime < o.admittime <= end:
            return 1.0
    return 0.0


def patient_split(subjects: list[int], seed: int) -> dict[int, str]:
    """subject_id -> train/val/test, 0.72/0.13/0.15 of the patients, seeded."""
    uniq = np.array(sorted(set(subjects)), dtype=np.int64)
    rng = np.random.default_rng(seed)
    order = uniq[rng.permutation(len(uniq))]
    n_train = int(round(SPLIT_FRACTIONS[0] * len(uniq)))
    n_val = int(round(SPLIT_FRACTIONS[1] * len(uniq)))
    out = {}
    for i, sid in enumerate(order.tolist()):
        out[sid] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    return out


# ----------------------------------------------------------------------------- events
@dataclass
class VarCounts:
    kept: int = 0
    implausible: int = 0
    non_numeric: int = 0
    outside_window: int = 0
    error_flag: int = 0
    not_assessable: int = 0


class Events:
    """Observations kept so far, as compact typed arrays (14 bytes per observation)."""

    def __init__(self, variables: list[Variable]) -> None:
        self.variables = variables
        self.stay = array("i")
        self.var = array("h")
        self.time = array("f")
        self.value = array("d")
        self.counts = [VarCounts() for _ in variables]
        self.low = [v.low for v in variables]
        self.high = [v.high for v in variables]
        self.integer = [v.integer for v in variables]


class Windows:
    """The cohort's EHR windows, looked up by stay id or by subject and time."""

    def __init__(self, stays: list[Stay], window_hours: float) -> None:
        self.window = window_hours
        self.start = [s.intime for s in stays]
        self.by_stay = {str(s.stay_id): i for i, s in enumerate(stays)}
        self.by_subject: dict[str, list[int]] = {}
        for i, s in enumerate(stays):
            self.by_subject.setdefault(str(s.subject_id), []).append(i)

    def find(self, subject: str, t: float) -> int:
        """The stay of ``subject`` whose window holds ``t``; -1 none, -2 outside all."""
        cands = self.by_subject.get(subject)
        if not cands:
            return -1
        for i in cands:
            if 0.0 <= t - self.start[i] <= self.window:
                return i
        return -2


def stream_events(path: Path, label: str, events: Events, items: dict[str, tuple],
                  windows: Windows, counts: dict[str, TableCounts], bars,
                  stay_col: tuple[str, ...] | None, subject_col: tuple[str, ...],
                  error_col: tuple[str, ...] | None = None) -> None:
    """Stream one event table, keeping rows of the wanted itemids inside a cohort window.

    Memory is bounded by construction: a row is parsed, tested and dropped; only kept
    observations are stored (in :class:`Events`). The itemid is tested first, as a string,
    because it rejects most rows at the cost of one dict lookup.

    Args:
        items: itemid string -> (variable index, unit conversion or None, charted value
            that is not a score or None), from :func:`item_map`.
        stay_col: column of the ICU stay id (chartevents); rows without one (MIMIC-III)
            and tables without one (labevents) are matched by subject and time.
        error_col: a 0/1 error flag column (MIMIC-III CHARTEVENTS ``ERROR``).
    """
    t0 = time.perf_counter()
    table = Table(path, label)
    i_item = table.col("itemid")
    i_time = table.col("charttime")
    i_num = table.col("valuenum")
    i_val = table.col("value")
    i_subj = table.col(*subject_col)
    i_stay = None if stay_col is None else table.col(*stay_col)
    i_err = None if error_col is None else table.col(*error_col, required=False)
    n = len(table.header)
    c = counts[label] = TableCounts(path=str(path))
    stays, var, times, vals = events.stay, events.var, events.time, events.value
    vc, low, high, integer = events.counts, events.low, events.high, events.integer
    by_stay, start, window, find = windows.by_stay, windows.start, windows.window, windows.find
    task = bars.add_task(label, total=table.size)
    rows = 0
    fromiso = datetime.fromisoformat
    for row in table.rows():
        rows += 1
        if rows & 0xFFFF == 0:
            bars.update(task, completed=table.position())
        if len(row) != n:
            c.bad(table, f"{len(row)} fields, the header has {n}")
            continue
        hit = items.get(row[i_item])
        if hit is None:
            continue
        j, conv, not_score = hit
        s = -1
        if i_stay is not None and row[i_stay]:
            s = by_stay.get(row[i_stay], -1)
            if s < 0:
                continue  # a stay outside the cohort
        elif row[i_subj] not in windows.by_subject:
            continue
        try:
            t = (fromiso(row[i_time]) - _EPOCH).total_seconds() / _HOUR
        except ValueError:
            c.bad(table, f"charttime {row[i_time]!r} is not a date-time")
            continue
        if s >= 0:
            rel = t - start[s]
            if rel < 0.0 or rel > window:
                vc[j].outside_window += 1
                continue
        else:
            s = find(row[i_subj], t)
            if s < 0:
                if s == -2:
                    vc[j].outside_window += 1
                continue
            rel = t - start[s]
        if i_err is not None and row[i_err] == "1":
            vc[j].error_flag += 1
            continue
        if not_score is not None and row[i_val].strip() == not_score:
            vc[j].not_assessable += 1
            continue
        raw = row[i_num] or row[i_val]
        try:
            v = float(raw)
        except ValueError:
            vc[j].non_numeric += 1
            continue
        if conv is not None:
            v = conv(v)
        if not (low[j] <= v <= high[j]) or (integer[j] and v != round(v)):
            vc[j].implausible += 1  # NaN fails the range test too
            continue
        vc[j].kept += 1
        stays.append(s)
        var.append(j)
        times.append(rel)
        vals.append(v)
    bars.update(task, completed=table.size)
    c.rows = rows
    c.check(table)
    c.seconds = time.perf_counter() - t0


# ----------------------------------------------------------------------------- notes
class Notes:
    """Note texts per (stay, modality), kept in time order, joined when the cohort is built."""

    def __init__(self) -> None:
        self.parts: dict[tuple[int, str], list[tuple[float, str]]] = {}
        self.counts: dict[str, dict[str, int]] = {}

    def count(self, modality: str, key: str) -> None:
        c = self.counts.setdefault(modality, {})
        c[key] = c.get(key, 0) + 1

    def add(self, stay: int, modality: str, t: float, text: str) -> None:
        self.parts.setdefault((stay, modality), []).append((t, text))
        self.count(modality, "linked")

    def texts(self) -> dict[tuple[int, str], str]:
        out = {}
        for key, parts in self.parts.items():
            parts.sort(key=lambda p: p[0])
            out[key] = "\n\n".join(p[1].strip() for p in parts)
        return out


# ----------------------------------------------------------------------------- cache
def default_cache_root(dataset: str) -> Path:
    """``$MEDMIX_CACHE_DIR/<dataset>``, else ``~/.cache/medmix/<dataset>``."""
    env = os.environ.get("MEDMIX_CACHE_DIR")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "medmix"
    return base / dataset


@dataclass
class Cohort:
    """A parsed cohort: what the cache holds and samples are built from."""

    stays: list[Stay]
    split: dict[int, str]  # subject_id -> split
    events: dict[str, np.ndarray]  # stay, var, time, value (sorted by stay, var, time)
    texts: dict[str, dict[str, str]]  # modality -> {stay_id str: text}
    images: dict[str, dict[str, str]]  # modality -> {stay_id str: path}
    meta: dict[str, dict[str, Any]]  # stay_id str -> extra meta (e.g. cxr study ids)
    report: dict[str, Any]


def save_cohort(folder: Path, key: str, cohort: Cohort) -> None:
    """Write the cohort atomically: arrays first, then ``cohort.json`` (its presence marks a
    complete cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **cohort.events)
    atomic_write_bytes(folder / "events.npz", buf.getvalue())
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    atomic_write_text(folder / "texts.json", json.dumps(cohort.texts))
    doc = {"format": CACHE_FORMAT, "parser_version": PARSER_VERSION, "key": key,
           "events_sha256": digest, "stays": [asdict(s) for s in cohort.stays],
           "split": {str(k): v for k, v in cohort.split.items()}, "images": cohort.images,
           "meta": cohort.meta, "report": cohort.report}
    atomic_write_text(folder / "cohort.json", json.dumps(jsonable(doc)))


def load_cohort(folder: Path, key: str) -> Cohort | None:
    """The cached cohort of ``key``, or None when absent, of another key, or damaged."""
    path = folder / "cohort.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text("utf-8"))
        if doc.get("format") != CACHE_FORMAT or doc.get("key") != key:
            return None
        raw = (folder / "events.npz").read_bytes()
        if hashlib.sha256(raw).hexdigest() != doc["events_sha256"]:
            raise ValueError("events.npz does not match its recorded sha256")
        with np.load(io.BytesIO(raw)) as z:
            events = {k: z[k] for k in ("stay", "var", "time", "value")}
        texts = json.loads((folder / "texts.json").read_text("utf-8"))
        stays = [Stay(**{k: (math.nan if v is None else v) for k, v in s.items()})
                 for s in doc["stays"]]
        return Cohort(stays, {int(k): v for k, v in doc["split"].items()}, events, texts,
                      doc["images"], doc["meta"], doc["report"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"The cohort cache in {folder} is damaged ({exc}); rebuilding it from "
                      f"the raw tables.", stacklevel=3)
        return None


def sort_events(events: Events, n_stays: int) -> dict[str, np.ndarray]:
    """Kept observations as arrays sorted by stay, variable, time (charting order on ties)."""
    stay = np.frombuffer(events.stay, dtype=np.int32).astype(np.int64)
    var = np.frombuffer(events.var, dtype=np.int16).astype(np.int64)
    t = np.frombuffer(events.time, dtype=np.float32).astype(np.float64)
    v = np.frombuffer(events.value, dtype=np.float64).copy()
    order = np.lexsort((t, var, stay))  # stable: ties keep file order
    return {"stay": stay[order].astype(np.int32), "var": var[order].astype(np.int16),
            "time": t[order], "value": v[order]}


# ----------------------------------------------------------------------------- dataset
#: options every MIMIC plugin accepts, with their type check
COMMON_OPTIONS = {
    "split_seed": int, "window_hours": (int, float), "min_los_hours": (int, float),
    "min_age": (int, float), "stays": str, "variables": (list, tuple, str),
    "readmission_days": (int, float), "cache_dir": (str, os.PathLike), "cache": bool,
    "progress": bool,
}
#: options that change nothing in the samples (not part of the cache key)
_NOT_KEYED = {"cache_dir", "cache", "progress", "split_seed"}


def say(msg: str) -> None:
    """A one-line notice on stderr (which source was found, cache hits)."""
    print(f"[medmix] {msg}", file=sys.stderr)


class MimicDataset(Dataset):
    """Base of the MIMIC plugins: options, cache, samples, patient split, report.

    Subclasses set ``name``, ``allowed_options`` and implement :meth:`_inputs` (the files
    read, the source description) and :meth:`_build` (raw tables -> :class:`Cohort`).
    """

    attributes = ATTRIBUTES
    default_experts = ("stats",)
    allowed_options: dict[str, Any] = COMMON_OPTIONS

    def __init__(self, source: str | None = None, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.allowed_options))
        if unknown:
            raise DataError(f"{self.name}: unknown option(s) {unknown}; known options: "
                            f"{', '.join(sorted(self.allowed_options))}.")
        for k, v in options.items():
            want = self.allowed_options[k]
            if v is not None and (not isinstance(v, want) or isinstance(v, bool)
                                  and want is not bool):
                raise DataError(f"{self.name}: option {k!r} = {v!r} has the wrong type; "
                                f"expected {getattr(want, '__name__', want)}.")
        super().__init__(source, **options)
        if source is None:
            raise DataError(f"{self.name} needs a source: MIMIC cannot be redistributed, so "
                            f"pass the folder of your own credentialed copy, e.g. "
                            f"--source {self._source_example} (see docs/data/{self.name}.md).")
        self.path = Path(source).expanduser()
        if not self.path.is_dir():
            raise DataError(f"{self.name}: source {str(self.path)!r} is not a folder. Expected "
                            f"{self._source_example} (see docs/data/{self.name}.md).")
        o = options
        self.opts = Options(
            window_hours=float(o.get("window_hours", 48.0)),
            min_los_hours=None if o.get("min_los_hours") is None else float(o["min_los_hours"]),
            min_age=float(o.get("min_age", 18.0)), stays=str(o.get("stays",
                                                                    "first_per_admission")),
            readmission_days=float(o.get("readmission_days", 30.0)),
            split_seed=int(o.get("split_seed", 0)))
        if self.opts.stays not in ("first_per_admission", "all"):
            raise DataError(f"{self.name}: option stays={self.opts.stays!r}; expected "
                            f"'first_per_admission' (default) or 'all'.")
        if not self.opts.window_hours > 0 or not self.opts.readmission_days > 0:
            raise DataError(f"{self.name}: window_hours and readmission_days must be > 0; got "
                            f"{self.opts.window_hours} and {self.opts.readmission_days}.")
        self.variables = select_variables(o.get("variables"))
        self.progress = bool(o.get("progress", True))
        self._cohort: Cohort | None = None
        self._samples: list[Sample] | None = None
        self._cache_hit = False

    _source_example = "/data/mimic"

    # ------------------------------------------------------------------ subclass API
    def _inputs(self) -> tuple[list[Path], dict[str, Any]]:
        """(every raw file the build reads, a JSON description of the sources)."""
        raise NotImplementedError

    def _build(self) -> Cohort:
        raise NotImplementedError

    def _modality_names(self) -> list[tuple[str, str]]:
        """(name, kind) of the modalities, in order."""
        raise NotImplementedError

    # ------------------------------------------------------------------ specs
    def modalities(self) -> list[ModalitySpec]:
        out = []
        for name, kind in self._modality_names():
            if kind == "timeseries":
                out.append(ModalitySpec(name, kind, [v.name for v in self.variables],
                                        {v.name: v.unit for v in self.variables}))
            else:
                out.append(ModalitySpec(name, kind))
        return out

    def tasks(self) -> list[TaskSpec]:
        return [TaskSpec(t, "binary") for t in TASKS]

    # ------------------------------------------------------------------ cache
    def cache_key(self) -> str:
        files, sources = self._inputs()
        opts = {k: v for k, v in self.options.items() if k not in _NOT_KEYED}
        doc = {"dataset": self.name, "parser": PARSER_VERSION, "sources": sources,
               "files": [file_identity(p) for p in files], "options": opts,
               "variables": [asdict(v) for v in self.variables],
               "modalities": self._modality_names()}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def cache_folder(self) -> Path:
        """``<cache_dir option or $MEDMIX_CACHE_DIR/<name>>/<key[:16]>``."""
        root = self.options.get("cache_dir")
        root = Path(root).expanduser() if root else default_cache_root(self.name)
        return root / self.cache_key()[:16]

    def cohort(self) -> Cohort:
        """The parsed cohort: from the cache when it holds this key, else built and cached."""
        if self._cohort is not None:
            return self._cohort
        use_cache = bool(self.options.get("cache", True))
        key = self.cache_key()
        folder = self.cache_folder()
        cohort = load_cohort(folder, key) if use_cache else None
        self._cache_hit = cohort is not None
        if cohort is None:
            cohort = self._build()
            subjects = [s.subject_id for s in cohort.stays]
            cohort.split = patient_split(subjects, self.opts.split_seed)
            cohort.report["split_seed"] = self.opts.split_seed
            if use_cache:
                save_cohort(folder, key, cohort)
        elif self.progress:
            say(f"{self.name}: cohort read from the cache {folder}")
        if int(cohort.report.get("split_seed", -1)) != self.opts.split_seed:
            cohort.split = patient_split([s.subject_id for s in cohort.stays],
                                         self.opts.split_seed)
        cohort.report["split_seed"] = self.opts.split_seed
        self._cohort = cohort
        return cohort

    # ------------------------------------------------------------------ samples
    def samples(self) -> list[Sample]:
        """All cohort stays, ordered by stay id."""
        if self._samples is None:
            self._samples = self._make_samples(self.cohort())
        return self._samples

    def _make_samples(self, c: Cohort) -> list[Sample]:
        n, nv = len(c.stays), len(self.variables)
        ev = c.events
        key = ev["stay"].astype(np.int64) * nv + ev["var"].astype(np.int64)
        bounds = np.searchsorted(key, np.arange(n * nv + 1)).tolist()  # [N * V + 1]
        names = [v.name for v in self.variables]
        horizon = self.opts.window_hours
        mods = self._modality_names()
        out = []
        for i, s in enumerate(c.stays):
            sid = str(s.stay_id)
            payload: dict[str, Any] = {}
            for name, kind in mods:
                if kind == "timeseries":
                    lo, hi = bounds[i * nv], bounds[(i + 1) * nv]
                    if hi == lo:
                        payload[name] = None
                        continue
                    spans = [(bounds[i * nv + j], bounds[i * nv + j + 1]) for j in range(nv)]
                    payload[name] = TimeSeriesData(
                        list(names), [ev["time"][a:b].copy() for a, b in spans],
                        [ev["value"][a:b].copy() for a, b in spans], horizon)
                elif kind == "text":
                    text = c.texts.get(name, {}).get(sid)
                    payload[name] = TextData(text) if text else None
                else:
                    p = c.images.get(name, {}).get(sid)
                    payload[name] = ImageData([p]) if p else None
            meta = {"subject_id": s.subject_id, "hadm_id": s.hadm_id, "stay_id": s.stay_id,
                    "sex": s.sex, "age_band": age_band(s.age), "race": s.race,
                    "insurance": s.insurance, "age": s.age, "first_careunit": s.careunit,
                    "los_days": s.los_days, "split": c.split.get(s.subject_id, "")}
            if s.era:
                meta["era"] = s.era
            meta.update(c.meta.get(sid, {}))
            labels = {"mortality": s.mortality, "los7": s.los7,
                      "readmission30": s.readmission30}
            out.append(Sample(sid, payload, labels, meta))
        return out

    def splits(self, samples: list[Sample]) -> dict[str, list[int]]:
        """The patient-level 0.72/0.13/0.15 split (by ``subject_id``, seeded, cached)."""
        split = self.cohort().split
        out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for i, s in enumerate(samples):
            sub = s.meta.get("subject_id")
            if sub not in split:
                raise DataError(f"{self.name}: sample {s.id!r} (subject {sub}) is not in the "
                                f"cohort's patient split; pass this dataset's own samples.")
            out[split[sub]].append(i)
        return out

    # ------------------------------------------------------------------ reporting
    def identity(self) -> dict[str, Any]:
        _, sources = self._inputs()
        return {"name": self.name, "source": str(self.path), "sources": sources,
                "cache_key": self.cache_key(), "parser_version": PARSER_VERSION,
                "options": {k: v for k, v in self.options.items()
                            if k not in ("cache_dir", "cache", "progress")}}

    def report(self) -> dict[str, Any]:
        """Sources found, exclusions, prevalences, values dropped and why, bad rows, split."""
        c = self.cohort()
        samples = self.samples()
        rep = json.loads(json.dumps(jsonable(c.report)))
        labels = {}
        for t in TASKS:
            y = np.array([s.labels[t] for s in samples], dtype=float)
            known = y[~np.isnan(y)]
            labels[t] = {"positive": int(known.sum()), "negative": int((known == 0).sum()),
                         "unknown": int(np.isnan(y).sum()),
                         "prevalence": float(known.mean()) if len(known) else None}
        rep["labels"] = labels
        parts = self.splits(samples)
        rep["split_sizes"] = {k: len(v) for k, v in parts.items()}
        rep["split_subjects"] = {k: len({samples[i].meta["subject_id"] for i in v})
                                 for k, v in parts.items()}
        n = max(len(samples), 1)
        rep["missing_rates"] = {m: sum(s.modalities[m] is None for s in samples) / n
                                for m, _ in self._modality_names()}
        rep["cache"] = {"folder": str(self.cache_folder()), "hit": self._cache_hit}
        return rep


def warn_absent(what: str, modalities: str) -> str:
    msg = f"{what} not given or not found: {modalities} missing for every stay."
    warnings.warn(msg, stacklevel=3)
    return msg
