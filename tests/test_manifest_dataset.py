"""The ``manifest`` dataset: a user's cohort from a CSV table and a YAML/JSON spec."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from medmix_datasets.manifest import ManifestDataset, ManifestVolume

from medmix_core.errors import DataError
from medmix_core.types import ImageData, TabularData, TextData, TimeSeriesData, VolumeData

_spec = importlib.util.spec_from_file_location(
    "medmix_tiny_models", Path(__file__).parent / "fixtures" / "tiny_models.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

HEADER = ["patient_id", "frontal_path", "lateral_path", "ct_path", "note", "age", "creatinine",
          "lactate", "vitals_path", "died", "diagnosis", "split"]

SPEC = {
    "manifest": "cohort.csv",
    "id": "patient_id",
    "modalities": {
        "cxr": {"kind": "image", "columns": ["frontal_path", "lateral_path"]},
        "ct": {"kind": "volume", "column": "ct_path", "n_slices": 4, "hu_window": [-1000, 400]},
        "note": {"kind": "text", "column": "note"},
        "labs": {"kind": "tabular", "columns": ["age", "creatinine", "lactate"]},
        "vitals": {"kind": "timeseries", "column": "vitals_path"},
    },
    "tasks": [
        {"name": "mortality", "type": "binary", "column": "died"},
        {"name": "dx", "type": "multiclass", "column": "diagnosis", "classes": ["a", "b", "c"]},
    ],
    "splits": {"column": "split"},
}


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _phantom(depth: int = 12) -> np.ndarray:
    zz, yy, xx = np.mgrid[0:depth, 0:40, 40:80]
    vol = np.full(zz.shape, -1000.0, dtype=np.float32)
    vol[((yy - 20) / 16.0) ** 2 + ((xx - 60) / 15.0) ** 2 < 1] = 35.0
    return vol + zz * 2.0


def make_cohort(folder: Path, spec: dict | None = None) -> Path:
    """Real X-rays, a CT phantom, real ICU vital signs, clinical notes: 6 patients."""
    (folder / "img").mkdir(parents=True)
    (folder / "ts").mkdir()
    xr = tiny.cxr_paths()
    for p in xr:
        shutil.copy(p, folder / "img" / p.name)
    np.save(folder / "ct_p1.npy", _phantom())
    for k in range(3):  # vital signs of three real ICU stays (PhysioNet 2012, set A)
        stay = tiny.physionet_stay(k)
        lines = ["time,variable,value"]
        for var in ("HR", "RespRate", "Temp"):
            if var in stay:
                lines += [f"{t:.4f},{var},{v}" for t, v in zip(*stay[var])]
        (folder / "ts" / f"stay{k}.csv").write_text("\n".join(lines) + "\n")
    n = [f"img/{p.name}" for p in xr]
    notes = tiny.CLINICAL_TEXTS
    rows = [
        # id, frontal, lateral, ct, note, age, creat, lactate, vitals, died, dx, split
        ["p1", n[0], n[1], "ct_p1.npy", notes[0], "71", "1.4", "2.2", "ts/stay0.csv",
         "1", "a", "train"],
        ["p2", n[2], "", "", notes[1], "54", "", "NA", "ts/stay1.csv", "0", "b", "train"],
        ["p3", "img/absent.jpeg", n[0], "ct_gone.npy", "", "", "", "", "ts/stay2.csv",
         "0", "c", "val"],
        ["p4", "img/also_absent.jpeg", "", "", notes[3], "80", "2.1", "3.4", "ts/gone.csv",
         "", "a", "test"],
        ["p5", "", "", "", notes[2], "66", "0.9", "1.1", "", "1", "", "train"],
        ["p6", n[1], "", "ct_p1.npy", notes[0], "45", "1.0", "1.0", "ts/stay0.csv",
         "0", "b", "test"],
    ]
    _write_csv(folder / "cohort.csv", HEADER, rows)
    spec_path = folder / "cohort.yaml"
    spec_path.write_text(yaml.safe_dump(spec or SPEC, sort_keys=False))
    return spec_path


@pytest.fixture
def cohort(tmp_path):
    return make_cohort(tmp_path / "cohort")


def test_manifest_samples_masks_labels_and_missing_files(cohort):
    ds = ManifestDataset(source=str(cohort))
    mods = {m.name: m for m in ds.modalities()}
    assert [m.name for m in ds.modalities()] == ["cxr", "ct", "note", "labs", "vitals"]
    assert {k: m.kind for k, m in mods.items()} == {
        "cxr": "image", "ct": "volume", "note": "text", "labs": "tabular", "vitals": "timeseries"}
    assert mods["labs"].variables == ["age", "creatinine", "lactate"]
    assert mods["vitals"].variables == ["HR", "RespRate", "Temp"]

    samples = ds.samples()
    assert [s.id for s in samples] == ["p1", "p2", "p3", "p4", "p5", "p6"]
    present = {s.id: {m: s.modalities[m] is not None for m in mods} for s in samples}
    assert present == {
        "p1": dict(cxr=True, ct=True, note=True, labs=True, vitals=True),
        "p2": dict(cxr=True, ct=False, note=True, labs=True, vitals=True),
        "p3": dict(cxr=True, ct=False, note=False, labs=False, vitals=True),  # ct file absent
        "p4": dict(cxr=False, ct=False, note=True, labs=True, vitals=False),  # files absent
        "p5": dict(cxr=False, ct=False, note=True, labs=True, vitals=False),
        "p6": dict(cxr=True, ct=True, note=True, labs=True, vitals=True),
    }
    p1, p2, p3 = samples[0], samples[1], samples[2]
    assert isinstance(p1.modalities["cxr"], ImageData) and len(p1.modalities["cxr"].views) == 2
    assert all(Path(v).is_file() and Path(v).is_absolute() for v in p1.modalities["cxr"].views)
    assert len(p3.modalities["cxr"].views) == 1  # the absent frontal view is dropped
    ct = p1.modalities["ct"]
    assert isinstance(ct, VolumeData) and isinstance(ct, ManifestVolume)
    assert ct.n_slices == 4 and ct.hu_window == (-1000.0, 400.0) and ct.kind == "volume"
    assert isinstance(p1.modalities["note"], TextData)
    assert p1.modalities["note"].text == tiny.CLINICAL_TEXTS[0]
    labs = p2.modalities["labs"]
    assert isinstance(labs, TabularData)
    assert labs.values[0] == 54 and np.isnan(labs.values[1:]).all()  # empty and NA are NaN
    vit = p1.modalities["vitals"]
    assert isinstance(vit, TimeSeriesData) and vit.variables == ["HR", "RespRate", "Temp"]
    stay = tiny.physionet_stay(0)
    np.testing.assert_allclose(vit.values[0], stay["HR"][1])
    np.testing.assert_allclose(vit.times[0], stay["HR"][0], atol=1e-4)

    # labels: binary 0/1/NaN; multiclass index, NaN when empty
    tasks = ds.tasks()
    assert [(t.name, t.type, t.classes) for t in tasks] == [
        ("mortality", "binary", []), ("dx", "multiclass", ["a", "b", "c"])]
    mort = [s.labels["mortality"] for s in samples]
    assert mort[:3] == [1.0, 0.0, 0.0] and np.isnan(mort[3])
    dx = [s.labels["dx"] for s in samples]
    assert dx[:4] == [0.0, 1.0, 2.0, 0.0] and np.isnan(dx[4])
    assert ds.splits(samples) == {"train": [0, 1, 4], "val": [2], "test": [3, 5]}

    rep = ds.report()["modalities"]
    assert rep["cxr"]["missing_files"] == 2 and rep["cxr"]["empty"] == 1
    assert any(e.endswith("absent.jpeg") for e in rep["cxr"]["missing_file_examples"])
    assert rep["ct"]["missing_files"] == 1 and rep["ct"]["present"] == 2
    assert rep["vitals"]["missing_files"] == 1 and rep["vitals"]["empty"] == 1
    assert rep["labs"]["empty"] == 1 and rep["note"]["empty"] == 1
    assert rep["cxr"]["missing_rate"] == pytest.approx(2 / 6)


def test_manifest_registered_and_spec_option(cohort):
    from medmix_core.plugins import get_dataset

    assert get_dataset("manifest") is ManifestDataset
    via_dict = ManifestDataset(spec=SPEC, base_dir=str(cohort.parent))
    via_path = ManifestDataset(spec=str(cohort))
    assert [s.id for s in via_dict.samples()] == [s.id for s in via_path.samples()]
    assert via_dict.identity()["manifest_sha256"] == via_path.identity()["manifest_sha256"]
    json_spec = cohort.parent / "cohort.json"
    json_spec.write_text(json.dumps(SPEC))
    assert len(ManifestDataset(source=str(json_spec)).samples()) == 6
    with pytest.raises(DataError, match="needs a spec"):
        ManifestDataset()


def test_manifest_seeded_split_without_split_column(cohort):
    spec = {k: v for k, v in SPEC.items() if k != "splits"}
    a = ManifestDataset(spec=spec, base_dir=str(cohort.parent), split_seed=3)
    b = ManifestDataset(spec=spec, base_dir=str(cohort.parent), split_seed=3)
    sa = a.splits(a.samples())
    assert sa == b.splits(b.samples())
    assert sorted(sa["train"] + sa["val"] + sa["test"]) == list(range(6))


def _bad(cohort: Path, mutate) -> str:
    spec = json.loads(json.dumps(SPEC))
    mutate(spec)
    with pytest.raises(DataError) as info:
        ds = ManifestDataset(spec=spec, base_dir=str(cohort.parent))
        ds.samples()
    return str(info.value)


def test_manifest_bad_specs_raise_clear_errors(cohort):
    msg = _bad(cohort, lambda s: s["modalities"]["cxr"].update(kind="xray"))
    assert "modalities.cxr.kind" in msg and "unknown kind 'xray'" in msg
    msg = _bad(cohort, lambda s: s["modalities"]["note"].update(colum="note"))
    assert "modalities.note.colum" in msg and "unknown key" in msg
    msg = _bad(cohort, lambda s: s.update(extra=1))
    assert "extra: unknown key" in msg
    msg = _bad(cohort, lambda s: s["modalities"]["labs"].update(columns=["age", "creatinin"]))
    assert "'creatinin'" in msg and "did you mean 'creatinine'" in msg
    msg = _bad(cohort, lambda s: s["modalities"]["note"].update(n_slices=3))
    assert "apply to kind 'volume' only" in msg
    msg = _bad(cohort, lambda s: s["modalities"]["ct"].update(columns=["ct_path"]))
    assert "exactly one of 'column' or 'columns'" in msg
    msg = _bad(cohort, lambda s: s["tasks"][1].update(classes=["a", "b"]))
    assert "class 'c'" in msg and "p3" in msg
    msg = _bad(cohort, lambda s: s.update(manifest="nope.csv"))
    assert "nope.csv" in msg and "does not exist" in msg


def test_manifest_bad_table_content(tmp_path):
    spec_path = make_cohort(tmp_path / "c")
    table = spec_path.parent / "cohort.csv"
    lines = table.read_text().splitlines()
    table.write_text("\n".join(lines + [lines[1]]) + "\n")  # p1 again
    with pytest.raises(DataError, match=r"duplicate ids.*'p1' \(rows 2 and 8\)"):
        ManifestDataset(source=str(spec_path)).samples()

    table.write_text("\n".join(lines).replace(",1,a,train", ",maybe,a,train") + "\n")
    with pytest.raises(DataError, match="binary label"):
        ManifestDataset(source=str(spec_path)).samples()

    table.write_text("\n".join(lines).replace(",b,train", ",b,holdout") + "\n")
    with pytest.raises(DataError, match="'holdout'; expected train, val or test"):
        ManifestDataset(source=str(spec_path)).samples()

    table.write_text("\n".join(lines).replace(",71,", ",seventy,") + "\n")
    with pytest.raises(DataError, match="'seventy'; expected a number"):
        ManifestDataset(source=str(spec_path)).samples()

    table.write_text("\n".join(lines) + "\n")
    (spec_path.parent / "ts" / "stay1.csv").write_text("t,name,val\n1,HR,80\n")
    with pytest.raises(DataError, match="expected time,variable,value"):
        ManifestDataset(source=str(spec_path)).samples()


def test_manifest_parquet(tmp_path):
    spec_path = make_cohort(tmp_path / "c")
    spec = dict(SPEC, manifest="cohort.parquet")
    if importlib.util.find_spec("pyarrow") is None:
        (spec_path.parent / "cohort.parquet").write_bytes(b"PAR1")
        with pytest.raises(DataError, match="pip install pyarrow"):
            ManifestDataset(spec=spec, base_dir=str(spec_path.parent)).samples()
        return
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(spec_path.parent / "cohort.csv") as fh:
        rows = list(csv.DictReader(fh))
    cols = {h: [r[h] or None for r in rows] for h in HEADER}
    cols["age"] = [float(v) if v else None for v in cols["age"]]
    pq.write_table(pa.table(cols), spec_path.parent / "cohort.parquet")
    a = ManifestDataset(spec=spec, base_dir=str(spec_path.parent)).samples()
    b = ManifestDataset(source=str(spec_path)).samples()
    assert [s.id for s in a] == [s.id for s in b]
    assert [s.modalities["cxr"] is None for s in a] == [s.modalities["cxr"] is None for s in b]


def test_manifest_to_store_end_to_end(tmp_path, monkeypatch):
    """manifest -> extract(tiny BiomedCLIP-architecture image expert + stats) -> store."""
    from medmix_core.extract import extract
    from medmix_core.store import EmbeddingStore

    models = tmp_path / "models"
    tiny.make_biomedclip(models / "biomedclip")
    monkeypatch.setenv("MEDMIX_MODEL_DIR", str(models))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    spec_path = make_cohort(tmp_path / "c")
    store = extract("manifest", tmp_path / "store", experts=["biomedclip", "stats"],
                    source=str(spec_path), progress=False, shard_size=4)
    reopened = EmbeddingStore.open(store.path)
    assert reopened.n_samples == 6
    ds = ManifestDataset(source=str(spec_path))
    samples = ds.samples()
    by_mod = {m: {e.name: e for e in es} for m, es in reopened.experts.items()}
    assert set(by_mod["cxr"]) == {"biomedclip"} and set(by_mod["ct"]) == {"biomedclip"}
    assert set(by_mod["labs"]) == {"stats"} and set(by_mod["vitals"]) == {"stats"}
    assert by_mod["cxr"]["biomedclip"].dim == 16
    assert reopened.modality_missing_rates()["cxr"] == pytest.approx(2 / 6)
    rates = reopened.modality_missing_rates()
    for m in ("cxr", "ct", "labs", "vitals"):
        want = sum(s.modalities[m] is None for s in samples) / 6
        assert rates[m] == pytest.approx(want), m

    # the stored rows are the expert's embeddings of the present payloads; masks match
    from medmix_experts.foundation import BiomedCLIPExpert

    from medmix_core.types import ModalitySpec

    for m, kind in (("cxr", "image"), ("ct", "volume")):
        emb, mask = reopened.load(reopened.entry(m, "biomedclip"))
        present = [s.modalities[m] is not None for s in samples]
        assert mask.bool().tolist() == present
        rows = [i for i, p in enumerate(present) if p]
        direct = BiomedCLIPExpert().encode(ModalitySpec(m, kind),
                                           [samples[i].modalities[m] for i in rows])
        np.testing.assert_allclose(emb[rows].numpy(), direct, atol=1e-5)
        assert (emb[[i for i, p in enumerate(present) if not p]] == 0).all()


def test_manifest_text_from_files(tmp_path):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "r1.txt").write_text(tiny.CLINICAL_TEXTS[1])
    (tmp_path / "reports" / "r3.txt").write_text("  \n")
    _write_csv(tmp_path / "t.csv", ["id", "report", "y"],
               [["a", "reports/r1.txt", "1"], ["b", "reports/r2.txt", "0"],
                ["c", "reports/r3.txt", "0"], ["d", "", "1"]])
    spec = {"manifest": "t.csv", "id": "id",
            "modalities": {"report": {"kind": "text", "column": "report", "from_file": True}},
            "tasks": [{"name": "y", "type": "binary", "column": "y"}]}
    ds = ManifestDataset(spec=spec, base_dir=str(tmp_path))
    notes = [s.modalities["report"] for s in ds.samples()]
    assert notes[0].text == tiny.CLINICAL_TEXTS[1] and notes[1:] == [None, None, None]
    rep = ds.report()["modalities"]["report"]
    assert rep["missing_files"] == 1 and rep["empty"] == 2 and rep["present"] == 1
