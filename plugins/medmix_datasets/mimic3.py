"""``mimic3``: MIMIC-III v1.4 built into the ``mimic4mm`` modalities, for external testing.

Reads ``ICUSTAYS``, ``ADMISSIONS``, ``PATIENTS``, ``CHARTEVENTS`` (CareVue and MetaVision
itemids), ``LABEVENTS`` and ``NOTEEVENTS`` (``.csv`` or ``.csv.gz``, upper-case names as
published) from one folder. The same 46 EHR variables (mapped to MIMIC-III itemids), the
same cohort rules and the same three tasks as ``mimic4mm``, so a model trained there tests
here directly. Modalities: ``ehr`` (time series), ``radiology_note`` (NOTEEVENTS category
Radiology) and ``clinical_note`` (nursing, physician and other notes; discharge summaries
are excluded because they are written after the outcome). There are no images.

Overlap with MIMIC-IV. MIMIC-IV covers 2008-2019 and MIMIC-III 2001-2012: the MetaVision
stays of MIMIC-III (2008-2012) are also in MIMIC-IV, under other identifiers. The option
``era="carevue"`` (the default) keeps only stays recorded in CareVue (``DBSOURCE =
'carevue'``, 2001-2008), the subset PhysioNet publishes as "MIMIC-III Clinical Database
CareVue subset" precisely because it does not overlap MIMIC-IV; ``era="all"`` keeps every
stay. Details: docs/data/mimic3.md.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from medmix_core import hookimpl
from medmix_core.errors import DataError
from medmix_datasets import _mimic as mx

MODALITIES = [("ehr", "timeseries"), ("radiology_note", "text"), ("clinical_note", "text")]
ERAS = ("carevue", "all")
#: NOTEEVENTS categories never used: written at or after discharge (they reveal outcomes)
EXCLUDED_NOTES = ("discharge summary",)
#: MIMIC-III shifts the date of birth of patients older than 89 by 300 years
_AGE_CAP = 90.0
_TABLES = ("ICUSTAYS", "ADMISSIONS", "PATIENTS", "CHARTEVENTS", "LABEVENTS", "NOTEEVENTS")


def _table(path: Path, name: str) -> Path | None:
    return mx.find_table(path, name, name.lower())


def is_mimic3(path: Path) -> bool:
    """Whether ``path`` holds MIMIC-III's ICUSTAYS and ADMISSIONS tables."""
    return _table(path, "ICUSTAYS") is not None and _table(path, "ADMISSIONS") is not None


def check_era(era: Any) -> str:
    if era not in ERAS:
        raise DataError(f"Option era={era!r}; expected 'carevue' (default: CareVue stays "
                        f"2001-2008 only, which MIMIC-IV does not contain) or 'all'.")
    return str(era)


def inputs(path: Path, text_modalities: list[str]) -> tuple[list[Path], dict[str, Any]]:
    """(files read, source description) of a MIMIC-III folder."""
    names = list(_TABLES[:5]) + (["NOTEEVENTS"] if text_modalities else [])
    files = [p for p in (_table(path, n) for n in names) if p is not None]
    return files, {"mimic_iii": {"path": str(path), "version_hint": path.name
                                 if path.name[:1].isdigit() else None,
                                 "tables": [p.name for p in files]}}


