"""The ``openi`` dataset: the official layouts (report tarball, extracted folder, the
torchxrayvision wheel), views from the metadata tables, MeSH-derived labels, the stratified
split, counted bad input, and an end-to-end extraction. The fixture reports are written
here in the published XML schema; the real collection is used only when present."""

from __future__ import annotations

import csv
import gzip
import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from medmix_datasets.openi import DEFAULT_FINDINGS, OpenI, finding_labels, iterative_split

from medmix_core.errors import DataError
from medmix_core.plugins import get_dataset

XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR{n}"/>
   <pmcId id="{n}"/>
   <docSource>CXR</docSource>
   <IUXRId id="{n}"/>
   <licenseType>open-access</licenseType>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
         <Abstract>
            <AbstractText Label="COMPARISON">{comparison}</AbstractText>
            <AbstractText Label="INDICATION">{indication}</AbstractText>
            <AbstractText Label="FINDINGS">{findings}</AbstractText>
            <AbstractText Label="IMPRESSION">{impression}</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>
{mesh}
   </MeSH>
{images}
</eCitation>
"""
IMAGE = """   <parentImage id="{iid}">
      <figureId>F1</figureId>
      <caption>Xray Chest PA and Lateral</caption>
      <panel type="single"><url>/hadoop/storage/radiology/extract/{iid}.jpg</url></panel>
   </parentImage>"""

# (major terms, automatic terms, impression) cycled over the fixture reports
CASES = [
    (["normal"], [], "Normal chest."),
    (["Cardiomegaly/mild"], ["Cardiomegaly"], "Mild cardiomegaly."),
    (["Pleural Effusion/left/small", "Thickening/pleura/left"], [], "Small left effusion."),
    (["Opacity/lung/base/right", "Pneumonia/lower lobe/right"], ["pneumonia"], "Pneumonia."),
    (["Thickening/bronchi"], ["atelectases"], "Bronchial wall thickening."),
    (["Pulmonary Atelectasis/base/left"], [], "Left basilar atelectasis."),
]
N_REPORTS = 36


def _report(n: int, images: list[str], case, findings: str | None = "Heart normal.") -> str:
    major, auto, impression = case
    mesh = "\n".join([f"      <major>{m}</major>" for m in major]
                     + [f"      <automatic>{a}</automatic>" for a in auto])
    return XML.format(n=n, comparison="None.", indication="Cough.",
                      findings=findings or "", impression=impression, mesh=mesh,
                      images="\n".join(IMAGE.format(iid=i) for i in images))


def _png(path: Path, seed: int) -> None:
    pil = pytest.importorskip("PIL.Image", reason="Pillow not installed")
    arr = np.random.default_rng(seed).integers(0, 255, size=(16, 12), dtype=np.uint8)
    pil.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A small copy of the distribution: reports tarball, metadata, t-SNE table, PNGs."""
    root = tmp_path_factory.mktemp("openi")
    xmls: dict[str, bytes] = {}
    meta_rows, tsne_rows = [], []
    for n in range(1, N_REPORTS + 1):
        frontal, lateral = f"CXR{n}_IM-{n:04d}-1001", f"CXR{n}_IM-{n:04d}-2001"
        images = [frontal] if n % 6 == 5 else [frontal, lateral]  # every 6th: no lateral
        if n == 7:
            images = []  # a report without images
        meta_rows.append((frontal, "PA" if n % 4 else ""))  # blank view: t-SNE table decides
        tsne_rows.append((frontal, "PA"))
        meta_rows.append((lateral, "LL"))
        findings = None if n == 10 else "Heart normal."
        xmls[f"ecgen-radiology/{n}.xml"] = _report(n, images, CASES[n % len(CASES)],
                                                   findings).encode()
    xmls["ecgen-radiology/900.xml"] = _report(900, [], (["No Indexing"], [], "x")).encode()
    xmls["ecgen-radiology/901.xml"] = b"<eCitation><uId id='CXR901'/><MeSH>"  # truncated
    tgz = root / "NLMCXR_reports.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        for name, data in xmls.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    meta = root / "nlmcxr_dicom_metadata.csv.gz"
    with gzip.open(meta, "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["imageid", "Accession Number", "View Position", "filename"])
        w.writerows([(i, "1", v, f"./{i[3:]}.dcm") for i, v in meta_rows])
    tsne = root / "nlmcxr_tsne_pa.csv.gz"
    with gzip.open(tsne, "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["imageid", "tsne-view"])
        w.writerows(tsne_rows)
    pngs = root / "png"
    pngs.mkdir()
    for k, (iid, _) in enumerate(meta_rows[:8]):
        _png(pngs / f"{iid}.png", k)
    (pngs / f"{meta_rows[8][0]}.png").write_bytes(b"not a png at all")  # unreadable image
    return {"root": root, "tgz": tgz, "meta": meta, "tsne": tsne, "pngs": pngs, "xmls": xmls}


def _wheel(collection, dest: Path) -> Path:
    whl = dest / "torchxrayvision-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("torchxrayvision/__init__.py", "")
        for key, name in (("tgz", "NLMCXR_reports.tgz"), ("meta", "nlmcxr_dicom_metadata.csv.gz"),
                          ("tsne", "nlmcxr_tsne_pa.csv.gz")):
            zf.write(collection[key], f"torchxrayvision/data/{name}")
    return whl


def test_the_plugin_is_registered_and_asks_for_its_source():
    assert get_dataset("openi") is OpenI
    with pytest.raises(DataError, match="--source") as err:
        OpenI()
    assert "pip download --no-deps torchxrayvision" in str(err.value)


def test_reads_the_report_tarball_with_labels_and_notes(collection):
    ds = OpenI(str(collection["tgz"]))
    samples = ds.samples()
    assert [s.id for s in samples][:3] == ["CXR1", "CXR2", "CXR3"]
    assert len(samples) == N_REPORTS + 1  # the truncated XML is left out and counted
    assert [t.classes for t in ds.tasks()] == [list(DEFAULT_FINDINGS)]
    by_id = {s.id: s for s in samples}
    lab = dict(zip(DEFAULT_FINDINGS, by_id["CXR6"].labels["findings"]))  # CASES[0]: normal
    assert lab["No Finding"] == 1.0 and sum(lab.values()) == 1.0
    lab = dict(zip(DEFAULT_FINDINGS, by_id["CXR2"].labels["findings"]))
    assert lab["Effusion"] == 1.0 and lab["Pleural_Thickening"] == 1.0
    assert lab["No Finding"] == 0.0 and lab["Cardiomegaly"] == 0.0
    lab = dict(zip(DEFAULT_FINDINGS, by_id["CXR4"].labels["findings"]))
    assert lab["Pleural_Thickening"] == 0.0  # bronchial, not pleural, thickening
    assert lab["Atelectasis"] == 0.0  # only an automatic term, not used by default
    assert np.isnan(by_id["CXR900"].labels["findings"]).all()  # "No Indexing": unknown
    note = by_id["CXR1"].modalities["note"].text
    assert note == "FINDINGS: Heart normal. IMPRESSION: Mild cardiomegaly."
    assert by_id["CXR10"].modalities["note"].text.startswith("IMPRESSION:")
    # no images given: both views are missing for every report, the note never is
    assert all(s.modalities["frontal"] is None and s.modalities["lateral"] is None
               for s in samples)
    rep = ds.report()
    assert rep["unreadable_reports"]["count"] == 1
    assert "901.xml" in rep["unreadable_reports"]["examples"][0]
    assert rep["reports_without_labels"] == {"count": 1, "examples": ["CXR900"]}
    assert rep["view_source"]["unknown"] == rep["images_linked"]  # no tables in a bare tgz
    assert rep["missing_rates"]["frontal"] == 1.0 and rep["missing_rates"]["note"] == 0.0
    assert rep["prevalence"]["Cardiomegaly"]["positive"] == 6


def test_automatic_terms_are_an_option(collection):
    ds = OpenI(str(collection["tgz"]), mesh="major+automatic")
    lab = dict(zip(DEFAULT_FINDINGS, {s.id: s for s in ds.samples()}["CXR4"]
                   .labels["findings"]))
    assert lab["Atelectasis"] == 1.0


def test_a_folder_with_metadata_and_pngs_gives_views_and_counts_bad_images(collection):
    ds = OpenI(str(collection["root"]))
    rep = ds.report()
    assert rep["sources"]["metadata"].endswith("nlmcxr_dicom_metadata.csv.gz")
    assert rep["sources"]["images"] == str(collection["root"])
    # blank metadata views (every 4th frontal) fall back to the t-SNE table
    blank = len([n for n in range(1, N_REPORTS + 1) if n % 4 == 0 and n != 7])
    assert rep["view_source"]["view_table"] == blank and rep["view_source"]["unknown"] == 0
    assert rep["view_source"]["metadata"] == rep["images_linked"] - blank
    assert rep["images_unreadable"]["count"] == 1
    by_id = {s.id: s for s in ds.samples()}
    s1 = by_id["CXR1"]
    assert [Path(p).name for p in s1.modalities["frontal"].views] == ["CXR1_IM-0001-1001.png"]
    assert [Path(p).name for p in s1.modalities["lateral"].views] == ["CXR1_IM-0001-2001.png"]
    assert by_id["CXR5"].modalities["lateral"] is None  # the report has no lateral image
    assert by_id["CXR5"].modalities["frontal"] is None  # its PNG is the unreadable one
    assert by_id["CXR7"].meta == {"n_images": 0}
    assert by_id["CXR30"].modalities["frontal"] is None  # no PNG for it in the folder
    assert rep["images_not_found"] > 0
    assert rep["view_missing_rates"]["lateral"] == pytest.approx(8 / (N_REPORTS + 1))


def test_the_wheel_is_read_as_a_zip_and_the_extracted_folder_matches(collection, tmp_path):
    whl = _wheel(collection, tmp_path)
    a = OpenI(str(whl))
    folder = tmp_path / "extracted"
    for name, data in collection["xmls"].items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    b = OpenI(str(folder), metadata=str(collection["meta"]))
    assert [s.id for s in a.samples()] == [s.id for s in b.samples()]
    for sa, sb in zip(a.samples(), b.samples()):
        np.testing.assert_array_equal(sa.labels["findings"], sb.labels["findings"])
    assert a.report()["sources"]["view_table"].endswith("nlmcxr_tsne_pa.csv.gz")
    assert a.report()["view_source"]["unknown"] == 0
    assert a.identity()["sha256"] == b.identity()["sha256"]


def test_images_from_a_png_tarball_are_extracted_to_the_cache(collection, tmp_path):
    tgz = tmp_path / "NLMCXR_png.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        for p in sorted(collection["pngs"].glob("*.png")):
            tf.add(p, arcname=p.name)
    cache = tmp_path / "cache"
    ds = OpenI(str(collection["tgz"]), images=str(tgz), metadata=str(collection["meta"]),
               image_cache=str(cache))
    views = ds.samples()[0].modalities["frontal"].views
    assert Path(views[0]).parent == cache and Path(views[0]).is_file()
    assert ds.report()["images_unreadable"]["count"] == 1


def test_bad_input_gets_clear_errors(collection, tmp_path):
    with pytest.raises(DataError, match="does not exist.*torchxrayvision"):
        OpenI(str(tmp_path / "absent.tgz")).samples()
    with pytest.raises(DataError, match="holds no report XML"):
        OpenI(str(tmp_path)).samples()
    (tmp_path / "bad.tgz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable tar archive"):
        OpenI(str(tmp_path / "bad.tgz")).samples()
    with pytest.raises(DataError, match="did you mean 'findings'"):
        OpenI(str(collection["tgz"]), finding=["Mass"])
    with pytest.raises(DataError, match="choose from"):
        OpenI(str(collection["tgz"]), findings=["Cardiomegaly", "Lung cancer"])
    with pytest.raises(DataError, match="note_fields"):
        OpenI(str(collection["tgz"]), note_fields=["history"])
    with pytest.raises(DataError, match="mesh must be"):
        OpenI(str(collection["tgz"]), mesh="all")
    with pytest.raises(DataError, match="metadata file"):
        OpenI(str(collection["tgz"]), metadata=str(tmp_path / "none.csv")).samples()
    bad_meta = tmp_path / "meta.csv"
    bad_meta.write_text("id,view\nCXR1_IM-0001-1001,PA\n")
    with pytest.raises(DataError, match="expected 'imageid'"):
        OpenI(str(collection["tgz"]), metadata=str(bad_meta)).samples()


def test_label_set_is_an_option_and_mapping_rules_hold():
    names = ["No Finding", "Granuloma", "Pleural_Thickening", "Support Devices"]
    assert finding_labels(["Calcified Granuloma/lung/hilum"], [], names, False) == [0, 1, 0, 0]
    assert finding_labels(["Thickening/pleura"], [], names, False) == [0, 0, 1, 0]
    assert finding_labels(["Catheters, Indwelling"], [], names, False) == [0, 0, 0, 1]
    assert finding_labels(["normal"], [], names, False) == [1, 0, 0, 0]
    assert np.isnan(finding_labels([], ["opacity"], names, True)).all()


def test_split_is_065_015_020_stratified_and_fixed(collection):
    rng = np.random.default_rng(3)
    y = (rng.random((400, 5)) < [0.3, 0.1, 0.05, 0.02, 0.5]).astype(float)
    folds = iterative_split(y, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(400))
    assert [len(f) for f in folds] == pytest.approx([260, 60, 80], abs=2)
    for f in folds:  # every label's share is close to the whole's in every fold
        assert np.abs(y[f].mean(axis=0) - y.mean(axis=0)).max() < 0.03
    again = iterative_split(y, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again))
    ds = OpenI(str(collection["tgz"]))
    sp = ds.splits(ds.samples())
    assert sp == OpenI(str(collection["tgz"])).splits(ds.samples())
    assert sorted(sp["train"] + sp["val"] + sp["test"]) == list(range(len(ds.samples())))


def test_extract_writes_a_store_with_the_note_and_absent_views(collection, tmp_path):
    from medmix_core.extract import extract
    from medmix_core.store import EmbeddingStore

    extract("openi", tmp_path / "store", ["tfidf"], [], source=str(collection["root"]),
            expert_options={"tfidf": {"dim": 8}}, progress=False)
    st = EmbeddingStore.open(tmp_path / "store")
    assert st.n_samples == N_REPORTS + 1
    assert st.entry("note", "tfidf").dim == 8
    rates = st.modality_missing_rates()
    assert rates["note"] == 0.0
    assert st.tasks[0].type == "multilabel" and len(st.tasks[0].classes) == 15


def _real_source() -> Path | None:
    given = os.environ.get("MEDMIX_OPENI_SOURCE")
    if given:
        return Path(given)
    hits = sorted(Path("/tmp/txrv").glob("torchxrayvision-*.whl")) if Path(
        "/tmp/txrv").is_dir() else []
    return hits[-1] if hits else None


@pytest.mark.slow
def test_the_real_collection_when_present():
    src = _real_source()
    if src is None or not src.exists():
        pytest.skip("the real OpenI reports are not on this machine: set MEDMIX_OPENI_SOURCE "
                    "to NLMCXR_reports.tgz or the torchxrayvision wheel (pip download "
                    "--no-deps torchxrayvision)")
    ds = OpenI(str(src))
    rep = ds.report()
    assert rep["n_reports"] == 3955 and rep["unreadable_reports"]["count"] == 0
    assert rep["reports_without_labels"]["count"] == 95
    assert rep["images_linked"] == 7470
    assert rep["prevalence"]["No Finding"]["positive"] == 1391
    assert rep["prevalence"]["Cardiomegaly"]["positive"] == 375
    sp = ds.splits(ds.samples())
    assert {k: len(v) for k, v in sp.items()} == {"train": 2571, "val": 593, "test": 791}
