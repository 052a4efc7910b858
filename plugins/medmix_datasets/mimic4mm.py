"""``mimic4mm``: the paper's MIMIC-IV multimodal ICU cohort, built from the official files.

MIMIC cannot be redistributed: every user builds the cohort from their own credentialed
copy. Sources (each given separately; only MIMIC-IV is required):

* ``source``: the MIMIC-IV folder (``hosp/`` and ``icu/``, v2.x/3.x; or the v1.0 layout
  with ``core/`` too; the layout found is reported).
* option ``cxr``: the MIMIC-CXR-JPG 2.0.0 folder (``mimic-cxr-2.0.0-metadata.csv(.gz)``,
  ``-split``, ``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg``).
* option ``note``: the MIMIC-IV-Note folder (``note/radiology.csv.gz``; with
  ``discharge_note=True`` also ``note/discharge.csv.gz``).

A source that is not given leaves its modalities missing for every stay, with a warning.

Modalities: ``cxr_frontal`` and ``cxr_lateral`` (image; by ``ViewPosition``), ``ehr``
(time series of the 46 variables of :data:`medmix_datasets._mimic.VARIABLES`, hours since
ICU ``intime``), ``radiology_note`` (text), and ``discharge_note`` (text; opt-in, it is
written at discharge and reveals the outcome). Tasks: ``mortality``, ``los7``,
``readmission30``. Cohort rules, linking rules and task definitions: docs/data/mimic4mm.md.

A MIMIC-III folder given as ``source`` (as ``--external-test`` does: the external cohort
is read with the training dataset's plugin) is built by the ``mimic3`` rules into these
modalities; the images are then missing for every stay.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from pathlib import Path
from typing import Any

from medmix_core import hookimpl
from medmix_core.errors import DataError
from medmix_datasets import _mimic as mx

MODALITIES = [("cxr_frontal", "image"), ("cxr_lateral", "image"), ("ehr", "timeseries"),
              ("radiology_note", "text")]
FRONTAL = ("PA", "AP")  # PA preferred: ranked by position in this tuple
LATERAL = ("LATERAL", "LL")
CXR_METADATA = "mimic-cxr-2.0.0-metadata"
CXR_SPLIT = "mimic-cxr-2.0.0-split"


def detect_mimic4(path: Path) -> dict[str, Any]:
    """The MIMIC-IV layout of ``path``: folders of each table and a description.

    Raises:
        DataError: ``path`` holds neither layout.
    """
    hosp, icu, core = path / "hosp", path / "icu", path / "core"
    if not (mx.find_table(icu, "icustays") and (mx.find_table(hosp, "patients")
                                                or mx.find_table(core, "patients"))):
        found = sorted(p.name for p in path.iterdir())[:20] if path.is_dir() else []
        raise DataError(f"{path} is not a MIMIC-IV folder: expected icu/icustays.csv(.gz) and "
                        f"hosp/patients.csv(.gz) (v2.x/3.x) or core/patients.csv(.gz) (v1.0); "
                        f"found {found}. Pass the folder that holds hosp/ and icu/, e.g. "
                        f"physionet.org/files/mimiciv/3.1.")
    v1 = mx.find_table(core, "patients") is not None
    base = core if v1 else hosp
    hint = path.name if re.fullmatch(r"\d+(\.\d+)+", path.name) else None
    layout = "1.0 (core/, hosp/, icu/)" if v1 else "2.x/3.x (hosp/, icu/)"
    return {"patients": mx.find_table(base, "patients"),
            "admissions": mx.find_table(base, "admissions"),
            "icustays": mx.find_table(icu, "icustays"),
            "chartevents": mx.find_table(icu, "chartevents"),
            "labevents": mx.find_table(hosp, "labevents"),
            "layout": layout, "version_hint": hint}


def _note_folder(path: Path) -> Path:
    return path / "note" if (path / "note").is_dir() else path


def _study_time(date: str, tm: str) -> float:
    """``StudyDate`` 21800506 + ``StudyTime`` 84013.671 (HHMMSS, leading zeros dropped)."""
    d = date.strip().split(".")[0]
    t = float(tm) if tm.strip() else 0.0
    hh, rest = divmod(int(t), 10000)
    mm, ss = divmod(rest, 100)
    if len(d) != 8 or hh > 23 or mm > 59 or ss > 59:
        raise ValueError(f"StudyDate {date!r} / StudyTime {tm!r}")
    return mx.parse_time(f"{d[:4]}-{d[4:6]}-{d[6:]}") + hh + mm / 60.0 + (ss + t % 1) / 3600.0


class Mimic4MM(mx.MimicDataset):
    """The MIMIC-IV multimodal cohort of the paper (frontal/lateral CXR, EHR, radiology note).

    Args:
        source: the MIMIC-IV folder (hosp/, icu/[, core/]); or a MIMIC-III v1.4 folder,
            built by the ``mimic3`` rules into these modalities (for ``--external-test``).
        options: ``cxr`` (MIMIC-CXR-JPG folder), ``note`` (MIMIC-IV-Note folder),
            ``discharge_note`` (bool), ``window_hours`` (48), ``min_los_hours`` (= window),
            ``min_age`` (18), ``stays`` (``first_per_admission`` | ``all``),
            ``readmission_days`` (30), ``variables`` (subset of the 46 names),
            ``split_seed`` (0), ``cache_dir``, ``cache`` (True), ``progress`` (True), and
            ``era`` (MIMIC-III sources only; see ``mimic3``).
    """

    name = "mimic4mm"
    allowed_options = {**mx.COMMON_OPTIONS, "cxr": (str, Path), "note": (str, Path),
                       "discharge_note": bool, "era": str}
    _source_example = ("physionet.org/files/mimiciv/3.1 --dataset-option cxr=... "
                       "--dataset-option note=...")

    def __init__(self, source: str | None = None, **options: Any) -> None:
        super().__init__(source, **options)
        from medmix_datasets import mimic3

        self.is_mimic3 = mimic3.is_mimic3(self.path)
        self.layout = None if self.is_mimic3 else detect_mimic4(self.path)
        if not self.is_mimic3 and "era" in options:
            raise DataError("mimic4mm: option 'era' applies to MIMIC-III sources only; the "
                            f"source {self.path} is MIMIC-IV. Drop the option.")
        self.era = mimic3.check_era(options.get("era", "carevue"))
        self.cxr = None if options.get("cxr") is None else Path(options["cxr"]).expanduser()
        self.note = None if options.get("note") is None else Path(options["note"]).expanduser()
        for label, p in (("cxr", self.cxr), ("note", self.note)):
            if p is not None and not p.is_dir():
                raise DataError(f"mimic4mm: option {label}={str(p)!r} is not a folder. Give the "
                                f"{'MIMIC-CXR-JPG 2.0.0' if label == 'cxr' else 'MIMIC-IV-Note'}"
                                f" folder, or leave the option out to have its modality "
                                f"missing for every stay.")
        if self.cxr is not None and not self.is_mimic3 and mx.find_table(
                self.cxr, CXR_METADATA) is None:
            raise DataError(f"mimic4mm: option cxr={str(self.cxr)!r} has no "
                            f"{CXR_METADATA}.csv(.gz); expected the MIMIC-CXR-JPG 2.0.0 folder "
                            f"(with files/ beside the metadata).")
        self.discharge = bool(options.get("discharge_note", False))

    def _modality_names(self) -> list[tuple[str, str]]:
        return MODALITIES + ([("discharge_note", "text")] if self.discharge else [])

    # ------------------------------------------------------------------ inputs
    def _notes(self) -> dict[str, Path | None]:
        if self.note is None:
            return {"radiology": None, "discharge": None}
        folder = _note_folder(self.note)
        return {"radiology": mx.find_table(folder, "radiology"),
                "discharge": mx.find_table(folder, "discharge") if self.discharge else None}

    def _inputs(self) -> tuple[list[Path], dict[str, Any]]:
        if self.is_mimic3:
            from medmix_datasets import mimic3

            return mimic3.inputs(self.path, self._text_modalities())
        lay = self.layout
        files = [lay[k] for k in ("patients", "admissions", "icustays", "chartevents",
                                  "labevents") if lay[k] is not None]
        if self.cxr is not None:
            files += [p for p in (mx.find_table(self.cxr, CXR_METADATA),
                                  mx.find_table(self.cxr, CXR_SPLIT)) if p is not None]
        files += [p for p in self._notes().values() if p is not None]
        sources = {"mimic_iv": {"path": str(self.path), "layout": lay["layout"],
                                "version_hint": lay["version_hint"]},
                   "cxr": None if self.cxr is None else str(self.cxr),
                   "note": None if self.note is None else str(self.note)}
        return files, sources

    def _text_modalities(self) -> list[str]:
        return [m for m, k in self._modality_names() if k == "text"]

    # ------------------------------------------------------------------ build
    def _build(self) -> mx.Cohort:
        if self.is_mimic3:
            from medmix_datasets import mimic3

            ignored = [k for k in ("cxr", "note", "discharge_note") if k in self.options]
            warned = [mx.warn_absent(f"Images (MIMIC-III source {self.path}, no CXR)",
                                     "cxr_frontal and cxr_lateral")]
            if ignored:
                msg = (f"MIMIC-III source {self.path}: options {ignored} describe MIMIC-IV "
                       f"sources and are ignored.")
                warnings.warn(msg, stacklevel=2)
                warned.append(msg)
            return mimic3.build(self, self._text_modalities(), warned)
        lay = self.layout
        if self.progress:
            mx.say(f"mimic4mm: MIMIC-IV {lay['layout']} layout found in {self.path}"
                   + (f" (version {lay['version_hint']})" if lay["version_hint"] else ""))
        for k in ("admissions",):
            if lay[k] is None:
                raise DataError(f"{self.path}: MIMIC-IV {lay['layout']} layout without "
                                f"{k}.csv(.gz); it is needed for the cohort and the labels.")
        counts: dict[str, mx.TableCounts] = {}
        warned: list[str] = []
        excluded: dict[str, int] = {}
        stays, admissions, by_subject = self._cohort_tables(counts, excluded)
        stays = mx.apply_cohort_rules(stays, admissions, by_subject, self.opts, excluded)
        windows = mx.Windows(stays, self.opts.window_hours)
        events = mx.Events(self.variables)
        with mx.progress_bar(self.progress) as bars:
            for table, ids in (("chartevents", "iv"), ("labevents", "lab")):
                path = lay[table]
                label = ("icu/" if table == "chartevents" else "hosp/") + table
                if path is None:
                    warned.append(mx.warn_absent(f"MIMIC-IV {label}", "its EHR variables"))
                    continue
                mx.stream_events(path, label, events, mx.item_map(self.variables, ids), windows,
                                 counts, bars, ("stay_id",) if table == "chartevents" else None,
                                 ("subject_id",))
            images, meta, cxr_rep = self._cxr(windows, stays, counts, warned)
            notes = self._read_notes(windows, stays, counts, warned)
        report = {
            "source": self._inputs()[1], "warnings": warned,
            "cohort": {"icu_stays_read": counts["icu/icustays"].rows, "excluded": excluded,
                       "n_stays": len(stays), "n_subjects": len({s.subject_id for s in stays}),
                       "rules": self._rules()},
            "tables": {k: vars(v) for k, v in counts.items()},
            "variables": {v.name: vars(c) for v, c in zip(self.variables, events.counts)},
            "cxr": cxr_rep, "notes": notes.counts}
        texts: dict[str, dict[str, str]] = {}
        for (i, m), text in notes.texts().items():
            texts.setdefault(m, {})[str(stays[i].stay_id)] = text
        return mx.Cohort(stays, {}, mx.sort_events(events, len(stays)), texts, images, meta,
                         report)

    def _rules(self) -> dict[str, Any]:
        o = self.opts
        return {"min_age": o.min_age, "stays": o.stays, "min_los_hours": o.min_los,
                "window_hours": o.window_hours, "readmission_days": o.readmission_days}

    def _cohort_tables(self, counts, excluded):
        """Candidate stays (with demographics) and every admission of their patients."""
        lay = self.layout
        rows = mx.read_small(lay["icustays"], "icu/icustays", {
            "subject_id": ("subject_id",), "hadm_id": ("hadm_id",), "stay_id": ("stay_id",),
            "intime": ("intime",), "outtime": ("outtime",), "unit": ("first_careunit",)},
            counts)
        subjects = {r["subject_id"] for r in rows}
        pats = {r["subject_id"]: r for r in mx.read_small(
            lay["patients"], "patients", {"subject_id": ("subject_id",), "gender": ("gender",),
                                          "anchor_age": ("anchor_age",),
                                          "anchor_year": ("anchor_year",)},
            counts, keep=lambda r: r["subject_id"] in subjects)}
        adm_rows = mx.read_small(lay["admissions"], "admissions", {
            "subject_id": ("subject_id",), "hadm_id": ("hadm_id",),
            "admittime": ("admittime",), "dischtime": ("dischtime",),
            "flag": ("hospital_expire_flag",), "insurance": ("insurance",),
            "race": ("race", "ethnicity")}, counts, keep=lambda r: r["subject_id"] in subjects,
            optional=("insurance", "race"))
        admissions, by_subject, adm_info = {}, {}, {}
        for r in adm_rows:
            hadm, sub = mx.to_int(r["hadm_id"]), mx.to_int(r["subject_id"])
            try:
                admit, disch = mx.parse_time(r["admittime"]), _time_or_nan(r["dischtime"])
            except ValueError:
                counts["admissions"].bad_row(f"hadm_id {r['hadm_id']}: admittime "
                                             f"{r['admittime']!r} is not a date-time")
                continue
            if hadm is None or sub is None:
                counts["admissions"].bad_row(f"ids {r['subject_id']!r}/{r['hadm_id']!r}")
                continue
            flag = mx.to_float(r["flag"])
            a = mx.Admission(hadm, admit, disch, flag if flag in (0.0, 1.0) else math.nan)
            admissions[hadm] = a
            by_subject.setdefault(sub, []).append(a)
            adm_info[hadm] = (r["admittime"][:4], r["insurance"], r["race"])
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
            stay_id, sub, hadm = ids
            p = pats.get(r["subject_id"], {})
            year, ins, race = adm_info.get(hadm, ("", "", ""))
            age = mx.to_float(p.get("anchor_age", "")) + (
                mx.to_float(year) - mx.to_float(p.get("anchor_year", "")))
            stays.append(mx.Stay(stay_id, sub, hadm, tin, tout, age, mx.sex_name(
                p.get("gender", "")), mx.race_group(race), ins.strip() or "unknown",
                r["unit"]))
        return stays, admissions, by_subject

    def _cxr(self, windows: mx.Windows, stays, counts, warned):
        """Per view, the latest image of the stay's subject taken inside its EHR window."""
        rep = {"images_read": 0, "linked": {"cxr_frontal": 0, "cxr_lateral": 0},
               "outside_window": 0, "other_view": 0, "missing_files": 0,
               "missing_file_examples": []}
        if self.cxr is None:
            warned.append(mx.warn_absent("MIMIC-CXR-JPG (option cxr)",
                                         "cxr_frontal and cxr_lateral"))
            return {}, {}, rep
        t0 = time.perf_counter()
        path = mx.find_table(self.cxr, CXR_METADATA)
        table = mx.Table(path, CXR_METADATA)
        cols = {k: table.col(k) for k in ("dicom_id", "subject_id", "study_id", "ViewPosition",
                                          "StudyDate", "StudyTime")}
        c = counts[CXR_METADATA] = mx.TableCounts(path=str(path))
        best: dict[tuple[int, str], tuple[float, int, str, str]] = {}
        for row in table.well_formed_rows(c):
            sub = row[cols["subject_id"]]
            if sub not in windows.by_subject:
                continue
            view = row[cols["ViewPosition"]].strip().upper()
            if view in FRONTAL:
                mod, rank = "cxr_frontal", FRONTAL.index(view)
            elif view in LATERAL:
                mod, rank = "cxr_lateral", LATERAL.index(view)
            else:
                rep["other_view"] += 1
                continue
            try:
                t = _study_time(row[cols["StudyDate"]], row[cols["StudyTime"]])
            except ValueError as exc:
                c.bad(table, str(exc))
                continue
            s = windows.find(sub, t)
            if s < 0:
                rep["outside_window"] += s == -2
                continue
            rep["images_read"] += 1
            cand = (t, -rank, row[cols["study_id"]], row[cols["dicom_id"]])
            if (s, mod) not in best or cand > best[(s, mod)]:
                best[(s, mod)] = cand
        c.check(table)
        c.seconds = time.perf_counter() - t0
        cxr_split = self._cxr_split(counts)
        images: dict[str, dict[str, str]] = {}
        meta: dict[str, dict[str, Any]] = {}
        for (s, mod), (_, _, study, dicom) in sorted(best.items()):
            sub = str(stays[s].subject_id)
            p = self.cxr / "files" / f"p{sub[:2]}" / f"p{sub}" / f"s{study}" / f"{dicom}.jpg"
            if not p.is_file():
                rep["missing_files"] += 1
                if len(rep["missing_file_examples"]) < 5:
                    rep["missing_file_examples"].append(str(p))
                continue
            sid = str(stays[s].stay_id)
            images.setdefault(mod, {})[sid] = str(p)
            rep["linked"][mod] += 1
            m = meta.setdefault(sid, {})
            m[f"{mod}_study_id"] = int(study)
            if dicom in cxr_split:
                m[f"{mod}_cxr_split"] = cxr_split[dicom]
        return images, meta, rep

    def _cxr_split(self, counts) -> dict[str, str]:
        """dicom_id -> MIMIC-CXR's official split (meta only: our split is by patient)."""
        path = mx.find_table(self.cxr, CXR_SPLIT)
        if path is None:
            return {}
        rows = mx.read_small(path, CXR_SPLIT, {"dicom_id": ("dicom_id",), "split": ("split",)},
                             counts)
        return {r["dicom_id"]: r["split"] for r in rows}

    def _read_notes(self, windows: mx.Windows, stays, counts, warned) -> mx.Notes:
        notes = mx.Notes()
        files = self._notes()
        if files["radiology"] is None:
            warned.append(mx.warn_absent("MIMIC-IV-Note note/radiology.csv(.gz) (option note)",
                                         "radiology_note"))
        else:
            read_note_table(files["radiology"], "note/radiology", "radiology_note", windows,
                            notes, counts)
        if self.discharge:
            if files["discharge"] is None:
                warned.append(mx.warn_absent("MIMIC-IV-Note note/discharge.csv(.gz)",
                                             "discharge_note"))
            else:
                by_hadm = {s.hadm_id: i for i, s in enumerate(stays)}
                read_note_table(files["discharge"], "note/discharge", "discharge_note", windows,
                                notes, counts, by_hadm=by_hadm)
        return notes


