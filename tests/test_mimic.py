"""The ``mimic4mm`` and ``mimic3`` dataset plugins on fixture folders in the published schemas
(written by :mod:`mimic_fixtures`): layouts, cohort rules, linking, variables, labels, the
patient split, the cache, absent sources, bad rows, and end-to-end training with an
external test on MIMIC-III."""

from __future__ import annotations

import gzip
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from medmix_datasets import _mimic as mx  # noqa: E402
from medmix_datasets.mimic3 import Mimic3  # noqa: E402
from medmix_datasets.mimic4mm import Mimic4MM  # noqa: E402
from mimic_fixtures import CASES, III_CASES, write_mimic3, write_mimic4  # noqa: E402

from medmix_core.errors import DataError  # noqa: E402


@pytest.fixture(scope="module", params=["3.1", "1.0"])
def iv(request, tmp_path_factory):
    """(source folders, built dataset) per MIMIC-IV layout."""
    root = tmp_path_factory.mktemp(f"iv{request.param}")
    src = write_mimic4(root, request.param)
    ds = _iv(src, root / "cache")
    return src, ds


@pytest.fixture(scope="module")
def iii(tmp_path_factory):
    root = tmp_path_factory.mktemp("iii")
    return write_mimic3(root), root


def _iv(src, cache, **opts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = Mimic4MM(str(src["mimic_iv"]), cxr=str(src["cxr"]), note=str(src["note"]),
                      cache_dir=str(cache), progress=False, **opts)
        ds.samples()
    return ds


def _by_id(ds):
    return {s.id: s for s in ds.samples()}


def _series(sample, name):
    ts = sample.modalities["ehr"]
    j = ts.variables.index(name)
    return ts.times[j].tolist(), ts.values[j].tolist()


# ----------------------------------------------------------------------------- cohort
def test_both_mimic4_layouts_are_detected_and_give_the_cohort(iv):
    src, ds = iv
    rep = ds.report()
    layout = rep["source"]["mimic_iv"]["layout"]
    assert layout.startswith("1.0") == ("1.0" in str(src["mimic_iv"]))
    assert rep["cohort"]["icu_stays_read"] == 43
    assert rep["cohort"]["excluded"] == {"bad_times": 0, "no_admission": 0, "under_age": 1,
                                         "not_first_in_admission": 1, "short_stay": 1}
    assert rep["cohort"]["n_stays"] == len(ds.samples()) == 40
    ids = _by_id(ds)
    for kept in ("died", "readmitted", "readmission_stay", "first_of_two"):
        assert str(CASES[kept]) in ids
    for dropped in ("second_of_two", "child", "short"):
        assert str(CASES[dropped]) not in ids
    assert [m.name for m in ds.modalities()] == ["cxr_frontal", "cxr_lateral", "ehr",
                                                 "radiology_note"]
    assert len(ds.modalities()[2].variables) == 46
    assert Mimic4MM.attributes == ("sex", "age_band", "race", "insurance")


def test_all_stays_option_keeps_every_stay_of_an_admission(iv, tmp_path):
    src, _ = iv
    ds = _iv(src, tmp_path, stays="all")
    assert str(CASES["second_of_two"]) in _by_id(ds)
    assert ds.report()["cohort"]["excluded"]["not_first_in_admission"] == 0


def test_task_labels_follow_their_definitions(iv):
    ids = _by_id(iv[1])
    died = ids[str(CASES["died"])].labels
    assert died["mortality"] == 1.0 and died["los7"] == 0.0
    assert math.isnan(died["readmission30"])  # death in hospital: no readmission possible
    first = ids[str(CASES["readmitted"])].labels
    assert first == {"mortality": 0.0, "los7": 1.0, "readmission30": 1.0}
    again = ids[str(CASES["readmission_stay"])].labels
    assert again == {"mortality": 0.0, "los7": 0.0, "readmission30": 0.0}
    assert ids[str(CASES["first_of_two"])].labels["readmission30"] == 0.0  # 35 days later
    labels = iv[1].report()["labels"]
    assert labels["mortality"]["positive"] + labels["mortality"]["negative"] == 40
    assert labels["readmission30"]["unknown"] == labels["mortality"]["positive"]


def test_meta_carries_ids_and_the_stratification_attributes(iv):
    s = _by_id(iv[1])[str(CASES["died"])]
    assert (s.meta["subject_id"], s.meta["hadm_id"], s.meta["stay_id"]) == (
        10000001, 20000001, 30000001)
    assert {k: s.meta[k] for k in mx.ATTRIBUTES} == {
        "sex": "female", "age_band": "60-79", "race": "black", "insurance": "Medicaid"}


# ----------------------------------------------------------------------------- variables
def test_variables_are_converted_cleaned_and_windowed(iv):
    s = _by_id(iv[1])[str(CASES["died"])]
    assert _series(s, "heart_rate") == ([1.0], [80.0])  # 0 bpm implausible, 50 h outside
    t, v = _series(s, "temperature")
    assert t == [2.0] and v[0] == pytest.approx(37.0)  # 98.6 degF
    assert _series(s, "fio2") == ([6.0], [0.4])  # 40 %
    assert _series(s, "gcs_verbal") == ([7.0], [4.0])  # "No Response-ETT" is not a score
    assert _series(s, "sbp_art") == ([8.0], [131.0])  # 225309 "ART BP Systolic"
    assert _series(s, "creatinine") == ([5.0], [1.2])  # the pre-ICU draw is outside
    assert _series(s, "spo2") == ([], [])
    var = iv[1].report()["variables"]
    assert var["heart_rate"]["implausible"] == 1 and var["heart_rate"]["outside_window"] == 1
    assert var["spo2"]["non_numeric"] == 1 and var["creatinine"]["outside_window"] == 1
    assert var["gcs_verbal"]["not_assessable"] == 1 and var["gcs_verbal"]["kept"] >= 1
    assert s.modalities["ehr"].horizon == 48.0


def test_variables_option_selects_a_subset_and_rejects_unknown_names(iv, tmp_path):
    src, _ = iv
    ds = _iv(src, tmp_path, variables=["heart_rate", "lactate"])
    assert ds.modalities()[2].variables == ["heart_rate", "lactate"]
    s = _by_id(ds)[str(CASES["died"])]
    assert _series(s, "heart_rate") == ([1.0], [80.0])
    with pytest.raises(DataError, match="unknown variables.*'lactat'"):
        _iv(src, tmp_path, variables=["lactat"])


def test_the_variable_table_has_46_distinct_itemids():
    assert len(mx.VARIABLES) == 46
    for table in ("iv", "iii", "lab"):
        ids = [i for v in mx.VARIABLES
               for i in {"iv": v.chart_iv, "iii": v.carevue + v.chart_iv, "lab": v.lab}[table]]
        assert len(ids) == len(set(ids)), table
    assert all(v.chart_iv or v.lab for v in mx.VARIABLES)
    assert all(bool(v.chart_iv) == bool(v.carevue) for v in mx.VARIABLES)


@pytest.mark.parametrize("database", list(mx.DATABASES))
def test_every_variable_has_itemids_in_each_database_it_claims(database):
    # a variable claimed for MIMIC-III CareVue with only MetaVision ids would be empty for
    # every default (era="carevue") stay, silently
    claimed = [v for v in mx.VARIABLES if database in v.databases]
    assert len(claimed) == 46
    empty = [v.name for v in claimed if not mx.itemids(v, database)]
    assert not empty, f"{database}: variables without any itemid: {empty}"
    assert all(set(v.databases) <= set(mx.DATABASES) for v in mx.VARIABLES)
    # the check can fail: a charted variable without CareVue ids has none there
    only_iv = mx.Variable("x", "u", 0, 1, "vital", chart_iv=(220045,))
    assert mx.itemids(only_iv, "mimic_iii_carevue") == ()
    assert mx.itemids(only_iv, "mimic_iv") == (220045,)


def test_every_variable_names_its_sources_and_no_rule_is_stale():
    for v in mx.VARIABLES:
        assert v.verified, f"{v.name} names no source it was verified against"
        assert set(v.verified) <= set(mx.SOURCES), v.name
    known = {i for v in mx.VARIABLES for i in v.chart_iv + v.carevue + v.lab}
    # a conversion of an itemid no variable reads is the trace of a removed itemid
    assert set(mx.CONVERSIONS) <= known and set(mx.NOT_ASSESSABLE) <= known
    assert 3581 not in known  # "Present Weight (lb)": the pound part of a lb + oz pair
    items = mx.item_map(list(mx.VARIABLES), "iii")
    assert items["723"][2] == "1.0 ET/Trach" and items["3422"][1](50.0) == 0.5
    assert items["678"][1](212.0) == pytest.approx(100.0)  # degF -> degC
    assert items["920"][1](70.0) == pytest.approx(177.8)  # inch -> cm


# ----------------------------------------------------------------------------- linking
def test_cxr_views_and_radiology_notes_are_linked_inside_the_window(iv):
    ds = iv[1]
    ids = _by_id(ds)
    s = ids[str(CASES["died"])]
    # the latest frontal of the first 48 h (10 h), not the 1 h one nor the 100 h one
    assert Path(s.modalities["cxr_frontal"].views[0]).name == "d1-ap.jpg"
    assert Path(s.modalities["cxr_lateral"].views[0]).name == "d1-lat.jpg"
    assert s.meta["cxr_frontal_study_id"] == 50000001
    assert s.modalities["radiology_note"].text == "CHEST AP: new bilateral opacities."
    other = ids[str(CASES["readmitted"])]
    assert other.modalities["cxr_frontal"] is None  # listed, but the file is absent
    rep = ds.report()
    assert rep["cxr"]["missing_files"] == 1 and rep["cxr"]["outside_window"] == 1
    assert rep["notes"]["radiology_note"]["outside_window"] == 1
    assert 0 < rep["missing_rates"]["cxr_lateral"] < 1


def test_study_time_reads_dropped_leading_zeros():
    from medmix_datasets.mimic4mm import _study_time

    assert _study_time("21800506", "84013.500") - mx.parse_time("2180-05-06") == pytest.approx(
        8 + 40 / 60 + 13.5 / 3600)
    with pytest.raises(ValueError):
        _study_time("218005", "84013")


# ----------------------------------------------------------------------------- split, cache
def test_split_is_by_patient_seeded_and_stored(iv, tmp_path):
    src, ds = iv
    samples = ds.samples()
    parts = ds.splits(samples)
    subjects = {k: {samples[i].meta["subject_id"] for i in v} for k, v in parts.items()}
    assert not (subjects["train"] & subjects["val"] or subjects["train"] & subjects["test"]
                or subjects["val"] & subjects["test"])
    n = sum(len(v) for v in subjects.values())
    assert [round(len(subjects[k]) / n, 1) for k in ("train", "val", "test")] == [0.7, 0.1, 0.2]
    assert sorted(i for v in parts.values() for i in v) == list(range(len(samples)))
    # the two stays of the readmitted patient share a split
    ids = {s.id: i for i, s in enumerate(samples)}
    where = {k: set(v) for k, v in parts.items()}
    a, b = ids[str(CASES["readmitted"])], ids[str(CASES["readmission_stay"])]
    assert [k for k in where if a in where[k]] == [k for k in where if b in where[k]]
    stored = json.loads((ds.cache_folder() / "cohort.json").read_text())["split"]
    assert all(stored[str(samples[i].meta["subject_id"])] == k for k, v in parts.items()
               for i in v)
    other = _iv(src, tmp_path, split_seed=1)
    assert other.splits(other.samples()) != parts


def test_second_extraction_reads_the_cache_not_the_raw_tables(iv, monkeypatch):
    src, ds = iv
    folder = ds.cache_folder()
    assert (folder / "cohort.json").is_file() and (folder / "events.npz").is_file()

    def boom(*a, **k):
        raise AssertionError("raw tables were read again")

    monkeypatch.setattr(mx, "stream_events", boom)
    monkeypatch.setattr(mx, "read_small", boom)
    again = _iv(src, folder.parent)
    assert again.report()["cache"]["hit"] is True
    a, b = ds.samples(), again.samples()
    assert [s.id for s in a] == [s.id for s in b]
    assert [s.labels for s in a][:3] == [s.labels for s in b][:3]
    for x, y in zip(a, b):
        ex, ey = x.modalities["ehr"], y.modalities["ehr"]
        assert all(np.array_equal(p, q) for p, q in zip(ex.values, ey.values))
        assert (x.modalities["radiology_note"] is None) == (y.modalities["radiology_note"]
                                                            is None)


def test_a_damaged_cache_is_rebuilt(iv, tmp_path):
    src, _ = iv
    ds = _iv(src, tmp_path)
    (ds.cache_folder() / "events.npz").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="damaged"):
        again = Mimic4MM(str(src["mimic_iv"]), cxr=str(src["cxr"]), note=str(src["note"]),
                         cache_dir=str(tmp_path), progress=False)
        again.samples()
    assert len(again.samples()) == 40


