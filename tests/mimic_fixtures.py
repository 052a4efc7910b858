"""Small MIMIC-IV / MIMIC-CXR-JPG / MIMIC-IV-Note / MIMIC-III folders in the published schemas.

Column names, order, upper/lower case, date formats, gzip and folder layouts follow the
official releases (MIMIC-IV 1.0 with ``core/`` and 2.x/3.x with ``hosp/`` + ``icu/``;
MIMIC-CXR-JPG 2.0.0 ``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg``; MIMIC-III v1.4 upper case).
The values are invented. A few hand-made patients carry the cases the tests check
(:data:`CASES`); ``n_filler`` random stays make a cohort large enough to train on.
"""

from __future__ import annotations

import csv
import gzip
import io
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

T0 = datetime(2150, 1, 1)
CXR_JPEG = sorted((Path(__file__).parent / "fixtures" / "cxr").glob("*.jpeg"))[0]

#: what the hand-made MIMIC-IV patients are for (stay ids as the tests use them)
CASES = {
    "died": 30000001,          # in-hospital death; F-to-C, implausible, window, CXR, note
    "readmitted": 30000002,    # 8-day ICU stay, readmitted 10 days after discharge
    "readmission_stay": 30000003,
    "first_of_two": 30000004,  # two ICU stays in one admission: the second is dropped
    "second_of_two": 30000005,
    "child": 30000006,         # 16 years old: excluded
    "short": 30000007,         # 20-hour stay: excluded
}

IV_COLS = {
    "patients": "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod",
    "admissions_3": ("subject_id,hadm_id,admittime,dischtime,deathtime,admission_type,"
                     "admit_provider_id,admission_location,discharge_location,insurance,"
                     "language,marital_status,race,edregtime,edouttime,hospital_expire_flag"),
    "admissions_1": ("subject_id,hadm_id,admittime,dischtime,deathtime,admission_type,"
                     "admission_location,discharge_location,insurance,language,marital_status,"
                     "ethnicity,edregtime,edouttime,hospital_expire_flag"),
    "icustays": "subject_id,hadm_id,stay_id,first_careunit,last_careunit,intime,outtime,los",
    "chartevents_3": ("subject_id,hadm_id,stay_id,caregiver_id,charttime,storetime,itemid,"
                      "value,valuenum,valueuom,warning"),
    "chartevents_1": ("subject_id,hadm_id,stay_id,charttime,storetime,itemid,value,valuenum,"
                      "valueuom,warning"),
    "labevents_3": ("labevent_id,subject_id,hadm_id,specimen_id,itemid,order_provider_id,"
                    "charttime,storetime,value,valuenum,valueuom,ref_range_lower,"
                    "ref_range_upper,flag,priority,comments"),
    "labevents_1": ("labevent_id,subject_id,hadm_id,specimen_id,itemid,charttime,storetime,"
                    "value,valuenum,valueuom,ref_range_lower,ref_range_upper,flag,priority,"
                    "comments"),
    "transfers": "subject_id,hadm_id,transfer_id,eventtype,careunit,intime,outtime",
}
CXR_META_COLS = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,"
                 "Rows,Columns,StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,"
                 "ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning")
CHEXPERT = ("subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged "
            "Cardiomediastinum,Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,"
            "Pleural Other,Pneumonia,Pneumothorax,Support Devices")