def build(ds: mx.MimicDataset, text_modalities: list[str],
          warned: list[str] | None = None) -> mx.Cohort:
    """Build the cohort of a MIMIC-III folder for ``ds`` (a ``mimic3`` or ``mimic4mm``
    dataset: its options, variables and declared text modalities are used)."""
    path = ds.path
    warned = list(warned or [])
    tables = {n: _table(path, n) for n in _TABLES}
    for n in ("ICUSTAYS", "ADMISSIONS", "PATIENTS"):
        if tables[n] is None:
            raise DataError(f"{path}: no {n}.csv(.gz); a MIMIC-III v1.4 folder holds ICUSTAYS, "
                            f"ADMISSIONS and PATIENTS (plus CHARTEVENTS, LABEVENTS, "
                            f"NOTEEVENTS).")
    if ds.progress:
        mx.say(f"{ds.name}: MIMIC-III layout (upper-case tables) found in {path}; "
               f"era={getattr(ds, 'era', 'carevue')}")
    counts: dict[str, mx.TableCounts] = {}
    excluded: dict[str, int] = {}
    stays, admissions, by_subject = _cohort_tables(tables, counts, excluded,
                                                   getattr(ds, "era", "carevue"))
    stays = mx.apply_cohort_rules(stays, admissions, by_subject, ds.opts, excluded)
    windows = mx.Windows(stays, ds.opts.window_hours)
    events = mx.Events(ds.variables)
    notes = mx.Notes()
    with mx.progress_bar(ds.progress) as bars:
        for name, ids, stay_col, err in (("CHARTEVENTS", "iii", ("ICUSTAY_ID",), ("ERROR",)),
                                         ("LABEVENTS", "lab", None, None)):
            if tables[name] is None:
                warned.append(mx.warn_absent(f"MIMIC-III {name}", "its EHR variables"))
                continue
            mx.stream_events(tables[name], name, events, mx.item_map(ds.variables, ids),
                             windows, counts, bars, stay_col, ("SUBJECT_ID",), err)
        if text_modalities:
            if tables["NOTEEVENTS"] is None:
                warned.append(mx.warn_absent("MIMIC-III NOTEEVENTS", ", ".join(text_modalities)))
            else:
                _notes(tables["NOTEEVENTS"], windows, notes, counts, text_modalities)
    report = {
        "source": inputs(path, text_modalities)[1], "warnings": warned,
        "cohort": {"icu_stays_read": counts["ICUSTAYS"].rows, "excluded": excluded,
                   "n_stays": len(stays), "n_subjects": len({s.subject_id for s in stays}),
                   "rules": {"min_age": ds.opts.min_age, "stays": ds.opts.stays,
                             "min_los_hours": ds.opts.min_los,
                             "window_hours": ds.opts.window_hours,
                             "readmission_days": ds.opts.readmission_days,
                             "era": getattr(ds, "era", "carevue")}},
        "tables": {k: vars(v) for k, v in counts.items()},
        "variables": {v.name: vars(c) for v, c in zip(ds.variables, events.counts)},
        "notes": notes.counts}
    texts: dict[str, dict[str, str]] = {}
    for (i, m), text in notes.texts().items():
        texts.setdefault(m, {})[str(stays[i].stay_id)] = text
    return mx.Cohort(stays, {}, mx.sort_events(events, len(stays)), texts, {}, {}, report)


def _cohort_tables(tables, counts, excluded, era: str):
    rows = mx.read_small(tables["ICUSTAYS"], "ICUSTAYS", {
        "subject_id": ("SUBJECT_ID",), "hadm_id": ("HADM_ID",), "stay_id": ("ICUSTAY_ID",),
        "dbsource": ("DBSOURCE",), "unit": ("FIRST_CAREUNIT",), "intime": ("INTIME",),
        "outtime": ("OUTTIME",)}, counts)
    excluded["era_overlaps_mimic_iv"] = 0
    if era == "carevue":
        n = len(rows)
        rows = [r for r in rows if r["dbsource"].lower() == "carevue"]
        excluded["era_overlaps_mimic_iv"] = n - len(rows)
    subjects = {r["subject_id"] for r in rows}
    pats = {r["subject_id"]: r for r in mx.read_small(
        tables["PATIENTS"], "PATIENTS", {"subject_id": ("SUBJECT_ID",), "gender": ("GENDER",),
                                         "dob": ("DOB",)},
        counts, keep=lambda r: r["subject_id"] in subjects)}
    adm_rows = mx.read_small(tables["ADMISSIONS"], "ADMISSIONS", {
        "subject_id": ("SUBJECT_ID",), "hadm_id": ("HADM_ID",), "admittime": ("ADMITTIME",),
        "dischtime": ("DISCHTIME",), "flag": ("HOSPITAL_EXPIRE_FLAG",),
        "insurance": ("INSURANCE",), "race": ("ETHNICITY",)}, counts,
        keep=lambda r: r["subject_id"] in subjects, optional=("insurance", "race"))
    admissions, by_subject, info = {}, {}, {}
    for r in adm_rows:
        hadm, sub = mx.to_int(r["hadm_id"]), mx.to_int(r["subject_id"])
        try:
            admit = mx.parse_time(r["admittime"])
            disch = mx.parse_time(r["dischtime"]) if r["dischtime"] else math.nan
        except ValueError:
            counts["ADMISSIONS"].bad_row(f"HADM_ID {r['hadm_id']}: ADMITTIME/DISCHTIME "
                                         f"{r['admittime']!r}/{r['dischtime']!r} not date-times")
            continue
        if hadm is None or sub is None:
            counts["ADMISSIONS"].bad_row(f"ids {r['subject_id']!r}/{r['hadm_id']!r}")
            continue
        flag = mx.to_float(r["flag"])
        a = mx.Admission(hadm, admit, disch, flag if flag in (0.0, 1.0) else math.nan)
        admissions[hadm] = a
        by_subject.setdefault(sub, []).append(a)
        info[hadm] = (r["insurance"], r["race"])
    stays = []
    excluded["bad_times"] = 0
    for r in rows:
        ids = [mx.to_int(r[k]) for k in ("stay_id", "subject_id", "hadm_id")]
        try:
            tin, tout = mx.parse_time(r["intime"]), mx.parse_time(r["outtime"])
        except ValueError:
            excluded["bad_times"] += 1
            continue
        if None in ids:
            excluded["bad_times"] += 1
            continue
        p = pats.get(r["subject_id"], {})
        try:
            age = (tin - mx.parse_time(p.get("dob", ""))) / (24 * 365.2425)
        except ValueError:
            age = math.nan
        age = min(age, _AGE_CAP)  # older than 89: DOB shifted by 300 years
        ins, race = info.get(ids[2], ("", ""))
        stays.append(mx.Stay(ids[0], ids[1], ids[2], tin, tout, age,
                             mx.sex_name(p.get("gender", "")), mx.race_group(race),
                             ins.strip() or "unknown", r["unit"], era=r["dbsource"].lower()))
    return stays, admissions, by_subject