# ----------------------------------------------------------------------------- sources, errors
def test_absent_sources_leave_their_modalities_missing_with_a_warning(tmp_path):
    src = write_mimic4(tmp_path, "3.1", n_filler=4)
    (src["mimic_iv"] / "hosp" / "labevents.csv.gz").unlink()
    with pytest.warns(UserWarning) as rec:
        ds = Mimic4MM(str(src["mimic_iv"]), cache_dir=str(tmp_path / "c"), progress=False)
        samples = ds.samples()
    text = " ".join(str(w.message) for w in rec)
    assert "MIMIC-CXR-JPG" in text and "radiology_note" in text and "labevents" in text
    assert all(s.modalities["cxr_frontal"] is None and s.modalities["radiology_note"] is None
               for s in samples)
    assert all(s.modalities["ehr"] is not None for s in samples)
    assert len(ds.report()["warnings"]) == 3
    assert ds.report()["missing_rates"]["cxr_lateral"] == 1.0


def test_bad_rows_are_counted_and_wrong_files_are_errors(tmp_path):
    src = write_mimic4(tmp_path, "3.1", n_filler=4)
    ds = Mimic4MM(str(src["mimic_iv"]), cxr=str(src["cxr"]), note=str(src["note"]),
                  cache=False, progress=False)
    tab = ds.report()["tables"]["icu/chartevents"]
    assert tab["malformed"] == 2 and "4 fields" in tab["examples"][0]
    # a chartevents without its itemid column is not chartevents
    bad = src["mimic_iv"] / "icu" / "chartevents.csv.gz"
    with gzip.open(bad, "wt") as fh:
        fh.write("subject_id,hadm_id,stay_id,charttime,value\n1,2,3,2150-01-01 00:00:00,4\n")
    with pytest.raises(DataError, match="no column itemid"):
        Mimic4MM(str(src["mimic_iv"]), cache=False, progress=False).samples()
    # mostly malformed rows: the wrong file
    with gzip.open(bad, "wt") as fh:
        fh.write(",".join(["subject_id", "hadm_id", "stay_id", "caregiver_id", "charttime",
                           "storetime", "itemid", "value", "valuenum", "valueuom", "warning"]))
        fh.write("\n" + "x,y\n" * 30)
    with pytest.raises(DataError, match="30 of 30 rows"):
        Mimic4MM(str(src["mimic_iv"]), cache=False, progress=False).samples()