NOTE_COLS = "note_id,subject_id,hadm_id,note_type,note_seq,charttime,storetime,text"
III_COLS = {
    "PATIENTS": "ROW_ID,SUBJECT_ID,GENDER,DOB,DOD,DOD_HOSP,DOD_SSN,EXPIRE_FLAG",
    "ADMISSIONS": ("ROW_ID,SUBJECT_ID,HADM_ID,ADMITTIME,DISCHTIME,DEATHTIME,ADMISSION_TYPE,"
                   "ADMISSION_LOCATION,DISCHARGE_LOCATION,INSURANCE,LANGUAGE,RELIGION,"
                   "MARITAL_STATUS,ETHNICITY,EDREGTIME,EDOUTTIME,DIAGNOSIS,"
                   "HOSPITAL_EXPIRE_FLAG,HAS_CHARTEVENTS_DATA"),
    "ICUSTAYS": ("ROW_ID,SUBJECT_ID,HADM_ID,ICUSTAY_ID,DBSOURCE,FIRST_CAREUNIT,LAST_CAREUNIT,"
                 "FIRST_WARDID,LAST_WARDID,INTIME,OUTTIME,LOS"),
    "CHARTEVENTS": ("ROW_ID,SUBJECT_ID,HADM_ID,ICUSTAY_ID,ITEMID,CHARTTIME,STORETIME,CGID,VALUE,"
                    "VALUENUM,VALUEUOM,WARNING,ERROR,RESULTSTATUS,STOPPED"),
    "LABEVENTS": "ROW_ID,SUBJECT_ID,HADM_ID,ITEMID,CHARTTIME,VALUE,VALUENUM,VALUEUOM,FLAG",
    "NOTEEVENTS": ("ROW_ID,SUBJECT_ID,HADM_ID,CHARTDATE,CHARTTIME,STORETIME,CATEGORY,"
                   "DESCRIPTION,CGID,ISERROR,TEXT"),
}


def ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S")


def h(hours: float) -> timedelta:
    return timedelta(hours=hours)