def _notes(path: Path, windows: mx.Windows, notes: mx.Notes, counts,
           text_modalities: list[str]) -> None:
    """NOTEEVENTS -> radiology_note / clinical_note, by subject and CHARTTIME in the window.

    Skipped and counted: ``ISERROR = 1``, discharge summaries, notes without a CHARTTIME
    (only a date: they cannot be placed inside the window).
    """
    t0 = time.perf_counter()
    table = mx.Table(path, "NOTEEVENTS")
    i_sub, i_time = table.col("SUBJECT_ID"), table.col("CHARTTIME")
    i_cat, i_text = table.col("CATEGORY"), table.col("TEXT")
    i_err = table.col("ISERROR", required=False)
    c = counts["NOTEEVENTS"] = mx.TableCounts(path=str(path))
    for row in table.well_formed_rows(c):
        if row[i_sub] not in windows.by_subject:
            continue
        cat = row[i_cat].strip().lower()
        mod = "radiology_note" if cat == "radiology" else "clinical_note"
        if mod not in text_modalities:
            continue
        if cat in EXCLUDED_NOTES:
            notes.count(mod, "discharge_summary_excluded")
            continue
        if i_err is not None and row[i_err].strip() == "1":
            notes.count(mod, "iserror")
            continue
        if not row[i_time].strip():
            notes.count(mod, "no_charttime")
            continue
        mx.add_windowed_note(c, table, notes, windows, mod, row[i_sub], row[i_time],
                             row[i_text], "CHARTTIME")
    c.check(table)
    c.seconds = time.perf_counter() - t0


class Mimic3(mx.MimicDataset):
    """MIMIC-III v1.4 as an external cohort of ``mimic4mm`` (EHR, radiology and clinical notes).

    Args:
        source: the MIMIC-III folder (ICUSTAYS.csv.gz, ADMISSIONS.csv.gz, ...).
        options: ``era`` (``carevue`` default | ``all``), and the ``mimic4mm`` cohort options
            ``window_hours``, ``min_los_hours``, ``min_age``, ``stays``,
            ``readmission_days``, ``variables``, ``split_seed``, ``cache_dir``, ``cache``,
            ``progress``.
    """

    name = "mimic3"
    allowed_options = {**mx.COMMON_OPTIONS, "era": str}
    _source_example = "physionet.org/files/mimiciii/1.4"

    def __init__(self, source: str | None = None, **options: Any) -> None:
        super().__init__(source, **options)
        self.era = check_era(options.get("era", "carevue"))
        if not is_mimic3(self.path):
            found = sorted(p.name for p in self.path.iterdir())[:20]
            raise DataError(f"{self.path} is not a MIMIC-III v1.4 folder: expected "
                            f"ICUSTAYS.csv(.gz) and ADMISSIONS.csv(.gz); found {found}.")

    def _modality_names(self) -> list[tuple[str, str]]:
        return list(MODALITIES)

    def _inputs(self) -> tuple[list[Path], dict[str, Any]]:
        return inputs(self.path, ["radiology_note", "clinical_note"])

    def _build(self) -> mx.Cohort:
        return build(self, ["radiology_note", "clinical_note"])


@hookimpl
def register_datasets(register):
    register("mimic3", Mimic3)