def test_source_and_option_errors_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="needs a source"):
        Mimic4MM()
    with pytest.raises(DataError, match="source"):
        Mimic3()
    with pytest.raises(DataError, match="not a folder"):
        Mimic4MM(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a MIMIC-IV folder.*hosp/patients"):
        Mimic4MM(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="not a MIMIC-III"):
        Mimic3(str(tmp_path / "empty"))
    src = write_mimic4(tmp_path, "3.1", n_filler=2)
    with pytest.raises(DataError, match="unknown option.*'windw_hours'"):
        Mimic4MM(str(src["mimic_iv"]), windw_hours=24)
    with pytest.raises(DataError, match="stays='last'"):
        Mimic4MM(str(src["mimic_iv"]), stays="last")
    with pytest.raises(DataError, match="cxr=.*not a folder"):
        Mimic4MM(str(src["mimic_iv"]), cxr=str(tmp_path / "nocxr"))
    with pytest.raises(DataError, match="no mimic-cxr-2.0.0-metadata"):
        Mimic4MM(str(src["mimic_iv"]), cxr=str(src["note"]))
    with pytest.raises(DataError, match="wrong type"):
        Mimic4MM(str(src["mimic_iv"]), window_hours="48")


# ----------------------------------------------------------------------------- MIMIC-III
def test_mimic3_cohort_variables_and_notes(iii, tmp_path):
    path, _ = iii
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = Mimic3(str(path), cache_dir=str(tmp_path), progress=False)
        ids = _by_id(ds)
    assert [m.name for m in ds.modalities()] == ["ehr", "radiology_note", "clinical_note"]
    assert str(III_CASES["metavision"]) not in ids  # era="carevue": no overlap with MIMIC-IV
    s = ids[str(III_CASES["carevue_died"])]
    assert s.labels["mortality"] == 1.0 and math.isnan(s.labels["readmission30"])
    assert s.meta["age_band"] == "80+" and s.meta["age"] == 90.0 and s.meta["era"] == "carevue"
    assert _series(s, "heart_rate") == ([1.0, 6.0], [80.0, 84.0])  # ERROR=1 row dropped
    assert _series(s, "temperature")[1][0] == pytest.approx(37.0)
    assert _series(s, "gcs_verbal") == ([8.0], [4.0])  # "1.0 ET/Trach" is not a score
    assert _series(s, "fio2") == ([9.0], [0.5])  # 3422 "FIO2 [Meas]", 50 %
    assert s.modalities["radiology_note"].text == "CHEST (PORTABLE AP): effusion."
    assert s.modalities["clinical_note"].text == "Pt sedated, on pressors."
    rep = ds.report()
    assert rep["variables"]["heart_rate"]["error_flag"] == 1
    assert rep["variables"]["gcs_verbal"]["not_assessable"] == 1
    assert rep["cohort"]["excluded"]["era_overlaps_mimic_iv"] == 1
    assert rep["notes"]["clinical_note"] == {"linked": 16, "iserror": 1,
                                             "discharge_summary_excluded": 1}
    assert rep["tables"]["CHARTEVENTS"]["malformed"] == 1
    assert rep["labels"]["readmission30"]["positive"] > 0
    everything = Mimic3(str(path), era="all", cache_dir=str(tmp_path), progress=False)
    mv = _by_id(everything)[str(III_CASES["metavision"])]
    assert _series(mv, "heart_rate") == ([1.0], [88.0])  # a MetaVision itemid
    with pytest.raises(DataError, match="era='2008'"):
        Mimic3(str(path), era="2008")


def test_mimic4mm_reads_a_mimic3_source_into_its_own_modalities(iii, tmp_path):
    path, _ = iii
    with pytest.warns(UserWarning, match="cxr_frontal"):
        ds = Mimic4MM(str(path), cache_dir=str(tmp_path), progress=False)
        samples = ds.samples()
    assert [m.name for m in ds.modalities()] == ["cxr_frontal", "cxr_lateral", "ehr",
                                                 "radiology_note"]
    assert all(s.modalities["cxr_frontal"] is None for s in samples)
    assert sum(s.modalities["radiology_note"] is not None for s in samples) == 16
    assert set(samples[0].modalities) == {"cxr_frontal", "cxr_lateral", "ehr", "radiology_note"}


# ----------------------------------------------------------------------------- end to end
def _run(tmp_path, name, dataset, source, options, external=None, **extra):
    from medmix_core.config import RunConfig
    from medmix_core.runner import run

    cfg = RunConfig(**extra,dataset=dataset, source=str(source), dataset_options=options,
                    experts=["stats"], epochs=2, seeds=1, bootstrap=0, progress=False,
                    device="cpu", store=str(tmp_path / f"store-{name}"),
                    out=str(tmp_path / f"run-{name}"),
                    external_test=None if external is None else str(external))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run(cfg, log=lambda *a: None)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["3.1", "1.0"])
