"""The ``mmist`` dataset on a tiny fixture in the MMIST-ccRCC layout, written here: CT
volumes named by TCIA Series Instance UID, pyramidal TIFF slides, a clinical table with
vital_status_12, the official split as train/val/test folders, and bad input of every kind
(an unreadable CT and slide, a file of no patient, a patient without a split, labels that
are unknown or malformed)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import registered
from medmix_datasets.mmist import MMIST, CTVolume, DicomSeries, dicom_series_to_array

from medmix_core import SlideData, TabularData, TextData
from medmix_core.errors import DataError
from medmix_core.plugins import get_dataset, registry

HAS_NIB = importlib.util.find_spec("nibabel") is not None
HAS_TIFF = importlib.util.find_spec("tifffile") is not None

#: id, split (None: no file anywhere), label cell, age, gender, stage, has CT, has WSI
PATIENTS = [
    ("TCGA-A3-3306", "train", "1", "61", "male", "Stage I", True, True),
    ("TCGA-A3-3307", "train", "0", "70", "female", "Stage IV", True, True),
    ("TCGA-B0-4688", "train", "1", "55", "male", "Stage II", True, False),
    ("TCGA-B0-5080", "train", "1", "", "female", "Stage III", False, True),
    ("C3L-00004", "train", "0", "66", "male", "Stage IV", True, True),
    ("C3L-00010", "train", "1", "59", "", "Stage I", True, True),
    ("C3N-00149", "train", "", "48", "female", "Stage I", True, True),
    ("C3N-00150", "val", "1", "72", "male", "Stage II", True, True),
    ("C3L-00026", "val", "maybe", "64", "female", "Stage III", True, True),
    ("TCGA-CJ-4634", "test", "0", "58", "male", "Stage IV", True, True),
    ("TCGA-CJ-4635", "test", "1", "67", "female", "Stage I", True, True),
    ("C3L-00999", None, "1", "50", "male", "Stage II", False, False),
]


def _uid(i: int) -> str:
    return f"1.3.6.1.4.1.14519.5.2.1.{1000 + i}"


def _write_ct(path_stem: Path, i: int) -> Path:
    vol = np.random.default_rng(i).uniform(-200, 300, size=(6, 24, 24)).astype(np.float32)
    if HAS_NIB:
        import nibabel as nib

        path = path_stem.with_name(path_stem.name + ".nii.gz")
        nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), np.eye(4)), str(path))
    else:
        path = path_stem.with_name(path_stem.name + ".npy")
        np.save(path, vol)
    return path


def _write_slide(path: Path, seed: int) -> None:
    import tifffile

    rng = np.random.default_rng(seed)
    a = (240 + rng.integers(0, 12, size=(256, 256, 3))).astype(np.uint8)
    a[64:192, 64:192] = np.stack([rng.integers(150, 210, (128, 128)),
                                  rng.integers(30, 80, (128, 128)),
                                  rng.integers(120, 190, (128, 128))], axis=2)
    half = a.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    with tifffile.TiffWriter(path) as tw:
        tw.write(a, tile=(64, 64), photometric="rgb", subifds=1, resolutionunit="CENTIMETER",
                 resolution=(1e4 / 0.25, 1e4 / 0.25))
        tw.write(half, tile=(64, 64), photometric="rgb", subfiletype=1,
                 resolutionunit="CENTIMETER", resolution=(1e4 / 0.5, 1e4 / 0.5))


def write_fixture(root: Path, slides: bool = True) -> Path:
    """The tiny cohort in the MMIST-ccRCC layout (see the module docstring)."""
    for sub in ("CT", "WSI", "Clinical"):
        for split in ("train", "val", "test"):
            (root / sub / split).mkdir(parents=True, exist_ok=True)
    with open(root / "clinical.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "age", "gender", "tumor_stage", "days_to_death",
                    "vital_status_12", "vital_status_24"])
        for pid, _, lab, age, sex, stage, *_ in PATIENTS:
            w.writerow([pid, age, sex, stage, "400" if lab == "0" else "", lab, lab])
    maps = {"TCGA.csv": [], "CPTAC.csv": []}
    for i, (pid, split, _, _, _, _, has_ct, has_wsi) in enumerate(PATIENTS):
        if split is None:
            continue
        (root / "Clinical" / split / f"{pid}.pt").write_bytes(b"\0")
        if has_ct:
            if pid == "C3L-00010":  # named by the patient, not by the series
                _write_ct(root / "CT" / split / pid, i)
            else:
                _write_ct(root / "CT" / split / f"{_uid(i)}_Gr{i % 4 + 1}", i)
                maps["TCGA.csv" if pid.startswith("TCGA") else "CPTAC.csv"].append((_uid(i), pid))
        if has_wsi and slides:
            name = f"{pid}-01Z-00-DX1.svs" if pid.startswith("TCGA") else f"{pid}-21.svs"
            _write_slide(root / "WSI" / split / name, i)
    for name, rows in maps.items():
        with open(root / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["Subject ID", "Series Instance UID", "Modality"])
            for uid, pid in rows:
                w.writerow([pid, uid, "CT"])
    # bad input: a CT of a mapped series that is not a volume, a slide that is not a TIFF,
    # a slide of no patient
    maps_row = ("C3N-00150", _uid(99))
    with open(root / "CPTAC.csv", "a", newline="") as fh:
        csv.writer(fh).writerow([maps_row[0], maps_row[1], "CT"])
    (root / "CT" / "val" / f"{_uid(99)}.nii.gz").write_bytes(b"not gzip at all")
    (root / "WSI" / "train" / "C3L-00004-22.svs").write_bytes(b"garbage" * 20)
    (root / "WSI" / "train" / "C3L-77777-21.svs").write_bytes(b"II*\x00")
    return root


needs_tiff = pytest.mark.skipif(not HAS_TIFF, reason="writing slides needs tifffile")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("mmist"), slides=HAS_TIFF)


def test_reads_the_official_layout(cohort):
    ds = get_dataset("mmist")(source=str(cohort))
    assert [m.name for m in ds.modalities()] == ["ct", "wsi", "clinical"]
    assert [(m.name, m.kind) for m in ds.modalities()][:2] == [("ct", "volume"), ("wsi", "slide")]
    assert [t.name for t in ds.tasks()] == ["vital_status_12"]
    samples = ds.samples()
    ids = [s.id for s in samples]
    assert ids == [p[0] for p in PATIENTS if p[1] is not None]  # C3L-00999 has no split
    by = {s.id: s for s in samples}
    splits = ds.splits(samples)
    assert [ids[i] for i in splits["val"]] == ["C3N-00150", "C3L-00026"]
    assert [ids[i] for i in splits["test"]] == ["TCGA-CJ-4634", "TCGA-CJ-4635"]
    assert len(splits["train"]) == 7
    # labels: 1/0 as published, empty and malformed are unknown
    y = {s.id: s.labels["vital_status_12"] for s in samples}
    assert y["TCGA-A3-3306"] == 1.0 and y["TCGA-A3-3307"] == 0.0
    assert np.isnan(y["C3N-00149"]) and np.isnan(y["C3L-00026"])
    # clinical: numbers, one-hot categories, the outcome columns left out
    var = ds.modalities()[2].variables
    assert var[:3] == ["age", "gender=female", "gender=male"] and "tumor_stage=Stage IV" in var
    assert not any(v.startswith(("days_to", "vital_status")) for v in var)
    clin = by["C3L-00010"].modalities["clinical"]
    assert isinstance(clin, TabularData)
    assert clin.values[0] == 59 and np.isnan(clin.values[1]) and np.isnan(clin.values[2])
    assert np.isnan(by["TCGA-B0-5080"].modalities["clinical"].values[0])  # age not recorded
    # CT through the series tables (grade suffix stripped) or named by the patient
    ct = by["TCGA-A3-3306"].modalities["ct"]
    assert isinstance(ct, CTVolume) and ct.n_slices == 16 and ct.hu_window == (-160.0, 240.0)
    assert Path(ct.volume).name.startswith(_uid(0))
    assert Path(by["C3L-00010"].modalities["ct"].volume).name.startswith("C3L-00010")
    assert by["TCGA-B0-5080"].modalities["ct"] is None
    rep = ds.report()
    assert rep["split_source"] == "folders" and rep["without_split"]["count"] == 1
    assert rep["labels"]["unknown"]["count"] == 1 and rep["labels"]["invalid"] == {
        "count": 1, "examples": ["C3L-00026: 'maybe'"]}
    assert rep["modalities"]["ct"]["unreadable"] == 1
    assert rep["unmatched_files"]["count"] == 1
    assert "days_to_death" in rep["excluded_columns"]
    assert rep["cohorts"] == {"TCGA-KIRC": 6, "CPTAC-CCRCC": 5, "other": 0}
    ident = ds.identity()
    assert ident["name"] == "mmist" and len(ident["clinical_sha256"]) == 64


@needs_tiff
def test_slides_are_matched_by_barcode_and_unreadable_ones_counted(cohort):
    ds = MMIST(str(cohort))
    by = {s.id: s for s in ds.samples()}
    wsi = by["TCGA-A3-3306"].modalities["wsi"]
    assert isinstance(wsi, SlideData) and Path(wsi.paths[0]).name == "TCGA-A3-3306-01Z-00-DX1.svs"
    assert [Path(v).name for v in by["C3L-00004"].modalities["wsi"].paths] == ["C3L-00004-21.svs"]
    assert by["TCGA-B0-4688"].modalities["wsi"] is None
    rep = ds.report()["modalities"]["wsi"]
    assert rep["unreadable"] == 1 and rep["unreadable_examples"] == ["WSI/train/C3L-00004-22.svs"]


def test_notes_split_file_and_options(tmp_path):
    root = write_fixture(tmp_path / "c", slides=False)
    with open(root / "notes.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["case_id", "text"], ["TCGA-A3-3306", "Clear cell RCC, G2."]])
    with open(root / "split.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "split"])
        for pid, *_ in PATIENTS:
            w.writerow([pid, "test" if pid.startswith("C3L") else "train"])
    ds = MMIST(str(root), split_file="split.csv", clinical_columns=["age"])
    assert [m.name for m in ds.modalities()] == ["ct", "wsi", "clinical", "notes"]
    samples = ds.samples()
    assert len(samples) == len(PATIENTS)  # the split file places C3L-00999 too
    by = {s.id: s for s in samples}
    assert by["TCGA-A3-3306"].modalities["notes"] == TextData("Clear cell RCC, G2.")
    assert by["TCGA-A3-3307"].modalities["notes"] is None
    test = [samples[i].id for i in ds.splits(samples)["test"]]
    assert test == [p[0] for p in PATIENTS if p[0].startswith("C3L")]
    assert ds.modalities()[2].variables == ["age"]


def test_bad_input_raises_clear_errors(tmp_path):
    with pytest.raises(DataError, match="source"):
        MMIST()
    with pytest.raises(DataError, match="not a folder"):
        MMIST(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="unknown option"):
        MMIST(str(tmp_path), splitfile="x.csv")
    root = write_fixture(tmp_path / "c", slides=False)
    (root / "clinical.csv").rename(root / "clin.csv")
    with pytest.raises(DataError, match="clinical table .*does not exist"):
        MMIST(str(root)).samples()
    assert len(MMIST(str(root), clinical_file="clin.csv").samples()) == 11
    with pytest.raises(DataError, match="label column 'os_12'"):
        MMIST(str(root), clinical_file="clin.csv", label_column="os_12").samples()
    # a patient in two splits
    _write_ct(root / "CT" / "test" / "TCGA-A3-3306", 0)
    with pytest.raises(DataError, match="more than one split.*TCGA-A3-3306"):
        MMIST(str(root), clinical_file="clin.csv").samples()


def test_without_any_recorded_split_the_seeded_split_is_used(tmp_path):
    root = tmp_path / "flat"
    (root / "CT").mkdir(parents=True)
    with open(root / "clinical.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Subject ID", "age", "vital_status_12"])
        for i in range(20):
            w.writerow([f"C3L-{i:05d}", 50 + i, i % 2])
    _write_ct(root / "CT" / "C3L-00003", 3)
    ds = MMIST(str(root))
    s = ds.samples()
    assert len(s) == 20 and ds.report()["split_source"].startswith("seeded")
    sp = ds.splits(s)
    assert sorted(sp["train"] + sp["val"] + sp["test"]) == list(range(20))
    assert s[3].modalities["ct"] is not None and s[4].modalities["ct"] is None


def test_dicom_series_is_converted_once_to_hu(tmp_path):
    pydicom = pytest.importorskip("pydicom", reason="DICOM series need pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = tmp_path / "series"
    folder.mkdir()
    raw = np.random.default_rng(0).integers(0, 2000, size=(4, 8, 8)).astype(np.int16)
    for k in range(4):  # written out of order: the z position decides
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 1, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.ImagePositionPatient = [0, 0, float(3 - k)]
        ds.InstanceNumber = k + 1
        ds.PixelData = raw[3 - k].tobytes()
        ds.save_as(str(folder / f"IM{k}.dcm"), enforce_file_format=True)
    np.testing.assert_array_equal(dicom_series_to_array(folder), raw.astype(np.float32) - 1024)
    vol = DicomSeries(folder, tmp_path / "cache", 16, (-160.0, 240.0))
    path = vol.volume
    assert Path(path).parent == tmp_path / "cache"
    np.testing.assert_array_equal(np.load(path), raw.astype(np.float32) - 1024)
    mtime = Path(path).stat().st_mtime_ns
    assert vol.volume == path and Path(path).stat().st_mtime_ns == mtime  # cached
    assert pydicom  # imported for the skip


def test_mmist_is_registered():
    assert "mmist" in registry().names("datasets")


# ----------------------------------------------------------------------------- end to end
@needs_tiff
@pytest.mark.slow
def test_extract_and_train_end_to_end(tmp_path):
    pytest.importorskip("tiffslide", reason="reading slides needs tiffslide")
    from test_wsi import TileStats, _Plugin  # the numpy tile encoder of the WSI tests

    from medmix_core.config import RunConfig
    from medmix_core.extract import extract
    from medmix_core.runner import run

    root = write_fixture(tmp_path / "cohort")
    experts = ["stats", "wsi"]
    options = {"wsi": {"tile_expert": "tilestats", "tile_size": 32, "max_tiles": 8}}
    tiny_ct = importlib.util.find_spec("transformers") is not None and HAS_NIB
    if tiny_ct:
        spec = importlib.util.spec_from_file_location(
            "medmix_tiny_models", Path(__file__).parent / "fixtures" / "tiny_models.py")
        tiny = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tiny)
        tiny.make_dinov2(tmp_path / "dinov2")
        experts.append("dinov2")
        options["dinov2"] = {"model_path": str(tmp_path / "dinov2"), "n_slices": 4}
    assert TileStats.name == "tilestats"
    with registered(_Plugin(), "tilestats-test"):
        store = extract("mmist", tmp_path / "store", experts, source=str(root),
                        expert_options=options, progress=False)
        assert {e.name for e in store.experts["clinical"]} == {"stats"}
        # slides are a kind of their own: image experts never open them whole
        assert {e.name for e in store.experts["wsi"]} == {"wsi"}
        assert {e.name: e.dim for e in store.experts["wsi"]}["wsi"] == 6
        if tiny_ct:
            assert {e.name for e in store.experts["ct"]} == {"dinov2"}
        cfg = RunConfig(dataset="mmist", source=str(root), store=str(tmp_path / "store"),
                        experts=experts, epochs=2, seeds=[0], d=8, batch_size=8, bootstrap=0,
                        out=str(tmp_path / "run"), progress=False, device="cpu")
        result = run(cfg, log=lambda *a, **k: None)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["seeds"] == [0] and metrics["n_test"] == 2
    assert result["test"]["auroc"]["mean"] == metrics["test"]["auroc"]["mean"]