def _time_or_nan(s: str) -> float:
    return mx.parse_time(s) if s.strip() else math.nan


def read_note_table(path: Path, label: str, modality: str, windows: mx.Windows,
                    notes: mx.Notes, counts, by_hadm: dict[int, int] | None = None) -> None:
    """Link MIMIC-IV-Note rows to stays: by subject and ``charttime`` inside the EHR window,
    or (``by_hadm``, discharge notes) by the stay's admission."""
    t0 = time.perf_counter()
    table = mx.Table(path, label)
    i_sub, i_hadm = table.col("subject_id"), table.col("hadm_id")
    i_time, i_text = table.col("charttime"), table.col("text")
    c = counts[label] = mx.TableCounts(path=str(path))
    for row in table.well_formed_rows(c):
        if by_hadm is not None:
            s = by_hadm.get(mx.to_int(row[i_hadm]) or -1, -1)
            if s >= 0:
                notes.add(s, modality, 0.0, row[i_text])
            continue
        if row[i_sub] not in windows.by_subject:
            continue
        mx.add_windowed_note(c, table, notes, windows, modality, row[i_sub], row[i_time],
                             row[i_text], "charttime")
    c.check(table)
    c.seconds = time.perf_counter() - t0


@hookimpl
def register_datasets(register):
    register("mimic4mm", Mimic4MM)