class _Writer:
    """CSV rows to ``.csv`` or ``.csv.gz``; quoting as the published files (minimal)."""

    def __init__(self, path: Path, header: str, gz: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path.with_name(path.name + (".csv.gz" if gz else ".csv"))
        raw = gzip.open(self.path, "wb", compresslevel=1) if gz else open(self.path, "wb")
        self.fh = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        self.w = csv.writer(self.fh, lineterminator="\n")
        self.n = len(header.split(","))
        self.fh.write(header + "\n")

    def row(self, *cells) -> None:
        assert len(cells) == self.n, (self.path, cells)
        self.w.writerow(["" if c is None else c for c in cells])

    def raw(self, line: str) -> None:
        self.fh.write(line + "\n")

    def close(self) -> None:
        self.fh.close()


# --------------------------------------------------------------------------- the world
def _world(n_filler: int, seed: int) -> dict:
    """Patients, admissions, stays and events of the MIMIC-IV fixture (times as datetimes)."""
    rng = np.random.default_rng(seed)
    W = {"patients": [], "admissions": [], "stays": [], "chart": [], "labs": [], "cxr": [],
         "notes": [], "discharge": []}

    def patient(sub, sex, age):
        W["patients"].append((sub, sex, age, 2150, "2014 - 2016", None))

    def admission(sub, hadm, admit, disch, died, race="WHITE", ins="Medicare"):
        W["admissions"].append((sub, hadm, admit, disch, disch if died else None, race, ins,
                                int(died)))

    def stay(sub, hadm, sid, tin, hours):
        W["stays"].append((sub, hadm, sid, tin, tin + h(hours)))

    def chart(sub, hadm, sid, t, item, value, num=None, uom=""):
        W["chart"].append((sub, hadm, sid, t, item, value, value if num is None else num, uom))

    def lab(sub, hadm, t, item, value, uom="mg/dL"):
        W["labs"].append((sub, hadm, t, item, value, value, uom))

    # died: 65 F, death in hospital, ICU 72 h
    a = T0
    patient(10000001, "F", 65)
    admission(10000001, 20000001, a, a + h(120), True, "BLACK/AFRICAN AMERICAN", "Medicaid")
    tin = a + h(2)
    stay(10000001, 20000001, 30000001, tin, 72)
    chart(10000001, 20000001, 30000001, tin + h(1), 220045, 80, uom="bpm")
    chart(10000001, 20000001, 30000001, tin + h(2), 223761, 98.6, uom="°F")
    chart(10000001, 20000001, 30000001, tin + h(3), 220045, 0, uom="bpm")  # implausible
    chart(10000001, 20000001, 30000001, tin + h(50), 220045, 90, uom="bpm")  # after 48 h
    chart(10000001, 20000001, 30000001, tin + h(4), 223900, "No Response-ETT", 1)  # no score
    chart(10000001, 20000001, 30000001, tin + h(7), 223900, "Confused", 4)
    chart(10000001, 20000001, 30000001, tin + h(8), 225309, 131, uom="mmHg")  # ART BP
    chart(10000001, 20000001, 30000001, tin + h(5), 220277, "___", "", uom="%")
    chart(10000001, 20000001, 30000001, tin + h(6), 223835, 40, uom="%")  # FiO2 -> 0.40
    lab(10000001, 20000001, tin + h(5), 50912, 1.2)
    lab(10000001, None, tin - h(1), 50912, 1.5)  # before intime (ED): outside the window
    W["cxr"] += [("d1-ap", 10000001, 50000001, "AP", tin + h(10), True),
                 ("d1-lat", 10000001, 50000001, "LATERAL", tin + h(10), True),
                 ("d1-ap-early", 10000001, 50000003, "AP", tin + h(1), True),
                 ("d1-pa-late", 10000001, 50000002, "PA", tin + h(100), True)]
    W["notes"] += [(10000001, 20000001, tin + h(10), "CHEST AP: new bilateral opacities."),
                   (10000001, 20000001, tin + h(100), "LATE REPORT outside the window.")]
    W["discharge"] += [(10000001, 20000001, a + h(120), "Discharge: patient expired.")]

    # readmitted: 50 M, 8-day ICU stay, back 10 days after discharge
    a = T0 + timedelta(days=60)
    patient(10000002, "M", 50)
    admission(10000002, 20000002, a, a + h(240), False, "WHITE", "Private")
    stay(10000002, 20000002, 30000002, a + h(1), 192)
    chart(10000002, 20000002, 30000002, a + h(2), 220045, 100, uom="bpm")
    W["cxr"] += [("d2-pa-nofile", 10000002, 50000010, "PA", a + h(5), False)]
    admission(10000002, 20000003, a + h(480), a + h(600), False, "WHITE", "Private")
    stay(10000002, 20000003, 30000003, a + h(481), 60)
    chart(10000002, 20000003, 30000003, a + h(482), 220045, 95, uom="bpm")

    # two ICU stays in one admission; a readmission 35 days later does not count
    a = T0 + timedelta(days=120)
    patient(10000003, "M", 70)
    admission(10000003, 20000004, a, a + h(240), False, "HISPANIC OR LATINO", "Medicare")
    stay(10000003, 20000004, 30000004, a + h(1), 72)
    stay(10000003, 20000004, 30000005, a + h(120), 72)
    chart(10000003, 20000004, 30000004, a + h(3), 220045, 70, uom="bpm")
    admission(10000003, 20000005, a + h(240 + 35 * 24), a + h(240 + 37 * 24), False)

    # a child and a short stay, both excluded
    a = T0 + timedelta(days=180)
    patient(10000004, "F", 16)
    admission(10000004, 20000006, a, a + h(200), False)
    stay(10000004, 20000006, 30000006, a + h(1), 100)
    patient(10000005, "M", 40)
    admission(10000005, 20000007, a, a + h(200), False)
    stay(10000005, 20000007, 30000007, a + h(1), 20)

    # fillers: one admission and stay each, outcome tied to the heart rate
    for k in range(n_filler):
        sub, hadm, sid = 10001000 + k, 21000000 + k, 31000000 + k
        a = T0 + timedelta(days=200 + 3 * k)
        died = bool(rng.random() < 0.35)
        patient(sub, "F" if k % 2 else "M", int(rng.integers(20, 90)))
        hours = float(rng.uniform(50, 300))
        admission(sub, hadm, a, a + h(hours + 48), died,
                  ["WHITE", "BLACK/AFRICAN AMERICAN", "ASIAN", "OTHER"][k % 4],
                  ["Medicare", "Private", "Medicaid"][k % 3])
        tin = a + h(2)
        stay(sub, hadm, sid, tin, hours)
        base = 110 if died else 75
        for j in range(12):
            t = tin + h(4 * j + float(rng.uniform(0, 1)))
            chart(sub, hadm, sid, t, 220045, round(base + rng.normal(0, 8), 1), uom="bpm")
            chart(sub, hadm, sid, t, 220179, round(120 - (25 if died else 0)
                                                   + rng.normal(0, 10)), uom="mmHg")
            chart(sub, hadm, sid, t, 223762, round(37 + rng.normal(0, 0.5), 1), uom="°C")
        for j in range(3):
            t = tin + h(8 * j + 1)
            lab(sub, hadm, t, 50813, round((4.0 if died else 1.2) + rng.uniform(0, 1), 1),
                "mmol/L")
            lab(sub, hadm, t, 50983, int(rng.integers(132, 146)), "mEq/L")
        if k % 2 == 0:
            W["cxr"].append((f"f{k}-pa", sub, 52000000 + k, "PA", tin + h(6), True))
            W["notes"].append((sub, hadm, tin + h(6), f"PA chest radiograph {k}: "
                               + ("diffuse opacities" if died else "lungs are clear")))
        if k % 3 == 0:
            W["cxr"].append((f"f{k}-ll", sub, 52000000 + k, "LL", tin + h(6), True))
    return W


# --------------------------------------------------------------------------- MIMIC-IV
def write_mimic4(root: str | Path, layout: str = "3.1", n_filler: int = 36, seed: int = 0,
                 gz: bool | None = None, extra_chart_rows: int = 0) -> dict[str, Path]:
    """Write MIMIC-IV (in ``layout`` "1.0" or "3.1"), MIMIC-CXR-JPG and MIMIC-IV-Note.

    Args:
        layout: "1.0" (core/, hosp/, icu/; plain CSV by default) or "3.1" (hosp/, icu/;
            gzipped by default).
        extra_chart_rows: rows of an itemid outside the 46 variables appended to
            chartevents (the bulk of a real chartevents; for the streaming benchmark).
    Returns:
        {"mimic_iv", "cxr", "note"}: the three source folders.
    """
    root = Path(root)
    W = _world(n_filler, seed)
    v1 = layout.startswith("1")
    gz = (not v1) if gz is None else gz
    iv = root / "mimiciv" / layout
    base = iv / ("core" if v1 else "hosp")
    w = _Writer(base / "patients", IV_COLS["patients"], gz)
    for p in W["patients"]:
        w.row(*p)
    w.close()
    w = _Writer(base / "admissions", IV_COLS["admissions_1" if v1 else "admissions_3"], gz)
    for sub, hadm, admit, disch, death, race, ins, flag in W["admissions"]:
        cells = [sub, hadm, ts(admit), ts(disch), ts(death) if death else "", "EW EMER."]
        if not v1:
            cells.append("P12345")
        cells += ["EMERGENCY ROOM", "DIED" if flag else "HOME", ins, "ENGLISH", "MARRIED",
                  race, "", "", flag]
        w.row(*cells)
    w.close()
    if v1:
        w = _Writer(iv / "core" / "transfers", IV_COLS["transfers"], gz)
        for n, (sub, hadm, _sid, tin, tout) in enumerate(W["stays"]):
            w.row(sub, hadm, 39000000 + n, "admit", "Medical Intensive Care Unit (MICU)",
                  ts(tin), ts(tout))
        w.close()
    w = _Writer(iv / "icu" / "icustays", IV_COLS["icustays"], gz)
    for sub, hadm, sid, tin, tout in W["stays"]:
        w.row(sub, hadm, sid, "Medical Intensive Care Unit (MICU)",
              "Medical Intensive Care Unit (MICU)", ts(tin), ts(tout),
              round((tout - tin).total_seconds() / 86400, 4))
    w.close()
    w = _Writer(iv / "icu" / "chartevents", IV_COLS["chartevents_1" if v1 else "chartevents_3"],
                gz)
    for sub, hadm, sid, t, item, value, num, uom in W["chart"]:
        cells = [sub, hadm, sid] + ([] if v1 else [7000]) + [ts(t), ts(t + h(0.2)), item, value,
                                                            num, uom, 0]
        w.row(*cells)
    # a malformed row and a row whose time does not parse
    w.raw("10000001,20000001,30000001,garbage")
    bad = [10000001, 20000001, 30000001] + ([] if v1 else [7000]) + [
        "not-a-time", "", 220045, 77, 77, "bpm", 0]
    w.row(*bad)
    first = W["stays"][0]
    for k in range(extra_chart_rows):
        cells = [first[0], first[1], first[2]] + ([] if v1 else [7000]) + [
            ts(first[3] + h(k % 40)), "", 220048, "SR (Sinus Rhythm)", "", "", 0]
        w.row(*cells)
    w.close()
    w = _Writer(iv / "hosp" / "labevents", IV_COLS["labevents_1" if v1 else "labevents_3"], gz)
    for n, (sub, hadm, t, item, value, num, uom) in enumerate(W["labs"]):
        cells = [n + 1, sub, hadm, 90000000 + n, item] + ([] if v1 else ["P1"]) + [
            ts(t), ts(t + h(1)), value, num, uom, "", "", "", "ROUTINE",
            "comment, with a comma\nand a new line"]
        w.row(*cells)
    w.close()
    return {"mimic_iv": iv, "cxr": _write_cxr(root, W), "note": _write_note(root, W)}


def _write_cxr(root: Path, W: dict) -> Path:
    cxr = root / "mimic-cxr-jpg" / "2.0.0"
    meta = _Writer(cxr / "mimic-cxr-2.0.0-metadata", CXR_META_COLS, True)
    split = _Writer(cxr / "mimic-cxr-2.0.0-split", "dicom_id,study_id,subject_id,split", True)
    chex = _Writer(cxr / "mimic-cxr-2.0.0-chexpert", CHEXPERT, True)
    studies = set()
    for dicom, sub, study, view, t, exists in W["cxr"]:
        # StudyTime is HHMMSS.fff with leading zeros dropped, as in the release
        stime = f"{int(t.strftime('%H%M%S'))}.{t.microsecond // 1000:03d}"
        meta.row(dicom, sub, study, "CHEST (PA AND LAT)", view, 3056, 2544, t.strftime("%Y%m%d"),
                 stime, "CHEST (PA AND LAT)", "postero-anterior", "Erect")
        split.row(dicom, study, sub, "train")
        if study not in studies:
            studies.add(study)
            chex.row(sub, study, *([""] * 13 + ["1.0"]))
        if exists:
            p = cxr / "files" / f"p{str(sub)[:2]}" / f"p{sub}" / f"s{study}" / f"{dicom}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(CXR_JPEG, p)
    for w in (meta, split, chex):
        w.close()
    return cxr


def _write_note(root: Path, W: dict) -> Path:
    note = root / "mimic-iv-note" / "2.2"
    for name, rows, kind in (("radiology", W["notes"], "RR"), ("discharge", W["discharge"], "DS")):
        w = _Writer(note / "note" / name, NOTE_COLS, True)
        for n, (sub, hadm, t, text) in enumerate(rows):
            w.row(f"{sub}-{kind}-{n}", sub, hadm, kind, n + 1, ts(t), ts(t + h(2)), text)
        w.close()
    return note


# --------------------------------------------------------------------------- MIMIC-III
#: hand-made MIMIC-III stays (ICUSTAY_ID)
III_CASES = {"carevue_died": 200001, "metavision": 200002}


def write_mimic3(root: str | Path, n_filler: int = 30, seed: int = 1,
                 gz: bool = True) -> Path:
    """Write a MIMIC-III v1.4 folder (upper-case tables) and return it."""
    rng = np.random.default_rng(seed)
    out = Path(root) / "mimiciii" / "1.4"
    W = {k: _Writer(out / k, v, gz) for k, v in III_COLS.items()}
    row_id = iter(range(1, 10 ** 9))

    def patient(sub, sex, dob):
        W["PATIENTS"].row(next(row_id), sub, sex, ts(dob), "", "", "", 0)

    def admission(sub, hadm, admit, disch, died, ins="Medicare", eth="WHITE"):
        W["ADMISSIONS"].row(next(row_id), sub, hadm, ts(admit), ts(disch),
                            ts(disch) if died else "", "EMERGENCY", "EMERGENCY ROOM ADMIT",
                            "DEAD/EXPIRED" if died else "HOME", ins, "ENGL", "CATHOLIC",
                            "MARRIED", eth, "", "", "SEPSIS", int(died), 1)

    def stay(sub, hadm, sid, db, tin, hours):
        W["ICUSTAYS"].row(next(row_id), sub, hadm, sid, db, "MICU", "MICU", 52, 52, ts(tin),
                          ts(tin + h(hours)), round(hours / 24, 4))

    def chart(sub, hadm, sid, t, item, value, num=None, error=0, uom=""):
        W["CHARTEVENTS"].row(next(row_id), sub, hadm, sid, item, ts(t), ts(t), 17000, value,
                             value if num is None else num, uom, 0, error, "", "")

    def lab(sub, hadm, t, item, value, uom="mg/dL"):
        W["LABEVENTS"].row(next(row_id), sub, hadm, item, ts(t), value, value, uom, "")

    def note(sub, hadm, t, cat, text, iserror=""):
        W["NOTEEVENTS"].row(next(row_id), sub, hadm, t.strftime("%Y-%m-%d"),
                            ts(t) if cat != "Discharge summary" else "", "", cat, "Report",
                            "", iserror, text)

    base = datetime(2130, 1, 1)
    # CareVue, died, 300-year-shifted DOB (older than 89)
    tin = base + h(2)
    patient(1, "F", base - timedelta(days=365 * 300))
    admission(1, 100001, base, base + h(120), True)
    stay(1, 100001, 200001, "carevue", tin, 72)
    chart(1, 100001, 200001, tin + h(1), 211, 80, uom="BPM")
    chart(1, 100001, 200001, tin + h(2), 678, 98.6, uom="Deg. F")
    chart(1, 100001, 200001, tin + h(3), 211, 250, error=1, uom="BPM")  # ERROR = 1
    chart(1, 100001, "", tin + h(6), 211, 84, uom="BPM")  # no ICUSTAY_ID: by time
    chart(1, 100001, 200001, tin + h(4), 723, "1.0 ET/Trach", 1)  # intubated: no score
    chart(1, 100001, 200001, tin + h(8), 723, "4 Confused", 4)
    chart(1, 100001, 200001, tin + h(9), 3422, 50, uom="%")  # FIO2 [Meas] -> 0.5
    lab(1, 100001, tin + h(5), 50912, 2.1)
    note(1, 100001, tin + h(10), "Radiology", "CHEST (PORTABLE AP): effusion.")
    note(1, 100001, tin + h(5), "Nursing", "Pt sedated, on pressors.")
    note(1, 100001, tin + h(7), "Nursing", "Wrong patient note.", iserror="1")
    note(1, 100001, base + h(120), "Discharge summary", "Patient expired.")
    # MetaVision (2008-2012): overlaps MIMIC-IV
    tin = base + timedelta(days=30)
    patient(2, "M", tin - timedelta(days=365 * 60))
    admission(2, 100002, tin - h(1), tin + h(200), False)
    stay(2, 100002, 200002, "metavision", tin, 80)
    chart(2, 100002, 200002, tin + h(1), 220045, 88, uom="bpm")
    for k in range(n_filler):
        sub, hadm, sid = 100 + k, 110000 + k, 210000 + k
        a = base + timedelta(days=60 + 3 * k)
        died = bool(rng.random() < 0.35)
        patient(sub, "F" if k % 2 else "M", a - timedelta(days=int(rng.integers(25, 85)) * 365))
        hours = float(rng.uniform(50, 300))
        admission(sub, hadm, a, a + h(hours + 48), died, ["Medicare", "Private"][k % 2],
                  ["WHITE", "BLACK/AFRICAN AMERICAN", "HISPANIC/LATINO - PUERTO RICAN"][k % 3])
        if k % 4 == 1 and not died:
            admission(sub, hadm + 5000, a + h(hours + 48 + 24 * 7), a + h(hours + 48 + 24 * 9),
                      False)
        tin = a + h(2)
        stay(sub, hadm, sid, "carevue", tin, hours)
        b = 110 if died else 75
        for j in range(12):
            t = tin + h(4 * j + float(rng.uniform(0, 1)))
            chart(sub, hadm, sid, t, 211, round(b + rng.normal(0, 8), 1), uom="BPM")
            chart(sub, hadm, sid, t, 455, round(120 - (25 if died else 0) + rng.normal(0, 10)))
            chart(sub, hadm, sid, t, 676, round(37 + rng.normal(0, 0.5), 1))
        for j in range(3):
            t = tin + h(8 * j + 1)
            lab(sub, hadm, t, 50813, round((4.0 if died else 1.2) + rng.uniform(0, 1), 1))
            lab(sub, hadm, t, 50983, int(rng.integers(132, 146)), "mEq/L")
        if k % 2 == 0:
            note(sub, hadm, tin + h(6), "Radiology", f"CHEST: {'edema' if died else 'clear'}")
            note(sub, hadm, tin + h(3), "Nursing", f"Nursing note {k}.")
    W["CHARTEVENTS"].raw("1,2,3")  # a malformed row
    for w in W.values():
        w.close()
    return out