def test_train_on_mimic4mm_and_test_externally_on_mimic3(layout, tmp_path):
    src = write_mimic4(tmp_path / "iv", layout, n_filler=76)  # 80 stays: both classes in test
    m3 = write_mimic3(tmp_path / "iii")
    opts = {"cxr": str(src["cxr"]), "note": str(src["note"]),
            "cache_dir": str(tmp_path / "cache"), "progress": False}
    metrics = _run(tmp_path, layout, "mimic4mm", src["mimic_iv"], opts, external=m3)
    assert metrics["task"] == "mortality" and metrics["modalities"] == ["ehr"]
    assert metrics["n_test"] == len(Mimic4MM(str(src["mimic_iv"]), **opts).splits(
        Mimic4MM(str(src["mimic_iv"]), **opts).samples())["test"])
    assert 0.0 <= metrics["test"]["auroc"]["mean"] <= 1.0
    ext = metrics["external"]
    assert ext["auroc"]["mean"] is not None and 0.0 <= ext["auroc"]["mean"] <= 1.0
    rows = (Path(metrics["out"]) / "external_predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 31  # every CareVue stay of the MIMIC-III fixture


@pytest.mark.slow
def test_external_test_read_by_the_mimic3_plugin(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMIX_CACHE_DIR", str(tmp_path / "medmix-cache"))
    src = write_mimic4(tmp_path / "iv", "3.1", n_filler=76)
    m3 = write_mimic3(tmp_path / "iii")
    metrics = _run(tmp_path, "ext3", "mimic4mm", src["mimic_iv"], {"progress": False},
                   external=m3, external_dataset="mimic3")
    assert metrics["modalities"] == ["ehr"]
    assert 0.0 <= metrics["external"]["auroc"]["mean"] <= 1.0
    assert (tmp_path / "medmix-cache" / "mimic3").is_dir()  # the default cache root


@pytest.mark.slow
def test_train_on_mimic3(iii, tmp_path):
    path, _ = iii
    metrics = _run(tmp_path, "iii", "mimic3", path,
                   {"cache_dir": str(tmp_path / "cache"), "progress": False})
    assert metrics["modalities"] == ["ehr"] and metrics["n_test"] > 0


def test_the_docs_variable_table_is_the_code_table():
    import re

    page = (Path(__file__).parents[1] / "docs" / "data" / "mimic4mm.md").read_text("utf-8")
    cell = r" \| ([^|]+)"
    rows = re.findall(r"^\| (\d+) \| `(\w+)`" + cell * 2 + cell * 3 + cell + r" \|$", page,
                      flags=re.MULTILINE)
    assert [r[1] for r in rows] == [v.name for v in mx.VARIABLES]

    def ids(cell):
        return tuple(int(x) for x in re.findall(r"\b(\d{2,6})\b(?![^(]*\))", cell))

    def num(x):
        return float(x.strip().replace("\u2212", "-"))

    for (_, name, unit, rng, iv_ids, cv_ids, lab_ids, verified), v in zip(rows, mx.VARIABLES):
        assert unit.strip() == v.unit, name
        lo, hi = rng.split(" \u2013 ")
        assert (num(lo), num(hi)) == (v.low, v.high), name
        assert (ids(iv_ids), ids(cv_ids), ids(lab_ids)) == (v.chart_iv, v.carevue, v.lab), name
        assert tuple(re.findall(r"[\w-]+", verified)) == v.verified, name
    # the legend of the source keys names the repository and path of each
    for key, where in mx.SOURCES.items():
        repo, path = where.split(" ", 1)
        assert re.search(rf"^\| `{key}` \| {re.escape(repo)} \| `{re.escape(path)}` \|", page,
                         flags=re.MULTILINE), key
